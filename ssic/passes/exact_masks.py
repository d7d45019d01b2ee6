"""Exact-mode mask graph: the edit mask propagated through every layer's receptive field.

Each value of the model gets a *change mask*: which of its pixels can differ from the prime run.
Convolutions and pools grow it by their window (a MaxPool of the same geometry), nearest resizes and
pads move it, element-wise ops and concatenations take the union, and global ops (normalisation
statistics, attention, reshapes) mark the whole value as changed. A grid's active tiles are the cells
that touch the union of the change masks of every value at that resolution, so no pixel read from a
cache can have changed: the sparse result equals the dense one up to float rounding whenever the
model has no global operation in its path. With GroupNorm or attention on the path the union is the
whole image and every tile is active (correct, but not sparse).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from ssic.passes.analysis import Grid, spatial_hw, static_shape

ALL = "ALL"

POINTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu",
    "HardSigmoid", "HardSwish", "Softplus", "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu",
    "Identity", "Reciprocal", "Mish", "Cast", "Dropout", "BatchNormalization", "Concat", "Where", "PRelu",
}
WINDOWED = {"Conv", "MaxPool", "AveragePool"}


def _is_nhwc(v: ir.Value) -> bool:
    """A graph input consumed only by ``Transpose(perm=[0, 3, 1, 2])`` (an NHWC export)."""
    users = [u for u, _ in v.uses()]
    return v.is_graph_input() and bool(users) and all(
        u.op_type == "Transpose" and list(u.attributes.get_ints("perm", [])) == [0, 3, 1, 2] for u in users)


def build_exact_mask_model(model: ir.Model, grids: list[Grid], mask_hw: tuple[int, int], opset: int = 18,
                           sources: dict[str, str] | None = None) -> onnx.ModelProto:
    """The mask graph of exact mode: one change mask per spatial input -> ``ssic.tiles.<HxW>`` per grid.

    ``sources`` maps a model input's name to its mask input's name (float32 ``[1, 1, H, W]`` at that
    input's own resolution); without it, the input at ``mask_hw`` is fed by ``ssic.mask``.
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = [0]

    def name(hint: str) -> str:
        counter[0] += 1
        return f"{hint}_{counter[0]}"

    def const(array: np.ndarray) -> str:
        n = name("c")
        inits.append(onnx.numpy_helper.from_array(array, n))
        return n

    def op(op_type: str, inputs: list[str], **attrs) -> str:
        out = name(op_type)
        nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    masks: dict[ir.Value, object] = {}
    graph = model.graph
    mask_inputs: list[tuple[str, tuple[int, int]]] = []
    for v in graph.inputs:
        hw = spatial_hw(v)
        if sources is not None:
            if v.name in sources:
                shape = static_shape(v)
                nhwc = _is_nhwc(v)
                hw = (shape[1], shape[2]) if nhwc else hw
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
        in_masks = [masks.get(v) for v in node.inputs if v is not None]
        changed = [m for m in in_masks if m is not None]
        if not changed:
            continue
        out_hw = [spatial_hw(o) for o in node.outputs]
        result: object
        if ALL in changed:
            result = ALL
        elif node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [])) == [0, 3, 1, 2] \
                and node.inputs[0] in masks and _is_nhwc(node.inputs[0]):
            result = masks[node.inputs[0]]  # an NHWC input's change mask is already [1, 1, H, W]
        elif node.op_type in WINDOWED and node.domain == "" and spatial_hw(node.inputs[0]) is not None:
            m = masks.get(node.inputs[0])
            if node.op_type == "Conv":
                wshape = static_shape(node.inputs[1])
                kernel = list(wshape[2:]) if wshape else None
            else:
                kernel = list(node.attributes.get_ints("kernel_shape", []))
            dil = list(node.attributes.get_ints("dilations", [1, 1]))
            if m is None or kernel is None or len(kernel) != 2 or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
                result = ALL
            else:
                extent = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
                result = op("MaxPool", [m], kernel_shape=extent,
                            strides=list(node.attributes.get_ints("strides", [1, 1])),
                            pads=list(node.attributes.get_ints("pads", [0, 0, 0, 0])))
                if node.op_type == "Conv" and len(changed) > 1:
                    result = ALL  # weights that change between runs
        elif node.op_type == "Resize" and node.domain == "" and out_hw[0] is not None:
            m = masks.get(node.inputs[0])
            mode = node.attributes.get_string("mode", "nearest")
            attrs = {"mode": "nearest",
                     "coordinate_transformation_mode": node.attributes.get_string("coordinate_transformation_mode", "half_pixel"),
                     "nearest_mode": node.attributes.get_string("nearest_mode", "round_prefer_floor")}
            if m is None:
                result = ALL
            else:
                result = op("Resize", [m, "", "", const(np.array([1, 1, *out_hw[0]], np.int64))], **attrs)
                if mode != "nearest":
                    result = op("MaxPool", [result], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif node.op_type == "Pad" and node.domain == "" and out_hw[0] is not None:
            m = masks.get(node.inputs[0])
            pads_t = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
            if m is None or pads_t is None or node.attributes.get_string("mode", "constant") != "constant" or \
                    (len(node.inputs) > 3 and node.inputs[3] is not None):
                result = ALL
            else:
                p = [int(x) for x in pads_t.numpy()]
                result = op("Pad", [m, const(np.array([0, 0, p[2], p[3], 0, 0, p[6], p[7]], np.int64))])
        elif node.op_type in POINTWISE and node.domain == "" and out_hw[0] is not None:
            spatial = []
            for v in node.inputs:
                if v is None or masks.get(v) is None:
                    continue
                if spatial_hw(v) == out_hw[0]:
                    spatial.append(masks[v])
                else:
                    spatial = None
                    break
            if not spatial:
                result = ALL
            elif len(spatial) == 1:
                result = spatial[0]
            else:
                result = op("Max", spatial)
        else:
            result = ALL
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
            base = const(np.ones((1, 1, grid.height, grid.width), np.float32)) if everything else \
                const(np.zeros((1, 1, grid.height, grid.width), np.float32))
            if everything and mask_inputs:
                # keep a data dependency on the mask so the graph is uniform
                base = op("Max", [base, op("Mul", [op("ReduceMax", [mask_inputs[0][0]], keepdims=1), const(np.zeros((1, 1, 1, 1), np.float32))])])
            merged = base
        else:
            merged = parts[0] if len(parts) == 1 else op("Max", sorted(set(parts)))
        t = grid.tile
        pooled = op("MaxPool", [merged], kernel_shape=[t, t], strides=[t, t], ceil_mode=1)
        active = op("Greater", [pooled, const(np.array(0.0, np.float32))])
        nz = op("NonZero", [op("Squeeze", [active, const(np.array([0, 1], np.int64))])])
        idx = op("Mul", [op("Transpose", [nz], perm=[1, 0]), const(np.array(t, np.int64))])
        nodes.append(helper.make_node("Identity", [idx], [grid.tiles_input], name=name("out")))
        outputs.append(helper.make_tensor_value_info(grid.tiles_input, TensorProto.INT64, [f"n_{grid.name}", 2]))

    g = helper.make_graph(nodes, "ssic_exact_mask",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, *hw]) for n, hw in mask_inputs],
                          outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="ssic")
    m.ir_version = 10
    return m
