"""The sparse rewrite: turn the high-resolution part of a model into tile-domain computation.

See ``docs/architecture.md``. The pass walks the graph in topological order and gives every value a
*representation* in the sparse graph:

- dense: the value itself, computed as in the model (inputs, low-resolution layers);
- :class:`Tiled`: a ``[n*t*t, C]`` tile tensor on a grid, plus a pending per-channel
  ``act(x*scale + shift)`` epilogue that a following gather fuses (GroupNorm with cached statistics,
  BatchNorm, swish, ReLU, leaky ReLU);
- :class:`Lazy`: a nearest upsample or zero pad of another representation, folded into the next
  gather's index arithmetic instead of being computed.

Convolutions at a sparse resolution become ``ssic::TileGather`` (im2col rows) + MatMul + bias;
element-wise ops, Concat and residual adds run on tile tensors; anything else gets its inputs
materialised (``ssic::TileScatter`` from the cache) and stays dense. Every cache the sparse graph
reads becomes a graph input; :class:`SparsifyResult` lists them so the prime graph can output them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ssic.ops import ACT_IDENTITY, ACT_RELU, ACT_SWISH
from ssic.ops import ACT_LEAKY_RELU as ACT_LEAKY
from ssic.passes.analysis import (
    ConvDecision,
    Grid,
    SparsePlan,
    conv_kind,
    conv_macs,
    spatial_hw,
    static_shape,
)

ELEMENTWISE_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus",
    "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu", "Identity", "Reciprocal", "Mish",
}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


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

    def to_json(self) -> dict:
        return {
            "name": self.name, "source": self.source, "layout": self.layout, "shape": list(self.shape),
            "dtype": self.dtype, "kind": self.kind, "resolution": self.resolution, "layer": self.layer,
        }


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
class SparsifyResult:
    caches: list[CacheSpec] = field(default_factory=list)
    gn_stats: list[GroupNormStats] = field(default_factory=list)
    decisions: list[ConvDecision] = field(default_factory=list)


@dataclass
class Tiled:
    grid: Grid
    tiles: ir.Value  # [M, C]
    base: ir.Value | None  # original value whose cache holds what `tiles` does not cover
    channels: int
    scale: ir.Value | None = None
    shift: ir.Value | None = None
    act: int = ACT_IDENTITY
    alpha: float = 0.0
    dense_source: ir.Value | None = None  # tiles were cut from this dense value: gather it directly

    @property
    def has_epilogue(self) -> bool:
        return self.scale is not None or self.shift is not None or self.act != ACT_IDENTITY


@dataclass
class Lazy:
    """``value = pad(upsample(source))``: index arithmetic folded into the consumer's gather."""

    source: object  # Tiled or ir.Value (dense)
    source_value: ir.Value  # the model value ``source`` represents
    upsample: int = 1
    pad_top: int = 0
    pad_left: int = 0


def _np(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


class SparsifyPass:
    """Rewrite a model (in place) into its sparse graph; returns what the prime graph must output."""

    def __init__(self, plan: SparsePlan, *, fuse_swish: bool = False, gn_stats: str = "incremental") -> None:
        self.plan = plan
        self.fuse_swish = fuse_swish
        if gn_stats not in ("incremental", "cached"):
            raise ValueError(f"gn_stats must be 'incremental' or 'cached', got {gn_stats!r}")
        self.gn_stats = gn_stats

    # ------------------------------------------------------------------ plumbing
    def __call__(self, model: ir.Model) -> SparsifyResult:
        self.model = model
        self.graph = model.graph
        self.repr: dict[ir.Value, object] = {}
        self.materialized: dict[ir.Value, ir.Value] = {}
        self.evaluated: dict[int, ir.Value] = {}
        self.cache_inputs: dict[tuple[str, str], ir.Value] = {}
        self.tile_inputs: dict[Grid, ir.Value] = {}
        self.empty: dict[tuple, ir.Value] = {}
        self.skip: set[ir.Node] = set()
        self.counter = 0
        self.result = SparsifyResult()
        self.graph.opset_imports.setdefault("ssic", 1)

        for node in list(self.graph):
            if node in self.skip:
                continue
            handled = self._dispatch(node)
            if not handled:
                self._keep_dense(node)
        for i, out in enumerate(list(self.graph.outputs)):
            if out in self.repr:
                full = self._materialize(out)
                full.name = out.name
                out.name = out.name + "/ssic_replaced"
                self.graph.outputs[i] = full
        self._cleanup()
        return self.result

    def _name(self, hint: str) -> str:
        self.counter += 1
        return f"ssic/{hint}_{self.counter}"

    def _add(self, op_type: str, inputs, attributes=None, *, domain: str = "", name_hint: str = "", num_outputs: int = 1):
        node = ir.node(op_type, list(inputs), attributes or {}, domain=domain, num_outputs=num_outputs,
                       name=self._name(name_hint or op_type))
        for j, out in enumerate(node.outputs):
            out.name = f"{node.name}/out{j}"
        self.graph.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def _const(self, array: np.ndarray, hint: str) -> ir.Value:
        name = self._name(hint)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def _tiles_input(self, grid: Grid) -> ir.Value:
        if grid not in self.tile_inputs:
            value = ir.Value(name=grid.tiles_input, shape=ir.Shape([f"n_{grid.name}", 2]),
                             type=ir.TensorType(ir.DataType.INT64))
            self.graph.inputs.append(value)
            self.tile_inputs[grid] = value
        return self.tile_inputs[grid]

    def _cache(self, value: ir.Value, layout: str, layer: str | None) -> ir.Value:
        key = (value.name, layout)
        if key not in self.cache_inputs:
            shape = static_shape(value)
            _, c, h, w = shape
            cshape = (1, c, h, w) if layout == "NCHW" else (h, w, c)
            name = f"ssic.cache.{layout.lower()}.{value.name}"
            inp = ir.Value(name=name, shape=ir.Shape(cshape), type=ir.TensorType(ir.DataType.FLOAT))
            self.graph.inputs.append(inp)
            self.cache_inputs[key] = inp
            self.result.caches.append(CacheSpec(name, value.name, layout, cshape, "activation", f"{h}x{w}", layer))
        return self.cache_inputs[key]

    def _empty_tiles(self, channels: int) -> ir.Value:
        key = ("tiles", channels)
        if key not in self.empty:
            self.empty[key] = self._const(np.zeros((0, channels), np.float32), f"empty_tiles_c{channels}")
        return self.empty[key]

    def _empty_idx(self) -> ir.Value:
        key = ("idx",)
        if key not in self.empty:
            self.empty[key] = self._const(np.zeros((0, 2), np.int64), "empty_idx")
        return self.empty[key]

    # ------------------------------------------------------------------ representation helpers
    def _rep(self, value: ir.Value | None):
        if value is None:
            return None
        return self.repr.get(value, value)

    def _evaluate(self, t: Tiled) -> ir.Value:
        """Tile tensor with the pending epilogue applied."""
        if not t.has_epilogue:
            return t.tiles
        key = id(t)
        if key in self.evaluated:
            return self.evaluated[key]
        x = t.tiles
        if t.scale is not None:
            x = self._add("Mul", [x, t.scale], name_hint="epi_scale")
        if t.shift is not None:
            x = self._add("Add", [x, t.shift], name_hint="epi_shift")
        if t.act == ACT_RELU:
            x = self._add("Relu", [x])
        elif t.act == ACT_LEAKY:
            x = self._add("LeakyRelu", [x], {"alpha": float(t.alpha)})
        elif t.act == ACT_SWISH:
            x = self._add("Mul", [x, self._add("Sigmoid", [x])], name_hint="swish")
        self.evaluated[key] = x
        return x

    def _to_tiles(self, rep, grid: Grid, channels: int) -> ir.Value | None:
        """Evaluated tile tensor of ``rep`` on ``grid`` (gathering dense or upsampled values)."""
        if isinstance(rep, Tiled):
            if rep.grid == grid:
                return self._evaluate(rep)
            return None
        if isinstance(rep, Lazy):
            if rep.pad_top or rep.pad_left:
                return None
            return self._gather(self._gatherable(rep.source_value, rep.source), grid, kernel=1, stride=1, pads=(0, 0), upsample=rep.upsample,
                                channels=channels, hint="upsample_tiles")
        if isinstance(rep, ir.Value) and spatial_hw(rep) == (grid.height, grid.width):
            return self._gather(rep, grid, kernel=1, stride=1, pads=(0, 0), upsample=1, channels=channels,
                                hint="dense_tiles")
        return None

    def _gather(self, source, grid: Grid, *, kernel: int, stride: int, pads: tuple[int, int], upsample: int,
                channels: int, hint: str, cache_of: ir.Value | None = None) -> ir.Value | None:
        attrs = {"tile": grid.tile, "kernel": kernel, "stride": stride, "pad_top": pads[0], "pad_left": pads[1],
                 "upsample": upsample, "activation": ACT_IDENTITY, "alpha": 0.0}
        extra = []
        if cache_of is not None:
            # the prime values only (no new tiles): what the cache holds under the active tiles
            inputs = [self._empty_tiles(channels), self._cache(cache_of, "NHWC", None), self._empty_idx(),
                      self._tiles_input(grid)]
            attrs.update(src_tile=1, src_layout=0)
            return self._add("TileGather", inputs, attrs, domain="ssic", name_hint=hint)
        if isinstance(source, Tiled) and (source.dense_source is not None or source.base is None):
            if source.dense_source is None:
                return None  # computed tiles without a cache: caller falls back
            dense, epi = source.dense_source, source
            inputs = [self._empty_tiles(channels), dense, self._empty_idx(), self._tiles_input(grid)]
            attrs.update(src_tile=1, src_layout=1)
        elif isinstance(source, Tiled):
            epi = source
            inputs = [source.tiles, self._cache(source.base, "NHWC", None), self._tiles_input(source.grid),
                      self._tiles_input(grid)]
            attrs.update(src_tile=source.grid.tile, src_layout=0)
        elif isinstance(source, ir.Value):
            epi = None
            inputs = [self._empty_tiles(channels), source, self._empty_idx(), self._tiles_input(grid)]
            attrs.update(src_tile=1, src_layout=1)
        else:
            return None
        if epi is not None and epi.has_epilogue:
            extra = [epi.scale or self._const(np.ones(channels, np.float32), "ones"),
                     epi.shift or self._const(np.zeros(channels, np.float32), "zeros")]
            attrs.update(activation=epi.act, alpha=float(epi.alpha))
        return self._add("TileGather", inputs + extra, attrs, domain="ssic", name_hint=hint)

    def _materialize(self, value: ir.Value) -> ir.Value:
        """A full (dense) value for ``value`` in the sparse graph."""
        rep = self.repr.get(value)
        if rep is None:
            return value
        if value in self.materialized:
            return self.materialized[value]
        if isinstance(rep, Tiled) and rep.dense_source is None:
            # pixels no active tile covers keep their prime value (the approximation SIGE makes too)
            tiles = self._evaluate(rep)
            cache = self._cache(value, "NCHW", None)
            full = self._add("TileScatter", [tiles, cache, self._tiles_input(rep.grid)], {"tile": rep.grid.tile},
                             domain="ssic", name_hint="materialize")
            full.shape = value.shape
            full.type = value.type
        else:
            full = self._recompute(value)
        self.materialized[value] = full
        return full

    def _recompute(self, value: ir.Value) -> ir.Value:
        """Re-emit the producer of ``value`` on materialised inputs."""
        node = value.producer()
        inputs = [self._materialize(v) if v is not None else None for v in node.inputs]
        if all(a is b for a, b in zip(inputs, node.inputs, strict=False)):
            return value
        clone = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()),
                        num_outputs=len(node.outputs), name=self._name("dense_" + node.op_type))
        for j, out in enumerate(clone.outputs):
            out.name = f"{clone.name}/out{j}"
            out.shape = node.outputs[j].shape
            out.type = node.outputs[j].type
        self.graph.append(clone)
        return clone.outputs[node.outputs.index(value)]

    def _keep_dense(self, node: ir.Node) -> None:
        for i, value in enumerate(node.inputs):
            if value is not None and value in self.repr:
                node.replace_input_with(i, self._materialize(value))

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        op = node.op_type
        if op == "Conv":
            return self._conv(node)
        has_sparse_input = any(v is not None and v in self.repr for v in node.inputs)
        if op == "Resize":
            return self._resize(node)
        if not has_sparse_input:
            return False
        if op in ("Identity", "Dropout"):
            self.repr[node.outputs[0]] = self.repr[node.inputs[0]]
            return True
        if op == "GroupNormalization":
            return self._group_norm(node)
        if op == "Reshape":
            return self._instance_norm_pattern(node)
        if op == "BatchNormalization":
            return self._batch_norm(node)
        if op == "Pad":
            return self._pad(node)
        if op == "AveragePool":
            return self._average_pool(node)
        if op == "Concat":
            return self._concat(node)
        if op == "Sigmoid" and self._swish(node):
            return True
        if op in ("Relu", "LeakyRelu"):
            return self._activation(node)
        if op in ("Mul", "Add", "Sub", "Div") and self._affine(node):
            return True
        if op in ELEMENTWISE_UNARY or op in ELEMENTWISE_BINARY:
            return self._elementwise(node)
        return False

    # ------------------------------------------------------------------ handlers
    def _conv(self, node: ir.Node) -> bool:
        out = node.outputs[0]
        hw = spatial_hw(out)
        grid = self.plan.grid_for(hw)
        w = _np(node.inputs[1])
        b = _np(node.inputs[2]) if len(node.inputs) > 2 else None
        in_shape = static_shape(node.inputs[0])
        cin = in_shape[1] if in_shape else 0
        cout = w.shape[0] if w is not None else 0
        decision = ConvDecision(node.name or out.name, conv_kind(node), hw, (cin, cout), False, "",
                                macs_dense=conv_macs(node))
        self.result.decisions.append(decision)
        reason = None
        if grid is None:
            reason = f"output {hw[0]}x{hw[1]} is below the sparse resolution threshold ({self.plan.min_res})" if hw \
                else "output is not a static [1, C, H, W] tensor"
        elif w is None or w.ndim != 4:
            reason = "weights are not a constant 2-D kernel"
        elif node.attributes.get_int("group", 1) != 1:
            reason = "grouped convolution (im2col + MatMul covers group=1 only)"
        elif any(d != 1 for d in node.attributes.get_ints("dilations", [1, 1])):
            reason = "dilated convolution"
        elif w.shape[2] != w.shape[3] or len(set(node.attributes.get_ints("strides", [1, 1]))) != 1:
            reason = "non-square kernel or stride"
        elif node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
            reason = "auto_pad is not supported (explicit pads only)"
        elif len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
            reason = "bias is not constant"
        if reason is not None:
            decision.reason = reason
            return False

        k = w.shape[2]
        s = node.attributes.get_ints("strides", [1, 1])[0]
        pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
        rep = self._rep(node.inputs[0])
        upsample, pad_top, pad_left = 1, pads[0], pads[1]
        source_value = node.inputs[0]
        if isinstance(rep, Lazy):
            upsample, pad_top, pad_left = rep.upsample, pad_top + rep.pad_top, pad_left + rep.pad_left
            rep, source_value = rep.source, rep.source_value
        if isinstance(rep, ir.Value) and spatial_hw(rep) is None:
            decision.reason = "input is not a static [1, C, H, W] tensor"
            return False
        rep = self._gatherable(source_value, rep)
        if isinstance(rep, Tiled) and rep.act == ACT_SWISH and rep.tiles is not None and not self.fuse_swish \
                and source_value is node.inputs[0]:
            # swish costs an exp per read and a gather reads each pixel k*k times: apply it once on
            # the tiles and gather the activation's own cache instead
            rep = self._cacheable(source_value, rep)
        if k == 1 and s == 1 and upsample == 1 and pad_top == 0 and pad_left == 0 and isinstance(rep, Tiled) \
                and rep.grid == grid and rep.dense_source is None:
            x = self._evaluate(rep)
            wmat = np.ascontiguousarray(w[:, :, 0, 0].T.astype(np.float32))
        else:
            x = self._gather(rep, grid, kernel=k, stride=s, pads=(pad_top, pad_left), upsample=upsample,
                             channels=cin, hint="gather")
            if x is None:
                decision.reason = "input representation cannot be gathered"
                return False
            wmat = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * cin, cout).astype(np.float32))
        y = self._add("MatMul", [x, self._const(wmat, "conv_w")], name_hint="conv")
        if b is not None:
            y = self._add("Add", [y, self._const(b.astype(np.float32), "conv_b")], name_hint="conv_bias")
        self.repr[out] = Tiled(grid, y, out, cout)
        decision.sparse = True
        decision.grid = grid.name
        decision.macs_per_tile = grid.tile * grid.tile * cout * cin * k * k
        decision.reason = f"tile {grid.tile} on grid {grid.name}" + (f", upsample x{upsample} folded" if upsample > 1 else "")
        return True

    def _gatherable(self, value: ir.Value, rep):
        """Computed tiles (results of element-wise ops) get ``value``'s own cache for what they don't cover."""
        if isinstance(rep, Tiled) and rep.base is None and rep.dense_source is None:
            return self._cacheable(value, rep)
        return rep

    def _cacheable(self, value: ir.Value, rep: Tiled) -> Tiled:
        """A Tiled for ``value`` whose uncovered pixels come from ``value``'s own cache."""
        tiles = self._evaluate(rep)
        return Tiled(rep.grid, tiles, value, rep.channels)

    def _resize(self, node: ir.Node) -> bool:
        x, out = node.inputs[0], node.outputs[0]
        in_hw, out_hw = spatial_hw(x), spatial_hw(out)
        if in_hw is None or out_hw is None:
            return False
        rep = self._rep(x)
        if in_hw == out_hw and isinstance(rep, (Tiled, Lazy)):
            self.repr[out] = rep
            return True
        if self.plan.grid_for(out_hw) is None:
            return False
        mode = node.attributes.get_string("mode", "nearest")
        ctm = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
        nearest = node.attributes.get_string("nearest_mode", "round_prefer_floor")
        if mode != "nearest" or out_hw[0] % in_hw[0] or out_hw[1] % in_hw[1]:
            return False
        u = out_hw[0] // in_hw[0]
        if u != out_hw[1] // in_hw[1] or u < 2:
            return False
        if ctm != "asymmetric" or nearest != "floor":
            # with integer factors, half_pixel + round_prefer_ceil / asymmetric + floor are the same map
            if not (ctm in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil",)):
                return False
        if isinstance(rep, Lazy):
            return False
        self.repr[out] = Lazy(rep, x, upsample=u)
        return True

    def _average_pool(self, node: ir.Node) -> bool:
        """k x k / stride k average pooling without padding: a gather of k*k columns and a mean."""
        grid = self._grid_of_output(node)
        kernel = node.attributes.get_ints("kernel_shape", [])
        strides = node.attributes.get_ints("strides", [1, 1])
        pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
        shape = static_shape(node.inputs[0])
        if grid is None or shape is None or len(kernel) != 2 or kernel[0] != kernel[1] or any(pads) \
                or node.attributes.get_int("ceil_mode", 0) or node.attributes.get_string("auto_pad", "NOTSET") \
                not in ("NOTSET", "") or len(set(strides)) != 1:
            return False
        k, c = kernel[0], shape[1]
        rep = self._gatherable(node.inputs[0], self._rep(node.inputs[0]))
        cols = self._gather(rep, grid, kernel=k, stride=strides[0], pads=(0, 0), upsample=1, channels=c,
                            hint="pool_gather")
        if cols is None:
            return False
        grouped = self._add("Reshape", [cols, self._const(np.array([-1, k * k, c], np.int64), "shape")])
        y = self._add("ReduceMean", [grouped, self._const(np.array([1], np.int64), "axes")], {"keepdims": 0},
                      name_hint="pool_mean")
        self.repr[node.outputs[0]] = Tiled(grid, y, None, c)
        return True

    def _pad(self, node: ir.Node) -> bool:
        rep = self._rep(node.inputs[0])
        if not isinstance(rep, Tiled) or node.attributes.get_string("mode", "constant") != "constant":
            return False
        pads = _np(node.inputs[1]) if len(node.inputs) > 1 else None
        cval = _np(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        axes = _np(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if pads is None or axes is not None or (cval is not None and np.any(cval != 0)):
            return False
        pads = [int(p) for p in pads]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or any(p < 0 for p in pads):
            return False
        self.repr[node.outputs[0]] = Lazy(rep, node.inputs[0], pad_top=pads[2], pad_left=pads[3])
        return True

    def _per_channel(self, value: ir.Value, channels: int) -> ir.Value | None:
        """``value`` as a ``[C]`` (or ``[1]``) vector if it broadcasts per channel over [1,C,H,W]."""
        shape = static_shape(value)
        if shape is None:
            return None
        if len(shape) == 0 or math.prod(shape) == 1:
            return value if len(shape) <= 1 else self._reshape(value, [1])
        dims = list(shape)
        while len(dims) < 4:
            dims.insert(0, 1)
        if len(dims) == 4 and dims[0] == 1 and dims[2] == 1 and dims[3] == 1 and dims[1] == channels:
            return self._reshape(value, [channels])
        return None

    def _reshape(self, value: ir.Value, shape: list[int]) -> ir.Value:
        const = _np(value)
        if const is not None:
            return self._const(const.reshape(shape).astype(const.dtype), "vec")
        return self._add("Reshape", [value, self._const(np.array(shape, np.int64), "shape")], name_hint="vec")

    def _through(self, node: ir.Node, rep, fn) -> bool:
        """Apply a per-channel op ``fn(Tiled) -> Tiled | None`` to ``rep``, also through a nearest upsample.

        Per-channel affine maps and activations commute with nearest upsampling, so
        ``bn(upsample(x))`` becomes ``upsample(bn(x))`` and the next gather folds both.
        """
        if isinstance(rep, Tiled):
            new = fn(rep)
            if new is None:
                return False
            self.repr[node.outputs[0]] = new
            return True
        if isinstance(rep, Lazy) and rep.pad_top == 0 and rep.pad_left == 0:
            src = rep.source
            if isinstance(src, ir.Value):
                shape = static_shape(src)
                if shape is None or len(shape) != 4:
                    return False
                src = Tiled(None, None, None, shape[1], dense_source=src)
            else:
                src = self._gatherable(rep.source_value, src)
            new = fn(src)
            if new is None:
                return False
            self.repr[node.outputs[0]] = Lazy(new, rep.source_value, upsample=rep.upsample)
            return True
        return False

    def _compose(self, t: Tiled, mul: ir.Value | None = None, add: ir.Value | None = None) -> Tiled | None:
        """``t`` followed by ``x*mul + add`` (per-channel ``[C]`` vectors), folded into its epilogue."""
        if t.act != ACT_IDENTITY:
            if t.tiles is None:
                return None
            t = Tiled(t.grid, self._evaluate(t), None, t.channels)
        scale, shift = t.scale, t.shift
        if mul is not None:
            scale = mul if scale is None else self._add("Mul", [scale, mul], name_hint="compose_scale")
            shift = None if shift is None else self._add("Mul", [shift, mul], name_hint="compose_shift")
        if add is not None:
            shift = add if shift is None else self._add("Add", [shift, add], name_hint="compose_shift")
        return Tiled(t.grid, t.tiles, t.base, t.channels, scale, shift, ACT_IDENTITY, 0.0, t.dense_source)

    def _with_act(self, t: Tiled, act: int, alpha: float = 0.0) -> Tiled | None:
        if t.act != ACT_IDENTITY:
            if t.tiles is None:
                return None
            t = Tiled(t.grid, self._evaluate(t), None, t.channels)  # activation after activation
        return Tiled(t.grid, t.tiles, t.base, t.channels, t.scale, t.shift, act, alpha, t.dense_source)

    def _affine(self, node: ir.Node) -> bool:
        """Per-channel Mul/Add/Sub/Div on a Tiled (or upsampled) value: compose into its epilogue."""
        a, b = node.inputs[0], node.inputs[1]
        ra, rb = self._rep(a), self._rep(b)
        op = node.op_type
        if isinstance(ra, (Tiled, Lazy)) and not isinstance(rb, (Tiled, Lazy)):
            t, other = ra, b
        elif isinstance(rb, (Tiled, Lazy)) and not isinstance(ra, (Tiled, Lazy)) and op in ("Mul", "Add"):
            t, other = rb, a
        else:
            return False
        channels = static_shape(node.outputs[0])
        if channels is None or len(channels) != 4:
            return False
        vec = self._per_channel(other, channels[1])
        if vec is None:
            return False
        if op == "Sub":
            return self._through(node, t, lambda x: self._compose(x, add=self._add("Neg", [vec])))
        if op == "Div":
            return self._through(node, t, lambda x: self._compose(x, mul=self._add("Reciprocal", [vec])))
        if op == "Mul":
            return self._through(node, t, lambda x: self._compose(x, mul=vec))
        return self._through(node, t, lambda x: self._compose(x, add=vec))

    def _activation(self, node: ir.Node) -> bool:
        rep = self._rep(node.inputs[0])
        if node.op_type == "Relu":
            return self._through(node, rep, lambda t: self._with_act(t, ACT_RELU))
        alpha = node.attributes.get_float("alpha", 0.01)
        return self._through(node, rep, lambda t: self._with_act(t, ACT_LEAKY, alpha))

    def _swish(self, node: ir.Node) -> bool:
        x = node.inputs[0]
        rep = self._rep(x)
        if not isinstance(rep, (Tiled, Lazy)):
            return False
        users = list(node.outputs[0].uses())
        if len(users) != 1:
            return False
        mul = users[0].node
        if mul.op_type != "Mul" or set(mul.inputs) != {x, node.outputs[0]} or len(mul.inputs) != 2:
            return False
        if not self._through(mul, rep, lambda t: self._with_act(t, ACT_SWISH)):
            return False
        self.skip.add(mul)
        return True

    def _gn_common(self, node_name: str, x: ir.Value, out: ir.Value, groups: int, eps: float,
                   gamma: np.ndarray, beta: np.ndarray) -> bool:
        rep = self._rep(x)
        if not isinstance(rep, Tiled):
            return False
        if rep.has_epilogue or rep.base is None:
            rep = self._cacheable(x, rep)
        c = rep.channels
        key = x.name
        incremental = self.gn_stats == "incremental"
        if incremental:
            names = (f"ssic.gn_sum.{key}", f"ssic.gn_sumsq.{key}")
            kinds, dtype, irtype = ("gn_sum", "gn_sumsq"), "float64", ir.DataType.DOUBLE
        else:
            names = (f"ssic.gn_scale.{key}", f"ssic.gn_shift.{key}")
            kinds, dtype, irtype = ("gn_scale", "gn_shift"), "float32", ir.DataType.FLOAT
        if names[0] not in {st.scale_name for st in self.result.gn_stats}:
            self.result.gn_stats.append(GroupNormStats(x.name, groups, eps, gamma.astype(np.float32).reshape(c),
                                                       beta.astype(np.float32).reshape(c), names[0], names[1],
                                                       node_name, incremental))
            for nm, kind in zip(names, kinds, strict=True):
                v = ir.Value(name=nm, shape=ir.Shape([c]), type=ir.TensorType(irtype))
                self.graph.inputs.append(v)
                self.cache_inputs[(nm, "C")] = v
                self.result.caches.append(CacheSpec(nm, x.name, "C", (c,), kind, rep.grid.name, node_name, dtype))
        a, b = self.cache_inputs[(names[0], "C")], self.cache_inputs[(names[1], "C")]
        if incremental:
            a, b = self._incremental_gn(rep, x, a, b, groups, eps, gamma, beta)
        self.repr[out] = Tiled(rep.grid, rep.tiles, rep.base, c, a, b, ACT_IDENTITY, 0.0, rep.dense_source)
        return True

    def _incremental_gn(self, rep: Tiled, x: ir.Value, s1: ir.Value, s2: ir.Value, groups: int, eps: float,
                        gamma: np.ndarray, beta: np.ndarray) -> tuple[ir.Value, ir.Value]:
        """GroupNorm scale/shift of the edited tensor from the prime run's sums and the changed tiles.

        ``sum_new = sum_prime + sum(new tiles) - sum(cached values under the tiles)`` (and the same for
        squares), so the statistics are those of the edited tensor wherever pixels outside the active
        tiles are unchanged: exact with every tile active, far closer than SIGE's cached statistics for
        large edits. The [C]-sized arithmetic runs in float64.
        """
        c, grid = rep.channels, rep.grid
        old = self._gather(Tiled(grid, None, None, c, dense_source=None), grid, kernel=1, stride=1, pads=(0, 0),
                           upsample=1, channels=c, hint="gn_old", cache_of=rep.base)
        new = rep.tiles
        if grid.height % grid.tile or grid.width % grid.tile:
            valid = self._valid_rows(grid)
            new, old = self._add("Mul", [new, valid]), self._add("Mul", [old, valid])
        # four float32 reductions over the [M, C] tiles; only the [C] results go to float64
        axis0 = self._const(np.array([0], np.int64), "axis0")

        def total(op: str, x: ir.Value) -> ir.Value:
            return self._add("Cast", [self._add(op, [x, axis0], {"keepdims": 0})], {"to": ir.DataType.DOUBLE})

        d1 = self._add("Sub", [total("ReduceSum", new), total("ReduceSum", old)])
        d2 = self._add("Sub", [total("ReduceSumSquare", new), total("ReduceSumSquare", old)])
        cpg = c // groups
        per_group = self._const(np.array([groups, cpg], np.int64), "gshape")
        axis1 = self._const(np.array([1], np.int64), "axis1")
        n = float(grid.height * grid.width * cpg)
        g1 = self._add("ReduceSum", [self._add("Reshape", [self._add("Add", [s1, d1]), per_group]), axis1], {"keepdims": 1})
        g2 = self._add("ReduceSum", [self._add("Reshape", [self._add("Add", [s2, d2]), per_group]), axis1], {"keepdims": 1})
        mean = self._add("Div", [g1, self._const(np.array(n), "count")])
        var = self._add("Sub", [self._add("Div", [g2, self._const(np.array(n), "count")]), self._add("Mul", [mean, mean])])
        inv = self._add("Reciprocal", [self._add("Sqrt", [self._add("Add", [var, self._const(np.array(float(eps)), "eps")])])])
        flat = self._const(np.array([c], np.int64), "cshape")
        inv_c = self._add("Reshape", [self._add("Expand", [inv, per_group]), flat])
        mean_c = self._add("Reshape", [self._add("Expand", [mean, per_group]), flat])
        scale = self._add("Mul", [inv_c, self._const(gamma.astype(np.float64).reshape(c), "gamma")])
        shift = self._add("Sub", [self._const(beta.astype(np.float64).reshape(c), "beta"), self._add("Mul", [mean_c, scale])])
        return (self._add("Cast", [scale], {"to": ir.DataType.FLOAT}, name_hint="gn_scale"),
                self._add("Cast", [shift], {"to": ir.DataType.FLOAT}, name_hint="gn_shift"))

    def _valid_rows(self, grid: Grid) -> ir.Value:
        """``[n*t*t, 1]`` float mask: 1 for tile rows inside the image (clipped tiles carry extra rows)."""
        t = grid.tile
        idx = self._tiles_input(grid)
        py = self._const(np.repeat(np.arange(t), t).reshape(1, t * t).astype(np.int64), "py")
        px = self._const(np.tile(np.arange(t), t).reshape(1, t * t).astype(np.int64), "px")
        y = self._add("Add", [self._add("Slice", [idx, self._const(np.array([0], np.int64), "s0"),
                                                  self._const(np.array([1], np.int64), "s1"),
                                                  self._const(np.array([1], np.int64), "ax")]), py])
        x = self._add("Add", [self._add("Slice", [idx, self._const(np.array([1], np.int64), "s1"),
                                                  self._const(np.array([2], np.int64), "s2"),
                                                  self._const(np.array([1], np.int64), "ax")]), px])
        ok = self._add("And", [self._add("Less", [y, self._const(np.array(grid.height, np.int64), "h")]),
                               self._add("Less", [x, self._const(np.array(grid.width, np.int64), "w")])])
        ok = self._add("Cast", [ok], {"to": ir.DataType.FLOAT})
        return self._add("Reshape", [ok, self._const(np.array([-1, 1], np.int64), "col")])

    def _group_norm(self, node: ir.Node) -> bool:
        x = node.inputs[0]
        shape = static_shape(x)
        gamma, beta = _np(node.inputs[1]), _np(node.inputs[2])
        if shape is None or gamma is None or beta is None:
            return False
        c = shape[1]
        groups = node.attributes.get_int("num_groups", 1)
        if gamma.size == groups and groups != c:
            gamma, beta = np.repeat(gamma, c // groups), np.repeat(beta, c // groups)
        return self._gn_common(node.name, x, node.outputs[0], groups, node.attributes.get_float("epsilon", 1e-5),
                               gamma, beta)

    def _instance_norm_pattern(self, node: ir.Node) -> bool:
        """Reshape([1,G,-1]) -> InstanceNormalization -> Reshape([1,C,H,W]): GroupNorm as exported by TorchScript."""
        x = node.inputs[0]
        shape = static_shape(x)
        mid = static_shape(node.outputs[0])
        if shape is None or mid is None or len(mid) != 3 or len(shape) != 4:
            return False
        users = list(node.outputs[0].uses())
        if len(users) != 1 or users[0].node.op_type != "InstanceNormalization":
            return False
        inorm = users[0].node
        users2 = list(inorm.outputs[0].uses())
        if len(users2) != 1 or users2[0].node.op_type != "Reshape":
            return False
        back = users2[0].node
        if static_shape(back.outputs[0]) != shape:
            return False
        groups, c = mid[1], shape[1]
        s, b = _np(inorm.inputs[1]), _np(inorm.inputs[2])
        if s is None or b is None or c % groups:
            return False
        self.skip.update({inorm, back})
        ok = self._gn_common(inorm.name, x, back.outputs[0], groups, inorm.attributes.get_float("epsilon", 1e-5),
                             np.repeat(s, c // groups), np.repeat(b, c // groups))
        if not ok:
            self.skip.difference_update({inorm, back})
        return ok

    def _batch_norm(self, node: ir.Node) -> bool:
        """Inference BatchNorm is an exact per-channel affine map."""
        rep = self._rep(node.inputs[0])
        params = [_np(v) for v in node.inputs[1:5]]
        if any(p is None for p in params) or any(o.uses() for o in node.outputs[1:]):
            return False
        gamma, beta, mean, var = params
        eps = node.attributes.get_float("epsilon", 1e-5)
        a = (gamma / np.sqrt(var + eps)).astype(np.float32)
        bb = (beta - mean * a).astype(np.float32)
        return self._through(node, rep, lambda t: self._compose(t, mul=self._const(a, "bn_scale"),
                                                                add=self._const(bb, "bn_shift")))

    def _grid_of_output(self, node: ir.Node) -> Grid | None:
        return self.plan.grid_for(spatial_hw(node.outputs[0]))

    def _elementwise(self, node: ir.Node) -> bool:
        grid = self._grid_of_output(node)
        out_shape = static_shape(node.outputs[0])
        if grid is None or out_shape is None or len(node.outputs) != 1:
            return False
        channels = out_shape[1]
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
                continue
            rep = self._rep(v)
            shape = static_shape(v)
            if isinstance(rep, (Tiled, Lazy)) or (shape is not None and spatial_hw(v) == (grid.height, grid.width)):
                t = self._to_tiles(rep, grid, shape[1] if shape else channels)
                if t is None:
                    return False
                inputs.append(t)
            elif shape is not None and math.prod(shape) == 1:
                inputs.append(v if len(shape) <= 1 else self._reshape(v, [1]))
            else:
                vec = self._per_channel(v, channels)
                if vec is None:
                    return False
                inputs.append(vec)
        clone = ir.Node("", node.op_type, inputs, list(node.attributes.values()), name=self._name(node.op_type))
        clone.outputs[0].name = f"{clone.name}/out0"
        self.graph.append(clone)
        self.repr[node.outputs[0]] = Tiled(grid, clone.outputs[0], None, channels)
        return True

    def _concat(self, node: ir.Node) -> bool:
        grid = self._grid_of_output(node)
        axis = node.attributes.get_int("axis", 0)
        if grid is None or axis not in (1, -3):
            return False
        parts = []
        for v in node.inputs:
            shape = static_shape(v)
            t = self._to_tiles(self._rep(v), grid, shape[1]) if shape else None
            if t is None:
                return False
            parts.append(t)
        y = self._add("Concat", parts, {"axis": 1}, name_hint="concat")
        self.repr[node.outputs[0]] = Tiled(grid, y, None, static_shape(node.outputs[0])[1])
        return True

    def _cleanup(self) -> None:
        # Tiled values without a cache base that a later gather needed were given one in _cacheable.
        from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

        RemoveUnusedNodesPass()(self.model)
        TopologicalSortPass()(self.model)
        used = {v for v in self.graph.inputs if v.uses() or v.is_graph_output()}
        keep = [v for v in self.graph.inputs if v in used or not v.name.startswith("ssic.")]
        if len(keep) != len(self.graph.inputs):
            dropped = {v.name for v in self.graph.inputs} - {v.name for v in keep}
            self.graph.inputs.clear()
            self.graph.inputs.extend(keep)
            self.result.caches = [c for c in self.result.caches if c.name not in dropped]
            self.result.gn_stats = [s for s in self.result.gn_stats
                                    if s.scale_name not in dropped or s.shift_name not in dropped]
