"""The ``fuse-tile-conv`` pass of the fused ONNX Runtime lowering: ``TileGather -> MatMul`` becomes
one ``ssic::TileConv``.

The sparse rewrite lowers every conv to ``ssic::TileGather`` (im2col rows ``[M, k*k*C]``) and a MatMul
by the weight matrix ``[k*k*C, Cout]``, then a bias ``Add`` (``ssic/passes/sparsify/conv.py``); the
conv of a channel concat sums its parts with ``Gemm``'s C input. Between the two ops the rows make a
round trip through memory: a 3x3 conv's buffer is 9x its input, and MatMul packs it once more. This
pass matches

    TileGather(...) -> MatMul(cols, W)            [-> Add(., b) with b constant [Cout]]
    TileGather(...) -> Gemm(cols, W, partial_sum)  (alpha = beta = 1, no transposes)

where ``cols`` has no other reader and ``W`` is a constant 2-D matrix, and replaces it with
``ssic::TileConv(tiles, cache, src_idx, dst_idx, pack_weight(W), scale, shift, bias, addend)``: the
C++ kernel gathers 24-384 rows at a time (``conv_block_rows`` in ``plugins/ort/kernels.h``) into a
buffer that stays in L2 and multiplies them there (``plugins/ort/gemm.h``). The result is the same up
to float summation order.

Only the ONNX Runtime target runs it (the TensorRT plugins and the standard lowering have no
TileConv); ``--disable-pass fuse-tile-conv`` keeps the two-op form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.ops import DOMAIN, TILE_CONV, pack_weight
from ssic.passes.rewrite import only_reader, take_over
from ssic.passes.sparsify.context import const_array as _const


def _gathered_columns(gather: ir.Node) -> int | None:
    """``k*k*C`` of a TileGather, C from its cache's static shape (layout NHWC or NCHW)."""
    shape = gather.inputs[1].shape
    layout = gather.attributes.get_int("src_layout", 0)
    if shape is None or len(shape) != (3 if layout == 0 else 4):
        return None
    c = shape[2] if layout == 0 else shape[1]
    k = gather.attributes.get_int("kernel")
    return k * k * c if isinstance(c, int) else None


def _plain_gemm(node: ir.Node) -> bool:
    a = node.attributes
    return (a.get_int("transA", 0) == 0 and a.get_int("transB", 0) == 0 and a.get_float("alpha", 1.0) == 1.0
            and a.get_float("beta", 1.0) == 1.0 and len(node.inputs) == 3 and node.inputs[2] is not None)


def _addend_ok(value: ir.Value, cout: int) -> bool:
    """A Gemm's C is a full ``[M, Cout]`` partial sum (not a broadcast bias) when a conv produced it."""
    producer = value.producer()
    if producer is None or producer.op_type not in ("MatMul", "Gemm", TILE_CONV.name):
        return False
    if producer.op_type == TILE_CONV.name:
        return producer.attributes.get_int("cout") == cout
    w = _const(producer.inputs[1])
    return w is not None and w.ndim == 2 and w.shape[1] == cout


def _bias_of(node: ir.Node, cout: int) -> tuple[np.ndarray, ir.Node] | None:
    """The constant ``[Cout]`` operand of an ``Add`` that is the only reader of ``node``'s output."""
    use = only_reader(node.outputs[0])
    if use is None or use[0].op_type != "Add" or use[0].domain not in ("", "ai.onnx"):
        return None
    add = use[0]
    b = _const(add.inputs[1 - use[1]])
    if b is None or b.size != cout or b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1):
        return None
    return b.reshape(cout).astype(np.float32), add


class FuseTileConvPass(ir.passes.InPlacePass):
    """Replace ``TileGather -> MatMul/Gemm [-> Add bias]`` with ``ssic::TileConv`` (see the module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        fused = 0
        for gather in list(graph):
            if gather.domain != DOMAIN or gather.op_type != "TileGather":
                continue
            use = only_reader(gather.outputs[0])
            if use is None or use[1] != 0:
                continue
            mm = use[0]
            if mm.domain not in ("", "ai.onnx") or mm.op_type not in ("MatMul", "Gemm"):
                continue
            w = _const(mm.inputs[1])
            if w is None or w.ndim != 2:
                continue
            if _gathered_columns(gather) != w.shape[0]:
                continue
            cout = int(w.shape[1])
            addend = None
            if mm.op_type == "Gemm":
                if not _plain_gemm(mm) or not _addend_ok(mm.inputs[2], cout):
                    continue
                addend = mm.inputs[2]
            bias = _bias_of(mm, cout)
            last = bias[1] if bias else mm
            name = mm.name or f"tile_conv_{fused}"
            packed = ir.Value(name=f"{name}/packed_w", const_value=ir.tensor(pack_weight(w.astype(np.float32))))
            graph.register_initializer(packed)
            inputs: list[ir.Value | None] = [*gather.inputs[:4], packed, *gather.inputs[4:6]]
            inputs += [None] * (6 - len(gather.inputs))  # omitted scale/shift
            if bias is not None:
                b = ir.Value(name=f"{name}/bias", const_value=ir.tensor(bias[0]))
                graph.register_initializer(b)
                inputs.append(b)
            else:
                inputs.append(None)
            inputs.append(addend)
            while inputs and inputs[-1] is None:
                inputs.pop()
            attrs = [ir.AttrInt64(a.name, a.as_int()) if a.type == ir.AttributeType.INT else ir.AttrFloat32(a.name, a.as_float())
                     for a in gather.attributes.values()]
            attrs.append(ir.AttrInt64("cout", cout))
            node = ir.Node(DOMAIN, TILE_CONV.name, inputs, attrs, name=f"{name}/tile_conv", num_outputs=1)
            graph.insert_before(last, node)
            take_over(last.outputs[0], node.outputs[0])
            for dead in ([bias[1]] if bias else []) + [mm, gather]:
                graph.remove(dead, safe=True)
            fused += 1
        if fused:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)  # the unpacked weights and biases
        return ir.passes.PassResult(model, fused > 0)
