"""Op rules and their registry: the one table of ops the sparse rewrite and exact mode know.

A :class:`Rule` handles one or more ONNX op types (default domain). For the sparse rewrite it has
``check(node, ctx) -> Refusal | None`` (read-only: a refusal's reason is what ``ssic inspect`` shows
for a layer left dense) and ``rewrite(node, ctx)`` (records the output's tile representation). For
exact mode it has ``propagate_mask(node, masks)``: which output pixels can change given which input
pixels changed (the op's receptive field). An op may have rules that only propagate masks (it runs
dense, but exact mode still knows its receptive field); an op without any rule runs dense and, in
exact mode, marks its whole output as changed.

The rules of a family live in one module (``conv``, ``normalization``, ``pointwise``,
``resampling``); :data:`RULES` maps op types to rules in the order they are tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssic.passes.mask_graph import MaskGraphBuilder

if TYPE_CHECKING:
    import onnx_ir as ir

    from ssic.passes.analysis import ConvDecision
    from ssic.passes.sparsify.context import SparsifyContext

#: mask value of a tensor whose every pixel may have changed (a global op on its path)
ALL = "ALL"


@dataclass(frozen=True)
class Refusal:
    """Why a rule does not rewrite a node; the node then runs dense."""

    reason: str


class MaskGraph(MaskGraphBuilder):
    """Builder of the exact-mode mask graph (:class:`ssic.passes.mask_graph.MaskGraphBuilder`) with one
    float ``[1, 1, H, W]`` change mask per value of the model.

    A mask is the name of a tensor in the mask graph (1 where the value may differ from the prime
    run), :data:`ALL`, or None (the value cannot change).
    """

    def __init__(self) -> None:
        super().__init__("ssic_exact_mask")
        self.masks: dict[ir.Value, str] = {}

    def of(self, value: ir.Value | None) -> str | None:
        return None if value is None else self.masks.get(value)


class Rule:
    """One op rule. Subclasses set ``op_types`` and override what they support."""

    op_types: tuple[str, ...] = ()
    #: False for rules that also apply when no input is sparse (a conv at a sparse resolution)
    needs_sparse_input: bool = True

    def describe(self, node: ir.Node, ctx: SparsifyContext) -> ConvDecision | None:
        """A MAC-heavy layer's ``ssic inspect`` row, created before ``check`` (None for light ops)."""
        return None

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        """None when :meth:`rewrite` applies to ``node``, else why not. Must not change the graph."""
        return Refusal(f"{node.op_type} has no tile rule (runs dense)")

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        """Record the tile representation of ``node``'s outputs (only called after ``check`` passed)."""
        raise NotImplementedError

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        """Exact mode: the change mask of ``node``'s outputs (a mask name or :data:`ALL`).

        Called only when some input may have changed and none is :data:`ALL`. The default is
        :data:`ALL` (the whole output may change).
        """
        return ALL

    @property
    def has_mask_rule(self) -> bool:
        return type(self).propagate_mask is not Rule.propagate_mask


RULES: dict[str, list[Rule]] = {}


def register(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES` for each of its op types (tried in registration order)."""
    for op_type in rule.op_types:
        RULES.setdefault(op_type, []).append(rule)
    return rule


def rules_for(node: ir.Node) -> list[Rule]:
    """The rules for ``node`` in the order they are tried (none for other domains)."""
    if node.domain not in ("", "ai.onnx"):
        return []
    return RULES.get(node.op_type, [])


def mask_rule_for(node: ir.Node) -> Rule | None:
    """The rule that knows ``node``'s receptive field, or None (its whole output may change)."""
    for rule in rules_for(node):
        if rule.has_mask_rule:
            return rule
    return None
