"""How a model value is represented in the sparse graph (the *tile-value* types of the rewrite).

Every value the rewrite has seen has exactly one representation:

- :class:`DenseValue`: the value itself, computed as in the model (graph inputs, low-resolution
  layers, anything an op rule refused);
- :class:`TileValue`: a ``[n*t*t, C]`` tile tensor on a grid (``docs/architecture.md``), plus a
  pending per-channel epilogue ``act(x*scale + shift)`` that the next gather fuses;
- :class:`LazyResample`: a nearest upsample or a (zero, reflect or edge) pad of a dense or tile value,
  folded into the next gather's index arithmetic instead of being computed.

The methods say what each kind can do (become tiles on a grid, be gathered from, take a per-channel
map); the graph-building work is done by :class:`ssic.passes.sparsify.context.SparsifyContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import onnx_ir as ir

from ssic.ops import ACT_IDENTITY, PAD_ZEROS
from ssic.passes.analysis import Grid, spatial_hw, static_shape

if TYPE_CHECKING:
    from collections.abc import Callable

    from ssic.passes.sparsify.context import SparsifyContext


class Rep:
    """Base class of the representations. ``sparse`` is False only for :class:`DenseValue`."""

    sparse = True

    def tileable_on(self, grid: Grid) -> bool:
        """Whether :meth:`to_tiles` can give a tile tensor of this value on ``grid``."""
        raise NotImplementedError

    def to_tiles(self, ctx: SparsifyContext, grid: Grid, channels: int) -> ir.Value:
        """The evaluated ``[n*t*t, C]`` tile tensor on ``grid`` (requires :meth:`tileable_on`)."""
        raise NotImplementedError

    def gather_source(self, ctx: SparsifyContext, value: ir.Value) -> Rep:
        """A representation of ``value`` a gather can read from (computed tiles get a cache base)."""
        return self

    def channel_map_refusal(self) -> str | None:
        """Why a per-channel map (affine or activation) cannot be folded into this value, or None."""
        return "the input is not a tile value"

    def map_channels(self, ctx: SparsifyContext, fn: Callable[[TileValue], TileValue]) -> Rep:
        """This value followed by the per-channel map ``fn`` (requires ``channel_map_refusal() is None``)."""
        raise NotImplementedError

    def materialize(self, ctx: SparsifyContext, value: ir.Value) -> ir.Value | None:
        """A full tensor of ``value`` built by this representation itself (e.g. its rows scattered into
        its cache), or None: the sparse graph then re-emits ``value``'s producer on materialised inputs."""
        return None


@dataclass(frozen=True, eq=False)
class DenseValue(Rep):
    """A value computed in full in the sparse graph."""

    value: ir.Value
    sparse = False

    def tileable_on(self, grid: Grid) -> bool:
        return spatial_hw(self.value) == (grid.height, grid.width)

    def to_tiles(self, ctx: SparsifyContext, grid: Grid, channels: int) -> ir.Value:
        return ctx.gather(self, grid, kernel=1, stride=1, pads=(0, 0), upsample=1, channels=channels,
                          hint="dense_tiles")


@dataclass(frozen=True, eq=False)
class TileValue(Rep):
    """``act(tiles*scale + shift)`` on ``grid``; pixels no tile covers are read from ``base``'s cache.

    ``base`` is None for computed tiles (results of element-wise ops) until a gather needs a cache,
    see :meth:`gather_source`. ``dense_source`` set means the tiles are a per-channel map of that
    dense value: a gather reads it directly (``tiles`` is then None when only a gather will read it).
    ``parts`` set means the value is a channel concat of those :class:`ConcatPart`: a conv reads each
    part from its own cache (``ConvRule``) so the concat itself needs no cache.
    """

    grid: Grid | None
    tiles: ir.Value | None  # [M, C]
    base: ir.Value | None
    channels: int
    scale: ir.Value | None = None
    shift: ir.Value | None = None
    act: int = ACT_IDENTITY
    alpha: float = 0.0
    dense_source: ir.Value | None = None
    parts: tuple[ConcatPart, ...] = ()

    @property
    def has_epilogue(self) -> bool:
        return self.scale is not None or self.shift is not None or self.act != ACT_IDENTITY

    def tileable_on(self, grid: Grid) -> bool:
        return self.grid == grid

    def to_tiles(self, ctx: SparsifyContext, grid: Grid, channels: int) -> ir.Value:
        return ctx.evaluate(self)

    def gather_source(self, ctx: SparsifyContext, value: ir.Value) -> Rep:
        if self.base is None and self.dense_source is None:
            return ctx.cacheable(value, self)
        return self

    def channel_map_refusal(self) -> str | None:
        if self.act != ACT_IDENTITY and self.tiles is None:
            return "an activation of an upsampled dense value cannot take a second per-channel map"
        return None

    def map_channels(self, ctx: SparsifyContext, fn: Callable[[TileValue], TileValue]) -> Rep:
        return fn(self)

    def with_epilogue(self, **changes) -> TileValue:
        return replace(self, parts=(), **changes)  # a map of the concat is no longer its parts


@dataclass(frozen=True, eq=False)
class ConcatPart:
    """One operand of a channel concat: its representation, the model value and its channel count."""

    rep: Rep
    value: ir.Value
    channels: int


@dataclass(frozen=True, eq=False)
class LazyResample(Rep):
    """``value = pad(upsample(source))`` (nearest; pad mode ``ssic.ops.PAD_*``): index arithmetic for the next gather."""

    source: DenseValue | TileValue
    source_value: ir.Value  # the model value ``source`` represents
    upsample: int = 1
    pad_top: int = 0
    pad_left: int = 0
    pad_mode: int = PAD_ZEROS

    @property
    def padded(self) -> bool:
        return bool(self.pad_top or self.pad_left)

    def tileable_on(self, grid: Grid) -> bool:
        return not self.padded

    def to_tiles(self, ctx: SparsifyContext, grid: Grid, channels: int) -> ir.Value:
        return ctx.gather(self.source.gather_source(ctx, self.source_value), grid, kernel=1, stride=1, pads=(0, 0),
                          upsample=self.upsample, channels=channels, hint="upsample_tiles")

    def _pseudo_source(self) -> TileValue | None:
        if isinstance(self.source, TileValue):
            return self.source
        shape = static_shape(self.source.value)
        if shape is None or len(shape) != 4:
            return None
        return TileValue(None, None, None, shape[1], dense_source=self.source.value)

    def channel_map_refusal(self) -> str | None:
        if self.padded:
            return "a per-channel map after a zero pad is not folded"
        src = self._pseudo_source()
        if src is None:
            return "the upsampled value is not a static [1, C, H, W] tensor"
        return src.channel_map_refusal()

    def map_channels(self, ctx: SparsifyContext, fn: Callable[[TileValue], TileValue]) -> Rep:
        """Per-channel maps commute with nearest upsampling: ``f(upsample(x)) = upsample(f(x))``."""
        src = self._pseudo_source()
        if src.dense_source is None:
            src = src.gather_source(ctx, self.source_value)
        return LazyResample(fn(src), self.source_value, upsample=self.upsample)


@dataclass(frozen=True, eq=False)
class LazyShuffle(Rep):
    """``value = DepthToSpace(source, block)``: the next conv's gather reads the source upsampled by the
    block and keeps, per output phase, the channel block that lands on each pixel (no full tensor)."""

    source: DenseValue | TileValue
    source_value: ir.Value
    block: int
    crd: bool  # DepthToSpace mode CRD (PixelShuffle); DCR otherwise

    def tileable_on(self, grid: Grid) -> bool:
        return False

    def channel_map_refusal(self) -> str | None:
        return "a per-channel map after DepthToSpace is not folded"

    def source_channel(self, i: int, j: int, c: int, channels: int) -> int:
        """Source channel of output channel ``c`` at sub-pixel ``(i, j)`` of a block."""
        r = self.block
        return c * r * r + i * r + j if self.crd else (i * r + j) * channels + c
