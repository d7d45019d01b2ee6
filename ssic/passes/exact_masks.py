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
from onnx import TensorProto, helper

from ssic.passes.analysis import Grid, spatial_hw, static_shape
from ssic.passes.sparsify.rule import ALL, MaskGraph, mask_rule_for


def _is_nhwc(v: ir.Value) -> bool:
    """A graph input consumed only by ``Transpose(perm=[0, 3, 1, 2])`` (an NHWC export)."""
    users = [u for u, _ in v.uses()]
    return v.is_graph_input() and bool(users) and all(
        u.op_type == "Transpose" and list(u.attributes.get_ints("perm", [])) == [0, 3, 1, 2] for u in users)


def build_exact_mask_model(model: ir.Model, grids: list[Grid], mask_hw: tuple[int, int], opset: int = 18,
                           sources: dict[str, str] | None = None) -> onnx.ModelProto:
    """The mask graph of exact mode: one change mask per spatial input -> ``ssic.tiles.<HxW>`` per grid.

    ``model`` is the pre-processed model (static shapes), ``grids`` the sparse grids; ``sources`` maps
    a model input's name to its mask input's name (float32 ``[1, 1, H, W]`` at that input's own
    resolution, NHWC inputs included); without it the input at ``mask_hw`` is fed by ``ssic.mask``.
    ``opset`` is the default-domain opset of the mask graph.
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

    outputs = []
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
        mg.nodes.append(helper.make_node("Identity", [idx], [grid.tiles_input], name=mg.name("out")))
        outputs.append(helper.make_tensor_value_info(grid.tiles_input, TensorProto.INT64, [f"n_{grid.name}", 2]))

    g = helper.make_graph(mg.nodes, "ssic_exact_mask",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, *hw]) for n, hw in mask_inputs],
                          outputs, mg.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="ssic")
    m.ir_version = 10
    return m
