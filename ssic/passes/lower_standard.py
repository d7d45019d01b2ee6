"""The ``standard`` lowering: expand ``ssic::TileGather`` / ``ssic::TileScatter`` into stock ONNX ops.

After this pass the sparse graph runs on plain ONNX Runtime (and TensorRT without plugins): no custom
op library is needed. The semantics are those of ``docs/architecture.md`` / ``ssic/ops.py``. Every
shape is static except the number of active tiles, which is read from the index inputs at run time.

TileGather (``tiles``, ``cache``, ``src_idx``, ``dst_idx``, [``scale``], [``shift``]) becomes:

1. the source as NHWC ``[Hs, Ws, C]`` (an NCHW cache is transposed), zero-padded to
   ``[Hp + 1, Wp, C]`` where ``Hp x Wp`` is the source tile grid; the extra row holds zeros and its
   first pixel, flat index ``Hp*Wp``, is the "outside the image" pixel;
2. ``ScatterND`` of the new source tiles at their pixel coordinates
   (``src_idx[i] + offset[p]`` with a constant ``[ts*ts, 2]`` offset table), skipped when the tile
   tensor is statically empty;
3. a flat index table ``[n, t, t, k, k]`` computed from ``dst_idx`` and two constant offset tables:
   ``Y = y0*s + (py*s + ky - pad_top)`` (same for X), in-image test against ``Hs*u x Ws*u``,
   ``(Y // u) * Wp + X // u`` inside, ``Hp*Wp`` (the zero pixel) outside (``pad_mode`` reflect/edge first map
   outside coordinates into the image, so no pixel is outside);
4. ``Gather`` of rows, then ``x*scale + shift`` and the activation on the gathered rows; if there is a
   shift, out-of-image rows are zeroed again after the activation (every activation maps 0 to 0, so
   without a shift the zero pixel stays zero by itself);
5. ``Reshape`` to ``[n*t*t, k*k*C]`` (row ``(i, py, px)``, column ``(ky, kx, c)``).

TileScatter (``tiles``, ``cache``, ``idx``, [``residual``]) becomes: NCHW cache -> NHWC, padded to
the tile grid, ``act(tiles + residual)`` scattered at the tile pixels, sliced back to ``H x W``,
transposed back to ``[1, C, H, W]``.

A float16 cache is Cast to float32 where it is read: a gather with no new tiles (a statically empty
tile tensor, e.g. the cached values under the active tiles) gathers float16 rows and casts only
those; otherwise the cast comes where the float32 tiles are scattered into the cache (ScatterND
takes one type), after the layout change and the padding, which therefore move half the bytes (the
rows cannot be cast after the gather there: it reads cache and new tiles through one index table).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ssic.errors import SSICError
from ssic.ops import (
    ACT_IDENTITY,
    ACT_LEAKY_RELU,
    ACT_RELU,
    ACT_SWISH,
    DEFAULT_ALPHA,
    PAD_REFLECT,
    PAD_ZEROS,
)
from ssic.passes.rewrite import take_over

DOMAIN = "ssic"


class _Builder:
    """Builds the replacement of one ssic node: named nodes, values and initializers."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.tape = ir.tape.Tape()
        self.count = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def op(self, op_type: str, inputs: list[ir.Value | None], **attrs) -> ir.Value:
        name = self._name(op_type)
        out = self.tape.op(op_type, inputs, attrs or None, name=name)
        out.name = name
        return out

    def const(self, array: np.ndarray, hint: str = "const") -> ir.Value:
        value = self.tape.initializer(ir.tensor(np.asarray(array)), name=self._name(hint))
        self.graph.register_initializer(value)
        return value

    def i64(self, values, hint: str = "shape") -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def activation(self, x: ir.Value, code: int, alpha: float) -> ir.Value:
        if code == ACT_IDENTITY:
            return x
        if code == ACT_RELU:
            return self.op("Relu", [x])
        if code == ACT_LEAKY_RELU:
            return self.op("LeakyRelu", [x], alpha=float(alpha))
        if code == ACT_SWISH:
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        raise SSICError(f"unknown ssic activation code {code}")

    def to_float32(self, x: ir.Value, cache: ir.Value) -> ir.Value:
        """``x`` (derived from ``cache`` by layout ops only) as float32: a Cast when the cache is float16."""
        if cache.dtype == ir.DataType.FLOAT16:
            return self.op("Cast", [x], to=ir.DataType.FLOAT)
        return x

    def to_nhwc(self, nchw: ir.Value, c: int, h: int, w: int) -> ir.Value:
        return self.op("Transpose", [self.op("Reshape", [nchw, self.i64([c, h, w])])], perm=[1, 2, 0])

    def tile_pixels(self, idx: ir.Value, t: int) -> ir.Value:
        """``[n*t*t, 2]`` pixel coordinates of every tile's pixels, rows ``(i, py, px)``."""
        py, px = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
        offsets = np.stack([py.ravel(), px.ravel()], axis=1).astype(np.int64)[None]  # [1, t*t, 2]
        corners = self.op("Reshape", [idx, self.i64([-1, 1, 2])])
        return self.op("Reshape", [self.op("Add", [corners, self.const(offsets, "tile_offsets")]),
                                   self.i64([-1, 2])])


def _static_shape(value: ir.Value, what: str) -> tuple[int, ...]:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        raise SSICError(f"standard lowering needs a static shape for {what} {value.name!r}, got {shape}")
    return tuple(int(d) for d in shape)


def _attrs(node: ir.Node) -> dict[str, int | float]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _ceil_to(x: int, t: int) -> int:
    return -(-x // t) * t


def lower_tile_gather(b: _Builder, node: ir.Node) -> ir.Value:
    """Return the stock-op value equal to the output of ``ssic::TileGather`` ``node``."""
    a = _attrs(node)
    ts, t, k = int(a["src_tile"]), int(a["tile"]), int(a["kernel"])
    s, u = int(a.get("stride", 1)), int(a.get("upsample", 1))
    pad_top, pad_left = int(a.get("pad_top", 0)), int(a.get("pad_left", 0))
    act, alpha = int(a.get("activation", ACT_IDENTITY)), float(a.get("alpha", DEFAULT_ALPHA))
    pad_mode = int(a.get("pad_mode", PAD_ZEROS))
    tiles, cache, src_idx, dst_idx = node.inputs[:4]
    scale, shift = _input(node, 4), _input(node, 5)

    if int(a.get("src_layout", 0)) == 1:
        _, c, hs, ws = _static_shape(cache, "the NCHW cache")
        src = b.to_nhwc(cache, c, hs, ws)
    else:
        hs, ws, c = _static_shape(cache, "the NHWC cache")
        src = cache
    hp, wp = _ceil_to(hs, ts), _ceil_to(ws, ts)

    # 1-2. source = cache with the new tiles pasted, plus one zero row (flat index hp*wp).
    src = b.op("Pad", [src, b.i64([0, 0, 0, hp + 1 - hs, wp - ws, 0])])
    # no new tiles (a statically empty tile tensor: the cache read alone): no scatter, and a float16
    # cache is cast after the gather, on the rows read only
    no_tiles = tiles.shape is not None and len(tiles.shape) == 2 and tiles.shape[0] == 0
    if not no_tiles:
        src = b.op("ScatterND", [b.to_float32(src, cache), b.tile_pixels(src_idx, ts), tiles])
    src = b.op("Reshape", [src, b.i64([(hp + 1) * wp, c])])

    # 3. flat index table [n, t, t, k, k] from dst_idx.
    p, kk = np.arange(t), np.arange(k)
    off = p[:, None] * s + kk[None, :]  # [t, k]: offset of (p, kk)
    off_y = (off[:, None, :, None] - pad_top) * np.ones((1, t, 1, k), np.int64)  # [py, px, ky, kx]
    off_x = (off[None, :, None, :] - pad_left) * np.ones((t, 1, k, 1), np.int64)
    corner_y = b.op("Reshape", [b.op("Gather", [dst_idx, b.i64(0, "col")], axis=1), b.i64([-1, 1, 1, 1, 1])])
    corner_x = b.op("Reshape", [b.op("Gather", [dst_idx, b.i64(1, "col")], axis=1), b.i64([-1, 1, 1, 1, 1])])
    ys = b.op("Add", [b.op("Mul", [corner_y, b.i64(s, "stride")]), b.const(off_y[None].astype(np.int64), "off_y")])
    xs = b.op("Add", [b.op("Mul", [corner_x, b.i64(s, "stride")]), b.const(off_x[None].astype(np.int64), "off_x")])

    def inside(v: ir.Value, size: int) -> ir.Value:
        return b.op("And", [b.op("Greater", [v, b.i64(-1, "lo")]), b.op("Less", [v, b.i64(size, "hi")])])

    def source_coord(v: ir.Value, size: int) -> ir.Value:
        n = size * u
        if pad_mode == PAD_REFLECT and n > 1:
            r = b.op("Mod", [b.op("Abs", [v]), b.i64(2 * n - 2, "period")])
            v = b.op("Where", [b.op("Less", [r, b.i64(n, "n")]), r, b.op("Sub", [b.i64(2 * n - 2, "period"), r])])
        clipped = b.op("Min", [b.op("Max", [v, b.i64(0, "lo")]), b.i64(n - 1, "hi")])
        return b.op("Div", [clipped, b.i64(u, "upsample")]) if u > 1 else clipped

    flat = b.op("Add", [b.op("Mul", [source_coord(ys, hs), b.i64(wp, "wp")]), source_coord(xs, ws)])
    if pad_mode == PAD_ZEROS:
        valid = b.op("And", [inside(ys, hs * u), inside(xs, ws * u)])
        flat = b.op("Where", [valid, flat, b.i64(hp * wp, "zero_pixel")])

    # 4. gather rows [n*t*t*k*k, C], per-channel affine, activation.
    rows = b.op("Gather", [src, b.op("Reshape", [flat, b.i64([-1])])], axis=0)
    if no_tiles:
        rows = b.to_float32(rows, cache)
    if scale is not None:
        rows = b.op("Mul", [rows, scale])
    if shift is not None:
        rows = b.op("Add", [rows, shift])
    rows = b.activation(rows, act, alpha)
    if shift is not None and pad_mode == PAD_ZEROS:
        # act(shift) need not be 0: zero the out-of-image (conv padding) rows again.
        keep = b.op("Reshape", [valid, b.i64([-1, 1])])
        zero = b.const(np.zeros((1, 1), np.float32), "zero")
        rows = b.op("Where", [keep, rows, zero])

    # 5. im2col rows: [n*t*t, k*k*C].
    return b.op("Reshape", [rows, b.i64([-1, k * k * c])])


def lower_tile_scatter(b: _Builder, node: ir.Node) -> ir.Value:
    """Return the stock-op value equal to the output of ``ssic::TileScatter`` ``node``."""
    a = _attrs(node)
    t = int(a["tile"])
    act, alpha = int(a.get("activation", ACT_IDENTITY)), float(a.get("alpha", DEFAULT_ALPHA))
    tiles, cache, idx = node.inputs[:3]
    residual = _input(node, 3)
    _, c, h, w = _static_shape(cache, "the NCHW cache")
    hp, wp = _ceil_to(h, t), _ceil_to(w, t)

    vals = tiles if residual is None else b.op("Add", [tiles, residual])
    vals = b.activation(vals, act, alpha)
    full = b.to_nhwc(cache, c, h, w)
    if (hp, wp) != (h, w):
        full = b.op("Pad", [full, b.i64([0, 0, 0, hp - h, wp - w, 0])])
    full = b.to_float32(full, cache)
    full = b.op("ScatterND", [full, b.tile_pixels(idx, t), vals])
    if (hp, wp) != (h, w):
        full = b.op("Slice", [full, b.i64([0, 0]), b.i64([h, w]), b.i64([0, 1])])
    return b.op("Reshape", [b.op("Transpose", [full], perm=[2, 0, 1]), b.i64([1, c, h, w])])


LOWERINGS = {"TileGather": lower_tile_gather, "TileScatter": lower_tile_scatter}


class LowerToStandardPass(ir.passes.InPlacePass):
    """Replace every ``ssic::TileGather`` / ``ssic::TileScatter`` with stock ONNX ops.

    The ``ssic`` opset import is dropped when no ssic node remains. Raises :class:`SSICError` for an
    ssic op it cannot lower or a cache whose shape is not static.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for index, node in enumerate(list(graph)):
            if node.domain != DOMAIN:
                continue
            lower = LOWERINGS.get(node.op_type)
            if lower is None:
                raise SSICError(f"standard lowering: no expansion for ssic::{node.op_type}")
            b = _Builder(graph, f"{node.name or f'ssic_{index}'}/std")
            new = lower(b, node)
            graph.insert_before(node, b.tape.nodes)
            take_over(node.outputs[0], new)
            graph.remove(node, safe=True)
            modified = True
        if modified:
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(model)  # e.g. the empty tile tensors a skipped scatter leaves unread
        if modified and not any(n.domain == DOMAIN for n in graph.all_nodes()):
            model.opset_imports.pop(DOMAIN, None)
        return ir.passes.PassResult(model, modified)
