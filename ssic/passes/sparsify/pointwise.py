"""Pointwise rules: activations, swish, per-channel affine maps, element-wise ops, Concat on channels.

Per-channel maps (``x*a + b`` with ``[1, C, 1, 1]`` operands, ReLU, leaky ReLU, swish) are not
computed: they become the pending epilogue of a :class:`TileValue` that the next gather fuses, also
through a folded nearest upsample. Other element-wise ops and channel Concats run on the ``[M, C]``
tile tensors. Every op here is pointwise in space, so its change mask (exact mode) is the union of
its inputs' masks.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ssic.ops import ACT_LEAKY_RELU, ACT_RELU, ACT_SWISH
from ssic.passes.analysis import spatial_hw, static_shape
from ssic.passes.sparsify.context import SparsifyContext, per_channel_ok
from ssic.passes.sparsify.rule import ALL, MaskGraph, Refusal, Rule, register
from ssic.passes.sparsify.values import ConcatPart, TileValue

ELEMENTWISE_UNARY = (
    "Sigmoid", "Tanh", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Clip", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Erf", "Gelu", "Reciprocal", "Mish",
)
ELEMENTWISE_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu")
COMPARISONS = ("Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal")


def pointwise_mask(node: ir.Node, masks: MaskGraph) -> str | None:
    """Union of the inputs' change masks; ALL when a changed input has another resolution."""
    out_hw = spatial_hw(node.outputs[0])
    if out_hw is None:
        return ALL
    spatial = []
    for v in node.inputs:
        m = masks.of(v)
        if m is None:
            continue
        if spatial_hw(v) != out_hw:
            return ALL
        spatial.append(m)
    if not spatial:
        return ALL
    return spatial[0] if len(spatial) == 1 else masks.op("Max", spatial)


class PointwiseRule(Rule):
    """Base of rules for ops that are pointwise in space."""

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        return pointwise_mask(node, masks)


def channel_map(node: ir.Node, ctx: SparsifyContext, rep, fn) -> None:
    """Record ``fn`` (a per-channel map of a tile value) applied to ``rep`` as ``node``'s output."""
    ctx.set_rep(node.outputs[0], rep.map_channels(ctx, fn))


class AliasRule(PointwiseRule):
    """``Identity`` / ``Dropout`` (inference): the output is the input."""

    op_types = ("Identity", "Dropout")

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        ctx.set_rep(node.outputs[0], ctx.rep(node.inputs[0]))


class SwishRule(PointwiseRule):
    """``x * Sigmoid(x)``: a swish epilogue (matched at the Sigmoid, the Mul is consumed)."""

    op_types = ("Sigmoid",)

    @staticmethod
    def _mul(node: ir.Node) -> ir.Node | None:
        users = list(node.outputs[0].uses())
        if len(users) != 1:
            return None
        mul = users[0].node
        if mul.op_type != "Mul" or len(mul.inputs) != 2 or set(mul.inputs) != {node.inputs[0], node.outputs[0]}:
            return None
        return mul

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        rep = ctx.rep(node.inputs[0])
        if not rep.sparse:
            return Refusal("input is dense")
        if self._mul(node) is None:
            return Refusal("not x * sigmoid(x)")
        reason = rep.channel_map_refusal()
        return None if reason is None else Refusal(reason)

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        mul = self._mul(node)
        channel_map(mul, ctx, ctx.rep(node.inputs[0]), lambda t: ctx.with_act(t, ACT_SWISH))
        ctx.skip.add(mul)


class ActivationRule(PointwiseRule):
    """``Relu`` / ``LeakyRelu``: an activation epilogue."""

    op_types = ("Relu", "LeakyRelu")

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        reason = ctx.rep(node.inputs[0]).channel_map_refusal()
        return None if reason is None else Refusal(reason)

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        rep = ctx.rep(node.inputs[0])
        if node.op_type == "Relu":
            channel_map(node, ctx, rep, lambda t: ctx.with_act(t, ACT_RELU))
        else:
            alpha = node.attributes.get_float("alpha", 0.01)
            channel_map(node, ctx, rep, lambda t: ctx.with_act(t, ACT_LEAKY_RELU, alpha))


class AffineRule(PointwiseRule):
    """Per-channel ``Mul``/``Add``/``Sub``/``Div`` of a tile value: composed into its epilogue."""

    op_types = ("Mul", "Add", "Sub", "Div")

    @staticmethod
    def _operands(node: ir.Node, ctx: SparsifyContext):
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = ctx.rep(a), ctx.rep(b)
        if ra.sparse and not rb.sparse:
            return ra, b
        if rb.sparse and not ra.sparse and node.op_type in ("Mul", "Add"):
            return rb, a
        return None, None

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        rep, other = self._operands(node, ctx)
        if rep is None:
            return Refusal("not a tile value and a per-channel operand")
        shape = static_shape(node.outputs[0])
        if shape is None or len(shape) != 4 or not per_channel_ok(other, shape[1]):
            return Refusal("the other operand is not per-channel")
        reason = rep.channel_map_refusal()
        return None if reason is None else Refusal(reason)

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        rep, other = self._operands(node, ctx)
        vec = ctx.per_channel(other, static_shape(node.outputs[0])[1])
        op = node.op_type
        if op == "Sub":
            channel_map(node, ctx, rep, lambda t: ctx.compose(t, add=ctx.add("Neg", [vec])))
        elif op == "Div":
            channel_map(node, ctx, rep, lambda t: ctx.compose(t, mul=ctx.add("Reciprocal", [vec])))
        elif op == "Mul":
            channel_map(node, ctx, rep, lambda t: ctx.compose(t, mul=vec))
        else:
            channel_map(node, ctx, rep, lambda t: ctx.compose(t, add=vec))


def _operand_refusal(v: ir.Value, ctx: SparsifyContext, grid, channels: int) -> str | None:
    """Why operand ``v`` cannot enter an element-wise op on ``grid``'s tiles (None: it can)."""
    rep, shape = ctx.rep(v), static_shape(v)
    if rep.sparse or (shape is not None and spatial_hw(v) == (grid.height, grid.width)):
        if not rep.sparse and v.dtype not in (None, ir.DataType.FLOAT):
            return f"operand {v.name} is a full {v.dtype} map (gathers read float32)"
        return None if rep.tileable_on(grid) else f"operand {v.name} cannot be tiled on grid {grid.name}"
    if (shape is not None and math.prod(shape) == 1) or per_channel_ok(v, channels):
        return None
    return f"operand {v.name} is neither spatial, per-channel nor scalar"


class ElementwiseRule(PointwiseRule):
    """An element-wise op on tile tensors: spatial operands as tiles, per-channel/scalar ones as vectors.

    Also on a graph input at a sparse resolution (an image's transfer function or normalisation before the
    first conv, OIDN's sRGB curve): the op then runs on the input's active tiles, not on the whole image,
    and the next conv reads the prime run's result elsewhere (a cache). Comparisons run on tiles when
    only ``Where`` conditions read them (a boolean tile tensor is never scattered into a full map).
    """

    op_types = ELEMENTWISE_UNARY + ELEMENTWISE_BINARY + COMPARISONS + ("Where",)
    needs_sparse_input = False

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        grid = ctx.grid_of_output(node)
        out_shape = static_shape(node.outputs[0])
        if grid is None or out_shape is None or len(node.outputs) != 1 or len(out_shape) != 4:
            return Refusal("output is not at a sparse resolution")
        operands = [v for v in node.inputs if v is not None]
        if not any(ctx.rep(v).sparse for v in operands):
            spatial = [v for v in operands if static_shape(v) is not None and spatial_hw(v) == (grid.height, grid.width)]
            if not spatial or not all(v.is_graph_input() for v in spatial):
                return Refusal("no sparse input")
        for v in operands:
            why = _operand_refusal(v, ctx, grid, out_shape[1])
            if why:
                return Refusal(why)
        if node.op_type in COMPARISONS:
            out = node.outputs[0]
            users = [u.node for u in out.uses()]
            if out.is_graph_output() or not users or any(
                    u.op_type != "Where" or u.inputs[0] is not out or u.inputs[1] is out or u.inputs[2] is out
                    or static_shape(u.outputs[0]) != out_shape for u in users):
                return Refusal("a comparison read by other than Where's condition")
            for u in users:
                for v in u.inputs[1:]:
                    if v is not None and v is not out and _operand_refusal(v, ctx, grid, out_shape[1]):
                        return Refusal("a comparison whose Where cannot run on tiles")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        grid = ctx.grid_of_output(node)
        channels = static_shape(node.outputs[0])[1]
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
                continue
            rep, shape = ctx.rep(v), static_shape(v)
            if rep.sparse or (shape is not None and spatial_hw(v) == (grid.height, grid.width)):
                inputs.append(rep.to_tiles(ctx, grid, shape[1] if shape else channels))
            elif shape is not None and math.prod(shape) == 1:
                inputs.append(v if len(shape) <= 1 else ctx.reshape(v, [1]))
            else:
                inputs.append(ctx.per_channel(v, channels))
        clone = ir.Node("", node.op_type, inputs, list(node.attributes.values()), name=ctx.name(node.op_type))
        clone.outputs[0].name = f"{clone.name}/out0"
        ctx.graph.append(clone)
        ctx.set_rep(node.outputs[0], TileValue(grid, clone.outputs[0], None, channels))


class ConcatRule(PointwiseRule):
    """``Concat`` on the channel axis of values at one sparse resolution."""

    op_types = ("Concat",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        grid = ctx.grid_of_output(node)
        if grid is None or node.attributes.get_int("axis", 0) not in (1, -3) \
                or static_shape(node.outputs[0]) is None:
            return Refusal("not a channel concat at a sparse resolution")
        for v in node.inputs:
            if static_shape(v) is None or not ctx.rep(v).tileable_on(grid):
                return Refusal(f"operand {v.name} cannot be tiled on grid {grid.name}")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        grid = ctx.grid_of_output(node)
        parts = [ctx.rep(v).to_tiles(ctx, grid, static_shape(v)[1]) for v in node.inputs]
        y = ctx.add("Concat", parts, {"axis": 1}, name_hint="concat")  # removed as dead code where unused
        meta = tuple(ConcatPart(ctx.rep(v), v, static_shape(v)[1]) for v in node.inputs)
        ctx.set_rep(node.outputs[0], TileValue(grid, y, None, static_shape(node.outputs[0])[1], parts=meta))


class SplitRule(PointwiseRule):
    """``Split`` on the channel axis (gates such as NAFNet's SimpleGate): a Split of the tile tensor."""

    op_types = ("Split",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        grid = ctx.grid_of_output(node)
        shape = static_shape(node.inputs[0])
        if grid is None or shape is None or node.attributes.get_int("axis", 0) not in (1, -3):
            return Refusal("not a channel split at a sparse resolution")
        if any(static_shape(o) is None for o in node.outputs):
            return Refusal("split sizes unknown")
        if not ctx.rep(node.inputs[0]).tileable_on(grid):
            return Refusal(f"input cannot be tiled on grid {grid.name}")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        grid = ctx.grid_of_output(node)
        x = node.inputs[0]
        tiles = ctx.rep(x).to_tiles(ctx, grid, static_shape(x)[1])
        sizes = [static_shape(o)[1] for o in node.outputs]
        parts = ctx.add("Split", [tiles, ctx.i64(sizes, "split")], {"axis": 1}, name_hint="split",
                        num_outputs=len(sizes))
        parts = [parts] if len(sizes) == 1 else list(parts)
        for out, part, c in zip(node.outputs, parts, sizes, strict=True):
            ctx.set_rep(out, TileValue(grid, part, None, c))

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        return pointwise_mask(node, masks) if node.attributes.get_int("axis", 0) in (1, -3) else ALL


def _reduce_axes(node: ir.Node) -> list[int] | None:
    from ssic.passes.sparsify.context import const_array

    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    attr = node.attributes.get_ints("axes", None)
    return None if attr is None else list(attr)


class ChannelReduceRule(PointwiseRule):
    """``ReduceMean`` over the channel axis (channel LayerNorm written out): a reduction of each tile row."""

    op_types = ("ReduceMean",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        grid = ctx.grid_of_output(node)
        if grid is None or _reduce_axes(node) not in ([1], [-3]) or not node.attributes.get_int("keepdims", 1):
            return Refusal("not a channel mean (keepdims) at a sparse resolution")
        x = node.inputs[0]
        if static_shape(x) is None or not ctx.rep(x).tileable_on(grid):
            return Refusal(f"input cannot be tiled on grid {grid.name}")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        grid = ctx.grid_of_output(node)
        x = node.inputs[0]
        tiles = ctx.rep(x).to_tiles(ctx, grid, static_shape(x)[1])
        y = ctx.reduce("ReduceMean", tiles, [1], keepdims=1, name_hint="channel_mean")
        ctx.set_rep(node.outputs[0], TileValue(grid, y, None, 1))

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        axes = _reduce_axes(node)
        if axes is None or any(a % 4 in (2, 3) for a in axes) or not node.attributes.get_int("keepdims", 1):
            return ALL
        return pointwise_mask(node, masks)


class DensePointwiseRule(PointwiseRule):
    """Pointwise ops without a tile rule: they run dense, exact mode takes the union of input masks."""

    op_types = ("Cast", "Where")


register(AliasRule())
register(SwishRule())
register(ActivationRule())
register(AffineRule())
register(ElementwiseRule())
register(ConcatRule())
register(SplitRule())
register(ChannelReduceRule())
register(DensePointwiseRule())
