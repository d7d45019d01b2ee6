"""The ``fuse-tile-affine`` pass of the fused ONNX Runtime lowering: a per-channel affine map and
activation over a tile tensor becomes one ``ssic::TileAffine``.

A tile value's pending epilogue (``SparsifyContext.evaluate``: a GroupNorm's or BatchNorm's scale and
shift, a transfer function's per-channel factors, then ReLU, LeakyReLU or swish) is emitted as stock
ops over the ``[rows, C]`` tile tensor::

    y = Mul(x, scale[C])  ->  Add(y, shift[C])  ->  [Relu | LeakyRelu | Mul(y, Sigmoid(y))]

Each is a pass over the tensor, and ONNX Runtime broadcasts a ``[C]`` vector over rows one row at a
time: OIDN's ``[18148, 3] * [3]`` took 0.21-0.53 ms where a scalar Clip of the same tensor took 0.02 ms.
This pass matches any prefix of that chain that starts with the Mul or the Add (each intermediate read
by nothing else) and replaces it with ``y = ssic::TileAffine(x, scale, shift)``
(``plugins/ort/kernels.cpp``; reference ``ssic.ops.tile_affine_ref``): one pass, rows split between
the threads, swish through the kernels' vectorised exp. A missing factor is 1 and a missing offset 0;
a scalar one becomes a ``[C]`` constant.

The rank of ``x`` decides whether the chain is over a tile tensor: ONNX shape inference runs first
(``ShapeInferencePass``), and only a rank-2 ``x`` whose channel count is known and equal to the
vectors' is fused. Only the ONNX Runtime target runs this pass; ``--disable-pass fuse-tile-affine``
keeps the stock form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.ops import (
    ACT_IDENTITY,
    ACT_LEAKY_RELU,
    ACT_RELU,
    ACT_SWISH,
    DEFAULT_ALPHA,
    DOMAIN,
    TILE_AFFINE,
)
from ssic.passes.rewrite import fuse_matches, is_stock, only_reader, readers
from ssic.passes.sparsify.context import const_array as _const


def _channels(x: ir.Value) -> int | None:
    """C of a float32 ``[rows, C]`` value with a static C, else None."""
    if x.shape is None or len(x.shape) != 2 or not isinstance(x.shape[1], int):
        return None
    if x.type is not None and x.dtype != ir.DataType.FLOAT:
        return None
    return x.shape[1]


def _vector(v: ir.Value, c: int) -> ir.Value | np.ndarray | None:
    """``v`` when it is a float32 ``[C]`` value; a constant scalar as a ``[C]`` array; else None."""
    const = _const(v)
    if const is not None:
        if const.dtype != np.float32:
            return None
        if const.shape == (c,):
            return v
        return np.full(c, const.reshape(-1)[0], np.float32) if const.size == 1 else None
    if v.shape is not None and len(v.shape) == 1 and v.shape[0] == c and v.dtype == ir.DataType.FLOAT:
        return v
    return None


def _operands(node: ir.Node, x: ir.Value, c: int) -> ir.Value | np.ndarray | None:
    """The per-channel operand of binary ``node`` whose other input is ``x``."""
    if len(node.inputs) != 2 or x not in node.inputs or node.inputs[0] is node.inputs[1]:
        return None
    other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    return _vector(other, c)


def _activation(y: ir.Value) -> tuple[int, float, list[ir.Node]] | None:
    """The activation reading ``y`` alone: ``(code, alpha, nodes)``, else None."""
    use = only_reader(y)
    if use is not None and is_stock(use[0], "Relu"):
        return ACT_RELU, DEFAULT_ALPHA, [use[0]]
    if use is not None and is_stock(use[0], "LeakyRelu"):
        return ACT_LEAKY_RELU, use[0].attributes.get_float("alpha", DEFAULT_ALPHA), [use[0]]
    uses = readers(y)
    if len(uses) == 2:
        sig = [n for n, _ in uses if is_stock(n, "Sigmoid")]
        mul = [n for n, _ in uses if is_stock(n, "Mul")]
        if len(sig) == 1 and len(mul) == 1 and only_reader(sig[0].outputs[0]) is not None \
                and only_reader(sig[0].outputs[0])[0] is mul[0] and set(mul[0].inputs) == {y, sig[0].outputs[0]}:
            return ACT_SWISH, DEFAULT_ALPHA, [sig[0], mul[0]]
    return None


def _match(node: ir.Node) -> dict | None:
    """The chain starting at a stock ``Mul`` or ``Add`` of a tile tensor by a ``[C]`` vector, or None."""
    if not (is_stock(node, "Mul") or is_stock(node, "Add")) or len(node.inputs) != 2:
        return None
    for x in node.inputs:
        c = _channels(x)
        if c is None:
            continue
        operand = _operands(node, x, c)
        if operand is None:
            continue
        nodes, scale, shift, y = [node], None, None, node.outputs[0]
        if node.op_type == "Mul":
            scale = operand
            use = only_reader(y)
            if use is not None and is_stock(use[0], "Add"):
                b = _operands(use[0], y, c)
                if b is not None:
                    shift, y = b, use[0].outputs[0]
                    nodes.append(use[0])
        else:
            shift = operand
        act = _activation(y)
        if act is None and not any(isinstance(v, ir.Value) for v in (scale, shift)):
            return None  # scalars only and no activation: ONNX Runtime's scalar path is fast already
        code, alpha = ACT_IDENTITY, DEFAULT_ALPHA
        if act is not None:
            code, alpha, more = act
            nodes += more
            y = more[-1].outputs[0]
        return {"x": x, "c": c, "scale": scale, "shift": shift, "act": code, "alpha": alpha, "olds": [y], "dead": nodes}
    return None


def _build(node: ir.Node, m: dict, graph: ir.Graph) -> ir.Node:
    c, name = m["c"], node.name or "affine"
    inputs = [m["x"]]
    for v, fill, hint in ((m["scale"], 1.0, "scale"), (m["shift"], 0.0, "shift")):
        if v is None:  # a missing factor is 1, a missing offset 0
            v = np.full(c, fill, np.float32)
        if isinstance(v, np.ndarray):
            const_name = f"{name}/{hint}"
            v = ir.Value(name=const_name, shape=ir.Shape([c]), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(v, name=const_name))
            graph.register_initializer(v)
        inputs.append(v)
    return ir.Node(DOMAIN, TILE_AFFINE.name, inputs,
                   [ir.AttrInt64("activation", m["act"]), ir.AttrFloat32("alpha", m["alpha"])],
                   name=f"{name}/tile_affine")


class FuseTileAffinePass(ir.passes.InPlacePass):
    """Replace per-channel Mul/Add [+ activation] chains over tile tensors with ``ssic::TileAffine``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(strict_mode=False)(model)
        fused = fuse_matches(model, _match, lambda node, m: _build(node, m, model.graph))
        return ir.passes.PassResult(model, fused > 0)
