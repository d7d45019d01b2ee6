"""Normalisation rules: GroupNormalization, InstanceNormalization, TorchScript's GroupNorm pattern, BatchNorm.

GroupNorm in the sparse region becomes a per-channel ``x*scale + shift`` pending on the tile value.
By default (``gn_stats="incremental"``) the statistics are corrected with the new tiles: the prime
graph outputs each GroupNorm input's per-channel sum and sum of squares (float64) and the sparse graph
adds the new tiles' sums minus the cached values' sums under them, so they are the edited tensor's
statistics wherever pixels outside the active tiles are unchanged (exact with every tile active).
``gn_stats="cached"`` keeps the prime run's scale/shift (SIGE's approximation). Inference BatchNorm
is an exact per-channel affine map. GroupNorm statistics are global: in exact mode the whole output
may change (no mask rule); BatchNorm is pointwise.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.passes.analysis import static_shape
from ssic.passes.sparsify.context import GroupNormStats, SparsifyContext, const_array
from ssic.passes.sparsify.pointwise import PointwiseRule, channel_map
from ssic.passes.sparsify.rule import Refusal, Rule, register
from ssic.passes.sparsify.values import TileValue


def group_norm(ctx: SparsifyContext, layer: str, x: ir.Value, out: ir.Value, groups: int, eps: float,
               gamma: np.ndarray, beta: np.ndarray) -> None:
    """Record ``out = GroupNorm(x)`` (``x`` a tile value, per-channel ``gamma``/``beta``) as a tile value."""
    rep = ctx.rep(x)
    parts = rep.parts if isinstance(rep, TileValue) else ()
    if rep.has_epilogue or rep.base is None:
        rep = ctx.cacheable(x, rep)
    c = rep.channels
    incremental = ctx.gn_stats == "incremental"
    if incremental:
        names = (f"ssic.gn_sum.{x.name}", f"ssic.gn_sumsq.{x.name}")
        kinds, dtype = ("gn_sum", "gn_sumsq"), "float64"
    else:
        names = (f"ssic.gn_scale.{x.name}", f"ssic.gn_shift.{x.name}")
        kinds, dtype = ("gn_scale", "gn_shift"), "float32"
    if names[0] not in {st.scale_name for st in ctx.result.gn_stats}:
        ctx.result.gn_stats.append(GroupNormStats(x.name, groups, eps, gamma.astype(np.float32).reshape(c),
                                                  beta.astype(np.float32).reshape(c), names[0], names[1], layer,
                                                  incremental))
    a, b = (ctx.stat_input(nm, x, c, kind, rep.grid, layer, dtype) for nm, kind in zip(names, kinds, strict=True))
    if incremental:
        a, b = _incremental_stats(ctx, rep, a, b, groups, eps, gamma, beta, parts)
    ctx.set_rep(out, TileValue(rep.grid, rep.tiles, rep.base, c, a, b, dense_source=rep.dense_source))


def _stat_parts(ctx: SparsifyContext, rep: TileValue, parts) -> list[tuple[ir.Value, ir.Value]]:
    """``(new tiles, prime-run values under them)`` pairs, each ``[M, C_i]``, whose channels in order
    make ``rep``'s. The input of a GroupNorm after a channel concat (UNet decoders) is taken part by
    part: its parts' caches are read by the concat's convs anyway (``ConvRule``), and the statistics of
    a concat are its parts' statistics side by side, so neither the concat nor its old values are
    assembled for them."""
    grid = rep.grid
    if parts and all(isinstance(p.rep, TileValue) and p.rep.grid == grid and p.rep.tiles is not None
                     and not p.rep.has_epilogue for p in parts):
        return [(p.rep.tiles, ctx.gather_cached(p.value, grid, p.channels, "gn_old_part", tiles=p.rep.tiles))
                for p in parts]
    return [(rep.tiles, ctx.gather_cached(rep.base, grid, rep.channels, "gn_old", tiles=rep.tiles))]


def _incremental_stats(ctx: SparsifyContext, rep: TileValue, s1: ir.Value, s2: ir.Value, groups: int, eps: float,
                       gamma: np.ndarray, beta: np.ndarray, parts=()) -> tuple[ir.Value, ir.Value]:
    """GroupNorm scale/shift of the edited tensor from the prime run's sums and the changed tiles.

    ``sum_new = sum_prime + sum(new - old)`` and ``sumsq_new = sumsq_prime + sum((new - old) * (new +
    old))`` over the active tiles (``old``: the cached values under them), two float32 ``ReduceSum``s
    over ``[M, C]`` per part; the ``[C]`` arithmetic runs in float64. ``ReduceSum`` of a product, not
    ``ReduceSumSquare``: ONNX Runtime's ReduceSumSquare over axis 0 of a ``[2608, 256]`` tile tensor
    took 0.79-0.88 ms where Mul + ReduceSum took 0.22 (2 threads, this project's machine), and the
    difference form sums the change itself rather than two large totals that nearly cancel.
    """
    c, grid = rep.channels, rep.grid
    valid = ctx.valid_rows(grid) if grid.height % grid.tile or grid.width % grid.tile else None
    axis0 = ctx.i64([0], "axis0")

    def total(v: ir.Value) -> ir.Value:
        return ctx.add("Cast", [ctx.add("ReduceSum", [v, axis0], {"keepdims": 0})], {"to": ir.DataType.DOUBLE})

    d1s, d2s = [], []
    for new, old in _stat_parts(ctx, rep, parts):
        diff = ctx.add("Sub", [new, old], name_hint="gn_diff")
        if valid is not None:  # rows of clipped tiles outside the image
            diff = ctx.add("Mul", [diff, valid])
        d1s.append(total(diff))
        d2s.append(total(ctx.add("Mul", [diff, ctx.add("Add", [new, old])])))
    d1 = d1s[0] if len(d1s) == 1 else ctx.add("Concat", d1s, {"axis": 0})
    d2 = d2s[0] if len(d2s) == 1 else ctx.add("Concat", d2s, {"axis": 0})
    cpg = c // groups
    per_group = ctx.i64([groups, cpg], "gshape")
    axis1 = ctx.i64([1], "axis1")
    n = float(grid.height * grid.width * cpg)
    new1, new2 = ctx.add("Add", [s1, d1]), ctx.add("Add", [s2, d2])
    ctx.note_commit(s1, new1)  # the edited tensor's sums: what a commit stores
    ctx.note_commit(s2, new2)
    g1 = ctx.add("ReduceSum", [ctx.add("Reshape", [new1, per_group]), axis1], {"keepdims": 1})
    g2 = ctx.add("ReduceSum", [ctx.add("Reshape", [new2, per_group]), axis1], {"keepdims": 1})
    mean = ctx.add("Div", [g1, ctx.const(np.array(n), "count")])
    var = ctx.add("Sub", [ctx.add("Div", [g2, ctx.const(np.array(n), "count")]), ctx.add("Mul", [mean, mean])])
    inv = ctx.add("Reciprocal", [ctx.add("Sqrt", [ctx.add("Add", [var, ctx.const(np.array(float(eps)), "eps")])])])
    flat = ctx.i64([c], "cshape")
    inv_c = ctx.add("Reshape", [ctx.add("Expand", [inv, per_group]), flat])
    mean_c = ctx.add("Reshape", [ctx.add("Expand", [mean, per_group]), flat])
    scale = ctx.add("Mul", [inv_c, ctx.const(gamma.astype(np.float64).reshape(c), "gamma")])
    shift = ctx.add("Sub", [ctx.const(beta.astype(np.float64).reshape(c), "beta"), ctx.add("Mul", [mean_c, scale])])
    return (ctx.add("Cast", [scale], {"to": ir.DataType.FLOAT}, name_hint="gn_scale"),
            ctx.add("Cast", [shift], {"to": ir.DataType.FLOAT}, name_hint="gn_shift"))


def _tile_input_refusal(ctx: SparsifyContext, x: ir.Value) -> Refusal | None:
    if not isinstance(ctx.rep(x), TileValue):
        return Refusal("normalisation of a value that is not a tile value")
    return None


class GroupNormRule(Rule):
    """``GroupNormalization`` with constant scale/bias (per group or per channel)."""

    op_types = ("GroupNormalization",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        if static_shape(node.inputs[0]) is None or const_array(node.inputs[1]) is None \
                or const_array(node.inputs[2]) is None:
            return Refusal("input shape unknown or scale/bias not constant")
        return _tile_input_refusal(ctx, node.inputs[0])

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        x = node.inputs[0]
        c = static_shape(x)[1]
        gamma, beta = const_array(node.inputs[1]), const_array(node.inputs[2])
        groups = node.attributes.get_int("num_groups", 1)
        if gamma.size == groups and groups != c:
            gamma, beta = np.repeat(gamma, c // groups), np.repeat(beta, c // groups)
        group_norm(ctx, node.name, x, node.outputs[0], groups, node.attributes.get_float("epsilon", 1e-5), gamma, beta)


class InstanceNormRule(Rule):
    """``InstanceNormalization`` of a ``[1, C, H, W]`` tile value: GroupNorm with one channel per group."""

    op_types = ("InstanceNormalization",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        shape = static_shape(node.inputs[0])
        if shape is None or len(shape) != 4 or const_array(node.inputs[1]) is None \
                or const_array(node.inputs[2]) is None:
            return Refusal("input not [1, C, H, W] or scale/bias not constant")
        return _tile_input_refusal(ctx, node.inputs[0])

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        x = node.inputs[0]
        c = static_shape(x)[1]
        group_norm(ctx, node.name, x, node.outputs[0], c, node.attributes.get_float("epsilon", 1e-5),
                   const_array(node.inputs[1]).reshape(c), const_array(node.inputs[2]).reshape(c))


class InstanceNormGroupNormRule(Rule):
    """``Reshape([1,G,-1]) -> InstanceNormalization -> Reshape([1,C,H,W])``: GroupNorm as TorchScript exports it."""

    op_types = ("Reshape",)

    @staticmethod
    def _match(node: ir.Node) -> tuple[ir.Node, ir.Node] | str:
        shape, mid = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if shape is None or mid is None or len(mid) != 3 or len(shape) != 4:
            return "reshape of a tile value (not a GroupNorm pattern)"
        users = list(node.outputs[0].uses())
        if len(users) != 1 or users[0].node.op_type != "InstanceNormalization":
            return "reshape of a tile value (not a GroupNorm pattern)"
        inorm = users[0].node
        users2 = list(inorm.outputs[0].uses())
        if len(users2) != 1 or users2[0].node.op_type != "Reshape":
            return "reshape of a tile value (not a GroupNorm pattern)"
        back = users2[0].node
        if static_shape(back.outputs[0]) != shape:
            return "reshape of a tile value (not a GroupNorm pattern)"
        if const_array(inorm.inputs[1]) is None or const_array(inorm.inputs[2]) is None or shape[1] % mid[1]:
            return "GroupNorm pattern with non-constant scale/bias"
        return inorm, back

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        match = self._match(node)
        if isinstance(match, str):
            return Refusal(match)
        return _tile_input_refusal(ctx, node.inputs[0])

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        inorm, back = self._match(node)
        x = node.inputs[0]
        groups, c = static_shape(node.outputs[0])[1], static_shape(x)[1]
        s, b = const_array(inorm.inputs[1]), const_array(inorm.inputs[2])
        ctx.skip.update({inorm, back})
        group_norm(ctx, inorm.name, x, back.outputs[0], groups, inorm.attributes.get_float("epsilon", 1e-5),
                   np.repeat(s, c // groups), np.repeat(b, c // groups))


class BatchNormRule(PointwiseRule):
    """Inference ``BatchNormalization``: an exact per-channel affine map."""

    op_types = ("BatchNormalization",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        if any(const_array(v) is None for v in node.inputs[1:5]) or any(o.uses() for o in node.outputs[1:]):
            return Refusal("BatchNorm with non-constant statistics or training outputs")
        reason = ctx.rep(node.inputs[0]).channel_map_refusal()
        return None if reason is None else Refusal(reason)

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        gamma, beta, mean, var = (const_array(v) for v in node.inputs[1:5])
        eps = node.attributes.get_float("epsilon", 1e-5)
        a = (gamma / np.sqrt(var + eps)).astype(np.float32)
        bb = (beta - mean * a).astype(np.float32)
        channel_map(node, ctx, ctx.rep(node.inputs[0]),
                    lambda t: ctx.compose(t, mul=ctx.const(a, "bn_scale"), add=ctx.const(bb, "bn_shift")))


register(GroupNormRule())
register(InstanceNormGroupNormRule())
register(InstanceNormRule())
register(BatchNormRule())
