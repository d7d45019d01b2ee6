"""The sparse rewrite: turn the high-resolution part of a model into tile-domain computation.

See ``docs/architecture.md``. :class:`SparsifyPass` walks the graph in topological order; for each
node it tries the op rules registered for its op type (:mod:`ssic.passes.sparsify.rule`, one module
per op family: :mod:`~ssic.passes.sparsify.conv`, :mod:`~ssic.passes.sparsify.normalization`,
:mod:`~ssic.passes.sparsify.pointwise`, :mod:`~ssic.passes.sparsify.resampling`, token views and row-wise
ops in :mod:`~ssic.passes.sparsify.tokens`, MatMul and attention in :mod:`~ssic.passes.sparsify.attention`).
The first rule whose
``check`` passes rewrites the node, giving its outputs a tile representation
(:mod:`ssic.passes.sparsify.values`); a node no rule takes stays dense and reads materialised inputs
(``ssic::TileScatter`` from the cache). Every cache the sparse graph reads becomes a graph input;
:class:`SparsifyResult` lists them so the prime graph can output them.
"""

from __future__ import annotations

import onnx_ir as ir

from ssic.passes.analysis import SparsePlan
from ssic.passes.sparsify import conv, normalization, pointwise, resampling  # noqa: F401  (register the rules)

# isort: split
from ssic.passes.sparsify import attention, tokens  # noqa: F401  (registered last: tried after the others)
from ssic.passes.sparsify.context import (
    CacheSpec,
    DenseOp,
    GroupNormStats,
    SparsifyContext,
    SparsifyResult,
)
from ssic.passes.sparsify.rule import RULES, Refusal, Rule, rules_for


class SparsifyPass:
    """Rewrite a model (in place) into its sparse graph; returns what the prime graph must output.

    ``gn_stats`` is ``"incremental"`` (GroupNorm statistics corrected with the new tiles) or
    ``"cached"`` (the prime run's statistics); ``cache_dtype`` (``"float32"`` or ``"float16"``) is the
    type of the activation caches the sparse graph reads. Raises ``ValueError`` for another value.
    """

    def __init__(self, plan: SparsePlan, *, gn_stats: str = "incremental", cache_dtype: str = "float32",
                 recompute_swish: bool = False) -> None:
        if gn_stats not in ("incremental", "cached"):
            raise ValueError(f"gn_stats must be 'incremental' or 'cached', got {gn_stats!r}")
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"cache_dtype must be 'float32' or 'float16', got {cache_dtype!r}")
        self.plan = plan
        self.gn_stats = gn_stats
        self.recompute_swish = recompute_swish
        self.cache_dtype = cache_dtype

    def __call__(self, model: ir.Model) -> SparsifyResult:
        ctx = SparsifyContext(model, self.plan, self.gn_stats, self.cache_dtype)
        ctx.recompute_swish = self.recompute_swish
        graph = model.graph
        graph.opset_imports.setdefault("ssic", 1)
        for node in list(graph):
            if node in ctx.skip:
                continue
            refusal = self._apply(node, ctx)
            if refusal is not None:
                if any(ctx.is_sparse(v) for v in node.inputs):
                    ctx.result.dense_ops.append(DenseOp(node.name, node.op_type, refusal.reason))
                ctx.keep_dense(node)
        for i, out in enumerate(list(graph.outputs)):
            if ctx.is_sparse(out):
                full = ctx.materialize(out)
                full.name = out.name
                out.name = out.name + "/ssic_replaced"
                graph.outputs[i] = full
        _cleanup(ctx)
        ctx.add_commit_outputs()
        return ctx.result

    @staticmethod
    def _apply(node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        """Rewrite ``node`` with the first rule that accepts it; return the refusal when none does."""
        rules = rules_for(node)
        if not rules:
            return Refusal(f"{node.op_type} has no tile rule (runs dense)")
        decision = rules[0].describe(node, ctx)
        if decision is not None:
            ctx.decisions[node] = decision
            ctx.result.decisions.append(decision)
        has_sparse_input = any(ctx.is_sparse(v) for v in node.inputs)
        refusal = None
        for rule in rules:
            if rule.needs_sparse_input and not has_sparse_input:
                refusal = refusal or Refusal("no sparse input")
                continue
            why = rule.check(node, ctx)
            if why is None:
                rule.rewrite(node, ctx)
                return None
            refusal = refusal or why
        if decision is not None:
            decision.reason = refusal.reason
        return refusal


def _cleanup(ctx: SparsifyContext) -> None:
    """Drop unused nodes and the cache inputs nothing reads (rules may declare more than they use)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    graph, result = ctx.graph, ctx.result
    RemoveUnusedNodesPass()(ctx.model)
    TopologicalSortPass()(ctx.model)
    used = {v for v in graph.inputs if v.uses() or v.is_graph_output()}
    keep = [v for v in graph.inputs if v in used or not v.name.startswith("ssic.")]
    if len(keep) != len(graph.inputs):
        dropped = {v.name for v in graph.inputs} - {v.name for v in keep}
        graph.inputs.clear()
        graph.inputs.extend(keep)
        result.caches = [c for c in result.caches if c.name not in dropped]
        result.gn_stats = [s for s in result.gn_stats if s.scale_name not in dropped or s.shift_name not in dropped]


__all__ = ["RULES", "CacheSpec", "DenseOp", "GroupNormStats", "Refusal", "Rule", "SparsifyPass", "SparsifyResult"]
