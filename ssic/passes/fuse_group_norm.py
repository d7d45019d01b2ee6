"""The ``fuse-group-norm`` pass of the fused ONNX Runtime lowering: the ``[C]`` arithmetic of each
incremental GroupNorm becomes one ``ssic::GroupNormAffine``.

For each GroupNorm in the sparse region the sparse rewrite (``_incremental_stats`` in
``ssic/passes/sparsify/normalization.py``) turns the prime run's sums and the edit's change of them
into the per-channel scale and shift with 24 stock ops on ``[C]`` vectors::

    new1 = Add(sum, dsum)                       new2 = Add(sumsq, dsumsq)    (graph outputs: commits)
    mean = Div(ReduceSum(Reshape(new1, [G, C/G]), [1]), count)
    var  = Sub(Div(ReduceSum(Reshape(new2, [G, C/G]), [1]), count), Mul(mean, mean))
    inv  = Reciprocal(Sqrt(Add(var, eps)))
    scale = Mul(Reshape(Expand(inv, [G, C/G]), [C]), gamma)
    shift = Sub(beta, Mul(Reshape(Expand(mean, [G, C/G]), [C]), scale))
    Cast(scale, FLOAT), Cast(shift, FLOAT)

Each is microseconds of work, but ONNX Runtime pays its per-node cost for every one: on PD at a 1.2%
edit, 3,447 such nodes took about 30 ms of a 200 ms sparse run (2 threads). This pass matches that form
(every intermediate read by nothing else; the two Adds may also be graph outputs) and replaces it with
``new1, new2, scale, shift = ssic::GroupNormAffine(sum, sumsq, dsum, dsumsq, gamma, beta)``
(``plugins/ort/kernels.cpp``; reference ``ssic.ops.group_norm_affine_ref``): the same float64
arithmetic, so the results equal the stock form's up to the order of the per-group sums.

Only the ONNX Runtime target runs it (the TensorRT plugins and the standard lowering have no
GroupNormAffine); ``--disable-pass fuse-group-norm`` keeps the stock form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.ops import DOMAIN, GROUP_NORM_AFFINE
from ssic.passes.rewrite import fuse_matches, is_stock, readers
from ssic.passes.sparsify.context import const_array as _const


class _NoMatch(Exception):
    pass


def _producer(value: ir.Value | None, op_type: str, nodes: list[ir.Node]) -> ir.Node:
    """The stock ``op_type`` node producing ``value`` (recorded in ``nodes``); else no match."""
    node = value.producer() if value is not None else None
    if not is_stock(node, op_type):
        raise _NoMatch
    nodes.append(node)
    return node


def _split(node: ir.Node) -> tuple[ir.Value, np.ndarray]:
    """``(the non-constant input, the constant)`` of a binary node with one constant input."""
    a, b = node.inputs
    ca, cb = _const(a), _const(b)
    if (ca is None) == (cb is None):
        raise _NoMatch
    return (b, ca) if ca is not None else (a, cb)


def _per_channel(value: ir.Value, groups_shape: list[np.ndarray], nodes: list[ir.Node]) -> ir.Value:
    """``x`` of ``Reshape(Expand(x, [G, C/G]), [C])``; the ``[G, C/G]`` shape goes to ``groups_shape``."""
    expand = _producer(_producer(value, "Reshape", nodes).inputs[0], "Expand", nodes)
    shape = _const(expand.inputs[1])
    if shape is None:
        raise _NoMatch
    groups_shape.append(shape.reshape(-1))
    return expand.inputs[0]


def _group_sum(value: ir.Value, groups_shape: list[np.ndarray], nodes: list[ir.Node]) -> ir.Node:
    """The ``Add`` of ``ReduceSum(Reshape(Add(...), [G, C/G]), axes=[1], keepdims=1)`` at ``value``."""
    red = _producer(value, "ReduceSum", nodes)
    axes = _const(red.inputs[1]) if len(red.inputs) > 1 and red.inputs[1] is not None else None
    if axes is None or axes.reshape(-1).tolist() != [1] or red.attributes.get_int("keepdims", 1) != 1:
        raise _NoMatch
    reshape = _producer(red.inputs[0], "Reshape", nodes)
    shape = _const(reshape.inputs[1])
    if shape is None:
        raise _NoMatch
    groups_shape.append(shape.reshape(-1))
    add = reshape.inputs[0].producer()
    if not is_stock(add, "Add") or len(add.inputs) != 2:
        raise _NoMatch
    return add


def _match(scale_cast: ir.Node) -> dict | None:
    """The stock form ending in ``scale_cast`` (the Cast of the scale), or None."""
    if not is_stock(scale_cast, "Cast") or scale_cast.attributes.get_int("to", 0) != ir.DataType.FLOAT:
        return None
    nodes: list[ir.Node] = [scale_cast]
    shapes: list[np.ndarray] = []
    try:
        scale_mul = _producer(scale_cast.inputs[0], "Mul", nodes)
        inv_c, gamma = _split(scale_mul)
        inv = _per_channel(inv_c, shapes, nodes)
        sqrt = _producer(_producer(inv, "Reciprocal", nodes).inputs[0], "Sqrt", nodes)
        var, eps = _split(_producer(sqrt.inputs[0], "Add", nodes))
        var_sub = _producer(var, "Sub", nodes)
        ex2, count2 = _split(_producer(var_sub.inputs[0], "Div", nodes))
        square = _producer(var_sub.inputs[1], "Mul", nodes)
        mean = square.inputs[0]
        if square.inputs[1] is not mean:
            raise _NoMatch
        mean_value, count1 = _split(_producer(mean, "Div", nodes))
        add1 = _group_sum(mean_value, shapes, nodes)
        add2 = _group_sum(ex2, shapes, nodes)
        # the shift: Cast(Sub(beta, Mul(Reshape(Expand(mean)), scale)))
        uses = readers(scale_mul.outputs[0])
        muls = [n for n, _ in uses if is_stock(n, "Mul") and n is not scale_cast]
        if len(uses) != 2 or len(muls) != 1:
            raise _NoMatch
        mean_c = next(v for v in muls[0].inputs if v is not scale_mul.outputs[0])
        if _per_channel(mean_c, shapes, nodes) is not mean:
            raise _NoMatch
        nodes.append(muls[0])
        sub_use = readers(muls[0].outputs[0])
        if len(sub_use) != 1 or not is_stock(sub_use[0][0], "Sub") or sub_use[0][1] != 1:
            raise _NoMatch
        shift_sub = sub_use[0][0]
        nodes.append(shift_sub)
        beta = _const(shift_sub.inputs[0])
        cast_use = readers(shift_sub.outputs[0])
        if beta is None or len(cast_use) != 1 or not is_stock(cast_use[0][0], "Cast") \
                or cast_use[0][0].attributes.get_int("to", 0) != ir.DataType.FLOAT:
            raise _NoMatch
        shift_cast = cast_use[0][0]
        nodes.append(shift_cast)
    except _NoMatch:
        return None
    c = gamma.size
    if any(s.size != 2 for s in shapes) or len({tuple(s.tolist()) for s in shapes}) != 1:
        return None
    groups, per = (int(v) for v in shapes[0])
    counts = {float(count1.reshape(-1)[0]), float(count2.reshape(-1)[0])} if count1.size == count2.size == 1 else set()
    if groups * per != c or beta.size != c or eps.size != 1 or len(counts) != 1:
        return None
    count = counts.pop()
    if count != int(count) or count < 1:
        return None
    # every intermediate is read inside the pattern only; the Adds may also be graph outputs (commits)
    inside = set(map(id, nodes))
    for node in nodes:
        if node in (scale_cast, shift_cast):
            continue
        for out in node.outputs:
            if out.is_graph_output() or any(id(n) not in inside for n, _ in out.uses()):
                return None
    for add in (add1, add2):
        if any(id(n) not in inside for n, _ in add.outputs[0].uses()):
            return None
    return {"adds": (add1, add2), "gamma": scale_mul, "beta": shift_sub, "groups": groups, "count": int(count),
            "eps": float(eps.reshape(-1)[0]), "dead": [*nodes, add1, add2],
            "olds": [add1.outputs[0], add2.outputs[0], scale_cast.outputs[0], shift_cast.outputs[0]]}


def _const_input(node: ir.Node) -> ir.Value:
    return next(v for v in node.inputs if _const(v) is not None)


def _build(cast: ir.Node, m: dict) -> ir.Node | None:
    add1, add2 = m["adds"]
    gamma, beta = _const_input(m["gamma"]), m["beta"].inputs[0]
    if any(_const(v).dtype != np.float64 for v in (gamma, beta)):  # float64 [C], as the stock form computes
        return None
    return ir.Node(DOMAIN, GROUP_NORM_AFFINE.name,
                   [add1.inputs[0], add2.inputs[0], add1.inputs[1], add2.inputs[1], gamma, beta],
                   [ir.AttrInt64("groups", m["groups"]), ir.AttrInt64("count", m["count"]),
                    ir.AttrFloat32("epsilon", m["eps"])],
                   name=f"{cast.name or 'gn'}/group_norm_affine", num_outputs=4)


class FuseGroupNormPass(ir.passes.InPlacePass):
    """Replace the stock-op GroupNorm scale/shift arithmetic with ``ssic::GroupNormAffine`` (see the module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, fuse_matches(model, _match, _build) > 0)
