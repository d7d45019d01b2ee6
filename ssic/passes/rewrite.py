"""Graph-rewrite helpers shared by the passes that replace nodes (onnx-ir): which stock node reads a
value, and a new value taking an old one's place.
"""

from __future__ import annotations

import onnx_ir as ir

#: The domains of stock ONNX ops.
STOCK_DOMAINS = ("", "ai.onnx")


def is_stock(node: ir.Node | None, op_type: str) -> bool:
    """Whether ``node`` is the stock ONNX op ``op_type``."""
    return node is not None and node.op_type == op_type and node.domain in STOCK_DOMAINS


def readers(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The ``(node, input index)`` uses of ``value``; none for a graph output (it must stay as it is)."""
    return [] if value.is_graph_output() else list(value.uses())


def only_reader(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The one use of ``value`` when it has exactly one and is not a graph output, else None."""
    uses = readers(value)
    return uses[0] if len(uses) == 1 else None


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, graph outputs included, under ``old``'s name, shape and type."""
    name, shape, type_ = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name, new.shape, new.type = name, shape, type_
