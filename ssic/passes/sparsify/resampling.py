"""Resampling and padding rules: Resize (nearest, integer factor), AveragePool and MaxPool, Pad.

A nearest upsample or a zero pad is not computed: it becomes a :class:`LazyResample` that the next
conv's gather folds into its index arithmetic (``upsample``, ``pad_top``/``pad_left``). A k x k /
stride s average or max pool is a gather of k*k columns and a mean or max.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.ops import PAD_EDGE, PAD_REFLECT, PAD_ZEROS
from ssic.passes.analysis import spatial_hw, static_shape
from ssic.passes.sparsify.context import SparsifyContext, const_array
from ssic.passes.sparsify.conv import window_mask
from ssic.passes.sparsify.rule import ALL, MaskGraph, Refusal, Rule, register
from ssic.passes.sparsify.values import DenseValue, LazyResample, LazyShuffle, TileValue


class ResizeRule(Rule):
    """Nearest ``Resize`` by an integer factor (>= 2, same on both axes) into a sparse resolution."""

    op_types = ("Resize",)
    needs_sparse_input = False

    @staticmethod
    def _same_size(node: ir.Node, ctx: SparsifyContext) -> bool:
        return spatial_hw(node.inputs[0]) == spatial_hw(node.outputs[0]) and ctx.rep(node.inputs[0]).sparse

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        x, out = node.inputs[0], node.outputs[0]
        in_hw, out_hw = spatial_hw(x), spatial_hw(out)
        if in_hw is None or out_hw is None:
            return Refusal("input or output is not a static [1, C, H, W] tensor")
        if self._same_size(node, ctx):
            return None
        if ctx.grid_for(out_hw) is None:
            return Refusal(f"output {out_hw[0]}x{out_hw[1]} is not a sparse resolution")
        mode = node.attributes.get_string("mode", "nearest")
        ctm = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
        nearest = node.attributes.get_string("nearest_mode", "round_prefer_floor")
        if mode != "nearest" or out_hw[0] % in_hw[0] or out_hw[1] % in_hw[1]:
            return Refusal(f"{mode} resize by a non-integer factor or not nearest")
        u = out_hw[0] // in_hw[0]
        if u != out_hw[1] // in_hw[1] or u < 2:
            return Refusal("resize factors differ between axes")
        # with integer factors, half_pixel + round_prefer_ceil and asymmetric + floor are the same map
        if (ctm != "asymmetric" or nearest != "floor") and not (
                ctm in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil"):
            return Refusal(f"nearest resize with {ctm}/{nearest} is not a pixel repeat")
        if not isinstance(ctx.rep(x), (TileValue, DenseValue)):
            return Refusal("resize of an already resampled value")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        x, out = node.inputs[0], node.outputs[0]
        if self._same_size(node, ctx):
            ctx.set_rep(out, ctx.rep(x))
            return
        u = spatial_hw(out)[0] // spatial_hw(x)[0]
        ctx.set_rep(out, LazyResample(ctx.rep(x), x, upsample=u))

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        m = masks.of(node.inputs[0])
        out_hw = spatial_hw(node.outputs[0])
        if m is None or out_hw is None:
            return ALL
        attrs = {"mode": "nearest",
                 "coordinate_transformation_mode": node.attributes.get_string("coordinate_transformation_mode", "half_pixel"),
                 "nearest_mode": node.attributes.get_string("nearest_mode", "round_prefer_floor")}
        result = masks.op("Resize", [m, "", "", masks.const(np.array([1, 1, *out_hw], np.int64))], **attrs)
        if node.attributes.get_string("mode", "nearest") != "nearest":
            result = masks.op("MaxPool", [result], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        return result


class PoolRule(Rule):
    """Square, unpadded ``AveragePool`` / ``MaxPool`` (any stride): a gather of the k*k window columns and
    a ``ReduceMean`` / ``ReduceMax`` over them, on tiles. Padded pools run dense (their padding is not
    zeros: -inf for max, excluded from the mean unless ``count_include_pad``)."""

    op_types = ("AveragePool", "MaxPool")

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        grid = ctx.grid_of_output(node)
        kernel = node.attributes.get_ints("kernel_shape", [])
        strides = node.attributes.get_ints("strides", [1, 1])
        pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
        if grid is None or static_shape(node.inputs[0]) is None:
            return Refusal("output is not at a sparse resolution")
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return Refusal("MaxPool's indices are read")
        if any(d != 1 for d in node.attributes.get_ints("dilations", [1, 1])):
            return Refusal("dilated pool")
        if len(kernel) != 2 or kernel[0] != kernel[1] or any(pads) or node.attributes.get_int("ceil_mode", 0) \
                or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "") or len(set(strides)) != 1:
            return Refusal("only square, unpadded pools")
        if not isinstance(ctx.rep(node.inputs[0]), TileValue):
            return Refusal("pool of a resampled value")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        grid = ctx.grid_of_output(node)
        k = node.attributes.get_ints("kernel_shape", [])[0]
        c = static_shape(node.inputs[0])[1]
        rep = ctx.rep(node.inputs[0]).gather_source(ctx, node.inputs[0])
        cols = ctx.gather(rep, grid, kernel=k, stride=node.attributes.get_ints("strides", [1, 1])[0], pads=(0, 0),
                          upsample=1, channels=c, hint="pool_gather")
        grouped = ctx.add("Reshape", [cols, ctx.i64([-1, k * k, c], "shape")])
        reduce = "ReduceMax" if node.op_type == "MaxPool" else "ReduceMean"
        y = ctx.reduce(reduce, grouped, [1], keepdims=0, name_hint="pool_reduce")
        ctx.set_rep(node.outputs[0], TileValue(grid, y, None, c))

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        return window_mask(node, masks, list(node.attributes.get_ints("kernel_shape", [])))


def _pad_amounts(node: ir.Node) -> list[int] | None:
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if pads is None else [int(p) for p in pads]


PAD_MODES = {"constant": PAD_ZEROS, "reflect": PAD_REFLECT, "edge": PAD_EDGE}


class PadRule(Rule):
    """Zero, reflect or edge ``Pad`` of the spatial axes of a tile value: folded into the next gather."""

    op_types = ("Pad",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        if not isinstance(ctx.rep(node.inputs[0]), TileValue):
            return Refusal("pad of a value that is not a tile value")
        mode = node.attributes.get_string("mode", "constant")
        if mode not in PAD_MODES:
            return Refusal(f"{mode} padding")
        hw = spatial_hw(node.inputs[0])
        if mode == "reflect" and (hw is None or max(_pad_amounts(node) or [0]) >= min(hw)):
            return Refusal("reflect padding as large as the image")
        pads = _pad_amounts(node)
        cval = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        if pads is None or axes is not None or (cval is not None and np.any(cval != 0)):
            return Refusal("pads not constant, padding with a non-zero value or with axes")
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or any(p < 0 for p in pads):
            return Refusal("padding of non-spatial axes or cropping")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        pads = _pad_amounts(node)
        ctx.set_rep(node.outputs[0], LazyResample(ctx.rep(node.inputs[0]), node.inputs[0], pad_top=pads[2],
                                                  pad_left=pads[3],
                                                  pad_mode=PAD_MODES[node.attributes.get_string("mode", "constant")]))

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        m = masks.of(node.inputs[0])
        p = _pad_amounts(node)
        mode = node.attributes.get_string("mode", "constant")
        if m is None or spatial_hw(node.outputs[0]) is None or p is None or len(p) != 8 or mode not in PAD_MODES \
                or (len(node.inputs) > 3 and node.inputs[3] is not None):
            return ALL
        pads = masks.const(np.array([0, 0, p[2], p[3], 0, 0, p[6], p[7]], np.int64))
        if mode == "constant":
            return masks.op("Pad", [m, pads])
        return masks.op("Pad", [m, pads], mode=mode)  # a changed pixel is mirrored/repeated into the border


class DepthToSpaceRule(Rule):
    """``DepthToSpace`` (PixelShuffle) of a tile value: a :class:`LazyShuffle` the next conv's gather folds.

    Any other consumer reads it materialised (a dense DepthToSpace of the scattered input). Output
    pixel ``(Y, X)`` comes from input pixel ``(Y // b, X // b)``: the change mask is upsampled by the
    block size.
    """

    op_types = ("DepthToSpace",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        if not isinstance(ctx.rep(node.inputs[0]), TileValue):
            return Refusal("DepthToSpace of a value that is not a tile value")
        if static_shape(node.inputs[0]) is None or spatial_hw(node.outputs[0]) is None:
            return Refusal("DepthToSpace shapes unknown")
        if node.attributes.get_string("mode", "DCR") not in ("DCR", "CRD"):
            return Refusal("unknown DepthToSpace mode")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        x = node.inputs[0]
        ctx.set_rep(node.outputs[0], LazyShuffle(ctx.rep(x), x, node.attributes.get_int("blocksize", 1),
                                                 node.attributes.get_string("mode", "DCR") == "CRD"))

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        m = masks.of(node.inputs[0])
        out_hw = spatial_hw(node.outputs[0])
        if m is None or out_hw is None:
            return ALL
        return masks.op("Resize", [m, "", "", masks.const(np.array([1, 1, *out_hw], np.int64))], mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor")


class SpaceToDepthRule(Rule):
    """``SpaceToDepth`` runs dense; an output pixel depends on one b x b block of the input."""

    op_types = ("SpaceToDepth",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        return Refusal("SpaceToDepth runs dense")

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        m = masks.of(node.inputs[0])
        b = node.attributes.get_int("blocksize", 0)
        if m is None or b < 1 or spatial_hw(node.outputs[0]) is None:
            return ALL
        return masks.op("MaxPool", [m], kernel_shape=[b, b], strides=[b, b])


register(ResizeRule())
register(PoolRule())
register(PadRule())
register(DepthToSpaceRule())
register(SpaceToDepthRule())
