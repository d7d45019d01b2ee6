"""Graph analysis shared by the passes: spatial shapes, resolutions, sparse grids and conv decisions.

Nothing here changes the graph. The decisions it makes (which resolutions are sparse, each grid's
tile size, why a conv stays dense) are recorded in the artefact's manifest and shown by
``ssic inspect``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from ssic.errors import SSICError


@dataclass(frozen=True)
class Grid:
    """The tile grid of one sparse resolution: cells of ``tile x tile`` pixels starting at 0."""

    height: int
    width: int
    tile: int
    halo: int = 1  # a cell is active when the mask touches it grown by this many pixels

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def tiles_input(self) -> str:
        """Name of the sparse graph's int64 ``[n, 2]`` input of active tile corners."""
        return f"ssic.tiles.{self.name}"

    @property
    def cells(self) -> tuple[int, int]:
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    @property
    def num_cells(self) -> int:
        gy, gx = self.cells
        return gy * gx


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The value's shape as ints, or None when unknown or symbolic."""
    shape = value.shape
    if shape is None:
        return None
    dims = []
    for d in shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def spatial_hw(value: ir.Value) -> tuple[int, int] | None:
    """``(H, W)`` of a ``[1, C, H, W]`` value, else None."""
    shape = static_shape(value)
    if shape is None or len(shape) != 4 or shape[0] != 1:
        return None
    return shape[2], shape[3]


def check_static_batch1(model: ir.Model) -> None:
    """Raise SSICError unless every graph input has a static shape with batch 1."""
    for value in model.graph.inputs:
        shape = static_shape(value)
        if shape is None:
            raise SSICError(
                f"input '{value.name}' has a dynamic or unknown shape {value.shape}; "
                "ssic compiles static shapes only (export with fixed sizes)"
            )
        if len(shape) >= 3 and shape[0] != 1:
            raise SSICError(
                f"input '{value.name}' has batch {shape[0]} (shape {list(shape)}); "
                "ssic compiles batch 1 (one image being edited)"
            )
        if len(shape) == 4 and (shape[2] == 0 or shape[3] == 0):
            raise SSICError(f"input '{value.name}' has an empty image (shape {list(shape)})")


def default_tile(height: int, width: int) -> int:
    """Tile size for a resolution when the user gives none.

    The conv after a gather is one MatMul over all active pixels, so its speed does not depend on the
    tile size; smaller tiles only waste less area. 2 was fastest end to end on GauGAN (1 costs more in
    gather bookkeeping than it saves), see BENCHMARKS.md.
    """
    return 2


@dataclass
class ConvDecision:
    """Why a conv runs sparse or dense: one row of ``ssic inspect``."""

    node: str
    kind: str  # "3x3", "1x1", "3x3/s2", ...
    out_hw: tuple[int, int] | None
    channels: tuple[int, int]
    sparse: bool
    reason: str
    macs_dense: int = 0
    macs_per_tile: int = 0
    grid: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SparsePlan:
    """Which resolutions are sparse, with their grids."""

    grids: dict[tuple[int, int], Grid] = field(default_factory=dict)
    min_res: int = 0

    def grid_for(self, hw: tuple[int, int] | None) -> Grid | None:
        if hw is None:
            return None
        return self.grids.get(hw)


def conv_kind(node: ir.Node) -> str:
    w = node.inputs[1]
    shape = static_shape(w) if w is not None else None
    k = f"{shape[2]}x{shape[3]}" if shape and len(shape) == 4 else "?"
    strides = node.attributes.get_ints("strides", [1, 1])
    if any(s != 1 for s in strides):
        k += "/s" + "x".join(str(s) for s in strides) if len(set(strides)) > 1 else f"/s{strides[0]}"
    return k


def plan_sparse_resolutions(
    model: ir.Model,
    *,
    min_res: int | None,
    tiles: dict[str, int] | None = None,
    default_tile_size: int | None = None,
    halos: dict[str, int] | None = None,
    default_halo: int = 1,
) -> SparsePlan:
    """Choose the sparse resolutions: every Conv/ConvTranspose output resolution with ``min(H, W) >= min_res``.

    ``tiles`` maps ``"HxW"`` to a tile size; unlisted resolutions get ``default_tile_size`` or
    :func:`default_tile`.
    """
    conv_res: set[tuple[int, int]] = set()
    largest = 0
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose") and node.domain == "":
            hw = spatial_hw(node.outputs[0])
            if hw is not None:
                conv_res.add(hw)
                largest = max(largest, min(hw))
    if not conv_res:
        raise SSICError("the model has no 2-D convolution with a static [1, C, H, W] output; nothing to sparsify")
    if min_res is None:
        min_res = max(1, largest // 4)
    plan = SparsePlan(min_res=min_res)
    tiles = tiles or {}
    for hw in sorted(conv_res, key=lambda r: (-r[0] * r[1], r)):
        if min(hw) < min_res:
            continue
        key = f"{hw[0]}x{hw[1]}"
        t = tiles.get(key)
        if t is None:
            t = default_tile_size if default_tile_size is not None else default_tile(*hw)
        if t < 1:
            raise SSICError(f"tile size for {key} must be >= 1, got {t}")
        halo = (halos or {}).get(key, default_halo)
        if halo < 0:
            raise SSICError(f"halo for {key} must be >= 0, got {halo}")
        plan.grids[hw] = Grid(hw[0], hw[1], int(t), int(halo))
    return plan


def conv_macs(node: ir.Node) -> int:
    """Dense multiply-accumulates of a Conv node from its static shapes (0 when unknown)."""
    out = static_shape(node.outputs[0])
    w = static_shape(node.inputs[1]) if node.inputs[1] is not None else None
    if out is None or w is None:
        return 0
    n = 1
    for d in out:
        n *= d
    return n * math.prod(w[1:])
