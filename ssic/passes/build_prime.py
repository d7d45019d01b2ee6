"""Build the prime graph: the dense model plus one output per cache the sparse graph reads.

Activation caches are outputs in the layout the sparse graph reads them (NCHW as in the model,
or ``[H, W, C]`` for gather sources) and at their declared type: a float16 cache is Cast before the
layout change, so the Transpose moves half the bytes. GroupNorm caches are the per-channel ``scale = gamma/sigma`` and
``shift = beta - mu*gamma/sigma`` of the original input, computed with a few Reduce ops.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.passes.sparsify import CacheSpec, GroupNormStats

_IR_DTYPES = {"float64": ir.DataType.DOUBLE, "float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


class BuildPrimePass:
    """Add cache outputs to a copy of the (pre-processed) model."""

    def __init__(self, caches: list[CacheSpec], gn_stats: list[GroupNormStats]) -> None:
        self.caches = caches
        self.gn_stats = {s.scale_name: s for s in gn_stats}

    def __call__(self, model: ir.Model) -> ir.Model:
        graph = model.graph
        self.graph = graph
        self.counter = 0
        values: dict[str, ir.Value] = {}
        for v in graph.inputs:
            values[v.name] = v
        for node in graph:
            for out in node.outputs:
                values[out.name] = out
        for v in graph.initializers.values():
            values[v.name] = v
        done_gn: set[str] = set()
        for cache in self.caches:
            src = values[cache.source]
            if cache.kind == "activation":
                cast = cache.dtype == "float16"
                if cast:
                    src = self._op("Cast", [src], {"to": ir.DataType.FLOAT16})
                if cache.layout == "NCHW":
                    out = src if cast else self._op("Identity", [src])
                else:
                    t = self._op("Transpose", [src], {"perm": [0, 2, 3, 1]})
                    out = self._op("Reshape", [t, self._const(np.array(cache.shape, np.int64))])
                self._output(out, cache)
            elif cache.kind in ("gn_scale", "gn_sum") and cache.name not in done_gn:
                stats = self.gn_stats[cache.name]
                if stats.incremental:
                    scale, shift = self._channel_sums(src)
                else:
                    scale, shift = self._group_norm_stats(src, stats)
                self._output(scale, cache)
                shift_spec = next(c for c in self.caches if c.name == stats.shift_name)
                self._output(shift, shift_spec)
                done_gn.add(cache.name)
        return model

    def _output(self, value: ir.Value, cache: CacheSpec) -> None:
        value.name = cache.name
        value.shape = ir.Shape(cache.shape)
        value.type = ir.TensorType(_IR_DTYPES[cache.dtype])
        self.graph.outputs.append(value)

    def _op(self, op_type: str, inputs, attrs=None) -> ir.Value:
        self.counter += 1
        node = ir.node(op_type, inputs, attrs or {}, name=f"ssic/prime/{op_type}_{self.counter}")
        node.outputs[0].name = f"{node.name}/out0"
        self.graph.append(node)
        return node.outputs[0]

    def _const(self, array: np.ndarray) -> ir.Value:
        self.counter += 1
        name = f"ssic/prime/const_{self.counter}"
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def _channel_sums(self, x: ir.Value) -> tuple[ir.Value, ir.Value]:
        """Per-channel sum and sum of squares of ``x`` (incremental GroupNorm statistics).

        Reduced in float32 (two read-only passes; casting the tensor to float64 first tripled the prime
        run's cost on DDIM), returned as float64 for the sparse graph's [C]-sized arithmetic.
        """
        axes = self._const(np.array([0, 2, 3], np.int64))
        s1 = self._op("ReduceSum", [x, axes], {"keepdims": 0})
        s2 = self._op("ReduceSumSquare", [x, axes], {"keepdims": 0})
        return (self._op("Cast", [s1], {"to": ir.DataType.DOUBLE}),
                self._op("Cast", [s2], {"to": ir.DataType.DOUBLE}))

    def _group_norm_stats(self, x: ir.Value, stats: GroupNormStats) -> tuple[ir.Value, ir.Value]:
        c = stats.gamma.shape[0]
        g = stats.num_groups
        grouped = self._op("Reshape", [x, self._const(np.array([g, -1], np.int64))])
        mean = self._op("ReduceMean", [grouped, self._const(np.array([1], np.int64))], {"keepdims": 1})
        centered = self._op("Sub", [grouped, mean])
        var = self._op("ReduceMean", [self._op("Mul", [centered, centered]), self._const(np.array([1], np.int64))],
                       {"keepdims": 1})
        inv = self._op("Reciprocal", [self._op("Sqrt", [self._op("Add", [var, self._const(np.array(stats.epsilon, np.float32))])])])
        # [G, 1] -> [G, C/G] -> [C]
        per_group_shape = self._const(np.array([g, c // g], np.int64))
        flat = self._const(np.array([c], np.int64))
        inv_c = self._op("Reshape", [self._op("Expand", [inv, per_group_shape]), flat])
        mean_c = self._op("Reshape", [self._op("Expand", [mean, per_group_shape]), flat])
        scale = self._op("Mul", [inv_c, self._const(stats.gamma)])
        shift = self._op("Sub", [self._const(stats.beta), self._op("Mul", [mean_c, scale])])
        return scale, shift
