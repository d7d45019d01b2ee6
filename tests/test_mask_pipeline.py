"""The default-mode mask graph equals the NumPy reference of ssic.masks exactly (rows and order)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssic.masks import active_tiles, brush_stroke_mask, dilate, load_edit_pair, mask_pyramid
from ssic.passes.mask_pipeline import build_mask_model, tiles_output_name

GRID_SETS = {
    # DDIM-like: 256 -> 128 -> 64, tile sizes per resolution
    "ddim": ((64, 64), [(64, 64, 4), (32, 32, 2), (16, 16, 2)], 2, 1),
    # non power-of-two fractions: resized by nearest from the covering level
    "odd_sizes": ((40, 40), [(40, 40, 3), (24, 24, 4), (13, 13, 2), (5, 5, 2)], 1, 1),
    # GauGAN 256x512 down to 16x32, level dilation 2
    "gaugan": ((256, 512), [(256, 512, 8), (128, 256, 4), (64, 128, 4), (32, 64, 2), (16, 32, 2)], 1, 2),
    # odd input, odd halvings, larger-than-input grid
    "odd_input": ((23, 17), [(23, 17, 5), (11, 8, 3), (5, 4, 2), (30, 20, 4)], 0, 1),
}


def _run(model: onnx.ModelProto, mask: np.ndarray) -> dict[str, np.ndarray]:
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"ssic.mask": mask.astype(np.float32)[None, None]}), strict=True))


def _reference(mask, grids, radius, level_dilation, halo):
    pyr = mask_pyramid(dilate(mask, radius), [(h, w) for h, w, _ in grids], level_dilation)
    return {tiles_output_name(h, w): active_tiles(pyr[(h, w)], t, halo) for h, w, t in grids}


def _check(mask, input_hw, grids, radius, level_dilation, halo):
    model = build_mask_model(input_hw, grids, radius=radius, level_dilation=level_dilation, halo=halo)
    got = _run(model, mask)
    want = _reference(mask, grids, radius, level_dilation, halo)
    assert set(got) == set(want)
    for name, ref in want.items():
        assert got[name].dtype == np.int64 and got[name].shape[1:] == (2,)
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(GRID_SETS)), st.sampled_from(["empty", "full", "sparse", "brush", "corner"]),
       st.integers(0, 2), st.integers(0, 2**31))
def test_mask_graph_matches_reference(grid_set, kind, halo, seed):
    input_hw, grids, radius, level_dilation = GRID_SETS[grid_set]
    rng = np.random.default_rng(seed)
    h, w = input_hw
    if kind == "empty":
        mask = np.zeros(input_hw, bool)
    elif kind == "full":
        mask = np.ones(input_hw, bool)
    elif kind == "sparse":
        mask = rng.random(input_hw) < rng.choice([0.001, 0.01, 0.05])
    elif kind == "brush":
        mask = brush_stroke_mask(h, w, float(rng.choice([0.012, 0.05, 0.15, 0.3])), seed=int(seed % 1000))
    else:  # a single pixel at a random border or corner
        mask = np.zeros(input_hw, bool)
        mask[rng.choice([0, h - 1]), rng.integers(0, w)] = True
    _check(mask, input_hw, grids, radius, level_dilation, halo)


def test_real_church_edit():
    from ssic.masks import difference_mask

    pair = load_edit_pair("church")
    if pair is None:
        pytest.skip("real edits absent: ../shared/data/edits/ (or $SSIC_SHARED_DIR/data/edits) not on this machine")
    mask = difference_mask(pair["original"], pair["edited"], eps=0.01)
    _check(mask, (256, 256), [(256, 256, 8), (128, 128, 4), (64, 64, 4)], 5, 1, 1)


def test_real_cityscapes_edit():
    from ssic.masks import label_difference_mask

    pair = load_edit_pair("cityscapes")
    if pair is None:
        pytest.skip("real edits absent: ../shared/data/edits/ (or $SSIC_SHARED_DIR/data/edits) not on this machine")
    mask = label_difference_mask(pair["label_a"], pair["label_b"], pair["instance_a"], pair["instance_b"])
    _check(mask, (256, 512), GRID_SETS["gaugan"][1], 1, 2, 1)


def test_model_interface():
    model = build_mask_model((32, 64), [(32, 64, 4), (16, 32, 2)], radius=1, level_dilation=1)
    assert model.ir_version == 10
    assert [i.name for i in model.graph.input] == ["ssic.mask"]
    assert [o.name for o in model.graph.output] == ["ssic.tiles.32x64", "ssic.tiles.16x32"]
    assert {n.op_type for n in model.graph.node} <= {
        "Cast", "Greater", "MaxPool", "AveragePool", "ReduceMax", "Min", "Max", "Sub", "Slice",
        "Gather", "Reshape", "NonZero", "Transpose", "Mul"}
    with pytest.raises(ValueError, match="one grid per resolution"):
        build_mask_model((8, 8), [(8, 8, 2), (8, 8, 4)], radius=0, level_dilation=1)
