"""Conv rules: convolutions at a sparse resolution become ``ssic::TileGather`` + MatMul + bias.

A k x k (strided, dilated, grouped, after a folded nearest upsample or zero pad) conv gathers im2col
rows ``[n*t*t, K*K*Cin]`` of its input for the output tiles (``K = (k-1)*d + 1``; a dilated conv keeps
the k*k columns it reads) and multiplies them by the weight reshaped to ``[k*k*Cin, Cout]`` (row order
``(ky, kx, c)``); a grouped conv does one MatMul per group, a depthwise conv a Mul and a sum. A 1x1
stride-1 conv of a tile value on the same grid is a MatMul on the tiles. ``auto_pad`` SAME/VALID is
resolved to explicit pads from the static shapes. ``ConvTranspose`` is a conv of the zero-inserted
input: a gather with ``upsample = stride`` whose rows keep, per output phase, only the columns that
fall on input pixels. The receptive field (exact mode) is the kernel window: a MaxPool of the change
mask with the op's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ssic.ops import ACT_SWISH, PAD_ZEROS
from ssic.passes.analysis import ConvDecision, conv_kind, conv_macs, spatial_hw, static_shape
from ssic.passes.sparsify.context import SparsifyContext, const_array
from ssic.passes.sparsify.rule import ALL, MaskGraph, Refusal, Rule, register
from ssic.passes.sparsify.values import DenseValue, LazyResample, LazyShuffle, TileValue


@dataclass(frozen=True)
class ConvGeometry:
    """Square kernel ``k``, stride ``s``, dilation ``d``, explicit pads ``(top, left, bottom, right)``."""

    k: int
    s: int
    d: int
    pads: tuple[int, int, int, int]

    @property
    def extent(self) -> int:
        return (self.k - 1) * self.d + 1


def window(node: ir.Node, kernel: list[int] | None) -> tuple[list[int], list[int], list[int], list[int]] | str:
    """Per-axis ``(kernel, strides, dilations, pads [top, left, bottom, right])`` of a Conv/pool, or why not.

    ``auto_pad`` VALID / SAME_UPPER / SAME_LOWER is resolved to explicit pads from the static input shape.
    """
    if kernel is None or len(kernel) != 2:
        return "not a 2-D kernel"
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    dil = list(node.attributes.get_ints("dilations", [1, 1]))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        hw = spatial_hw(node.inputs[0])
        if hw is None:
            return f"auto_pad {auto_pad} needs a static input shape"
        begin, end = [], []
        for size, k, s, d in zip(hw, kernel, strides, dil, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        pads = [begin[0], begin[1], end[0], end[1]]
    else:
        return f"unknown auto_pad {auto_pad}"
    if len(strides) != 2 or len(dil) != 2 or len(pads) != 4:
        return "not a 2-D window"
    return list(kernel), strides, dil, pads


def conv_geometry(node: ir.Node, kernel: list[int] | None) -> ConvGeometry | str:
    """The square geometry of a Conv ``node`` with kernel ``kernel``, or why it is not supported."""
    win = window(node, kernel)
    if isinstance(win, str):
        return win
    kernel, strides, dil, pads = win
    if kernel[0] != kernel[1] or len(set(strides)) != 1:
        return "non-square kernel or stride"
    if len(set(dil)) != 1:
        return "different dilations per axis"
    return ConvGeometry(kernel[0], strides[0], dil[0], tuple(pads))


def window_mask(node: ir.Node, masks: MaskGraph, kernel: list[int] | None) -> str | None:
    """Change mask after a sliding window (conv, pool): a MaxPool of the input's mask, same geometry."""
    m = masks.of(node.inputs[0])
    win = window(node, kernel)
    if spatial_hw(node.inputs[0]) is None or m is None or isinstance(win, str):
        return ALL
    kernel, strides, dil, pads = win
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    extra = {"ceil_mode": 1} if node.attributes.get_int("ceil_mode", 0) else {}
    return masks.op("MaxPool", [m], kernel_shape=extent, strides=strides, pads=pads, **extra)


def _conv_source(ctx: SparsifyContext, x: ir.Value, pads: tuple[int, int], rep=None):
    """The gather source of conv input ``x`` (representation ``rep``, default ``ctx.rep(x)``) with a
    folded upsample/pad: ``(rep, upsample, pads, pad_mode)``."""
    rep = ctx.rep(x) if rep is None else rep
    upsample, pad_top, pad_left, pad_mode = 1, pads[0], pads[1], PAD_ZEROS
    source_value = x
    if isinstance(rep, LazyResample):
        upsample, pad_top, pad_left = rep.upsample, pad_top + rep.pad_top, pad_left + rep.pad_left
        pad_mode = rep.pad_mode
        rep, source_value = rep.source, rep.source_value
    rep = rep.gather_source(ctx, source_value)
    if (isinstance(rep, TileValue) and rep.act == ACT_SWISH and rep.tiles is not None and source_value is x
            and not ctx.recompute_swish):
        # swish costs an exp per read (the gather's window reads each source pixel (t+k-1)^2/t^2 times):
        # apply it once on the tiles and gather the activation's own cache instead (--recompute-swish
        # keeps the input's cache only: less memory, slower)
        rep = ctx.cacheable(source_value, rep)
    return rep, upsample, (pad_top, pad_left), pad_mode


def _input_refusal(ctx: SparsifyContext, x: ir.Value) -> Refusal | None:
    rep = ctx.rep(x)
    if isinstance(rep, LazyResample):
        rep = rep.source
    if isinstance(rep, DenseValue) and spatial_hw(rep.value) is None:
        return Refusal("input is not a static [1, C, H, W] tensor")
    return None


def _grid_refusal(ctx: SparsifyContext, node: ir.Node) -> Refusal | None:
    hw = spatial_hw(node.outputs[0])
    if ctx.grid_for(hw) is not None:
        return None
    if hw:
        return Refusal(f"output {hw[0]}x{hw[1]} is below the sparse resolution threshold ({ctx.plan.min_res})")
    return Refusal("output is not a static [1, C, H, W] tensor")


def _bias(ctx: SparsifyContext, node: ir.Node, y: ir.Value) -> ir.Value:
    b = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
    if b is None:
        return y
    return ctx.add("Add", [y, ctx.const(b.astype(np.float32), "conv_b")], name_hint="conv_bias")


def weight_matrix(w: np.ndarray) -> np.ndarray:
    """A conv weight ``[Cout, Cin, k, k]`` as the float32 ``[k*k*Cin, Cout]`` matrix that multiplies
    im2col rows (row order ``(ky, kx, c)``, as ``ssic::TileGather`` writes its columns)."""
    cout, cin, k, _ = w.shape
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * cin, cout), np.float32)


def gather_cols(ctx: SparsifyContext, rep, grid, geo: ConvGeometry, pads: tuple[int, int], upsample: int,
                pad_mode: int, channels: int, hint: str) -> ir.Value:
    """im2col rows ``[n*t*t, k*k*C]`` of gather source ``rep`` for a conv of geometry ``geo`` on ``grid``
    (a dilated conv gathers its full extent and keeps the k*k columns it reads)."""
    cols = ctx.gather(rep, grid, kernel=geo.extent, stride=geo.s, pads=pads, upsample=upsample, channels=channels,
                      hint=hint, pad_mode=pad_mode)
    if geo.d > 1:
        keep = [ky * geo.d * geo.extent + kx * geo.d for ky in range(geo.k) for kx in range(geo.k)]
        cols = select_columns(ctx, cols, geo.extent, keep, channels, "dilation")
    return cols


def grouped_matmul(ctx: SparsifyContext, cols: ir.Value, w: np.ndarray, group: int) -> ir.Value:
    """``cols`` ``[M, k*k*Cin]`` (columns ``(ky, kx, c)``) times the conv weight ``w`` ``[Cout, Cin/g, k, k]``."""
    cout, cin_g, k, _ = w.shape
    cin, cout_g = cin_g * group, cout // group
    if group == 1:
        return ctx.add("MatMul", [cols, ctx.const(weight_matrix(w), "conv_w")], name_hint="conv")
    if cin_g == 1 and cout_g == 1:
        # depthwise: a per-channel weighted sum over the k*k columns
        wk = np.ascontiguousarray(w[:, 0].reshape(cout, k * k).T.astype(np.float32))  # [k*k, C]
        x = ctx.add("Reshape", [cols, ctx.i64([-1, k * k, cin], "shape")])
        prod = ctx.add("Mul", [x, ctx.const(wk, "conv_w")], name_hint="depthwise")
        return ctx.add("ReduceSum", [prod, ctx.i64([1], "axes")], {"keepdims": 0}, name_hint="conv")
    wg = w.reshape(group, cout_g, cin_g, k, k).transpose(0, 3, 4, 2, 1).reshape(group, k * k * cin_g, cout_g)
    x = ctx.add("Reshape", [cols, ctx.i64([-1, k * k, group, cin_g], "shape")])
    x = ctx.add("Transpose", [x], {"perm": [2, 0, 1, 3]})
    x = ctx.add("Reshape", [x, ctx.i64([group, -1, k * k * cin_g], "shape")])
    y = ctx.add("MatMul", [x, ctx.const(np.ascontiguousarray(wg, np.float32), "conv_w")], name_hint="conv")
    y = ctx.add("Transpose", [y], {"perm": [1, 0, 2]})
    return ctx.add("Reshape", [y, ctx.i64([-1, cout], "shape")])


def select_columns(ctx: SparsifyContext, cols: ir.Value, extent: int, keep: list[int], channels: int,
                   hint: str) -> ir.Value:
    """Keep the columns ``keep`` (indices into the ``extent*extent`` window) of im2col rows."""
    x = ctx.add("Reshape", [cols, ctx.i64([-1, extent * extent, channels], "shape")])
    x = ctx.add("Gather", [x, ctx.i64(keep, hint)], {"axis": 1}, name_hint=hint)
    return ctx.add("Reshape", [x, ctx.i64([-1, len(keep) * channels], "shape")])


class ConvRule(Rule):
    """``Conv`` (2-D, square kernel and stride, any dilation, groups and auto_pad, constant weights)."""

    op_types = ("Conv",)
    needs_sparse_input = False

    def describe(self, node: ir.Node, ctx: SparsifyContext) -> ConvDecision:
        out = node.outputs[0]
        in_shape = static_shape(node.inputs[0])
        group = node.attributes.get_int("group", 1)
        # the weight's shape is known even where the model stores no intermediate shapes
        wshape = static_shape(node.inputs[1]) if node.inputs[1] is not None else None
        if wshape is not None and len(wshape) == 4:
            cin, cout = wshape[1] * group, wshape[0]
        else:
            cin, cout = (in_shape[1] if in_shape else 0), 0
        return ConvDecision(node.name or out.name, conv_kind(node), spatial_hw(out), (cin, cout), False, "",
                            macs_dense=conv_macs(node))

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        refusal = _grid_refusal(ctx, node)
        if refusal is not None:
            return refusal
        w = const_array(node.inputs[1])
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if w is None or w.ndim != 4:
            return Refusal("weights are not a constant 2-D kernel")
        geo = conv_geometry(node, list(w.shape[2:]))
        if isinstance(geo, str):
            return Refusal(geo)
        if len(node.inputs) > 2 and node.inputs[2] is not None and b is None:
            return Refusal("bias is not constant")
        rep = ctx.rep(node.inputs[0])
        if isinstance(rep, LazyResample) and rep.pad_mode != PAD_ZEROS and any(geo.pads):
            return Refusal("zero padding around a reflect/edge pad")
        if isinstance(rep, LazyShuffle):
            grid = ctx.grid_of_output(node)
            if node.attributes.get_int("group", 1) != 1 or geo.d != 1 or (grid.tile * geo.s) % rep.block:
                return Refusal("conv after DepthToSpace needs group 1, no dilation and tile*stride a multiple "
                               "of the block")
        return _input_refusal(ctx, node.inputs[0])

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        out = node.outputs[0]
        grid = ctx.grid_of_output(node)
        w = const_array(node.inputs[1])
        group = node.attributes.get_int("group", 1)
        cout, cin_g = w.shape[0], w.shape[1]
        cin = cin_g * group
        geo = conv_geometry(node, list(w.shape[2:]))
        k, s, K = geo.k, geo.s, geo.extent
        if isinstance(ctx.rep(node.inputs[0]), LazyShuffle):
            y = _bias(ctx, node, _shuffled_conv(ctx, ctx.rep(node.inputs[0]), grid, w, geo))
            self._record(ctx, node, grid, TileValue(grid, y, out, cout), cin_g, k, f"DepthToSpace x{ctx.rep(node.inputs[0]).block} folded")
            return
        whole = ctx.rep(node.inputs[0])
        if isinstance(whole, TileValue) and whole.parts and group == 1 and whole.grid == grid and not (K == 1 and s == 1):
            y = _bias(ctx, node, _conv_of_parts(ctx, whole.parts, grid, w, geo))
            self._record(ctx, node, grid, TileValue(grid, y, out, cout), cin_g, k,
                         f"concat of {len(whole.parts)} read from their own caches")
            return
        rep, upsample, (pad_top, pad_left), pad_mode = _conv_source(ctx, node.inputs[0], geo.pads[:2])
        if K == 1 and s == 1 and upsample == 1 and pad_top == 0 and pad_left == 0 and isinstance(rep, TileValue) \
                and rep.grid == grid and rep.dense_source is None:
            cols = ctx.evaluate(rep)
        else:
            cols = gather_cols(ctx, rep, grid, geo, (pad_top, pad_left), upsample, pad_mode, cin, "gather")
        y = _bias(ctx, node, grouped_matmul(ctx, cols, w, group))
        self._record(ctx, node, grid, TileValue(grid, y, out, cout), cin_g, k,
                     f"upsample x{upsample} folded" if upsample > 1 else "")

    @staticmethod
    def _record(ctx: SparsifyContext, node: ir.Node, grid, rep: TileValue, cin_g: int, k: int, note: str) -> None:
        ctx.set_rep(node.outputs[0], rep)
        decision = ctx.decisions[node]
        decision.sparse = True
        decision.grid = grid.name
        decision.macs_per_tile = grid.tile * grid.tile * rep.channels * cin_g * k * k
        decision.reason = f"tile {grid.tile} on grid {grid.name}" + (f", {note}" if note else "")

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        if sum(masks.of(v) is not None for v in node.inputs) > 1:
            return ALL  # weights that change between runs
        wshape = static_shape(node.inputs[1])
        return window_mask(node, masks, list(wshape[2:]) if wshape else None)


def _conv_of_parts(ctx: SparsifyContext, parts, grid, w: np.ndarray, geo: ConvGeometry) -> ir.Value:
    """Conv (group 1) of a channel concat as the sum over its parts of the conv of each part with its
    slice of the weight: each part is gathered from its own cache (or folded upsample), so the concat
    is never cached. Same MACs as one MatMul; the partial products accumulate with ``Gemm``'s C input.
    Returns ``[n*t*t, Cout]`` (no bias)."""
    acc, c0 = None, 0
    for part in parts:
        rep, upsample, pads, pad_mode = _conv_source(ctx, part.value, geo.pads[:2], rep=part.rep)
        cols = gather_cols(ctx, rep, grid, geo, pads, upsample, pad_mode, part.channels, "gather_part")
        wmat = ctx.const(weight_matrix(w[:, c0:c0 + part.channels]), "conv_w")
        c0 += part.channels
        acc = (ctx.add("MatMul", [cols, wmat], name_hint="conv_part") if acc is None else
               ctx.add("Gemm", [cols, wmat, acc], name_hint="conv_part"))
    return acc


def _shuffled_conv(ctx: SparsifyContext, lazy: LazyShuffle, grid, w: np.ndarray, geo: ConvGeometry) -> ir.Value:
    """Conv of ``DepthToSpace(source)``: gather the source upsampled by the block, keep per row phase the
    channel block under each tap, one MatMul per phase. Returns ``[n*t*t, Cout]`` (no bias)."""
    cout, cin, k = w.shape[0], w.shape[1], w.shape[2]
    r, t, s = lazy.block, grid.tile, geo.s
    cs = cin * r * r
    src = lazy.source.gather_source(ctx, lazy.source_value)
    cols = ctx.gather(src, grid, kernel=k, stride=s, pads=geo.pads[:2], upsample=r, channels=cs,
                      hint="gather_shuffle")
    per_tile = ctx.add("Reshape", [cols, ctx.i64([-1, t * t, k * k * cs], "shape")])
    wmat = ctx.const(weight_matrix(w), "conv_w")
    phases: dict[tuple[int, int], list[int]] = {}
    for py in range(t):
        for px in range(t):
            phases.setdefault(((py * s) % r, (px * s) % r), []).append(py * t + px)
    parts, order = [], []
    for (a, b), rows in sorted(phases.items()):
        keep = [(ky * k + kx) * cs + lazy.source_channel((a - geo.pads[0] + ky) % r, (b - geo.pads[1] + kx) % r, c, cin)
                for ky in range(k) for kx in range(k) for c in range(cin)]
        sel = ctx.add("Gather", [per_tile, ctx.i64(rows, "phase_rows")], {"axis": 1}, name_hint="phase")
        sel = ctx.add("Reshape", [sel, ctx.i64([-1, k * k * cs], "shape")])
        sel = ctx.add("Gather", [sel, ctx.i64(keep, "phase_channels")], {"axis": 1}, name_hint="phase_channels")
        y = ctx.add("MatMul", [sel, wmat], name_hint="conv")
        parts.append(ctx.add("Reshape", [y, ctx.i64([-1, len(rows), cout], "shape")]))
        order += rows
    y = ctx.add("Concat", parts, {"axis": 1}) if len(parts) > 1 else parts[0]
    if order != sorted(order):
        y = ctx.add("Gather", [y, ctx.const(np.argsort(np.array(order)).astype(np.int64), "phase_order")], {"axis": 1})
    return ctx.add("Reshape", [y, ctx.i64([-1, cout], "shape")])


def _transpose_geometry(node: ir.Node, w: np.ndarray | None) -> tuple[int, int, tuple[int, int, int, int]] | str:
    """``(k, s, pads)`` of a ConvTranspose with explicit pads, or why it is not supported."""
    if w is None or w.ndim != 4:
        return "weights are not a constant 2-D kernel"
    if node.attributes.get_int("group", 1) != 1:
        return "grouped ConvTranspose"
    strides = list(node.attributes.get_ints("strides", [1, 1]))
    if w.shape[2] != w.shape[3] or len(set(strides)) != 1:
        return "non-square kernel or stride"
    if any(d != 1 for d in node.attributes.get_ints("dilations", [1, 1])):
        return "dilated ConvTranspose"
    if (node.attributes.get_string("auto_pad", "NOTSET") or "NOTSET") != "NOTSET" \
            or node.attributes.get_ints("output_shape", None) is not None:
        return "ConvTranspose with auto_pad or output_shape"
    pads = tuple(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    k = w.shape[2]
    if len(pads) != 4 or any(p > k - 1 or p < 0 for p in pads):
        return "ConvTranspose pads larger than the kernel"
    return k, strides[0], pads


class ConvTransposeRule(Rule):
    """``ConvTranspose`` (2-D, group 1, square kernel and stride, explicit pads, constant weights).

    Output pixel ``Y`` of phase ``Y % s`` reads input pixels through the kernel taps ``ky`` with
    ``(Y + ky - (k-1-pad)) % s == 0``: the gather reads the input upsampled by ``s`` (nearest) with the
    flipped kernel, and each phase keeps only its taps (one MatMul per phase, no multiply by zero).
    The tile size must be a multiple of the stride so that a row's phase is its position in the tile.
    """

    op_types = ("ConvTranspose",)
    needs_sparse_input = False

    def describe(self, node: ir.Node, ctx: SparsifyContext) -> ConvDecision:
        out = node.outputs[0]
        wshape = static_shape(node.inputs[1]) if node.inputs[1] is not None else None
        group = node.attributes.get_int("group", 1)
        cin, cout = (wshape[0], wshape[1] * group) if wshape and len(wshape) == 4 else (0, 0)
        x = static_shape(node.inputs[0])
        macs = x[2] * x[3] * cin * cout * wshape[2] * wshape[3] // group if x and len(x) == 4 and wshape else 0
        k = f"{wshape[2]}x{wshape[3]}" if wshape and len(wshape) == 4 else "?"
        strides = node.attributes.get_ints("strides", [1, 1])
        return ConvDecision(node.name or out.name, f"T{k}/s{strides[0]}", spatial_hw(out), (cin, cout), False, "",
                            macs_dense=int(macs))

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        refusal = _grid_refusal(ctx, node)
        if refusal is not None:
            return refusal
        geo = _transpose_geometry(node, const_array(node.inputs[1]))
        if isinstance(geo, str):
            return Refusal(geo)
        grid = ctx.grid_of_output(node)
        if grid.tile % geo[1]:
            return Refusal(f"tile {grid.tile} is not a multiple of the stride {geo[1]}")
        if len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            return Refusal("bias is not constant")
        x = node.inputs[0]
        if not isinstance(ctx.rep(x), (TileValue, DenseValue)):
            return Refusal("ConvTranspose of a resampled value")
        return _input_refusal(ctx, x)

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        out = node.outputs[0]
        grid = ctx.grid_of_output(node)
        w = const_array(node.inputs[1])  # [Cin, Cout, k, k]
        k, s, pads = _transpose_geometry(node, w)
        cin, cout = w.shape[0], w.shape[1]
        t = grid.tile
        x = node.inputs[0]
        rep = ctx.rep(x).gather_source(ctx, x)
        off_y, off_x = k - 1 - pads[0], k - 1 - pads[1]
        cols = ctx.gather(rep, grid, kernel=k, stride=1, pads=(off_y, off_x), upsample=s, channels=cin,
                          hint="gather_transpose")
        flipped = w[:, :, ::-1, ::-1]  # conv taps (ky, kx) of the zero-inserted input
        per_tile = ctx.add("Reshape", [cols, ctx.i64([-1, t * t, k * k * cin], "shape")])
        parts, order = [], []
        for a in range(s):
            for b in range(s):
                rows = [py * t + px for py in range(t) for px in range(t) if py % s == a and px % s == b]
                taps_y = [ky for ky in range(k) if (a + ky - off_y) % s == 0]
                taps_x = [kx for kx in range(k) if (b + kx - off_x) % s == 0]
                keep = [ky * k + kx for ky in taps_y for kx in taps_x]
                order += rows
                if not keep:
                    zeros = ctx.const(np.zeros((1, 1, cout), np.float32), "zeros")
                    shape = ctx.add("Concat", [ctx.add("Slice", [ctx.add("Shape", [per_tile]), ctx.i64([0], "s0"),
                                                                 ctx.i64([1], "s1")]),
                                               ctx.i64([len(rows), cout], "shape")], {"axis": 0})
                    parts.append(ctx.add("Expand", [zeros, shape]))
                    continue
                sel = ctx.add("Gather", [per_tile, ctx.i64(rows, "phase_rows")], {"axis": 1}, name_hint="phase")
                sel = select_columns(ctx, sel, k, keep, cin, "phase_taps")
                wp = flipped[:, :, taps_y][:, :, :, taps_x]  # [Cin, Cout, ky', kx']
                wmat = np.ascontiguousarray(wp.transpose(2, 3, 0, 1).reshape(len(keep) * cin, cout), np.float32)
                y = ctx.add("MatMul", [sel, ctx.const(wmat, "convT_w")], name_hint="convT")
                parts.append(ctx.add("Reshape", [y, ctx.i64([-1, len(rows), cout], "shape")]))
        y = ctx.add("Concat", parts, {"axis": 1}) if len(parts) > 1 else parts[0]
        inverse = np.argsort(np.array(order)).astype(np.int64)
        y = ctx.add("Gather", [y, ctx.const(inverse, "phase_order")], {"axis": 1})
        y = _bias(ctx, node, ctx.add("Reshape", [y, ctx.i64([-1, cout], "shape")]))
        ctx.set_rep(out, TileValue(grid, y, out, cout))
        decision = ctx.decisions[node]
        decision.sparse = True
        decision.grid = grid.name
        decision.macs_per_tile = t * t * cin * cout * k * k // (s * s)
        decision.reason = f"tile {t} on grid {grid.name}, {s * s} phases"

    def propagate_mask(self, node: ir.Node, masks: MaskGraph) -> str | None:
        """Input pixel ``i`` reaches outputs ``i*s - pad .. i*s - pad + k - 1``: upsample, then a k-window."""
        m = masks.of(node.inputs[0])
        wshape = static_shape(node.inputs[1])
        in_hw, out_hw = spatial_hw(node.inputs[0]), spatial_hw(node.outputs[0])
        if m is None or sum(masks.of(v) is not None for v in node.inputs) > 1 or wshape is None or in_hw is None \
                or out_hw is None:
            return ALL
        geo = _transpose_geometry(node, np.zeros(wshape, np.float32))
        if isinstance(geo, str):
            return ALL
        k, s, pads = geo
        up = masks.op("Resize", [m, "", "", masks.const(np.array([1, 1, in_hw[0] * s, in_hw[1] * s], np.int64))],
                      mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        ends = [out_hw[0] - in_hw[0] * s + pads[0], out_hw[1] - in_hw[1] * s + pads[1]]
        if any(e >= k for e in ends):
            return ALL
        pooled = masks.op("MaxPool", [up], kernel_shape=[k, k],
                          pads=[k - 1 - pads[0], k - 1 - pads[1], max(ends[0], 0), max(ends[1], 0)])
        if min(ends) < 0:
            pooled = masks.op("Slice", [pooled, masks.const(np.array([0, 0], np.int64)),
                                        masks.const(np.array(list(out_hw), np.int64)),
                                        masks.const(np.array([2, 3], np.int64))])
        return pooled


register(ConvRule())
register(ConvTransposeRule())
