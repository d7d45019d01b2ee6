"""The ``fuse-tile-moments`` pass of the fused ONNX Runtime lowering: the incremental GroupNorm
statistics' correction becomes one ``ssic::TileMoments``.

For each GroupNorm input in the sparse region (``ssic/passes/sparsify/normalization.py``) the
sparse rewrite emits, per concat part, in stock ONNX ops plus a gather::

    old  = TileGather(<no tiles>, cache, <no idx>, idx)    1x1, NHWC: the prime run's values under the tiles
    diff = Sub(new, old)          [-> Mul(diff, valid)]     valid: rows of clipped tiles inside the image
    sum  = Cast(ReduceSum(diff, axes=[0], keepdims=0), DOUBLE)
    sq   = Cast(ReduceSum(Mul(diff, Add(new, old)), axes=[0], keepdims=0), DOUBLE)

Three ``[M, C]`` temporaries, two reductions and the gathered copy of the old values. This pass
matches that form (each intermediate read by nothing else) and replaces it with
``sum, sq = ssic::TileMoments(new, cache, idx)``, which reads each tile and the cache under it once
(``plugins/ort/kernels.cpp``; reference ``ssic.ops.tile_moments_ref``). The sums differ from the
unfused form by float summation order only (per-tile float sums added in float64).

Only the ONNX Runtime target runs it (the TensorRT plugins and the standard lowering have no
TileMoments); ``--disable-pass fuse-tile-moments`` keeps the stock form.
"""

from __future__ import annotations

import onnx_ir as ir

from ssic.ops import DOMAIN, LAYOUT_NHWC, TILE_MOMENTS
from ssic.passes.rewrite import STOCK_DOMAINS, fuse_matches, is_stock, only_reader, readers
from ssic.passes.sparsify.context import const_array as _const


def _only(value: ir.Value, op_type: str) -> ir.Node | None:
    """The single stock-domain ``op_type`` node reading ``value``, else None."""
    use = only_reader(value)
    return use[0] if use is not None and is_stock(use[0], op_type) else None


def _sum_to_double(red: ir.Node | None, value: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """``(red, cast)`` when ``red`` is ``ReduceSum(value, axes=[0], keepdims=0)`` read only by a
    ``Cast`` to DOUBLE."""
    if red is None or red.op_type != "ReduceSum" or red.domain not in STOCK_DOMAINS or red.inputs[0] is not value:
        return None
    if red.attributes.get_int("keepdims", 1) != 0:
        return None
    axes = _const(red.inputs[1]) if len(red.inputs) > 1 and red.inputs[1] is not None else None
    if axes is None or axes.reshape(-1).tolist() != [0]:
        return None
    cast = _only(red.outputs[0], "Cast")
    if cast is None or cast.attributes.get_int("to", 0) != ir.DataType.DOUBLE:
        return None
    return red, cast


def _old_values_gather(node: ir.Node) -> bool:
    """A TileGather that reads only the NHWC cache, 1x1, no epilogue: the values under the tiles."""
    if node.domain != DOMAIN or node.op_type != "TileGather" or len(node.inputs) > 4:
        return False
    a = node.attributes
    plain = (a.get_int("kernel") == 1 and a.get_int("stride", 1) == 1 and a.get_int("upsample", 1) == 1
             and a.get_int("pad_top", 0) == 0 and a.get_int("pad_left", 0) == 0 and a.get_int("activation", 0) == 0
             and a.get_int("src_layout", LAYOUT_NHWC) == LAYOUT_NHWC and a.get_int("pad_mode", 0) == 0
             and a.get_int("src_tile", 1) == 1)
    tiles = node.inputs[0].shape
    return plain and tiles is not None and len(tiles) == 2 and tiles[0] == 0


def _match(sub: ir.Node) -> dict | None:
    if sub.op_type != "Sub" or sub.domain not in STOCK_DOMAINS or len(sub.inputs) != 2:
        return None
    new, old = sub.inputs
    gather = old.producer()
    if gather is None or not _old_values_gather(gather):
        return None
    old_uses = readers(old)
    adds = [n for n, _ in old_uses if n.op_type == "Add" and n.domain in STOCK_DOMAINS and set(n.inputs) == {new, old}]
    if len(old_uses) != 2 or len(adds) != 1 or not any(n is sub for n, _ in old_uses):
        return None
    add = adds[0]
    dead = [gather, sub, add]
    diff = sub.outputs[0]
    mask = _only(diff, "Mul")
    if mask is not None:  # diff * valid ([M, 1]): tiles clipped at the image's edge
        valid = mask.inputs[1] if mask.inputs[0] is diff else mask.inputs[0]
        if valid in (new, old) or (valid.shape is not None and (len(valid.shape) != 2 or valid.shape[1] != 1)):
            return None
        dead.append(mask)
        diff = mask.outputs[0]
    diff_uses = readers(diff)
    if len(diff_uses) != 2:
        return None
    prod = [n for n, _ in diff_uses if n.op_type == "Mul" and n.domain in STOCK_DOMAINS and set(n.inputs) == {diff, add.outputs[0]}]
    if len(prod) != 1 or len(readers(add.outputs[0])) != 1:
        return None
    reduce = [n for n, _ in diff_uses if n.op_type == "ReduceSum"]
    first = _sum_to_double(reduce[0] if len(reduce) == 1 else None, diff)
    second = _sum_to_double(_only(prod[0].outputs[0], "ReduceSum"), prod[0].outputs[0])
    if first is None or second is None:
        return None
    dead += [prod[0], *first, *second]
    return {"new": new, "cache": gather.inputs[1], "idx": gather.inputs[3], "tile": gather.attributes.get_int("tile"),
            "olds": [first[1].outputs[0], second[1].outputs[0]], "dead": dead}


class FuseTileMomentsPass(ir.passes.InPlacePass):
    """Replace the stock-op GroupNorm statistics correction with ``ssic::TileMoments`` (see the module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        def build(sub: ir.Node, m: dict) -> ir.Node:
            node = ir.Node(DOMAIN, TILE_MOMENTS.name, [m["new"], m["cache"], m["idx"]],
                           [ir.AttrInt64("tile", m["tile"])], name=f"{sub.name or 'gn'}/tile_moments", num_outputs=2)
            for out in node.outputs:
                out.type = ir.TensorType(ir.DataType.DOUBLE)
            return node

        # the valid-row masks left without readers go with the unused nodes
        return ir.passes.PassResult(model, fuse_matches(model, _match, build) > 0)
