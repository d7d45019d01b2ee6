"""The ``fuse-cache-store`` pass of the fused ONNX Runtime lowering: each NHWC cache the prime graph
writes becomes one ``ssic::CacheStore``.

``build-prime`` (:mod:`ssic.passes.build_prime`) writes an NHWC cache and a GroupNorm's incremental
statistics in stock ONNX ops::

    cache = Reshape(Transpose([Cast(x, to=FLOAT16)], perm=[0, 2, 3, 1]), [H, W, C])
    sum   = Cast(ReduceSum(x, axes=[0, 2, 3], keepdims=0), to=DOUBLE)
    sumsq = Cast(ReduceSumSquare(x, axes=[0, 2, 3], keepdims=0), to=DOUBLE)

ONNX Runtime runs these as separate passes over ``x`` plus a copy: the Transpose into its arena and the
Reshape from there into the buffer the cache is bound to. On DDIM (598 MB of float16 caches) they took
510 ms of a 3.36 s prime, 3 Transposes of [1, 256, 256, 256] float16 110 ms each, and the reductions
86 ms more. This pass replaces each such cache with ``cache, sum, sumsq = ssic::CacheStore(x, to)``,
placed right after the node that produces ``x`` (the stock chain followed the whole model, so every
cached activation stayed alive to the end), which reads ``x`` once and writes the cache where it is
bound (``plugins/ort/kernels.cpp``; reference :func:`ssic.ops.cache_store_ref`); a GroupNorm's sums of the same ``x`` come from its ``sum`` and
``sumsq`` outputs. The cache is bit for bit the stock ops' (float16 rounded to nearest even); the sums
differ by summation order only (per-row float sums added in float64).

Only the ONNX Runtime target runs it; ``--disable-pass fuse-cache-store`` keeps the stock form.
"""

from __future__ import annotations

import onnx_ir as ir

from ssic.ops import CACHE_FLOAT, CACHE_FLOAT16, CACHE_STORE, DOMAIN, VERSION
from ssic.passes.rewrite import STOCK_DOMAINS, is_stock, only_reader, take_over
from ssic.passes.sparsify.context import const_array as _const


def _nhwc_cache(out: ir.Value) -> tuple[ir.Value, int, list[ir.Node]] | None:
    """``(x, to, nodes)`` when graph output ``out`` is ``Reshape(Transpose([Cast(x)], perm=[0,2,3,1]))``
    to ``[H, W, C]`` of a ``[1, C, H, W]`` float32 ``x``, each intermediate read only there."""
    reshape = out.producer()
    if not is_stock(reshape, "Reshape"):
        return None
    transpose = reshape.inputs[0].producer()
    if not is_stock(transpose, "Transpose") or only_reader(reshape.inputs[0]) is None:
        return None
    if list(transpose.attributes.get_ints("perm", [])) != [0, 2, 3, 1]:
        return None
    x, nodes, to = transpose.inputs[0], [reshape, transpose], CACHE_FLOAT
    cast = x.producer()
    if is_stock(cast, "Cast") and cast.attributes.get_int("to", 0) == CACHE_FLOAT16 and only_reader(x) is not None:
        x, to = cast.inputs[0], CACHE_FLOAT16
        nodes.append(cast)
    if x.dtype != ir.DataType.FLOAT or x.shape is None or len(x.shape) != 4 or x.shape[0] != 1:
        return None
    _, c, h, w = x.shape
    target = _const(reshape.inputs[1])
    if target is None or target.reshape(-1).tolist() != [h, w, c] or not all(isinstance(d, int) for d in (c, h, w)):
        return None
    return x, to, nodes


def _channel_sum(out: ir.Value) -> tuple[ir.Value, str, list[ir.Node]] | None:
    """``(x, "sum" | "sumsq", nodes)`` when graph output ``out`` is ``Cast(ReduceSum[Square](x, axes=[0, 2, 3],
    keepdims=0), to=DOUBLE)``."""
    cast = out.producer()
    if not is_stock(cast, "Cast") or cast.attributes.get_int("to", 0) != ir.DataType.DOUBLE:
        return None
    red = cast.inputs[0].producer()
    if red is None or red.domain not in STOCK_DOMAINS or red.op_type not in ("ReduceSum", "ReduceSumSquare"):
        return None
    if only_reader(cast.inputs[0]) is None or red.attributes.get_int("keepdims", 1) != 0:
        return None
    axes = _const(red.inputs[1]) if len(red.inputs) > 1 and red.inputs[1] is not None else None
    if axes is None or axes.reshape(-1).tolist() != [0, 2, 3]:
        return None
    return red.inputs[0], "sum" if red.op_type == "ReduceSum" else "sumsq", [cast, red]


class FuseCacheStorePass(ir.passes.InPlacePass):
    """Write the prime graph's NHWC caches (and the GroupNorm sums of their sources) with
    ``ssic::CacheStore`` (see the module)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        stores: dict[int, ir.Node] = {}  # id(x) -> its first CacheStore
        dead: list[ir.Node] = []
        for out in list(graph.outputs):
            m = _nhwc_cache(out)
            if m is None:
                continue
            x, to, nodes = m
            node = ir.Node(DOMAIN, CACHE_STORE.name, [x], [ir.AttrInt64("to", to)],
                           name=f"ssic/prime/cache_store_{out.name}", num_outputs=3)
            # right after x's producer (build-prime appended the stock chain at the end of the graph): x is
            # read while it is still in cache, and freed as soon as its other readers are done (a
            # GroupNormalization reading it then copied it less: BENCHMARKS.md, ninth session)
            producer = x.producer()
            if producer is not None and producer.graph is graph:
                graph.insert_after(producer, node)
            else:
                graph.insert_before(next(iter(graph)), node)
            node.outputs[1].name, node.outputs[2].name = f"{node.name}/sum", f"{node.name}/sumsq"
            for o in node.outputs[1:]:
                o.type, o.shape = ir.TensorType(ir.DataType.DOUBLE), ir.Shape([x.shape[1]])
            take_over(out, node.outputs[0])
            stores.setdefault(id(x), node)
            dead += nodes
        for out in list(graph.outputs):
            m = _channel_sum(out)
            if m is None or id(m[0]) not in stores:
                continue
            x, which, nodes = m
            store = stores[id(x)]
            take_over(out, store.outputs[1 if which == "sum" else 2])
            dead += nodes
        if dead:
            model.opset_imports[DOMAIN] = VERSION
            graph.remove(dead, safe=True)
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)  # the Reshapes' shape constants
        return ir.passes.PassResult(model, bool(dead))
