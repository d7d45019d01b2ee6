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
                "ssic compiles batch 1 (one image being edited); for classifier-free guidance export batch 1 "
                "and keep two cache states per step, (step, 'uncond') and (step, 'cond'): ssic edit --negative-embedding, "
                "or ssic.latent.GuidedUNet"
            )
        if len(shape) == 4 and (shape[2] == 0 or shape[3] == 0):
            raise SSICError(f"input '{value.name}' has an empty image (shape {list(shape)})")


#: Tile size of every grid unless set. The conv after a gather is one MatMul over all active pixels,
#: so its speed does not depend on the tile size; smaller tiles only waste less area. 2 was fastest
#: end to end on GauGAN (1 costs more in gather bookkeeping than it saves), see BENCHMARKS.md.
DEFAULT_TILE = 2


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
    default_halo: int | None = 1,
) -> SparsePlan:
    """Choose the sparse resolutions: every Conv/ConvTranspose output resolution with ``min(H, W) >= min_res``.

    ``min_res=None`` derives it from the graph (:func:`default_min_res`). ``tiles`` maps ``"HxW"`` to
    a tile size; unlisted resolutions get ``default_tile_size`` or :data:`DEFAULT_TILE`. ``halos``
    maps ``"HxW"`` to a halo; unlisted resolutions get ``default_halo``, or with ``None`` the
    receptive-field radius of the grid's longest conv chain (:func:`chain_halos`).
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
        min_res = default_min_res(model, conv_res)
    plan = SparsePlan(min_res=min_res)
    graph_halos = chain_halos(model) if default_halo is None else {}
    tiles = tiles or {}
    for hw in sorted(conv_res, key=lambda r: (-r[0] * r[1], r)):
        if min(hw) < min_res:
            continue
        key = f"{hw[0]}x{hw[1]}"
        t = tiles.get(key)
        if t is None:
            t = default_tile_size if default_tile_size is not None else DEFAULT_TILE
        if t < 1:
            raise SSICError(f"tile size for {key} must be >= 1, got {t}")
        halo = (halos or {}).get(key, default_halo if default_halo is not None else graph_halos.get(hw, 1))
        if halo < 0:
            raise SSICError(f"halo for {key} must be >= 0, got {halo}")
        plan.grids[hw] = Grid(hw[0], hw[1], int(t), int(halo))
    return plan


#: Smallest side of a resolution that is made sparse by default: below it a grid of 2x2 tiles has
#: too few cells for an edit to leave many untouched (SIGE keeps such levels dense too).
MIN_SPARSE_SIDE = 16
#: Cap of the graph-derived halo: the receptive field of a long chain (a UNet level with many
#: ResBlocks) would make every edit cover the image; beyond this the error stays bounded by the
#: pyramid and is reported by ``ssic bench`` (see docs/architecture.md, "Tile size and halo").
MAX_GRAPH_HALO = 4
#: Ops that mix every position of a level into every other (attention over pixels): SIGE keeps such
#: levels dense. Global pooling (channel attention, squeeze-excitation) only yields a per-channel
#: vector, which the sparse graph computes from the materialised tensor, so it does not count.
_GLOBAL_OPS = {"Softmax", "Attention", "MultiHeadAttention"}


def _spatial_producers(value: ir.Value, limit: int = 64) -> set[tuple[int, int]]:
    """Resolutions of the nearest ``[1, C, H, W]`` values upstream of ``value`` (through reshapes)."""
    out: set[tuple[int, int]] = set()
    seen: set[int] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        hw = spatial_hw(v)
        if hw is not None and min(hw) > 1:
            out.add(hw)
            continue
        node = v.producer()
        if node is not None:
            stack.extend(i for i in node.inputs if i is not None and ir.convenience.get_const_tensor(i) is None)
    return out


def global_resolutions(model: ir.Model) -> set[tuple[int, int]]:
    """Resolutions at which a global operation mixes every pixel (attention's softmax over positions,
    global pooling, spatial mean): sparse tiles there would read a stale global value."""
    out: set[tuple[int, int]] = set()
    for node in model.graph:
        op = node.op_type
        if op in _GLOBAL_OPS:
            for v in node.inputs:
                if v is not None:
                    out |= {hw for hw in _spatial_producers(v) if not _pixel_row_softmax(node, hw)}
    return out


def _pixel_row_softmax(node: ir.Node, hw: tuple[int, int]) -> bool:
    """A Softmax with one row per pixel of ``hw`` (attention over pixels or text tokens, queries from
    the feature map): the token rules (``ssic/passes/sparsify/attention.py``) compute it for the active
    rows only, so it does not keep its level dense. Channel attention (a softmax over channels) does."""
    if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
        return False
    shape = static_shape(node.inputs[0])
    if shape is None or not shape:
        return False
    axis = node.attributes.get_int("axis", -1)
    axis = axis + len(shape) if axis < 0 else axis
    return any(d == hw[0] * hw[1] for i, d in enumerate(shape) if i != axis)


def default_min_res(model: ir.Model, conv_res: set[tuple[int, int]]) -> int:
    """The sparse resolutions a graph supports: from the largest conv resolution down, every level
    with ``min(H, W) >= MIN_SPARSE_SIDE`` until the first one with attention over pixels (a UNet's
    attention levels stay dense, as in SIGE). When attention sits at the largest level already, every
    level of at least ``MIN_SPARSE_SIDE`` is made sparse (attention there runs dense on the
    materialised tensor). Returns the smallest ``min(H, W)`` to make sparse."""
    globals_ = global_resolutions(model)
    levels = sorted(conv_res, key=lambda r: -min(r))
    chosen = None
    for hw in levels:
        if min(hw) < MIN_SPARSE_SIDE or hw in globals_:
            break
        chosen = min(hw)
    if chosen is None:
        big = [min(hw) for hw in levels if min(hw) >= MIN_SPARSE_SIDE]
        chosen = min(big) if big else min(levels[0])
    return chosen


def chain_halos(model: ir.Model) -> dict[tuple[int, int], int]:
    """Per resolution, the receptive-field radius of its longest chain of stride-1 convs (in pixels of
    that resolution), capped at :data:`MAX_GRAPH_HALO`: growing a grid's active region by this much
    recomputes every value inside the edit that the grid's own convs can reach."""
    radius: dict[ir.Value, int] = {}
    best: dict[tuple[int, int], int] = {}
    for node in model.graph:
        outs = [o for o in node.outputs if spatial_hw(o) is not None]
        if not outs:
            continue
        hw = spatial_hw(outs[0])
        same = [radius.get(v, 0) for v in node.inputs if v is not None and spatial_hw(v) == hw]
        r = max(same, default=0)
        if node.domain == "" and node.op_type == "Pad" and node.inputs[0] is not None:
            # an explicit (reflect/edge/zero) pad before a valid conv: the chain goes on through it
            r = radius.get(node.inputs[0], 0)
        if node.op_type == "Conv" and node.domain == "" and node.inputs[0] is not None \
                and set(node.attributes.get_ints("strides", [1, 1])) == {1} \
                and (spatial_hw(node.inputs[0]) == hw or _is_pad(node.inputs[0])):
            r = radius.get(node.inputs[0], 0)
            w = static_shape(node.inputs[1]) if node.inputs[1] is not None else None
            if w is not None and len(w) == 4:
                dil = node.attributes.get_ints("dilations", [1, 1])
                r += max((w[2] - 1) // 2 * dil[0], (w[3] - 1) // 2 * dil[1])
        for o in outs:
            radius[o] = r
        best[hw] = max(best.get(hw, 0), r)
    return {hw: max(1, min(r, MAX_GRAPH_HALO)) for hw, r in best.items()}


def _is_pad(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.domain == "" and producer.op_type == "Pad"


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
