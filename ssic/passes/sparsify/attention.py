"""MatMul on token values: projections, feed-forward layers and attention (docs/sparse-attention.md).

A MatMul whose token operand keeps its pixel rows outside the contraction runs on the active rows
only: a projection ``[1, M, C] x [C, C']``, attention scores ``q [.., M, d] x kᵀ [.., d, L]`` and
their product with the values ``P [.., M, L] x v [.., L, d]``. An operand whose pixel rows are
contracted (the keys' columns and the values' rows of *self*-attention) is needed in full: it is its
prime-run cache with the active rows scattered in (:func:`ssic.passes.sparsify.tokens.scatter_rows`),
the anchor engine's scheme: attention over the full map with the active rows updated, exact for
the active queries when every changed key lies in an active tile. Cross-attention's keys and values
depend only on a dense input (the text context ``encoder_hidden_states``, which must equal the primed
one): they are computed in full in the sparse graph, 77 rows of two small projections per layer, cheaper
than reading and storing a cache of them. ``softmax(q kᵀ) v`` is row-wise in the queries, so each
active row equals the dense result on that row.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ssic.passes.analysis import ConvDecision, static_shape
from ssic.passes.sparsify.context import SparsifyContext, const_array
from ssic.passes.sparsify.rule import Refusal, Rule, register
from ssic.passes.sparsify.tokens import RowTiles, align_dense, record


def matmul_macs(node: ir.Node) -> int:
    """Dense multiply-accumulates of a MatMul from its static shapes (``numel(Y) * K``; 0 when unknown)."""
    a, y = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if a is None or y is None or not a:
        return 0
    return math.prod(y) * a[-1]


def _position(rt: RowTiles, operand: int) -> str:
    """Where the pixel rows of MatMul operand ``operand`` (0: A, 1: B) lie: ``contract`` (summed
    over), ``row`` (A's rows), ``col`` (B's columns) or ``batch``."""
    rank = len(rt.shape)
    if rank - 1 - operand in rt.rows:
        return "contract"
    if rank - 2 + operand in rt.rows:
        return "row" if operand == 0 else "col"
    return "batch"


def _kind(node: ir.Node, ctx: SparsifyContext) -> str:
    a, b = node.inputs[0], node.inputs[1]
    if const_array(a) is not None or const_array(b) is not None:
        return "linear"
    sparse = [ctx.rep(a).sparse, ctx.rep(b).sparse]
    return "self-attn" if all(sparse) else "cross-attn" if any(sparse) else "attention"


class MatMulRule(Rule):
    """``MatMul`` with a token operand (see the module docstring)."""

    op_types = ("MatMul",)
    needs_sparse_input = False  # to say why a MatMul without a token operand runs in full

    def describe(self, node: ir.Node, ctx: SparsifyContext) -> ConvDecision:
        a, y = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        channels = (a[-1], y[-1]) if a and y else (0, 0)
        return ConvDecision(node.name or node.outputs[0].name, _kind(node, ctx), None, channels, False, "",
                            macs_dense=matmul_macs(node))

    @staticmethod
    def _plan(node: ir.Node, ctx: SparsifyContext):
        """``(grid, output rows, operands to use in full, rows of the output are in batch dims)`` or why not."""
        reps = [ctx.rep(v) for v in node.inputs[:2]]
        shapes = [static_shape(v) for v in node.inputs[:2]]
        out = static_shape(node.outputs[0])
        if out is None or any(s is None for s in shapes):
            return "shapes unknown"
        if any(len(s) < 2 for s in shapes):
            return "a 1-D operand"
        if any(r.sparse and not isinstance(r, RowTiles) for r in reps):
            return "a sparse operand that is not a token value"
        pos = [_position(r, i) if isinstance(r, RowTiles) else None for i, r in enumerate(reps)]
        full = set()
        for i in (0, 1):
            if pos[i] == "contract":
                full.add(i)
                pos[i] = None
        if pos == ["row", "col"]:  # q kᵀ: every key is needed, the rows are the queries
            full.add(1)
            pos[1] = None
        if pos == [None, None]:
            return "the pixel rows are contracted (both operands would be full maps)"
        rank = len(out)
        rows = []
        for i in (0, 1):
            if pos[i] is None:
                continue
            rt, shift = reps[i], rank - len(shapes[i])
            rows.append((rt.grid, (rank - 1,) if pos[i] == "col" else tuple(r + shift for r in rt.rows),
                         tuple(rt.shape[r] for r in rt.rows)))
        if len(rows) == 2 and (rows[0] != rows[1] or pos != ["batch", "batch"]):
            return "token operands on different rows"
        grid, out_rows, _ = rows[0]
        if "batch" in pos:
            for i in (0, 1):
                if pos[i] is None and i not in full:
                    s = shapes[i]
                    pad = rank - len(s)
                    if any(r - pad >= 0 and r - pad < len(s) - 2 and s[r - pad] != 1 for r in out_rows):
                        return "the dense operand varies along the pixel rows"
        elif len(out_rows) > 1 and len(shapes[1 if pos[0] is not None else 0]) > 2:
            return "the dense operand has batch dims across the pixel rows"
        return grid, out_rows, full, "batch" in pos

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        if not any(ctx.rep(v).sparse for v in node.inputs if v is not None):
            grids = {g.height * g.width for g in ctx.plan.grids.values()}
            shapes = [static_shape(v) or () for v in node.inputs[:2]]
            if not any(d in grids for s in shapes for d in s):
                return Refusal("no operand runs over the pixels of a sparse grid (e.g. keys/values of the "
                               "text context): computed in full")
            return Refusal("no sparse input")
        plan = self._plan(node, ctx)
        return Refusal(plan) if isinstance(plan, str) else None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        grid, out_rows, full, batch = self._plan(node, ctx)
        out = node.outputs[0]
        shape = static_shape(out)
        inputs = []
        for i, v in enumerate(node.inputs[:2]):
            rep = ctx.rep(v)
            if i in full:
                x = ctx.materialize(v)
            elif isinstance(rep, RowTiles):
                x = rep.tensor
            else:
                x = v
            if batch and (i in full or not isinstance(rep, RowTiles)):
                x = align_dense(ctx, x, len(shape), out_rows, grid, gather=False)
            inputs.append(x)
        y = ctx.add("MatMul", inputs, name_hint="token_matmul")
        record(ctx, out, RowTiles(grid, y, shape, out_rows))
        decision = ctx.decisions[node]
        decision.sparse = True
        decision.grid = grid.name
        n = grid.height * grid.width
        decision.macs_per_tile = -(-decision.macs_dense * grid.tile * grid.tile // n)
        role = {"linear": "token rows", "cross-attn": "queries"}.get(decision.kind, "attention rows")
        reason = f"{role} of the active tiles of {grid.name} (tile {grid.tile})"
        if full:
            reason += "; keys/values: the cached full map with the active rows scattered in"
        elif decision.kind == "cross-attn":
            reason += "; keys/values of the dense (non-image) input computed in full"
        decision.reason = reason


register(MatMulRule())
