"""Exact-mode mask graph: the edit mask propagated through every layer's receptive field.

Each value of the model gets a *change mask*: which of its pixels can differ from the prime run.
The receptive field of each op is the ``propagate_mask`` of its rule in the sparsify rule registry
(:data:`ssic.passes.sparsify.rule.RULES`, the same table the sparse rewrite uses): convolutions and
pools grow the mask by their window, nearest resizes and pads move it, element-wise ops and
concatenations take the union; ops without a mask rule (normalisation statistics, attention,
reshapes) mark the whole value as changed. A grid's active tiles are the cells that touch the union
of the change masks of every value at that resolution, so no pixel read from a cache can have
changed: the sparse result equals the dense one up to float rounding whenever the model has no
global operation in its path. With GroupNorm or attention on the path the union is the whole image
and every tile is active (correct, but not sparse).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from ssic.passes.analysis import Grid, spatial_hw, static_shape
from ssic.passes.sparsify.rule import ALL, MaskGraph, mask_rule_for


def _is_nhwc(v: ir.Value) -> bool:
    """A graph input consumed only by ``Transpose(perm=[0, 3, 1, 2])`` (an NHWC export)."""
    users = [u for u, _ in v.uses()]
    return v.is_graph_input() and bool(users) and all(
        u.op_type == "Transpose" and list(u.attributes.get_ints("perm", [])) == [0, 3, 1, 2] for u in users)


def build_exact_mask_model(model: ir.Model, grids: list[Grid], mask_hw: tuple[int, int], opset: int = 18,
                           sources: dict[str, str] | None = None, radius: int | None = None) -> onnx.ModelProto:
    """The mask graph of exact mode: one change mask per spatial input -> ``ssic.tiles.<HxW>`` per grid.

    ``model`` is the pre-processed model (static shapes), ``grids`` the sparse grids; ``sources`` maps
    a model input's name to its mask input's name (float32 ``[1, 1, H, W]`` at that input's own
    resolution, NHWC inputs included); without it the input at ``mask_hw`` is fed by ``ssic.mask``.
    ``opset`` is the default-domain opset of the mask graph. ``radius`` (bounded exact mode) limits
    each grid's tiles to the edit grown by ``radius`` pixels of ``mask_hw`` (see :func:`_bounded`).
    """
    mg = MaskGraph()
    masks = mg.masks
    graph = model.graph
    mask_inputs: list[tuple[str, tuple[int, int]]] = []
    nhwc_inputs = set()
    for v in graph.inputs:
        hw = spatial_hw(v)
        if sources is not None:
            if v.name in sources:
                if _is_nhwc(v):
                    shape = static_shape(v)
                    hw = (shape[1], shape[2])
                    nhwc_inputs.add(v)
                masks[v] = sources[v.name]
                mask_inputs.append((sources[v.name], hw))
            elif hw is not None:
                masks[v] = ALL
        elif hw == mask_hw:
            masks[v] = "ssic.mask"
            mask_inputs.append(("ssic.mask", hw))
        elif hw is not None:
            masks[v] = ALL
        # non-image inputs (timestep, class label) must equal the primed values: the runtime checks
    for name, hw in mask_inputs:
        mg.add_input(name, [1, 1, *hw])
    for node in graph:
        changed = [mg.of(v) for v in node.inputs if mg.of(v) is not None]
        if not changed:
            continue
        if ALL in changed:
            result = ALL
        elif node.op_type == "Transpose" and node.inputs[0] in nhwc_inputs:
            result = masks[node.inputs[0]]  # an NHWC input's change mask is already [1, 1, H, W]
        else:
            rule = mask_rule_for(node)
            result = ALL if rule is None else rule.propagate_mask(node, mg)
        for o in node.outputs:
            masks[o] = result

    near_edit = None
    for grid in grids:
        parts = []
        everything = False
        for v, m in masks.items():
            if spatial_hw(v) != (grid.height, grid.width):
                continue
            if m == ALL:
                everything = True
                break
            parts.append(m)
        if everything or not parts:
            base = mg.const(np.ones((1, 1, grid.height, grid.width), np.float32)) if everything else \
                mg.const(np.zeros((1, 1, grid.height, grid.width), np.float32))
            if everything and mask_inputs:
                # keep a data dependency on the mask so the graph is uniform
                base = mg.op("Max", [base, mg.op("Mul", [mg.op("ReduceMax", [mask_inputs[0][0]], keepdims=1),
                                                         mg.const(np.zeros((1, 1, 1, 1), np.float32))])])
            merged = base
        else:
            merged = parts[0] if len(parts) == 1 else mg.op("Max", sorted(set(parts)))
        t = grid.tile
        pooled = mg.op("MaxPool", [merged], kernel_shape=[t, t], strides=[t, t], ceil_mode=1)
        active = mg.op("Greater", [pooled, mg.const(np.array(0.0, np.float32))])
        nz = mg.op("NonZero", [mg.op("Squeeze", [active, mg.const(np.array([0, 1], np.int64))])])
        idx = mg.op("Mul", [mg.op("Transpose", [nz], perm=[1, 0]), mg.const(np.array(t, np.int64))])
        if radius is not None and mask_inputs:
            if near_edit is None:
                # the edit grown by the budget once, at the mask's resolution (every grid resizes it):
                # 32 px on Real-ESRGAN's 128x128 input, not 128 px on each of its 512x512 grids
                edit = mg.union([mg.resize_any(n, hw, mask_hw) for n, hw in mask_inputs])
                near_edit = mg.dilate(edit, radius, slack=True)
            idx = _bounded(mg, idx, grid, near_edit, mask_hw)
        mg.op("Identity", [idx], output=grid.tiles_input)
    return mg.model([(grid.tiles_input, [f"n_{grid.name}", 2]) for grid in grids])


def _bounded(mg: MaskGraph, idx: str, grid: Grid, near_edit: str, mask_hw: tuple[int, int]) -> str:
    """Bounded exact mode: keep only the tiles of ``idx`` that touch ``near_edit`` (the union of the
    source masks at ``mask_hw``, grown by at least the radius budget), resized conservatively to the grid (no set
    pixel is lost: a nearest upsample of the grown edit covers the edit grown by the scaled radius).
    Every value within that distance of the edit whose inputs can have changed is recomputed; beyond it
    the cache is read, so the error comes only from what the network carries further than the budget
    (measured by ``ssic compile --calibrate``)."""
    H, W, t = grid.height, grid.width, grid.tile
    gh, gw = grid.cells
    near = mg.resize_any(near_edit, mask_hw, (H, W))
    budget = mg.op("MaxPool", [near], kernel_shape=[t, t], strides=[t, t], ceil_mode=1)
    budget = mg.op("Reshape", [budget, mg.const(np.array([gh, gw], np.int64))])
    cells = mg.op("Div", [idx, mg.const(np.array(t, np.int64))])
    n = mg.op("Slice", [mg.op("Shape", [idx]), mg.const(np.array([0], np.int64)), mg.const(np.array([1], np.int64))])
    ones = mg.op("Expand", [mg.const(np.array([1.0], np.float32)), n])
    active = mg.op("ScatterND", [mg.const(np.zeros((gh, gw), np.float32)), cells, ones])
    both = mg.op("Greater", [mg.op("Mul", [active, budget]), mg.const(np.array(0.0, np.float32))])
    nz = mg.op("Transpose", [mg.op("NonZero", [both])], perm=[1, 0])
    return mg.op("Mul", [nz, mg.const(np.array(t, np.int64))])
