"""The default-mode mask graph: edit mask -> dilation -> SIGE's per-resolution pyramid -> active tiles.

Mirrors :func:`ssic.masks.mask_pyramid` and :func:`ssic.masks.active_tiles` (the NumPy reference the
tests compare it with) in stock ONNX ops, so the runtime (and TensorRT) computes the tiles of an
edit without Python in the loop. Each grid has its own tile size and halo.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto

from ssic.masks import PYRAMID_EPS, PYRAMID_THRESHOLD, nearest_source_level, pyramid_chain
from ssic.passes.analysis import Grid
from ssic.passes.mask_graph import MaskGraphBuilder


def build_mask_graph(input_hw: tuple[int, int], grids: list[Grid], *, radius: int, level_dilation: int,
                     sources=None) -> onnx.ModelProto:
    """Mask graph -> ``ssic.tiles.<HxW>`` int64 ``[n, 2]`` per grid.

    Input: ``ssic.mask`` float32 ``[1, 1, H0, W0]`` (``input_hw``), or with ``sources``
    (``ssic.artefact.MaskSource`` list) one mask per spatial model input, ``s.mask_input`` float32
    ``[1, 1, s.height, s.width]``, each resized conservatively to ``input_hw`` and united.
    """
    b = MaskGraphBuilder("ssic_mask")
    if sources and not (len(sources) == 1 and sources[0].mask_input == "ssic.mask"):
        parts = [b.resize_any(b.add_input(s.mask_input, [1, 1, s.height, s.width]), (s.height, s.width),
                              tuple(input_hw)) for s in sources]
        mask = b.union(parts, output="ssic.mask")
    else:
        mask = b.add_input("ssic.mask", [1, 1, *input_hw])
    full = b.dilate(mask, radius)
    sizes = [(g.height, g.width) for g in grids]
    chain = pyramid_chain(tuple(input_hw), sizes)
    levels = {chain[0]: full}
    cur = full
    zero = b.const(np.array(0.0, np.float32))
    cap = b.const(np.array(PYRAMID_THRESHOLD, np.float32))
    eps = b.const(np.array(PYRAMID_EPS, np.float32))
    for prev, (h, w) in itertools.pairwise(chain):
        # 2x2 averaging of the previous level (an odd last row/column is dropped, as the reference does;
        # no Slice where nothing is dropped: it copied the whole level, 0.2 ms at 1024x1024)
        cropped = cur if tuple(prev) == (2 * h, 2 * w) else b.op(
            "Slice", [cur, b.const(np.array([0, 0], np.int64)), b.const(np.array([2 * h, 2 * w], np.int64)),
                      b.const(np.array([2, 3], np.int64))])
        halved = b.op("AveragePool", [cropped], kernel_shape=[2, 2], strides=[2, 2])
        top = b.op("ReduceMax", [halved], keepdims=0)
        thr = b.op("Max", [b.op("Min", [cap, b.op("Sub", [top, eps])]), zero])
        cur = b.op("Cast", [b.op("Greater", [halved, thr])], to=TensorProto.FLOAT)
        cur = b.dilate(cur, level_dilation)
        levels[(h, w)] = cur
    for grid in grids:
        size = (grid.height, grid.width)
        src = nearest_source_level(chain, size)
        m = levels[src]
        if src != size:
            m = b.op("Resize", [m, "", "", b.const(np.array([1, 1, *size], np.int64))], mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        t, halo = grid.tile, grid.halo
        gh, gw = grid.cells
        pads = [halo, halo, gh * t - grid.height + halo, gw * t - grid.width + halo]
        pooled = b.op("MaxPool", [m], kernel_shape=[t + 2 * halo, t + 2 * halo], strides=[t, t], pads=pads)
        active = b.op("Greater", [b.op("Squeeze", [pooled, b.const(np.array([0, 1], np.int64))]), zero])
        idx = b.op("Transpose", [b.op("NonZero", [active])], perm=[1, 0])
        b.op("Mul", [idx, b.const(np.array(t, np.int64))], output=grid.tiles_input)
    return b.model([(gr.tiles_input, [f"n_{gr.name}", 2]) for gr in grids])
