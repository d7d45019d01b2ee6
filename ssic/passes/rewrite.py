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


def fuse_matches(model: ir.Model, match, build) -> int:
    """Replace every match in ``model``'s graph with one new node; returns how many were replaced.

    For each node in graph order (skipping nodes an earlier replacement removed), ``match(node)``
    returns None or a dict with ``"olds"`` (the values the new node's outputs take over, in output
    order) and ``"dead"`` (the nodes to remove). ``build(node, m)`` returns the new node (or None to
    leave the match alone); it is inserted before ``node``, its outputs take over ``"olds"`` (names,
    shapes, types where the old value had one, and graph outputs) and the dead nodes are removed. Unused nodes and
    initializers left behind are removed at the end, and the graph is sorted."""
    graph = model.graph
    removed: set[int] = set()
    fused = 0
    for node in list(graph):
        if id(node) in removed:
            continue
        m = match(node)
        if m is None or any(id(n) in removed for n in m["dead"]):
            continue
        new = build(node, m)
        if new is None:
            continue
        graph.insert_before(node, new)
        for old, out in zip(m["olds"], new.outputs, strict=True):
            typed = out.type
            take_over(old, out)
            if out.type is None:  # the old value had no type: keep the one build gave
                out.type = typed
        graph.remove(m["dead"], safe=True)
        removed.update(id(n) for n in m["dead"])
        fused += 1
    if fused:
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        graph.sort()
        RemoveUnusedNodesPass()(model)
    return fused
