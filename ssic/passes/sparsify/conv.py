"""Conv rules: a convolution at a sparse resolution becomes ``ssic::TileGather`` + MatMul + bias.

A k x k (strided, after a folded nearest upsample or zero pad) conv gathers im2col rows
``[n*t*t, k*k*Cin]`` of its input for the output tiles and multiplies them by the weight reshaped to
``[k*k*Cin, Cout]`` (row order ``(ky, kx, c)``); a 1x1 stride-1 conv of a tile value on the same grid
is a MatMul on the tiles. The receptive field (exact mode) is the kernel window: a MaxPool of the
change mask with the conv's geometry.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.ops import ACT_SWISH
from ssic.passes.analysis import ConvDecision, conv_kind, conv_macs, spatial_hw, static_shape
from ssic.passes.sparsify.context import SparsifyContext, const_array
from ssic.passes.sparsify.rule import ALL, MaskGraph, Refusal, Rule, register
from ssic.passes.sparsify.values import DenseValue, LazyResample, TileValue


def window_mask(node: ir.Node, masks: MaskGraph, kernel: list[int] | None) -> str | None:
    """Change mask after a sliding window (conv, pool): a MaxPool of the input's mask, same geometry."""
    m = masks.of(node.inputs[0])
    if spatial_hw(node.inputs[0]) is None or m is None or kernel is None or len(kernel) != 2 \
            or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return ALL
    dil = list(node.attributes.get_ints("dilations", [1, 1]))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    return masks.op("MaxPool", [m], kernel_shape=extent, strides=list(node.attributes.get_ints("strides", [1, 1])),
                    pads=list(node.attributes.get_ints("pads", [0, 0, 0, 0])))


class ConvRule(Rule):
    """``Conv`` (2-D, group 1, square kernel and stride, explicit pads, constant weights)."""

    op_types = ("Conv",)
    needs_sparse_input = False

    def describe(self, node: ir.Node, ctx: SparsifyContext) -> ConvDecision:
        out = node.outputs[0]
        in_shape = static_shape(node.inputs[0])
        group = node.attributes.get_int("group", 1)
        # the weight's shape is known even where the model stores no intermediate shapes
        wshape = static_shape(node.inputs[1]) if node.inputs[1] is not None else None
        if wshape is not None and len(wshape) == 4:
            cin, cout = wshape[1] * group, wshape[0]
        else:
            cin, cout = (in_shape[1] if in_shape else 0), 0
        return ConvDecision(node.name or out.name, conv_kind(node), spatial_hw(out), (cin, cout), False, "",
                            macs_dense=conv_macs(node))

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        hw = spatial_hw(node.outputs[0])
        grid = ctx.grid_for(hw)
        w = const_array(node.inputs[1])
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if grid is None:
            if hw:
                return Refusal(f"output {hw[0]}x{hw[1]} is below the sparse resolution threshold ({ctx.plan.min_res})")
            return Refusal("output is not a static [1, C, H, W] tensor")
        if w is None or w.ndim != 4:
            return Refusal("weights are not a constant 2-D kernel")
        if node.attributes.get_int("group", 1) != 1:
            return Refusal("grouped convolution (im2col + MatMul covers group=1 only)")
        if any(d != 1 for d in node.attributes.get_ints("dilations", [1, 1])):
            return Refusal("dilated convolution")
        if w.shape[2] != w.shape[3] or len(set(node.attributes.get_ints("strides", [1, 1]))) != 1:
            return Refusal("non-square kernel or stride")
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
            return Refusal("auto_pad is not supported (explicit pads only)")
        if len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
            return Refusal("bias is not constant")
        rep = ctx.rep(node.inputs[0])
        if isinstance(rep, LazyResample):
            rep = rep.source
        if isinstance(rep, DenseValue) and spatial_hw(rep.value) is None:
            return Refusal("input is not a static [1, C, H, W] tensor")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        out = node.outputs[0]
        grid = ctx.grid_of_output(node)
        w = const_array(node.inputs[1])
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        cout, cin, k = w.shape[0], w.shape[1], w.shape[2]
        s = node.attributes.get_ints("strides", [1, 1])[0]
        pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
        x = node.inputs[0]
        rep = ctx.rep(x)
        upsample, pad_top, pad_left = 1, pads[0], pads[1]
        source_value = x
        if isinstance(rep, LazyResample):
            upsample, pad_top, pad_left = rep.upsample, pad_top + rep.pad_top, pad_left + rep.pad_left
            rep, source_value = rep.source, rep.source_value
        rep = rep.gather_source(ctx, source_value)
        if isinstance(rep, TileValue) and rep.act == ACT_SWISH and rep.tiles is not None and source_value is x:
            # swish costs an exp per read and a gather reads each pixel k*k times: apply it once on
            # the tiles and gather the activation's own cache instead
            rep = ctx.cacheable(source_value, rep)
        if k == 1 and s == 1 and upsample == 1 and pad_top == 0 and pad_left == 0 and isinstance(rep, TileValue) \
                and rep.grid == grid and rep.dense_source is None:
            cols = ctx.evaluate(rep)
            wmat = np.ascontiguousarray(w[:, :, 0, 0].T.astype(np.float32))
        else:
            cols = ctx.gather(rep, grid, kernel=k, stride=s, pads=(pad_top, pad_left), upsample=upsample,
                              channels=cin, hint="gather")
            wmat = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * cin, cout).astype(np.float32))
        y = ctx.add("MatMul", [cols, ctx.const(wmat, "conv_w")], name_hint="conv")
        if b is not None:
            y = ctx.add("Add", [y, ctx.const(b.astype(np.float32), "conv_b")], name_hint="conv_bias")
        ctx.set_rep(out, TileValue(grid, y, out, cout))
        decision = ctx.decisions[node]
        decision.sparse = True
        decision.grid = grid.name
        decision.macs_per_tile = grid.tile * grid.tile * cout * cin * k * k
        decision.reason = f"tile {grid.tile} on grid {grid.name}" + (f", upsample x{upsample} folded" if upsample > 1 else "")

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        if sum(masks.of(v) is not None for v in node.inputs) > 1:
            return ALL  # weights that change between runs
        wshape = static_shape(node.inputs[1])
        return window_mask(node, masks, list(wshape[2:]) if wshape else None)


class MaxPoolRule(Rule):
    """``MaxPool`` runs dense; exact mode knows its window."""

    op_types = ("MaxPool",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        return Refusal("MaxPool has no tile rule (runs dense)")

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        return window_mask(node, masks, list(node.attributes.get_ints("kernel_shape", [])))


register(ConvRule())
register(MaxPoolRule())
