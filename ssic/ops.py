"""The ssic custom-op table: the single source of truth for domain ``ssic``, version 1.

Everything another part of ssic needs to know about the custom ops lives here: op names and
versions, attribute names/types/defaults, the ONNX schemas (registered with ``onnx.defs`` so that
``onnx.checker`` and ``onnx.shape_inference`` accept graphs containing them) and NumPy reference
implementations that define the semantics the C++ kernels (``plugins/ort``) and the TensorRT
plugins (``plugins/trt``) must reproduce. The exact semantics are in ``docs/architecture.md``.

Tile-index conventions shared by reference and kernels (docs leave them open):

- ``src_idx`` (TileGather) and ``idx`` (TileScatter) must hold multiples of the tile size that lie
  inside the image; anything else is an error (``ValueError`` here, a runtime error in the kernels).
- If the same tile appears twice, the later entry wins.
- ``dst_idx`` may hold any top-left corner; pixels outside the source image read as zero.

Types: every input and output is float32 except the ``cache`` input, which may also be float16 (type
constraint ``TC``: the compiler's ``cache_dtype="float16"`` stores the prime run's activations at
half the memory). The kernels convert each cached value to float32 exactly as it is read (float16 ->
float32 is exact), so the result equals the float32 op on ``cache.astype(float32)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import defs, helper

DOMAIN = "ssic"
VERSION = 1

# Activation codes (attribute ``activation``).
ACT_IDENTITY = 0
ACT_RELU = 1
ACT_LEAKY_RELU = 2
ACT_SWISH = 3

# Source layouts (attribute ``src_layout`` of TileGather).
LAYOUT_NHWC = 0
LAYOUT_NCHW = 1

# What TileGather reads outside the (upsampled) source (attribute ``pad_mode``): zeros (a conv's
# padding), the mirror image without repeating the border (ONNX Pad "reflect") or the border ("edge").
PAD_ZEROS = 0
PAD_REFLECT = 1
PAD_EDGE = 2

DEFAULT_ALPHA = 0.01  # same default as ONNX LeakyRelu

#: Type constraints of the ops' inputs/outputs: name -> (allowed ONNX types, description).
TYPE_CONSTRAINTS: dict[str, tuple[tuple[str, ...], str]] = {
    "T": (("tensor(float)",), "float tensors"),
    "TC": (("tensor(float)", "tensor(float16)"), "the cache: float32, or float16 (converted on read)"),
    "I": (("tensor(int64)",), "tile corners"),
    "TD": (("tensor(double)",), "float64 sums"),
}


@dataclass(frozen=True)
class AttrSpec:
    """One attribute: name, python type (int or float), default (None = required), allowed range."""

    name: str
    type: type
    default: int | float | None
    doc: str
    min: int | None = None
    choices: tuple[int, ...] | None = None

    def check(self, op: str, value: object) -> int | float:
        """Return the value converted to the attribute type; raise ValueError if invalid."""
        if self.type is int:
            if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{op}: attribute {self.name!r} must be an int, got {value!r}")
            value = int(value)
            if self.min is not None and value < self.min:
                raise ValueError(f"{op}: attribute {self.name!r} must be >= {self.min}, got {value}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"{op}: attribute {self.name!r} must be one of {self.choices}, got {value}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{op}: attribute {self.name!r} must be a float, got {value!r}")
        return float(value)


@dataclass(frozen=True)
class InputSpec:
    name: str
    type_str: str  # type constraint name
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class OpSpec:
    """Everything about one custom op except its shape-inference function."""

    name: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[InputSpec, ...]
    attributes: tuple[AttrSpec, ...]
    doc: str
    version: int = VERSION
    attr_map: dict[str, AttrSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attr_map", {a.name: a for a in self.attributes})

    @property
    def min_inputs(self) -> int:
        return sum(not i.optional for i in self.inputs)

    @property
    def max_inputs(self) -> int:
        return len(self.inputs)

    def resolve_attrs(self, attrs: dict[str, object]) -> dict[str, int | float]:
        """Validate ``attrs`` and return them with every default filled in."""
        unknown = sorted(set(attrs) - set(self.attr_map))
        if unknown:
            raise ValueError(f"{self.name}: unknown attribute(s) {unknown}; known: {sorted(self.attr_map)}")
        out: dict[str, int | float] = {}
        for spec in self.attributes:
            if spec.name in attrs:
                out[spec.name] = spec.check(self.name, attrs[spec.name])
            elif spec.default is None:
                raise ValueError(f"{self.name}: missing required attribute {spec.name!r}")
            else:
                out[spec.name] = spec.default
        return out


_ACT_ATTRS = (
    AttrSpec("activation", int, ACT_IDENTITY, "0 identity, 1 relu, 2 leaky relu, 3 swish (SiLU)",
             choices=(0, 1, 2, 3)),
    AttrSpec("alpha", float, DEFAULT_ALPHA, "leaky relu slope"),
)

TILE_GATHER = OpSpec(
    name="TileGather",
    inputs=(
        InputSpec("tiles", "T", doc="[m*ts*ts, C] new tiles of the source (m may be 0)"),
        InputSpec("cache", "TC", doc="[Hs, Ws, C] (src_layout 0) or [1, C, Hs, Ws] (src_layout 1); float32 "
                  "or float16"),
        InputSpec("src_idx", "I", doc="[m, 2] top-left (y, x) of each source tile"),
        InputSpec("dst_idx", "I", doc="[n, 2] top-left (y, x) of each output tile"),
        InputSpec("scale", "T", optional=True, doc="[C] per-channel scale"),
        InputSpec("shift", "T", optional=True, doc="[C] per-channel shift"),
    ),
    outputs=(InputSpec("cols", "T", doc="[n*t*t, k*k*C] im2col rows, columns (ky, kx, c)"),),
    attributes=(
        AttrSpec("src_tile", int, None, "tile size ts of the source tiles", min=1),
        AttrSpec("tile", int, None, "tile size t of the output tiles", min=1),
        AttrSpec("kernel", int, None, "conv kernel size k", min=1),
        AttrSpec("stride", int, 1, "conv stride s", min=1),
        AttrSpec("pad_top", int, 0, "conv padding at the top"),
        AttrSpec("pad_left", int, 0, "conv padding at the left"),
        AttrSpec("upsample", int, 1, "nearest upsampling factor u applied to the source", min=1),
        *_ACT_ATTRS,
        AttrSpec("src_layout", int, LAYOUT_NHWC, "cache layout: 0 NHWC [Hs,Ws,C], 1 NCHW [1,C,Hs,Ws]",
                 choices=(LAYOUT_NHWC, LAYOUT_NCHW)),
        AttrSpec("pad_mode", int, PAD_ZEROS, "outside the upsampled source: 0 zeros, 1 reflect, 2 edge",
                 choices=(PAD_ZEROS, PAD_REFLECT, PAD_EDGE)),
    ),
    doc="im2col rows of a conv's input read from new source tiles where they cover a pixel, "
    "else from the cache (float32 or float16, converted on read); zero outside the image; fused "
    "per-channel scale/shift and activation. Output float32.",
)

#: The tile corners input and tile size attribute of TileScatter and TileMoments.
_TILE_ATTR = AttrSpec("tile", int, None, "tile size t", min=1)
_TILE_IDX = InputSpec("idx", "I", doc="[n, 2] top-left (y, x) of each tile")

TILE_SCATTER = OpSpec(
    name="TileScatter",
    inputs=(
        InputSpec("tiles", "T", doc="[n*t*t, C] tile tensor"),
        InputSpec("cache", "TC", doc="[1, C, H, W] NCHW full tensor; float32 or float16"),
        _TILE_IDX,
        InputSpec("residual", "T", optional=True, doc="[n*t*t, C] added to the tiles"),
    ),
    outputs=(InputSpec("out", "T", doc="[1, C, H, W] cache with the active tiles overwritten"),),
    attributes=(_TILE_ATTR, *_ACT_ATTRS),
    doc="Materialise a full float32 NCHW tensor: the cache (float32 or float16) with every active "
    "tile's in-image pixels replaced by act(tiles + residual).",
)

#: Columns per panel of TileConv's packed weight (``plugins/ort/gemm.h``).
PANEL = 16

TILE_CONV = OpSpec(
    name="TileConv",
    inputs=(
        *TILE_GATHER.inputs[:4],
        InputSpec("weight", "T", doc="[ceil(cout/16), k*k*C, 16] the conv's [k*k*C, cout] matrix in panels of 16 "
                  "columns (zero-padded; see pack_weight)"),
        *TILE_GATHER.inputs[4:],
        InputSpec("bias", "T", optional=True, doc="[cout] added to every row"),
        InputSpec("addend", "T", optional=True, doc="[n*t*t, cout] added (a partial sum of a concat's conv)"),
    ),
    outputs=(InputSpec("out", "T", doc="[n*t*t, cout] conv output rows"),),
    attributes=(*TILE_GATHER.attributes, AttrSpec("cout", int, None, "output channels", min=1)),
    doc="TileGather's im2col rows times the conv's weight matrix, plus bias and addend, computed block "
    "by block without the [n*t*t, k*k*C] buffer (ONNX Runtime CPU only; the fused lowering's "
    "fuse-tile-conv pass builds it from TileGather -> MatMul/Gemm [-> Add]). Output float32.",
)

TILE_MOMENTS = OpSpec(
    name="TileMoments",
    inputs=(
        InputSpec("tiles", "T", doc="[n*t*t, C] new values of the active tiles"),
        InputSpec("cache", "TC", doc="[H, W, C] NHWC prime-run values; float32 or float16"),
        _TILE_IDX,
    ),
    outputs=(InputSpec("sum", "TD", doc="[C] sum over the tiles' in-image pixels of new - old"),
             InputSpec("sumsq", "TD", doc="[C] the same sum of new^2 - old^2")),
    attributes=(_TILE_ATTR,),
    doc="How the per-channel sum and sum of squares of a tensor change when the active tiles take "
    "new values: sums over every listed tile's in-image pixels of (new - old) and (new - old) * "
    "(new + old), old read from the cache. The incremental GroupNorm statistics' correction in one "
    "pass (ONNX Runtime CPU only; the fused lowering's fuse-tile-moments pass builds it from the "
    "standard-op form the sparse rewrite emits). Outputs float64.",
)

TILE_AFFINE = OpSpec(
    name="TileAffine",
    inputs=(
        InputSpec("x", "T", doc="[rows, C] a tile tensor (NHWC rows)"),
        InputSpec("scale", "T", doc="[C] per-channel factor"),
        InputSpec("shift", "T", doc="[C] per-channel offset"),
    ),
    outputs=(InputSpec("y", "T", doc="[rows, C] act(x * scale + shift)"),),
    attributes=_ACT_ATTRS,
    doc="A per-channel affine map and activation over the rows of a tile tensor in one pass (ONNX Runtime "
    "CPU only; the fused lowering's fuse-tile-affine pass builds it from the broadcasting Mul, Add and "
    "activation the sparse rewrite emits for a pending epilogue). Output float32.",
)

GROUP_NORM_AFFINE = OpSpec(
    name="GroupNormAffine",
    inputs=(
        InputSpec("sum", "TD", doc="[C] per-channel sum of the tensor as primed"),
        InputSpec("sumsq", "TD", doc="[C] per-channel sum of squares as primed"),
        InputSpec("dsum", "TD", doc="[C] the change of sum under the edit (TileMoments)"),
        InputSpec("dsumsq", "TD", doc="[C] the change of sumsq under the edit"),
        InputSpec("gamma", "TD", doc="[C] GroupNorm scale per channel"),
        InputSpec("beta", "TD", doc="[C] GroupNorm bias per channel"),
    ),
    outputs=(InputSpec("new_sum", "TD", doc="[C] sum + dsum"),
             InputSpec("new_sumsq", "TD", doc="[C] sumsq + dsumsq"),
             InputSpec("scale", "T", doc="[C] gamma / sqrt(var + eps) of each channel's group"),
             InputSpec("shift", "T", doc="[C] beta - mean * scale")),
    attributes=(AttrSpec("groups", int, None, "GroupNorm groups (C a multiple of it)", min=1),
                AttrSpec("count", int, None, "elements per group: H * W * C / groups", min=1),
                AttrSpec("epsilon", float, None, "GroupNorm epsilon")),
    doc="The per-channel scale and shift of a GroupNorm from the edited tensor's sums: sums updated by the "
    "edit's change, reduced per group, mean and biased variance over count elements, in float64; scale and "
    "shift rounded to float32. The [C] arithmetic of the incremental GroupNorm statistics in one node "
    "(ONNX Runtime CPU only; the fused lowering's fuse-group-norm pass builds it from the 24 stock ops the "
    "sparse rewrite emits).",
)

#: ``to`` of CacheStore: the cache's element type (ONNX TensorProto codes).
CACHE_FLOAT = onnx.TensorProto.FLOAT
CACHE_FLOAT16 = onnx.TensorProto.FLOAT16

CACHE_STORE = OpSpec(
    name="CacheStore",
    inputs=(InputSpec("x", "T", doc="[1, C, H, W] an activation of the prime run"),),
    outputs=(InputSpec("cache", "TC", doc="[H, W, C] x in NHWC, float32 or float16 (attribute to)"),
             InputSpec("sum", "TD", doc="[C] sum of x over the image"),
             InputSpec("sumsq", "TD", doc="[C] sum of x^2 over the image")),
    attributes=(AttrSpec("to", int, CACHE_FLOAT, "the cache's type: 1 float32, 10 float16 (rounded to nearest "
                         "even)", choices=(CACHE_FLOAT, CACHE_FLOAT16)),),
    doc="The prime run's write of one NHWC cache: x transposed to [H, W, C] (and rounded to float16), with the "
    "per-channel sum and sum of squares a GroupNorm's incremental statistics start from, in one pass over x "
    "(ONNX Runtime CPU only; the fused lowering's fuse-cache-store pass builds it from the prime graph's "
    "[Cast ->] Transpose -> Reshape and ReduceSum / ReduceSumSquare -> Cast). Outputs float64 sums.",
)

OPS: dict[str, OpSpec] = {TILE_GATHER.name: TILE_GATHER, TILE_SCATTER.name: TILE_SCATTER, TILE_CONV.name: TILE_CONV,
                          TILE_MOMENTS.name: TILE_MOMENTS, CACHE_STORE.name: CACHE_STORE,
                          GROUP_NORM_AFFINE.name: GROUP_NORM_AFFINE, TILE_AFFINE.name: TILE_AFFINE}


# --------------------------------------------------------------------------------------------
# Node construction


def make_node(op: str, inputs: list[str], outputs: list[str], name: str | None = None,
              **attrs: object) -> onnx.NodeProto:
    """Return a validated ``onnx.NodeProto`` for ssic op ``op`` with every attribute written out.

    Missing optional inputs are given as ``""`` (or left off at the end). Raises ``ValueError``
    for unknown ops/attributes, wrong attribute types or values, or a wrong number of inputs.
    """
    spec = OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown ssic op {op!r}; known: {sorted(OPS)}")
    inputs = list(inputs)
    while inputs and inputs[-1] == "":
        inputs.pop()
    if not spec.min_inputs <= len(inputs) <= spec.max_inputs:
        raise ValueError(f"{op}: expected {spec.min_inputs}..{spec.max_inputs} inputs, got {len(inputs)}")
    for i, (value, ispec) in enumerate(zip(inputs, spec.inputs, strict=False)):
        if value == "" and not ispec.optional:
            raise ValueError(f"{op}: input {i} ({ispec.name}) is required")
    if len(outputs) != len(spec.outputs):
        raise ValueError(f"{op}: expected {len(spec.outputs)} output(s), got {len(outputs)}")
    resolved = spec.resolve_attrs(attrs)
    return helper.make_node(op, inputs, list(outputs), name=name, domain=DOMAIN, **resolved)


def opset_imports(onnx_opset: int = 17) -> list[onnx.OperatorSetIdProto]:
    """Return the opset imports a graph using ssic ops needs (default domain and ``ssic``)."""
    return [helper.make_opsetid("", onnx_opset), helper.make_opsetid(DOMAIN, VERSION)]


# --------------------------------------------------------------------------------------------
# Shape inference and schema registration


def gather_output_shape(tiles_shape, cache_shape, dst_shape, *, tile: int, kernel: int,
                        src_layout: int = LAYOUT_NHWC):
    """Return the TileGather output shape ``[n*t*t, k*k*C]`` (entries may be None if unknown)."""
    n = dst_shape[0] if dst_shape is not None else None
    c = None
    if tiles_shape is not None and tiles_shape[1] is not None:
        c = tiles_shape[1]
    elif cache_shape is not None:
        c = cache_shape[2] if src_layout == LAYOUT_NHWC else cache_shape[1]
    return [None if n is None else n * tile * tile, None if c is None else kernel * kernel * c]


def _dims(type_proto: onnx.TypeProto | None):
    if type_proto is None or not type_proto.HasField("tensor_type"):
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _attr_int(ctx, name: str, default: int | None) -> int | None:
    a = ctx.get_attribute(name)
    return default if a is None else a.i


def _float_type(shape) -> onnx.TypeProto:
    tp = onnx.TypeProto()
    tp.tensor_type.elem_type = onnx.TensorProto.FLOAT
    if shape is not None:
        tp.tensor_type.shape.SetInParent()
        for d in shape:
            dim = tp.tensor_type.shape.dim.add()
            if d is not None:
                dim.dim_value = d
    return tp


def _infer_tile_gather(ctx) -> None:
    tile = _attr_int(ctx, "tile", None)
    kernel = _attr_int(ctx, "kernel", None)
    layout = _attr_int(ctx, "src_layout", LAYOUT_NHWC)
    tiles = _dims(ctx.get_input_type(0))
    cache = _dims(ctx.get_input_type(1))
    dst = _dims(ctx.get_input_type(3))
    if tile is None or kernel is None:
        ctx.set_output_type(0, _float_type([None, None]))
        return
    if tiles is not None and len(tiles) != 2:
        tiles = None
    if cache is not None and len(cache) != (3 if layout == LAYOUT_NHWC else 4):
        cache = None
    shape = gather_output_shape(tiles, cache, dst, tile=tile, kernel=kernel, src_layout=layout)
    ctx.set_output_type(0, _float_type(shape))


def _infer_tile_conv(ctx) -> None:
    dst = _dims(ctx.get_input_type(3))
    tile, cout = _attr_int(ctx, "tile", None), _attr_int(ctx, "cout", None)
    n = dst[0] if dst is not None and tile is not None else None
    ctx.set_output_type(0, _float_type([None if n is None else n * tile * tile, cout]))


def _infer_tile_scatter(ctx) -> None:
    cache = _dims(ctx.get_input_type(1))
    ctx.set_output_type(0, _float_type(cache))


def _infer_tile_moments(ctx) -> None:
    tiles, cache = _dims(ctx.get_input_type(0)), _dims(ctx.get_input_type(1))
    c = tiles[1] if tiles is not None and len(tiles) == 2 else None
    if c is None and cache is not None and len(cache) == 3:
        c = cache[2]
    for i in range(2):
        tp = _float_type([c])
        tp.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        ctx.set_output_type(i, tp)


def _infer_cache_store(ctx) -> None:
    x = _dims(ctx.get_input_type(0))
    to = _attr_int(ctx, "to", CACHE_FLOAT)
    shape = [x[2], x[3], x[1]] if x is not None and len(x) == 4 else None
    tp = _float_type(shape)
    tp.tensor_type.elem_type = to
    ctx.set_output_type(0, tp)
    for i in (1, 2):
        tp = _float_type([shape[2] if shape is not None else None])
        tp.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        ctx.set_output_type(i, tp)


def _infer_tile_affine(ctx) -> None:
    ctx.set_output_type(0, _float_type(_dims(ctx.get_input_type(0))))


def _infer_group_norm_affine(ctx) -> None:
    dims = [_dims(ctx.get_input_type(i)) for i in range(6)]
    c = next((d[0] for d in dims if d is not None and len(d) == 1 and d[0] is not None), None)
    for i in range(4):
        tp = _float_type([c])
        if i < 2:
            tp.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        ctx.set_output_type(i, tp)


_INFER = {CACHE_STORE.name: _infer_cache_store, TILE_GATHER.name: _infer_tile_gather, TILE_SCATTER.name: _infer_tile_scatter,
          TILE_CONV.name: _infer_tile_conv, TILE_MOMENTS.name: _infer_tile_moments,
          GROUP_NORM_AFFINE.name: _infer_group_norm_affine, TILE_AFFINE.name: _infer_tile_affine}

_ATTR_TYPES = {int: defs.OpSchema.AttrType.INT, float: defs.OpSchema.AttrType.FLOAT}


def _make_schema(spec: OpSpec) -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    Opt = defs.OpSchema.FormalParameterOption
    inputs = [P(i.name, i.type_str, i.doc, param_option=Opt.Optional if i.optional else Opt.Single)
              for i in spec.inputs]
    outputs = [P(o.name, o.type_str, o.doc) for o in spec.outputs]
    attrs = []
    for a in spec.attributes:
        if a.default is None:
            attrs.append(defs.OpSchema.Attribute(a.name, _ATTR_TYPES[a.type], a.doc, required=True))
        else:
            attrs.append(defs.OpSchema.Attribute(
                a.name, helper.make_attribute(a.name, a.default), a.doc))
    schema = defs.OpSchema(
        spec.name, DOMAIN, spec.version, spec.doc,
        inputs=inputs, outputs=outputs,
        type_constraints=[(name, list(types), doc) for name, (types, doc) in TYPE_CONSTRAINTS.items()
                          if name in {p.type_str for p in (*spec.inputs, *spec.outputs)}],
        attributes=attrs,
    )
    schema.set_type_and_shape_inference_function(_INFER[spec.name])
    return schema


def register_schemas() -> None:
    """Register the ONNX schemas of all ssic ops (idempotent)."""
    for spec in OPS.values():
        if not defs.has(spec.name, spec.version, DOMAIN):
            defs.register_schema(_make_schema(spec))


register_schemas()


# --------------------------------------------------------------------------------------------
# NumPy reference implementations


def apply_activation(x: np.ndarray, activation: int, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Return ``act(x)`` in float32 for an activation code."""
    x = np.asarray(x, dtype=np.float32)
    if activation == ACT_IDENTITY:
        return x
    if activation == ACT_RELU:
        return np.maximum(x, np.float32(0))
    if activation == ACT_LEAKY_RELU:
        return np.where(x >= 0, x, x * np.float32(alpha)).astype(np.float32)
    if activation == ACT_SWISH:
        with np.errstate(over="ignore"):
            return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)
    raise ValueError(f"unknown activation code {activation}")


def _cache_as_float32(cache) -> np.ndarray:
    """The ``cache`` input as float32 (a float16 cache widens exactly, as the kernels read it)."""
    return np.asarray(cache).astype(np.float32)


def _check_idx(idx: np.ndarray, t: int, h: int, w: int, what: str) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1, 2)
    if idx.size and (np.any(idx % t != 0) or np.any(idx < 0) or np.any(idx[:, 0] >= h)
                     or np.any(idx[:, 1] >= w)):
        raise ValueError(f"{what}: tile corners must be multiples of {t} inside {h}x{w}")
    return idx


def _paste_tiles(full: np.ndarray, tiles: np.ndarray, idx: np.ndarray, t: int) -> None:
    """Overwrite ``full`` ([H, W, C]) with the in-image part of each tile, in order."""
    h, w, c = full.shape
    tiles = tiles.reshape(-1, t, t, c)
    for i, (y, x) in enumerate(idx):
        hh, ww = min(t, h - y), min(t, w - x)
        full[y:y + hh, x:x + ww] = tiles[i, :hh, :ww]


def reflect_coords(v: np.ndarray, n: int) -> np.ndarray:
    """Reflect integer coordinates into ``[0, n)`` without repeating the border (period ``2n - 2``)."""
    if n <= 1:
        return np.zeros_like(v)
    period = 2 * n - 2
    r = np.abs(v) % period
    return np.where(r >= n, period - r, r)


def tile_gather_ref(tiles, cache, src_idx, dst_idx, scale=None, shift=None, *, src_tile: int,
                    tile: int, kernel: int, stride: int = 1, pad_top: int = 0, pad_left: int = 0,
                    upsample: int = 1, activation: int = ACT_IDENTITY, alpha: float = DEFAULT_ALPHA,
                    src_layout: int = LAYOUT_NHWC, pad_mode: int = PAD_ZEROS) -> np.ndarray:
    """Return the TileGather output ``cols`` ``[n*t*t, k*k*C]`` (float32).

    ``cache`` may be float32 or float16 (read as its exact float32 value); every other float input
    is float32. Raises ``ValueError`` for invalid tile corners.
    """
    cache = _cache_as_float32(cache)
    if src_layout == LAYOUT_NHWC:
        src = cache.copy()
    elif src_layout == LAYOUT_NCHW:
        src = np.ascontiguousarray(cache[0].transpose(1, 2, 0))
    else:
        raise ValueError(f"unknown src_layout {src_layout}")
    hs, ws, c = src.shape
    ts, t, k, s, u = src_tile, tile, kernel, stride, upsample
    src_idx = _check_idx(src_idx, ts, hs, ws, "TileGather src_idx")
    dst_idx = np.asarray(dst_idx, dtype=np.int64).reshape(-1, 2)
    tiles = np.asarray(tiles, dtype=np.float32).reshape(-1, c)
    if tiles.shape[0] != len(src_idx) * ts * ts:
        raise ValueError("TileGather: tiles rows != len(src_idx) * src_tile^2")
    _paste_tiles(src, tiles, src_idx, ts)

    if scale is not None:
        src = src * np.asarray(scale, dtype=np.float32).reshape(c)
    if shift is not None:
        src = src + np.asarray(shift, dtype=np.float32).reshape(c)
    src = apply_activation(src, activation, alpha)

    n = len(dst_idx)
    pk = np.arange(t)[:, None] * s + np.arange(k)[None, :]  # [t, k]: offset of (p, kk)
    ys = dst_idx[:, 0, None, None] * s - pad_top + pk[None]  # [n, t(py), k(ky)]
    xs = dst_idx[:, 1, None, None] * s - pad_left + pk[None]  # [n, t(px), k(kx)]
    if pad_mode == PAD_REFLECT:
        ys, xs = reflect_coords(ys, hs * u), reflect_coords(xs, ws * u)
    elif pad_mode != PAD_EDGE and pad_mode != PAD_ZEROS:
        raise ValueError(f"unknown pad_mode {pad_mode}")
    vy = (ys >= 0) & (ys < hs * u) | (pad_mode != PAD_ZEROS)
    vx = (xs >= 0) & (xs < ws * u) | (pad_mode != PAD_ZEROS)
    sy = np.clip(ys, 0, hs * u - 1) // u
    sx = np.clip(xs, 0, ws * u - 1) // u
    # vals[n, py, ky, px, kx, C]
    vals = src[sy[:, :, :, None, None], sx[:, None, None, :, :]]
    valid = vy[:, :, :, None, None] & vx[:, None, None, :, :]
    vals = np.where(valid[..., None], vals, np.float32(0))
    cols = vals.transpose(0, 1, 3, 2, 4, 5).reshape(n * t * t, k * k * c)
    return np.ascontiguousarray(cols, dtype=np.float32)


def pack_weight(matrix: np.ndarray) -> np.ndarray:
    """A conv's weight matrix ``[K, cout]`` (float32) as TileConv's ``weight``: panels of ``PANEL`` = 16
    columns, ``[ceil(cout/16), K, 16]``, the last one zero-padded (the layout of BLIS-style packed B;
    Goto & van de Geijn, ACM TOMS 2008)."""
    k, cout = matrix.shape
    panels = -(-cout // PANEL)
    padded = np.zeros((k, panels * PANEL), np.float32)
    padded[:, :cout] = matrix
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def unpack_weight(weight: np.ndarray, cout: int) -> np.ndarray:
    """Inverse of :func:`pack_weight`: ``[ceil(cout/16), K, 16]`` -> ``[K, cout]``."""
    panels, k, width = weight.shape
    return np.ascontiguousarray(np.asarray(weight, np.float32).transpose(1, 0, 2).reshape(k, panels * width)[:, :cout])


def tile_conv_ref(tiles, cache, src_idx, dst_idx, weight, scale=None, shift=None, bias=None, addend=None, *,
                  cout: int, **gather_attrs) -> np.ndarray:
    """Return the TileConv output ``[n*t*t, cout]`` (float32): ``tile_gather_ref(...) @ W + bias +
    addend`` with ``W = unpack_weight(weight, cout)``. Raises ``ValueError`` like TileGather, and for
    a weight whose rows differ from ``k*k*C``."""
    cols = tile_gather_ref(tiles, cache, src_idx, dst_idx, scale, shift, **gather_attrs)
    w = unpack_weight(weight, cout)
    if w.shape[0] != cols.shape[1]:
        raise ValueError(f"TileConv: weight has {w.shape[0]} rows, the gathered rows {cols.shape[1]} columns")
    y = cols @ w
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(1, cout)
    if addend is not None:
        y = y + np.asarray(addend, np.float32).reshape(-1, cout)
    return np.ascontiguousarray(y, dtype=np.float32)


def tile_scatter_ref(tiles, cache, idx, residual=None, *, tile: int,
                     activation: int = ACT_IDENTITY, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Return the TileScatter output (float32 ``[1, C, H, W]``): ``cache`` (float32 or float16, read
    as its exact float32 value) with the active tiles replaced. Raises ``ValueError`` for invalid tile
    corners."""
    cache = _cache_as_float32(cache)
    _, c, h, w = cache.shape
    idx = _check_idx(idx, tile, h, w, "TileScatter idx")
    vals = np.asarray(tiles, dtype=np.float32).reshape(-1, c)
    if vals.shape[0] != len(idx) * tile * tile:
        raise ValueError("TileScatter: tiles rows != len(idx) * tile^2")
    if residual is not None:
        vals = vals + np.asarray(residual, dtype=np.float32).reshape(-1, c)
    vals = apply_activation(vals, activation, alpha)
    full = np.ascontiguousarray(cache[0].transpose(1, 2, 0))
    _paste_tiles(full, vals, idx, tile)
    return np.ascontiguousarray(full.transpose(2, 0, 1)[None])


def tile_moments_ref(tiles, cache, idx, *, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Return TileMoments' ``(sum, sumsq)`` (float64 ``[C]`` each): over every tile in ``idx`` (a tile
    listed twice counts twice) and its in-image pixels, ``sum(new - old)`` and ``sum(new^2 - old^2)``
    computed as ``(new - old) * (new + old)``; ``old`` read from the NHWC ``cache`` (float32 or
    float16). Raises ``ValueError`` for invalid tile corners."""
    cache = _cache_as_float32(cache)
    h, w, c = cache.shape
    idx = _check_idx(idx, tile, h, w, "TileMoments idx")
    new = np.asarray(tiles, np.float32).reshape(len(idx), tile, tile, c)
    s1, s2 = np.zeros(c, np.float64), np.zeros(c, np.float64)
    for i, (y, x) in enumerate(idx):
        hh, ww = min(tile, h - y), min(tile, w - x)
        nv, ov = new[i, :hh, :ww].reshape(-1, c), cache[y:y + hh, x:x + ww].reshape(-1, c)
        d = nv - ov
        s1 += d.sum(0, dtype=np.float64)
        s2 += (d * (nv + ov)).sum(0, dtype=np.float64)
    return s1, s2


def cache_store_ref(x, *, to: int = CACHE_FLOAT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return CacheStore's ``(cache, sum, sumsq)``: ``x`` ([1, C, H, W] float32) as ``[H, W, C]`` in
    float32 or, for ``to`` = 10, float16 rounded to nearest even (numpy's ``astype``), and the float64
    ``[C]`` sums of ``x`` and ``x * x`` over the image. Raises ``ValueError`` for another shape or ``to``."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"CacheStore: x must be [1, C, H, W], got {list(x.shape)}")
    if to not in (CACHE_FLOAT, CACHE_FLOAT16):
        raise ValueError(f"CacheStore: to must be {CACHE_FLOAT} or {CACHE_FLOAT16}, got {to}")
    cache = x[0].transpose(1, 2, 0).astype(np.float16 if to == CACHE_FLOAT16 else np.float32)
    flat = x[0].reshape(x.shape[1], -1).astype(np.float64)
    return np.ascontiguousarray(cache), flat.sum(1), (flat * flat).sum(1)


def group_norm_affine_ref(sum_, sumsq, dsum, dsumsq, gamma, beta, *, groups: int, count: int,
                          epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return GroupNormAffine's ``(new_sum, new_sumsq, scale, shift)``: float64 ``[C]`` sums
    ``sum + dsum`` and ``sumsq + dsumsq``; per group ``mean = S1 / count`` and the biased variance
    ``S2 / count - mean^2`` (``S1``, ``S2``: the group's channels' new sums), then per channel
    ``scale = gamma / sqrt(var + epsilon)`` and ``shift = beta - mean * scale`` computed in float64 and
    rounded to float32 (GroupNorm as ``torch.nn.GroupNorm`` and ONNX GroupNormalization define it).
    Raises ``ValueError`` when the inputs are not all ``[C]`` or ``C`` is not a multiple of ``groups``."""
    arrays = [np.asarray(a, np.float64).reshape(-1) for a in (sum_, sumsq, dsum, dsumsq, gamma, beta)]
    c = arrays[0].size
    if any(a.size != c for a in arrays) or groups < 1 or c % groups:
        raise ValueError(f"GroupNormAffine: inputs must all be [C] with C a multiple of groups={groups}")
    s1, s2 = arrays[0] + arrays[2], arrays[1] + arrays[3]
    mean = s1.reshape(groups, -1).sum(1) / count
    var = s2.reshape(groups, -1).sum(1) / count - mean * mean
    inv = np.repeat(1.0 / np.sqrt(var + epsilon), c // groups)
    scale = inv * arrays[4]
    shift = arrays[5] - np.repeat(mean, c // groups) * scale
    return s1, s2, scale.astype(np.float32), shift.astype(np.float32)


def tile_affine_ref(x, scale, shift, *, activation: int = ACT_IDENTITY, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Return TileAffine's ``act(x * scale + shift)`` (float32 ``[rows, C]``; ``scale``, ``shift``
    float32 ``[C]``). Raises ``ValueError`` for other shapes or an unknown activation code."""
    x = np.asarray(x, np.float32)
    scale, shift = np.asarray(scale, np.float32), np.asarray(shift, np.float32)
    if x.ndim != 2 or scale.shape != (x.shape[1],) or shift.shape != (x.shape[1],):
        raise ValueError(f"TileAffine: x must be [rows, C] and scale, shift [C]; got {list(x.shape)}, "
                         f"{list(scale.shape)}, {list(shift.shape)}")
    return apply_activation(x * scale + shift, activation, alpha)
