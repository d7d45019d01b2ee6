"""The default-mode mask graph (``mask.onnx``) built from stock ONNX ops.

``ssic.mask`` float32 ``[1, 1, H0, W0]`` (1 = edited) ->

1. dilation by the edit radius: ``MaxPool(kernel 2r+1, pads r)``;
2. SIGE's per-resolution pyramid: each level halves the previous one (``AveragePool`` 2x2 stride 2,
   after a ``Slice`` dropping an odd last row/column), thresholds it at
   ``max(min(0.3, ReduceMax - 1e-3), 0)`` (``Greater``, ``Cast``) and dilates it by the level
   dilation (``MaxPool``). Sizes the halving does not reach are a nearest resize of the smallest
   covering level, done with two ``Gather``s on constant integer index tables (exact, unlike a
   float ``Resize`` coordinate transform);
3. per grid ``(h, w, tile)``: ``MaxPool(kernel tile+2*halo, stride tile, pads halo top/left and
   enough bottom/right to count the clipped cells)`` -> ``Greater 0`` -> ``NonZero`` ->
   ``Transpose`` -> ``Mul tile``: output ``ssic.tiles.{h}x{w}`` int64 ``[n, 2]``, row-major.

The NumPy reference is ``active_tiles(mask_pyramid(dilate(mask, r), sizes, d)[(h, w)], tile, halo)``
from :mod:`ssic.masks`; the tests compare the two exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ssic.masks import (
    PYRAMID_EPS,
    PYRAMID_THRESHOLD,
    nearest_indices,
    nearest_source_level,
    pyramid_chain,
)

MASK_INPUT = "ssic.mask"


def tiles_output_name(h: int, w: int) -> str:
    """Return the name of the active-tile output of the grid at resolution ``h x w``."""
    return f"ssic.tiles.{h}x{w}"


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype, hint: str = "c") -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self._name(op_type), **attrs))
        return out

    def dilate(self, x: str, radius: int) -> str:
        if radius <= 0:
            return x
        k = 2 * radius + 1
        return self.op("MaxPool", [x], kernel_shape=[k, k], pads=[radius] * 4)


def build_mask_model(
    input_hw: tuple[int, int],
    grids: Iterable[tuple[int, int, int]],
    *,
    radius: int,
    level_dilation: int,
    halo: int = 1,
    opset: int = 18,
) -> onnx.ModelProto:
    """Return the default-mode mask model (IR version 10).

    ``grids``: ``(h, w, tile)`` per sparse resolution (one grid per resolution). ``radius`` dilates
    the input edit mask; ``level_dilation`` dilates every halved pyramid level (1 for diffusion
    models, 2 for GauGAN); ``halo`` grows every cell by that many pixels when testing it.
    """
    h0, w0 = int(input_hw[0]), int(input_hw[1])
    grids = [(int(h), int(w), int(t)) for h, w, t in grids]
    sizes = [(h, w) for h, w, _ in grids]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"one grid per resolution, got {sizes}")
    b = _GraphBuilder()

    # Binarise (any positive value is an edit), then dilate by the edit radius.
    zero = b.const(0.0, np.float32, "zero")
    full = b.op("Cast", [b.op("Greater", [MASK_INPUT, zero])], to=TensorProto.FLOAT)
    full = b.dilate(full, radius)

    chain = pyramid_chain((h0, w0), sizes)
    levels = {chain[0]: full}
    cur = full
    cap = b.const(PYRAMID_THRESHOLD, np.float32, "cap")
    eps = b.const(PYRAMID_EPS, np.float32, "eps")
    prev = chain[0]
    for h, w in chain[1:]:
        if prev != (2 * h, 2 * w):  # drop an odd last row / column, as 2x2 averaging does
            cur = b.op("Slice", [cur, b.const([0, 0], np.int64), b.const([2 * h, 2 * w], np.int64),
                                 b.const([2, 3], np.int64)])
        halved = b.op("AveragePool", [cur], kernel_shape=[2, 2], strides=[2, 2])
        top = b.op("ReduceMax", [halved], keepdims=0)
        threshold = b.op("Max", [b.op("Min", [cap, b.op("Sub", [top, eps])]), zero])
        cur = b.op("Cast", [b.op("Greater", [halved, threshold])], to=TensorProto.FLOAT)
        cur = b.dilate(cur, level_dilation)
        levels[(h, w)] = cur
        prev = (h, w)

    outputs = []
    for h, w, tile in grids:
        src = nearest_source_level(chain, (h, w))
        m = levels[src]
        if src != (h, w):
            m = b.op("Gather", [m, b.const(nearest_indices(src[0], h), np.int64, "rows")], axis=2)
            m = b.op("Gather", [m, b.const(nearest_indices(src[1], w), np.int64, "cols")], axis=3)
        gh, gw = -(-h // tile), -(-w // tile)
        # Bottom/right pads make floor-mode pooling produce exactly ceil(h/t) x ceil(w/t) cells.
        pads = [halo, halo, gh * tile - h + halo, gw * tile - w + halo]
        k = tile + 2 * halo
        pooled = b.op("MaxPool", [m], kernel_shape=[k, k], strides=[tile, tile], pads=pads)
        cells = b.op("Reshape", [pooled, b.const([gh, gw], np.int64)])
        active = b.op("NonZero", [b.op("Greater", [cells, zero])])
        corners = b.op("Transpose", [active], perm=[1, 0])
        name = tiles_output_name(h, w)
        b.op("Mul", [corners, b.const(tile, np.int64, "tile")], output=name)
        outputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, [f"n_{h}x{w}", 2]))

    graph = helper.make_graph(
        b.nodes, "ssic_mask",
        [helper.make_tensor_value_info(MASK_INPUT, TensorProto.FLOAT, [1, 1, h0, w0])],
        outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ssic")
    model.ir_version = 10
    return model
