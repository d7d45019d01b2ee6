"""The default-mode mask graph equals the NumPy reference (ssic.masks) exactly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st

from ssic.masks import active_tiles, brush_stroke_mask, dilate, mask_pyramid
from ssic.passes.analysis import Grid
from ssic.passes.build_mask import build_mask_graph

GRID_SETS = {
    "gaugan": ((256, 512), [(256, 512), (128, 256), (64, 128), (32, 64), (16, 32)]),
    "ddim": ((256, 256), [(256, 256), (128, 128), (64, 64), (32, 32)]),
    "odd": ((50, 38), [(50, 38), (25, 19), (13, 10), (7, 5)]),
}


def reference(mask, sizes, grids, radius, level_dilation):
    pyr = mask_pyramid(dilate(mask, radius), sizes, level_dilation)
    return [active_tiles(pyr[(g.height, g.width)], g.tile, g.halo) for g in grids]


@settings(max_examples=30, deadline=None)
@given(which=st.sampled_from(sorted(GRID_SETS)), seed=st.integers(0, 10_000), area=st.sampled_from([0.0, 0.002, 0.03, 0.2, 1.0]),
       tile=st.integers(1, 5), halos=st.lists(st.integers(0, 3), min_size=5, max_size=5),
       radius=st.integers(0, 5), level_dilation=st.integers(0, 2))
def test_mask_graph_matches_reference(which, seed, area, tile, halos, radius, level_dilation):
    hw, sizes = GRID_SETS[which]
    grids = [Grid(h, w, tile, halo) for (h, w), halo in zip(sizes, halos, strict=False)]
    if area == 1.0:
        mask = np.ones(hw, bool)
    elif area == 0.0:
        mask = np.zeros(hw, bool)
    else:
        mask = brush_stroke_mask(hw[0], hw[1], area, seed)
    model = build_mask_graph(hw, grids, radius=radius, level_dilation=level_dilation)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"ssic.mask": mask.astype(np.float32)[None, None]})
    for got, want, g in zip(outs, reference(mask, sizes, grids, radius, level_dilation), grids, strict=True):
        np.testing.assert_array_equal(got, want, err_msg=f"grid {g}")


def test_border_and_empty():
    hw, sizes = GRID_SETS["ddim"]
    grids = [Grid(h, w, 2, 1) for h, w in sizes]
    model = build_mask_graph(hw, grids, radius=5, level_dilation=1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    empty = sess.run(None, {"ssic.mask": np.zeros((1, 1, *hw), np.float32)})
    assert all(o.shape == (0, 2) for o in empty)
    corner = np.zeros((1, 1, *hw), np.float32)
    corner[..., -1, -1] = 1
    outs = sess.run(None, {"ssic.mask": corner})
    assert all(len(o) > 0 for o in outs)
    assert outs[0].max() == 254  # the last tile row/column
