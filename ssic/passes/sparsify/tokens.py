"""Token rules: a feature map seen as transformer tokens is carried as the rows of its grid's tiles.

A transformer block (Stable Diffusion's ``Transformer2DModel``, a VAE attention block, a ViT stage)
turns the feature map ``[1, C, H, W]`` into tokens ``[1, H*W, C]`` (``Transpose(0, 2, 3, 1)`` +
``Reshape``, or ``Reshape([1, C, H*W])`` + ``Transpose(0, 2, 1)``), works on them and turns them back.
A tile tensor ``[n*t*t, C]`` already holds one row per pixel, so a token tensor restricted to the
active tiles is the tile tensor itself, only in tile order instead of raster order
(docs/sparse-attention.md). :class:`RowTiles` is that representation for any value one of whose axes
(or a pair ``(H, W)`` of adjacent axes) runs over the pixels of a grid: the value is carried with
that axis replaced by the ``M = n*t*t`` active rows. The reshapes and transposes of the token views
(heads split, keys transposed) keep the row axis and run on the small tensors; row-wise ops
(element-wise ops, LayerNormalization, Softmax and Split over other axes) run on them unchanged.
MatMul (projections and attention) is in :mod:`ssic.passes.sparsify.attention`.

Where a full tensor is needed (self-attention's keys and values, an op without a rule) the rows are
scattered into the value's cache (its prime-run value, in the model's layout) with ``ScatterND`` or
``ScatterElements``: outside the active tiles the value keeps its prime value, as everywhere in the
default mode. These rules have no exact-mode receptive field: an op on tokens marks its whole output
changed (self-attention is global anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ssic.passes.analysis import Grid, static_shape
from ssic.passes.sparsify.context import CacheSpec, SparsifyContext, const_array
from ssic.passes.sparsify.normalization import group_norm
from ssic.passes.sparsify.pointwise import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY
from ssic.passes.sparsify.rule import Refusal, Rule, register
from ssic.passes.sparsify.values import Rep, TileValue


@dataclass(frozen=True, eq=False)
class RowTiles(Rep):
    """A value of model shape ``shape`` whose axes ``rows`` (one axis of ``H*W`` pixels in raster order,
    or two adjacent axes ``(H, W)``) run over the pixels of ``grid``, carried as ``tensor``: the shape
    with those axes collapsed into one axis of the ``M`` active rows (tile order, as tile tensors)."""

    grid: Grid
    tensor: ir.Value
    shape: tuple[int, ...]
    rows: tuple[int, ...]
    #: the NCHW value this is ``Reshape([1, C, H*W])`` of (a GroupNorm of it is the GroupNorm of that value)
    flat_of: ir.Value | None = None

    def tileable_on(self, grid: Grid) -> bool:
        return False

    def channel_map_refusal(self) -> str | None:
        return "a token value (its rows are pixels): handled by the token rules"

    @property
    def axis(self) -> int:
        """The row axis of ``tensor``."""
        return self.rows[0]

    @property
    def cshape(self) -> tuple[int, ...]:
        """The model shape with the row axes collapsed into one of ``H*W``."""
        return collapse(self.shape, self.rows)

    def target(self) -> list[int]:
        """``tensor``'s shape with ``-1`` for the active rows (a Reshape target)."""
        shape = list(self.cshape)
        shape[self.axis] = -1
        return shape

    def materialize(self, ctx: SparsifyContext, value: ir.Value) -> ir.Value:
        return scatter_rows(ctx, self, value)


def collapse(shape: tuple[int, ...], rows: tuple[int, ...]) -> tuple[int, ...]:
    r0, r1 = rows[0], rows[-1]
    return tuple(shape[:r0]) + (math.prod(shape[r0:r1 + 1]),) + tuple(shape[r1 + 1:])


def collapsed_axis(axis: int, rows: tuple[int, ...], rank: int) -> int | None:
    """``axis`` of a model value of rank ``rank`` as an axis of its collapsed tensor (None for a row axis)."""
    a = axis + rank if axis < 0 else axis
    if a < rows[0]:
        return a
    if a in rows:
        return None
    return a - (len(rows) - 1)


def find_rows(shape: tuple[int, ...], prefix: int, grid: Grid) -> tuple[int, ...] | None:
    """The row axes of a reshaped value: an axis of ``H*W`` (or adjacent ``(H, W)``) after dims of
    product ``prefix`` (a reshape keeps the raster order, so the rows stay where this product is)."""
    n = grid.height * grid.width
    for r in range(len(shape)):
        if math.prod(shape[:r]) != prefix:
            continue
        if shape[r] == n:
            return (r,)
        if r + 1 < len(shape) and (shape[r], shape[r + 1]) == (grid.height, grid.width):
            return (r, r + 1)
    return None


def is_grid_nchw(shape: tuple[int, ...] | None, rows: tuple[int, ...], grid: Grid) -> bool:
    return shape is not None and len(shape) == 4 and shape[0] == 1 and rows == (2, 3) \
        and shape[2:] == (grid.height, grid.width)


def to_tile_rows(ctx: SparsifyContext, rt: RowTiles) -> ir.Value:
    """``[M, K]``: one row per active pixel, the other axes flattened in order."""
    rc, cshape = rt.axis, rt.cshape
    k = math.prod(cshape) // cshape[rc]
    x = rt.tensor
    if math.prod(cshape[:rc]) != 1:
        x = ctx.add("Transpose", [x], {"perm": [rc] + [i for i in range(len(cshape)) if i != rc]},
                    name_hint="rows_first")
    return ctx.add("Reshape", [x, ctx.i64([-1, k], "shape")], name_hint="tile_rows")


def from_tile_rows(ctx: SparsifyContext, tiles: ir.Value, grid: Grid, shape: tuple[int, ...],
                   rows: tuple[int, ...]) -> RowTiles:
    """The :class:`RowTiles` of model shape ``shape`` from ``[M, K]`` rows (``K``: the other axes
    flattened in order)."""
    rt = RowTiles(grid, tiles, tuple(shape), tuple(rows))
    rc, cshape = rt.axis, rt.cshape
    others = [d for i, d in enumerate(cshape) if i != rc]
    x = tiles
    if math.prod(cshape[:rc]) != 1:
        if math.prod(cshape[rc + 1:]) == 1:
            x = ctx.add("Transpose", [x], {"perm": [1, 0]}, name_hint="rows_last")
        else:
            x = ctx.add("Reshape", [x, ctx.i64([-1] + others, "shape")])
            perm = list(range(1, rc + 1)) + [0] + list(range(rc + 1, len(cshape)))
            x = ctx.add("Transpose", [x], {"perm": perm}, name_hint="rows_to_axis")
    x = ctx.add("Reshape", [x, ctx.i64(rt.target(), "shape")], name_hint="token_view")
    return RowTiles(grid, x, tuple(shape), tuple(rows))


def grid_rows_of(rep: Rep, value: ir.Value) -> tuple[Grid, tuple[int, ...], int] | None:
    """``(grid, rows, prefix)`` of a sparse input of a view op: a :class:`RowTiles` or an NCHW tile
    value on its grid (rows ``(2, 3)``, prefix ``C``); None for anything else."""
    if isinstance(rep, RowTiles):
        return rep.grid, rep.rows, math.prod(rep.shape[:rep.rows[0]])
    shape = static_shape(value)
    if isinstance(rep, TileValue) and rep.grid is not None and rep.tileable_on(rep.grid) \
            and is_grid_nchw(shape, (2, 3), rep.grid):
        return rep.grid, (2, 3), shape[1]
    return None


def record(ctx: SparsifyContext, out: ir.Value, rt: RowTiles) -> None:
    """Set ``out``'s representation: a tile value when it is the grid's NCHW map again, else ``rt``."""
    if is_grid_nchw(rt.shape, rt.rows, rt.grid):
        ctx.set_rep(out, TileValue(rt.grid, to_tile_rows(ctx, rt), None, rt.shape[1]))
    else:
        ctx.set_rep(out, rt)


# ------------------------------------------------------------------ caches and scatter
def row_index(ctx: SparsifyContext, grid: Grid) -> ir.Value:
    """``[M]`` int64: the raster position ``y*W + x`` of every active row; rows of clipped tiles that
    lie outside the image get ``H*W`` (one past the end: a scatter writes them to a spare row)."""
    key = ("row_index", grid)
    if key not in ctx.memo:
        t, n = grid.tile, grid.height * grid.width
        idx = ctx.tiles_input(grid)
        py = ctx.const(np.repeat(np.arange(t), t).reshape(1, t * t).astype(np.int64), "py")
        px = ctx.const(np.tile(np.arange(t), t).reshape(1, t * t).astype(np.int64), "px")
        y = ctx.add("Add", [ctx.add("Slice", [idx, ctx.i64([0], "s0"), ctx.i64([1], "s1"), ctx.i64([1], "ax")]), py])
        x = ctx.add("Add", [ctx.add("Slice", [idx, ctx.i64([1], "s1"), ctx.i64([2], "s2"), ctx.i64([1], "ax")]), px])
        flat = ctx.add("Add", [ctx.add("Mul", [y, ctx.const(np.array(grid.width, np.int64), "w")]), x])
        if grid.height % t or grid.width % t:
            ok = ctx.add("And", [ctx.add("Less", [y, ctx.const(np.array(grid.height, np.int64), "h")]),
                                 ctx.add("Less", [x, ctx.const(np.array(grid.width, np.int64), "w")])])
            flat = ctx.add("Where", [ok, flat, ctx.const(np.array(n, np.int64), "spare")])
        ctx.memo[key] = ctx.add("Reshape", [flat, ctx.i64([-1], "flat")], name_hint="row_index")
    return ctx.memo[key]


def clamped_row_index(ctx: SparsifyContext, grid: Grid) -> ir.Value:
    """:func:`row_index` with the spare position clamped into the image (for gathers: those rows are garbage)."""
    key = ("row_index_clamped", grid)
    if key not in ctx.memo:
        idx = row_index(ctx, grid)
        n = grid.height * grid.width
        if grid.height % grid.tile or grid.width % grid.tile:
            idx = ctx.add("Min", [idx, ctx.const(np.array(n - 1, np.int64), "last")])
        ctx.memo[key] = idx
    return ctx.memo[key]


def rows_cache(ctx: SparsifyContext, value: ir.Value, rt: RowTiles) -> ir.Value:
    """The sparse graph input holding ``value``'s prime-run value as the model computes it (declared
    with layout ``NCHW``: the model's own layout, and the row axes ``rt.rows``) of type
    ``ctx.cache_dtype``; read as float32 (:func:`scatter_rows` casts a float16 cache)."""
    key = (value.name, "NCHW")
    if key not in ctx.cache_inputs:
        shape = static_shape(value)
        name = f"ssic.cache.nchw.{value.name}"
        dtype = "float32" if value.is_graph_output() else ctx.cache_dtype
        irtype = ir.DataType.FLOAT16 if dtype == "float16" else ir.DataType.FLOAT
        inp = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(irtype))
        ctx.graph.inputs.append(inp)
        ctx.cache_inputs[key] = inp
        ctx.result.caches.append(CacheSpec(name, value.name, "NCHW", tuple(shape), "activation", rt.grid.name, None,
                                           dtype, rows=tuple(rt.rows)))
    return ctx.cache_inputs[key]


def scatter_rows(ctx: SparsifyContext, rt: RowTiles, value: ir.Value) -> ir.Value:
    """The full value: its cache with the active rows replaced by ``rt``'s (``ScatterND`` on the rows
    when nothing precedes the row axis, else ``ScatterElements`` along it)."""
    grid = rt.grid
    n = grid.height * grid.width
    clipped = bool(grid.height % grid.tile or grid.width % grid.tile)
    cshape, rc = rt.cshape, rt.axis
    cache = rows_cache(ctx, value, rt)
    # a commit writes the new rows into the cache (Session.commit: scatter_rows_into)
    ctx.note_commit(cache, rt.tensor)
    data = cache
    if cache.type.dtype == ir.DataType.FLOAT16:
        data = ctx.add("Cast", [cache], {"to": ir.DataType.FLOAT}, name_hint="cache_f32")
    if len(rt.rows) > 1:
        data = ctx.add("Reshape", [data, ctx.i64(list(cshape), "shape")])
    idx = row_index(ctx, grid)
    if math.prod(cshape[:rc]) == 1:
        k = math.prod(cshape[rc + 1:])
        data = ctx.add("Reshape", [data, ctx.i64([n, k], "shape")])
        if clipped:
            data = ctx.add("Concat", [data, ctx.const(np.zeros((1, k), np.float32), "spare_row")], {"axis": 0})
        upd = ctx.add("Reshape", [rt.tensor, ctx.i64([-1, k], "shape")])
        full = ctx.add("ScatterND", [data, ctx.add("Unsqueeze", [idx, ctx.i64([1], "ax")]), upd],
                       name_hint="scatter_rows")
        if clipped:
            full = ctx.add("Slice", [full, ctx.i64([0], "s0"), ctx.i64([n], "n"), ctx.i64([0], "ax")])
    else:
        if clipped:
            spare = list(cshape)
            spare[rc] = 1
            data = ctx.add("Concat", [data, ctx.const(np.zeros(spare, np.float32), "spare_row")], {"axis": rc})
        shape_idx = [1] * len(cshape)
        shape_idx[rc] = -1
        ind = ctx.add("Expand", [ctx.add("Reshape", [idx, ctx.i64(shape_idx, "shape")]),
                                 ctx.add("Shape", [rt.tensor])])
        full = ctx.add("ScatterElements", [data, ind, rt.tensor], {"axis": rc}, name_hint="scatter_rows")
        if clipped:
            full = ctx.add("Slice", [full, ctx.i64([0], "s0"), ctx.i64([n], "n"), ctx.i64([rc], "ax")])
    full = ctx.add("Reshape", [full, ctx.i64(list(rt.shape), "shape")], name_hint="full")
    full.shape = value.shape
    full.type = value.type
    return full


def align_dense(ctx: SparsifyContext, v: ir.Value, rank: int, rows: tuple[int, ...], grid: Grid, *,
                gather: bool) -> ir.Value | None:
    """Dense operand ``v`` of an op whose output (rank ``rank``) has row axes ``rows``, made to
    broadcast against the collapsed row tensors: unit dims at the rows are merged into one, dims that
    are the rows themselves (a positional embedding) are gathered at the active rows when ``gather``.
    None when ``v`` varies along the rows in another way (or its shape is unknown)."""
    shape = static_shape(v)
    if shape is None:
        return None
    pad = rank - len(shape)
    pos = [r - pad for r in rows if r - pad >= 0]
    if not pos:
        return v
    dims = [shape[p] for p in pos]
    full_rows = len(pos) == len(rows)
    if all(d == 1 for d in dims):
        if len(pos) == 1:
            return v
        return ctx.reshape(v, list(shape[:pos[0]]) + [1] + list(shape[pos[-1] + 1:]))
    if not gather or not full_rows or math.prod(dims) != grid.height * grid.width \
            or (len(dims) == 2 and tuple(dims) != (grid.height, grid.width)):
        return None
    cshape = list(shape[:pos[0]]) + [math.prod(dims)] + list(shape[pos[-1] + 1:])
    flat = ctx.reshape(v, cshape) if len(pos) > 1 else v
    return ctx.add("Gather", [flat, clamped_row_index(ctx, grid)], {"axis": pos[0]}, name_hint="row_gather")


def clone(ctx: SparsifyContext, node: ir.Node, inputs: list, attributes: dict | None = None) -> list[ir.Value]:
    """``node`` re-emitted on ``inputs`` with ``attributes`` changed; returns its outputs."""
    attrs = {k: a for k, a in node.attributes.items()}
    new = ir.Node(node.domain, node.op_type, inputs, list(attrs.values()), num_outputs=len(node.outputs),
                  name=ctx.name(node.op_type))
    for name, value in (attributes or {}).items():
        new.attributes[name] = ir.AttrInt64(name, value) if isinstance(value, int) else value
    for j, out in enumerate(new.outputs):
        out.name = f"{new.name}/out{j}"
    ctx.graph.append(new)
    return list(new.outputs)


# ------------------------------------------------------------------ rules
class TokenViewRule(Rule):
    """``Transpose`` / ``Reshape`` that keep the pixel rows as one axis (or as ``(H, W)``): the token
    views of a feature map, the heads split of attention, keys transposed, and back to ``[1, C, H, W]``."""

    op_types = ("Transpose", "Reshape")

    @staticmethod
    def _out_rows(node: ir.Node, ctx: SparsifyContext) -> tuple[Grid, tuple[int, ...]] | str:
        x, out = node.inputs[0], node.outputs[0]
        found = grid_rows_of(ctx.rep(x), x)
        if found is None:
            return "input is neither a token value nor a tile value on its grid"
        grid, rows, prefix = found
        shape_in, shape_out = static_shape(x), static_shape(out)
        if shape_in is None or shape_out is None:
            return "shapes unknown"
        if node.op_type == "Transpose":
            perm = list(node.attributes.get_ints("perm", list(range(len(shape_in)))[::-1]))
            new = tuple(perm.index(r) for r in rows)
            if any(b != a + 1 for a, b in zip(new, new[1:], strict=False)):
                return "the transpose splits the pixel axes"
            return grid, new
        new = find_rows(shape_out, prefix, grid)
        if new is None:
            return "the reshape merges or splits the pixel rows"
        return grid, new

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        found = self._out_rows(node, ctx)
        return Refusal(found) if isinstance(found, str) else None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        x, out = node.inputs[0], node.outputs[0]
        grid, rows = self._out_rows(node, ctx)
        shape = static_shape(out)
        rep = ctx.rep(x)
        if is_grid_nchw(shape, rows, grid):
            # back to the feature map: the input's non-pixel dims flatten to the channels in order
            if isinstance(rep, RowTiles):
                ctx.set_rep(out, TileValue(grid, to_tile_rows(ctx, rep), None, shape[1]))
            else:
                ctx.set_rep(out, rep)  # a view of the tile value as itself
            return
        if isinstance(rep, TileValue):
            tiles = rep.to_tiles(ctx, grid, static_shape(x)[1])
            rt = from_tile_rows(ctx, tiles, grid, shape, rows)
            if node.op_type == "Reshape" and shape == (1, static_shape(x)[1], grid.height * grid.width):
                rt = RowTiles(grid, rt.tensor, rt.shape, rt.rows, flat_of=x)
            ctx.set_rep(out, rt)
            return
        if node.op_type == "Transpose":
            perm = list(node.attributes.get_ints("perm", list(range(len(rep.shape)))[::-1]))
            cperm = [collapsed_axis(p, rep.rows, len(rep.shape)) for p in perm if p not in rep.rows[1:]]
            cperm = [rep.axis if c is None else c for c in cperm]
            y = ctx.add("Transpose", [rep.tensor], {"perm": cperm}, name_hint="token_transpose")
        else:
            target = RowTiles(grid, rep.tensor, shape, rows).target()
            y = ctx.add("Reshape", [rep.tensor, ctx.i64(target, "shape")], name_hint="token_reshape")
        ctx.set_rep(out, RowTiles(grid, y, shape, rows))


def _operand_rows(ctx: SparsifyContext, node: ir.Node, rank: int) -> tuple[Grid, tuple[int, ...], tuple] | str:
    """The grid, output row axes and row dims shared by the token operands of an element-wise node."""
    found = None
    for v in node.inputs:
        if v is None:
            continue
        rep = ctx.rep(v)
        if not rep.sparse:
            continue
        if not isinstance(rep, RowTiles):
            return f"operand {v.name} is a sparse value that is not a token value"
        shift = rank - len(rep.shape)
        rows = tuple(r + shift for r in rep.rows)
        key = (rep.grid, rows, tuple(rep.shape[r] for r in rep.rows))
        if found is None:
            found = key
        elif found != key:
            return "token operands on different grids or rows"
    return found if found is not None else "no token operand"


class RowwiseRule(Rule):
    """An element-wise op on token values (GEGLU's Gelu and Mul, biases, residual Adds, an erf-based
    gelu): the same op on the row tensors; dense operands broadcast over the rows (or are gathered at
    the active rows when they are per-pixel, e.g. a positional embedding)."""

    op_types = tuple(dict.fromkeys(ELEMENTWISE_UNARY + ELEMENTWISE_BINARY + ("Relu", "LeakyRelu", "Cast", "Where")))

    def _plan(self, node: ir.Node, ctx: SparsifyContext):
        out_shape = static_shape(node.outputs[0])
        if out_shape is None or len(node.outputs) != 1:
            return "output shape unknown"
        found = _operand_rows(ctx, node, len(out_shape))
        if isinstance(found, str):
            return found
        return out_shape, found

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        plan = self._plan(node, ctx)
        if isinstance(plan, str):
            return Refusal(plan)
        out_shape, (grid, rows, _) = plan
        for v in node.inputs:
            if v is not None and not ctx.rep(v).sparse:
                shape = static_shape(v)
                if shape is None:
                    return Refusal(f"operand {v.name} has an unknown shape")
                pad = len(out_shape) - len(shape)
                dims = [shape[r - pad] for r in rows if r - pad >= 0]
                if any(d != 1 for d in dims) and (len(dims) != len(rows) or
                                                  tuple(dims) != tuple(out_shape[r] for r in rows)):
                    return Refusal(f"operand {v.name} varies along the pixel rows")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        out_shape, (grid, rows, _) = self._plan(node, ctx)
        inputs = []
        for v in node.inputs:
            if v is None:
                inputs.append(None)
                continue
            rep = ctx.rep(v)
            inputs.append(rep.tensor if isinstance(rep, RowTiles) else
                          align_dense(ctx, v, len(out_shape), rows, grid, gather=True))
        (y,) = clone(ctx, node, inputs)
        ctx.set_rep(node.outputs[0], RowTiles(grid, y, out_shape, rows))


def _single_token_input(ctx: SparsifyContext, node: ir.Node) -> RowTiles | None:
    rep = ctx.rep(node.inputs[0])
    others = [v for v in node.inputs[1:] if v is not None]
    if not isinstance(rep, RowTiles) or any(ctx.rep(v).sparse for v in others):
        return None
    return rep


class AxisRule(Rule):
    """An op along one axis that is not a pixel axis: ``Softmax`` / ``LogSoftmax`` (attention rows),
    ``LayerNormalization`` (over the trailing axes after the rows) and ``Split`` (GEGLU's halves) on
    token values; ``Softmax`` over the channels of an NCHW tile value (opset >= 13) on the tiles."""

    op_types = ("Softmax", "LogSoftmax", "LayerNormalization", "Split")

    @staticmethod
    def _axis(node: ir.Node, ctx: SparsifyContext, rt: RowTiles) -> int | str:
        rank = len(rt.shape)
        default = -1 if node.op_type in ("Softmax", "LogSoftmax", "LayerNormalization") else 0
        if node.op_type in ("Softmax", "LogSoftmax") and ctx.opset < 13:
            default = 1
        axis = node.attributes.get_int("axis", default)
        a = axis + rank if axis < 0 else axis
        spans_tail = node.op_type == "LayerNormalization" or (
            node.op_type in ("Softmax", "LogSoftmax") and ctx.opset < 13)
        if spans_tail and a <= rt.rows[-1]:
            return f"{node.op_type} over axes that include the pixel rows"
        c = collapsed_axis(a, rt.rows, rank)
        if c is None:
            return f"{node.op_type} along the pixel rows"
        return c - len(rt.cshape) if spans_tail else c

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        if self._channel_softmax(node, ctx):
            return None
        rt = _single_token_input(ctx, node)
        if rt is None:
            return Refusal(f"{node.op_type} of a value that is not a token value")
        if node.op_type == "LayerNormalization" and any(o.uses() for o in node.outputs[1:]):
            return Refusal("LayerNormalization's mean/inv-std outputs are used")
        if any(static_shape(o) is None for o in node.outputs):
            return Refusal("output shape unknown")
        axis = self._axis(node, ctx, rt)
        return Refusal(axis) if isinstance(axis, str) else None

    @staticmethod
    def _channel_softmax(node: ir.Node, ctx: SparsifyContext) -> bool:
        rep = ctx.rep(node.inputs[0])
        return node.op_type in ("Softmax", "LogSoftmax") and ctx.opset >= 13 and isinstance(rep, TileValue) \
            and rep.grid is not None and rep.tileable_on(rep.grid) \
            and node.attributes.get_int("axis", -1) in (1, -3) \
            and is_grid_nchw(static_shape(node.inputs[0]), (2, 3), rep.grid)

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        if self._channel_softmax(node, ctx):
            rep = ctx.rep(node.inputs[0])
            c = static_shape(node.inputs[0])[1]
            (y,) = clone(ctx, node, [rep.to_tiles(ctx, rep.grid, c)], {"axis": 1})
            ctx.set_rep(node.outputs[0], TileValue(rep.grid, y, None, c))
            return
        rt = ctx.rep(node.inputs[0])
        axis = self._axis(node, ctx, rt)
        inputs = [rt.tensor] + list(node.inputs[1:])
        outs = clone(ctx, node, inputs, {"axis": axis})
        for out, y in zip(node.outputs, outs, strict=True):
            if out.uses() or out.is_graph_output():
                ctx.set_rep(out, RowTiles(rt.grid, y, static_shape(out), rt.rows))


class FlatGroupNormRule(Rule):
    """``GroupNormalization`` of ``Reshape([1, C, H*W])`` of a tile value (diffusers' VAE attention
    normalises after flattening): the same statistics as the GroupNorm of the NCHW value, so it is
    that GroupNorm (:func:`ssic.passes.sparsify.normalization.group_norm`, incremental statistics) on
    the tiles, viewed as ``[1, C, H*W]`` again."""

    op_types = ("GroupNormalization",)

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        rep = ctx.rep(node.inputs[0])
        if not isinstance(rep, RowTiles) or rep.flat_of is None or not isinstance(ctx.rep(rep.flat_of), TileValue):
            return Refusal("GroupNorm of a token value that is not a flattened feature map")
        if const_array(node.inputs[1]) is None or const_array(node.inputs[2]) is None:
            return Refusal("scale/bias not constant")
        return None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        rt = ctx.rep(node.inputs[0])
        c = rt.shape[1]
        gamma, beta = const_array(node.inputs[1]), const_array(node.inputs[2])
        groups = node.attributes.get_int("num_groups", 1)
        if gamma.size == groups and groups != c:
            gamma, beta = np.repeat(gamma, c // groups), np.repeat(beta, c // groups)
        out = node.outputs[0]
        group_norm(ctx, node.name, rt.flat_of, out, groups, node.attributes.get_float("epsilon", 1e-5), gamma, beta)
        normed = ctx.rep(out)
        ctx.set_rep(out, from_tile_rows(ctx, normed.to_tiles(ctx, rt.grid, c), rt.grid, rt.shape, rt.rows))


class SliceRule(Rule):
    """``Slice`` with constant bounds along axes that are not the pixel rows (GEGLU's halves written as
    two slices, a head or channel range): the same slice of the row tensor."""

    op_types = ("Slice",)

    @staticmethod
    def _axes(node: ir.Node, ctx: SparsifyContext, rt: RowTiles) -> list[int] | str:
        if len(node.inputs) < 3:
            return "Slice with attribute bounds (opset < 10)"
        consts = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
        if consts[0] is None or consts[1] is None or any(v is not None and c is None
                                                         for v, c in zip(node.inputs[3:5], consts[2:], strict=False)):
            return "Slice bounds are not constant"
        rank = len(rt.shape)
        axes = consts[2].reshape(-1).tolist() if len(consts) > 2 and consts[2] is not None else list(range(len(consts[0])))
        out = [collapsed_axis(int(a), rt.rows, rank) for a in axes]
        if any(a is None for a in out):
            return "Slice along the pixel rows"
        return out

    def check(self, node: ir.Node, ctx: SparsifyContext) -> Refusal | None:
        rt = _single_token_input(ctx, node)
        if rt is None:
            return Refusal("Slice of a value that is not a token value")
        if static_shape(node.outputs[0]) is None:
            return Refusal("output shape unknown")
        axes = self._axes(node, ctx, rt)
        return Refusal(axes) if isinstance(axes, str) else None

    def rewrite(self, node: ir.Node, ctx: SparsifyContext) -> None:
        rt = ctx.rep(node.inputs[0])
        axes = self._axes(node, ctx, rt)
        inputs = [rt.tensor, node.inputs[1], node.inputs[2], ctx.i64(axes, "axes")]
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            inputs.append(node.inputs[4])
        y = ctx.add("Slice", inputs, name_hint="token_slice")
        ctx.set_rep(node.outputs[0], RowTiles(rt.grid, y, static_shape(node.outputs[0]), rt.rows))


register(TokenViewRule())
register(SliceRule())
register(FlatGroupNormRule())
register(RowwiseRule())
register(AxisRule())
