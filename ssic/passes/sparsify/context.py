"""The graph builder and state of one sparse rewrite, shared by every op rule.

:class:`SparsifyContext` holds the representation of every value seen so far
(:mod:`ssic.passes.sparsify.values`), the cache and tile-index inputs the sparse graph reads, and the
helpers the rules build nodes with (``add``, ``const``, ``gather``, ``materialize``, ...). Rules read
it in ``check`` and change it only in ``rewrite``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ssic.ops import (
    ACT_IDENTITY,
    ACT_LEAKY_RELU,
    ACT_RELU,
    ACT_SWISH,
    LAYOUT_NCHW,
    LAYOUT_NHWC,
    PAD_ZEROS,
)
from ssic.passes.analysis import ConvDecision, Grid, SparsePlan, spatial_hw, static_shape
from ssic.passes.sparsify.values import DenseValue, LazyResample, Rep, TileValue


@dataclass
class CacheSpec:
    """A cached activation: the prime graph outputs it, the sparse graph takes it as input."""

    name: str  # graph input/output name
    source: str  # the model value it caches
    layout: str  # "NCHW" ([1,C,H,W]), "NHWC" ([H,W,C]) or "C" (per-channel statistic)
    shape: tuple[int, ...]
    kind: str  # "activation", "gn_scale", "gn_shift" (cached statistics), "gn_sum", "gn_sumsq" (incremental)
    resolution: str | None = None
    layer: str | None = None
    dtype: str = "float32"
    #: the sparse graph output a commit folds into this cache: the value's new tiles ``[n*t*t, C]`` on
    #: the grid of ``resolution`` (activations) or the new ``[C]`` statistic; None: commit re-primes
    commit: str | None = None
    #: a token value's cache (self-attention keys/values, :func:`ssic.passes.sparsify.tokens.rows_cache`):
    #: the axes of ``shape`` that run over the pixels of ``resolution`` (one axis of ``H*W``, or ``(H, W)``);
    #: its commit output is ``shape`` with those axes collapsed into one of the active rows (tile order)
    rows: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        out = {
            "name": self.name, "source": self.source, "layout": self.layout, "shape": list(self.shape),
            "dtype": self.dtype, "kind": self.kind, "resolution": self.resolution, "layer": self.layer,
        }
        if self.commit is not None:
            out["commit"] = self.commit
        if self.rows is not None:
            out["rows"] = list(self.rows)
        return out


@dataclass
class GroupNormStats:
    """A GroupNorm whose per-channel scale/shift the prime graph computes on the original input."""

    input: str
    num_groups: int
    epsilon: float
    gamma: np.ndarray  # per channel
    beta: np.ndarray
    scale_name: str
    shift_name: str
    layer: str
    incremental: bool = False  # prime outputs per-channel sums (float64) instead of scale/shift


@dataclass
class DenseOp:
    """A node with a sparse input that runs dense (its inputs are materialised), and why."""

    node: str
    op_type: str
    reason: str

    def to_json(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}


@dataclass
class SparsifyResult:
    caches: list[CacheSpec] = field(default_factory=list)
    gn_stats: list[GroupNormStats] = field(default_factory=list)
    decisions: list[ConvDecision] = field(default_factory=list)
    #: nodes that had a sparse input but no rule took them (each materialises its inputs)
    dense_ops: list[DenseOp] = field(default_factory=list)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant tensor behind ``value`` as NumPy, or None when it is not constant."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def per_channel_ok(value: ir.Value, channels: int) -> bool:
    """Whether ``value`` broadcasts per channel (or as a scalar) over ``[1, C, H, W]``."""
    shape = static_shape(value)
    if shape is None:
        return False
    if len(shape) == 0 or math.prod(shape) == 1:
        return True
    dims = list(shape)
    while len(dims) < 4:
        dims.insert(0, 1)
    return len(dims) == 4 and dims[0] == 1 and dims[2] == 1 and dims[3] == 1 and dims[1] == channels


class SparsifyContext:
    """State and graph builder of one run of :class:`ssic.passes.sparsify.SparsifyPass`."""

    def __init__(self, model: ir.Model, plan: SparsePlan, gn_stats: str, cache_dtype: str = "float32") -> None:
        self.model = model
        self.graph = model.graph
        self.plan = plan
        self.gn_stats = gn_stats
        #: read a swish's input (with the activation in the gather) instead of caching its output
        self.recompute_swish = False
        self.cache_dtype = cache_dtype  # of activation caches: "float32" or "float16"
        self.reps: dict[ir.Value, Rep] = {}
        self.materialized: dict[ir.Value, ir.Value] = {}
        self.evaluated: dict[int, ir.Value] = {}
        self.cache_inputs: dict[tuple[str, str], ir.Value] = {}
        self.tile_inputs: dict[Grid, ir.Value] = {}
        self.empty: dict[tuple, ir.Value] = {}
        self.skip: set[ir.Node] = set()
        self.decisions: dict[ir.Node, ConvDecision] = {}
        self.counter = 0
        self.result = SparsifyResult()
        #: cache name -> the sparse-graph value a commit folds into it (see :meth:`note_commit`)
        self.commit_values: dict[str, ir.Value] = {}
        #: values a rule module builds once per sparse graph (e.g. a grid's raster row index), by key
        self.memo: dict[tuple, ir.Value] = {}

    @property
    def opset(self) -> int:
        """The model's default-domain opset (the form of the ops the rules emit must match it)."""
        return int(self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 18)))

    # ------------------------------------------------------------------ representations
    def rep(self, value: ir.Value) -> Rep:
        """The representation of ``value``: what a rule has recorded, else the dense value itself."""
        rep = self.reps.get(value)
        return rep if rep is not None else DenseValue(value)

    def is_sparse(self, value: ir.Value | None) -> bool:
        return value is not None and value in self.reps

    def set_rep(self, value: ir.Value, rep: Rep) -> None:
        self.reps[value] = rep

    def grid_for(self, hw: tuple[int, int] | None) -> Grid | None:
        return self.plan.grid_for(hw)

    def grid_of_output(self, node: ir.Node) -> Grid | None:
        return self.plan.grid_for(spatial_hw(node.outputs[0]))

    # ------------------------------------------------------------------ graph building
    def name(self, hint: str) -> str:
        self.counter += 1
        return f"ssic/{hint}_{self.counter}"

    def add(self, op_type: str, inputs, attributes=None, *, domain: str = "", name_hint: str = "",
            num_outputs: int = 1):
        """Append a node; return its output (or outputs when ``num_outputs > 1``)."""
        node = ir.node(op_type, list(inputs), attributes or {}, domain=domain, num_outputs=num_outputs,
                       name=self.name(name_hint or op_type))
        for j, out in enumerate(node.outputs):
            out.name = f"{node.name}/out{j}"
        self.graph.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, array: np.ndarray, hint: str) -> ir.Value:
        name = self.name(hint)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def tiles_input(self, grid: Grid) -> ir.Value:
        """The sparse graph's ``[n, 2]`` active-tile input of ``grid``."""
        if grid not in self.tile_inputs:
            value = ir.Value(name=grid.tiles_input, shape=ir.Shape([f"n_{grid.name}", 2]),
                             type=ir.TensorType(ir.DataType.INT64))
            self.graph.inputs.append(value)
            self.tile_inputs[grid] = value
        return self.tile_inputs[grid]

    def cache(self, value: ir.Value, layout: str, layer: str | None) -> ir.Value:
        """The sparse graph input holding ``value``'s prime-run value (``"NCHW"`` or ``"NHWC"``), of
        type ``self.cache_dtype``: only ``TileGather`` and ``TileScatter`` read it (both accept float16).
        A model output's own NCHW cache stays float32: its pixels outside the active tiles are returned
        as they are, so they stay the primed output exactly (one tensor, usually a few channels)."""
        key = (value.name, layout)
        if key not in self.cache_inputs:
            _, c, h, w = static_shape(value)
            cshape = (1, c, h, w) if layout == "NCHW" else (h, w, c)
            name = f"ssic.cache.{layout.lower()}.{value.name}"
            dtype = "float32" if layout == "NCHW" and value.is_graph_output() else self.cache_dtype
            irtype = ir.DataType.FLOAT16 if dtype == "float16" else ir.DataType.FLOAT
            inp = ir.Value(name=name, shape=ir.Shape(cshape), type=ir.TensorType(irtype))
            self.graph.inputs.append(inp)
            self.cache_inputs[key] = inp
            self.result.caches.append(CacheSpec(name, value.name, layout, cshape, "activation", f"{h}x{w}", layer,
                                                dtype))
        return self.cache_inputs[key]

    def note_commit(self, cache: ir.Value, update: ir.Value | None) -> None:
        """Record that ``update`` holds the edited value of cache input ``cache``: the cached tensor's
        new tiles on its grid (the tiles the sparse graph read with the cache) or a new ``[C]`` statistic.
        The first record wins (every tile tensor of one value holds the same numbers)."""
        if update is not None and update.producer() is not None:
            self.commit_values.setdefault(cache.name, update)

    def add_commit_outputs(self) -> None:
        """Make every recorded update a graph output ``ssic.commit.<cache>`` and name it in the cache's spec.

        The values are computed by every edit anyway; an output shared by two caches (the NHWC and NCHW
        caches of one value) is listed once.
        """
        for spec in self.result.caches:
            value = self.commit_values.get(spec.name)
            if value is None:
                continue
            if not value.is_graph_output():
                value.name = f"ssic.commit.{spec.name.removeprefix('ssic.')}"
                if spec.layout == "C":
                    value.shape = value.shape or ir.Shape(spec.shape)
                    value.type = value.type or ir.TensorType(
                        ir.DataType.DOUBLE if spec.dtype == "float64" else ir.DataType.FLOAT)
                elif spec.rows is not None:
                    r0, r1 = spec.rows[0], spec.rows[-1]
                    value.shape = value.shape or ir.Shape([*spec.shape[:r0], None, *spec.shape[r1 + 1:]])
                    value.type = value.type or ir.TensorType(ir.DataType.FLOAT)
                else:
                    channels = spec.shape[1] if spec.layout == "NCHW" else spec.shape[-1]
                    value.shape = value.shape or ir.Shape([None, channels])
                    value.type = value.type or ir.TensorType(ir.DataType.FLOAT)  # tile tensors are float32
                self.graph.outputs.append(value)
            spec.commit = value.name

    def stat_input(self, name: str, source: ir.Value, channels: int, kind: str, grid: Grid, layer: str,
                   dtype: str) -> ir.Value:
        """A per-channel ``[C]`` statistic input (GroupNorm sums or scale/shift), declared once."""
        key = (name, "C")
        if key not in self.cache_inputs:
            irtype = ir.DataType.DOUBLE if dtype == "float64" else ir.DataType.FLOAT
            v = ir.Value(name=name, shape=ir.Shape([channels]), type=ir.TensorType(irtype))
            self.graph.inputs.append(v)
            self.cache_inputs[key] = v
            self.result.caches.append(CacheSpec(name, source.name, "C", (channels,), kind, grid.name, layer, dtype))
        return self.cache_inputs[key]

    def empty_tiles(self, channels: int) -> ir.Value:
        key = ("tiles", channels)
        if key not in self.empty:
            self.empty[key] = self.const(np.zeros((0, channels), np.float32), f"empty_tiles_c{channels}")
        return self.empty[key]

    def empty_idx(self) -> ir.Value:
        key = ("idx",)
        if key not in self.empty:
            self.empty[key] = self.const(np.zeros((0, 2), np.int64), "empty_idx")
        return self.empty[key]

    def i64(self, values, hint: str) -> ir.Value:
        return self.const(np.array(values, np.int64), hint)

    def reduce(self, op_type: str, x: ir.Value, axes: list[int], *, keepdims: int, name_hint: str) -> ir.Value:
        """``op_type`` (ReduceMean, ReduceMax, ...) of ``x`` over ``axes`` in the model's opset form: axes
        as an input from opset 18, as an attribute before."""
        if self.opset >= 18:
            return self.add(op_type, [x, self.i64(axes, "axes")], {"keepdims": keepdims}, name_hint=name_hint)
        return self.add(op_type, [x], {"axes": list(axes), "keepdims": keepdims}, name_hint=name_hint)

    # ------------------------------------------------------------------ tile values
    def evaluate(self, t: TileValue) -> ir.Value:
        """The tile tensor of ``t`` with its pending epilogue applied."""
        if not t.has_epilogue:
            return t.tiles
        key = id(t)
        if key in self.evaluated:
            return self.evaluated[key]
        x = t.tiles
        if t.scale is not None:
            x = self.add("Mul", [x, t.scale], name_hint="epi_scale")
        if t.shift is not None:
            x = self.add("Add", [x, t.shift], name_hint="epi_shift")
        if t.act == ACT_RELU:
            x = self.add("Relu", [x])
        elif t.act == ACT_LEAKY_RELU:
            x = self.add("LeakyRelu", [x], {"alpha": float(t.alpha)})
        elif t.act == ACT_SWISH:
            x = self.add("Mul", [x, self.add("Sigmoid", [x])], name_hint="swish")
        self.evaluated[key] = x
        return x

    def cacheable(self, value: ir.Value, rep: TileValue) -> TileValue:
        """A tile value of ``value`` whose uncovered pixels come from ``value``'s own cache."""
        return TileValue(rep.grid, self.evaluate(rep), value, rep.channels)

    def compose(self, t: TileValue, mul: ir.Value | None = None, add: ir.Value | None = None) -> TileValue:
        """``t`` followed by ``x*mul + add`` (per-channel ``[C]`` vectors), folded into its epilogue."""
        if t.act != ACT_IDENTITY:
            t = TileValue(t.grid, self.evaluate(t), None, t.channels)
        scale, shift = t.scale, t.shift
        if mul is not None:
            scale = mul if scale is None else self.add("Mul", [scale, mul], name_hint="compose_scale")
            shift = None if shift is None else self.add("Mul", [shift, mul], name_hint="compose_shift")
        if add is not None:
            shift = add if shift is None else self.add("Add", [shift, add], name_hint="compose_shift")
        return t.with_epilogue(scale=scale, shift=shift, act=ACT_IDENTITY, alpha=0.0)

    def with_act(self, t: TileValue, act: int, alpha: float = 0.0) -> TileValue:
        """``t`` followed by activation ``act``, pending in its epilogue."""
        if t.act != ACT_IDENTITY:
            t = TileValue(t.grid, self.evaluate(t), None, t.channels)  # activation after activation
        return t.with_epilogue(act=act, alpha=alpha)

    def gather(self, source: Rep, grid: Grid, *, kernel: int, stride: int, pads: tuple[int, int], upsample: int,
               channels: int, hint: str, pad_mode: int = PAD_ZEROS) -> ir.Value:
        """``ssic::TileGather`` im2col rows ``[n*t*t, k*k*C]`` of ``source`` for the output tiles of ``grid``.

        ``source`` is a :class:`DenseValue` (read in full, NCHW) or a :class:`TileValue` with a cache
        base or a dense source (see :meth:`Rep.gather_source`); its pending epilogue is fused.
        ``pad_mode`` says what is read outside the (upsampled) source: zeros, reflection or edge.
        """
        attrs = {"tile": grid.tile, "kernel": kernel, "stride": stride, "pad_top": pads[0], "pad_left": pads[1],
                 "upsample": upsample, "activation": ACT_IDENTITY, "alpha": 0.0}
        if pad_mode != PAD_ZEROS:
            attrs["pad_mode"] = pad_mode
        if isinstance(source, DenseValue):
            epi = None
            inputs = [self.empty_tiles(channels), source.value, self.empty_idx(), self.tiles_input(grid)]
            attrs.update(src_tile=1, src_layout=LAYOUT_NCHW)
        elif isinstance(source, TileValue) and source.dense_source is not None:
            epi = source
            inputs = [self.empty_tiles(channels), source.dense_source, self.empty_idx(), self.tiles_input(grid)]
            attrs.update(src_tile=1, src_layout=LAYOUT_NCHW)
        elif isinstance(source, TileValue) and source.base is not None:
            epi = source
            cache = self.cache(source.base, "NHWC", None)
            self.note_commit(cache, source.tiles)
            inputs = [source.tiles, cache, self.tiles_input(source.grid), self.tiles_input(grid)]
            attrs.update(src_tile=source.grid.tile, src_layout=LAYOUT_NHWC)
        else:
            raise AssertionError(f"cannot gather from {source!r}: call gather_source first")
        extra = []
        if epi is not None and epi.has_epilogue:
            extra = [epi.scale or self.const(np.ones(channels, np.float32), "ones"),
                     epi.shift or self.const(np.zeros(channels, np.float32), "zeros")]
            attrs.update(activation=epi.act, alpha=float(epi.alpha))
        return self.add("TileGather", inputs + extra, attrs, domain="ssic", name_hint=hint)

    def gather_cached(self, value: ir.Value, grid: Grid, channels: int, hint: str,
                      tiles: ir.Value | None = None) -> ir.Value:
        """The prime-run values of ``value`` under the active tiles of ``grid`` (``[n*t*t, C]``);
        ``tiles``, when given, are ``value``'s new tiles there (what a commit writes into the cache)."""
        cache = self.cache(value, "NHWC", None)
        self.note_commit(cache, tiles)
        inputs = [self.empty_tiles(channels), cache, self.empty_idx(), self.tiles_input(grid)]
        attrs = {"tile": grid.tile, "kernel": 1, "stride": 1, "pad_top": 0, "pad_left": 0, "upsample": 1,
                 "activation": ACT_IDENTITY, "alpha": 0.0, "src_tile": 1, "src_layout": LAYOUT_NHWC}
        return self.add("TileGather", inputs, attrs, domain="ssic", name_hint=hint)

    def valid_rows(self, grid: Grid) -> ir.Value:
        """``[n*t*t, 1]`` float mask: 1 for tile rows inside the image (clipped tiles carry extra rows)."""
        t = grid.tile
        idx = self.tiles_input(grid)
        py = self.const(np.repeat(np.arange(t), t).reshape(1, t * t).astype(np.int64), "py")
        px = self.const(np.tile(np.arange(t), t).reshape(1, t * t).astype(np.int64), "px")
        y = self.add("Add", [self.add("Slice", [idx, self.i64([0], "s0"), self.i64([1], "s1"), self.i64([1], "ax")]), py])
        x = self.add("Add", [self.add("Slice", [idx, self.i64([1], "s1"), self.i64([2], "s2"), self.i64([1], "ax")]), px])
        ok = self.add("And", [self.add("Less", [y, self.const(np.array(grid.height, np.int64), "h")]),
                              self.add("Less", [x, self.const(np.array(grid.width, np.int64), "w")])])
        ok = self.add("Cast", [ok], {"to": ir.DataType.FLOAT})
        return self.add("Reshape", [ok, self.i64([-1, 1], "col")])

    def per_channel(self, value: ir.Value, channels: int) -> ir.Value:
        """``value`` as a ``[C]`` vector (a scalar is repeated: the fused kernels take one value per
        channel); requires :func:`per_channel_ok`."""
        shape = static_shape(value)
        if len(shape) == 0 or math.prod(shape) == 1:
            const = const_array(value)
            if const is not None:
                return self.const(np.full(channels, const.reshape(()), dtype=const.dtype), "vec")
            flat = self.reshape(value, [1])
            return self.add("Expand", [flat, self.i64([channels], "shape")], name_hint="vec")
        return self.reshape(value, [channels])

    def reshape(self, value: ir.Value, shape: list[int]) -> ir.Value:
        const = const_array(value)
        if const is not None:
            return self.const(const.reshape(shape).astype(const.dtype), "vec")
        return self.add("Reshape", [value, self.i64(shape, "shape")], name_hint="vec")

    # ------------------------------------------------------------------ dense fallback
    def materialize(self, value: ir.Value) -> ir.Value:
        """A full (dense) value for ``value`` in the sparse graph."""
        rep = self.reps.get(value)
        if rep is None:
            return value
        if value in self.materialized:
            return self.materialized[value]
        if isinstance(rep, TileValue) and rep.dense_source is None:
            # pixels no active tile covers keep their prime value (the approximation SIGE makes too)
            tiles = self.evaluate(rep)
            cache = self.cache(value, "NCHW", None)
            self.note_commit(cache, tiles)
            full = self.add("TileScatter", [tiles, cache, self.tiles_input(rep.grid)], {"tile": rep.grid.tile},
                            domain="ssic", name_hint="materialize")
            full.shape = value.shape
            full.type = value.type
        else:
            full = rep.materialize(self, value)
            if full is None:
                full = self._recompute(value)
        self.materialized[value] = full
        return full

    def _recompute(self, value: ir.Value) -> ir.Value:
        """Re-emit the producer of ``value`` on materialised inputs."""
        node = value.producer()
        inputs = [self.materialize(v) if v is not None else None for v in node.inputs]
        if all(a is b for a, b in zip(inputs, node.inputs, strict=False)):
            return value
        clone = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                        num_outputs=len(node.outputs), name=self.name("dense_" + node.op_type))
        for j, out in enumerate(clone.outputs):
            out.name = f"{clone.name}/out{j}"
            out.shape = node.outputs[j].shape
            out.type = node.outputs[j].type
        self.graph.append(clone)
        return clone.outputs[node.outputs.index(value)]

    def keep_dense(self, node: ir.Node) -> None:
        """Leave ``node`` as it is, reading materialised values for its sparse inputs."""
        for i, value in enumerate(node.inputs):
            if value is not None and value in self.reps:
                node.replace_input_with(i, self.materialize(value))


__all__ = ["CacheSpec", "DenseOp", "DenseValue", "GroupNormStats", "LazyResample", "SparsifyContext",
           "SparsifyResult", "TileValue", "const_array", "per_channel_ok"]
