"""NumPy mask utilities: difference masks, dilation, brush strokes, SIGE's pyramid, active tiles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ssic.masks import (
    active_tiles,
    brush_stroke_mask,
    difference_mask,
    dilate,
    edits_dir,
    instance_edges,
    label_difference_mask,
    load_edit_pair,
    mask_pyramid,
    resize_nearest,
    threshold_halved,
)

NO_SHARED = "real edits absent: ../shared/data/edits/ (or $SSIC_SHARED_DIR/data/edits) not on this machine"


def _masks(max_side: int = 20):
    return st.tuples(st.integers(1, max_side), st.integers(1, max_side)).flatmap(
        lambda hw: arrays(bool, hw, elements=st.booleans()))


# --- difference masks -----------------------------------------------------------------------------


def test_difference_mask_any_over_channels():
    a = np.zeros((4, 5, 3), np.float32)
    b = a.copy()
    b[1, 2, 0] = 0.5
    b[3, 4, 2] = -0.02
    b[0, 0, 1] = 0.005  # below eps
    m = difference_mask(a, b, eps=0.01)
    assert m.shape == (4, 5) and m.dtype == bool
    assert sorted(zip(*np.nonzero(m), strict=True)) == [(1, 2), (3, 4)]
    nchw = difference_mask(a.transpose(2, 0, 1)[None], b.transpose(2, 0, 1)[None], 0.01, channel_axis=1)
    np.testing.assert_array_equal(nchw, m)
    plane = difference_mask(a[..., 0], b[..., 0], 0.01, channel_axis=None)
    np.testing.assert_array_equal(plane, np.abs(b[..., 0]) > 0.01)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1e-3, 0.01, 0.5, -1.0]),
       st.sampled_from([np.float32, np.float16, np.uint8, np.float64]))
def test_changed_equals_the_float64_difference(seed, eps, dtype):
    """``changed`` subtracts only the elements that differ; the result is the whole float64 test's, for
    values near the threshold, equal values, NaN and infinities."""
    from ssic.masks import changed

    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((2, 7, 9)) * 4).astype(dtype)
    b = a.copy()
    pick = rng.random(a.shape) < 0.3
    b[pick] = (a[pick].astype(np.float64) + rng.choice([0.0, eps, 2 * abs(eps), 0.4, -0.6], pick.sum())).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        a.flat[:4] = [np.nan, np.inf, np.inf, 0.0]
        b.flat[:4] = [np.nan, np.inf, -np.inf, -0.0]
    with np.errstate(invalid="ignore"):
        want = np.abs(a.astype(np.float64) - b.astype(np.float64)) > eps
    np.testing.assert_array_equal(changed(a, b, eps), want)


def test_difference_mask_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        difference_mask(np.zeros((2, 2)), np.zeros((2, 3)))


# --- dilation -------------------------------------------------------------------------------------


def _dilate_slow(m: np.ndarray, r: int) -> np.ndarray:
    h, w = m.shape
    out = np.zeros_like(m)
    for y, x in zip(*np.nonzero(m), strict=True):
        out[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
    return out[:h, :w]


@settings(max_examples=60, deadline=None)
@given(_masks(), st.integers(0, 4))
def test_dilate_is_a_square_max_filter(mask, radius):
    np.testing.assert_array_equal(dilate(mask, radius), _dilate_slow(mask, radius))


# --- brush strokes --------------------------------------------------------------------------------


@pytest.mark.parametrize("area", [0.012, 0.05, 0.15, 0.30])
@pytest.mark.parametrize("hw", [(256, 256), (256, 512), (64, 48)])
def test_brush_stroke_area_and_determinism(area, hw):
    m = brush_stroke_mask(*hw, area, seed=7)
    assert m.shape == hw and m.dtype == bool
    assert abs(m.mean() - area) <= 0.1 * area
    np.testing.assert_array_equal(m, brush_stroke_mask(*hw, area, seed=7))
    assert not np.array_equal(m, brush_stroke_mask(*hw, area, seed=8))


def test_brush_stroke_is_stroke_like():
    # Strokes, not salt and pepper: few connected pieces, and most painted pixels have painted neighbours.
    m = brush_stroke_mask(256, 256, 0.05, seed=1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    assert inner.sum() > 0.7 * m.sum()


def test_brush_stroke_empty_area():
    assert not brush_stroke_mask(32, 32, 0.0, seed=0).any()


# --- GauGAN label masks ---------------------------------------------------------------------------


def test_label_difference_mask_with_instances():
    la = np.zeros((6, 6), np.int64)
    lb = la.copy()
    lb[0, 0] = 3
    ia = np.zeros((6, 6), np.int32)
    ib = ia.copy()
    ib[3:, 3:] = 1  # a new instance boundary: edges change along it
    m = label_difference_mask(la, lb)
    assert m.sum() == 1 and m[0, 0]
    mi = label_difference_mask(la, lb, ia, ib)
    np.testing.assert_array_equal(mi, m | instance_edges(ib))
    with pytest.raises(ValueError, match="both"):
        label_difference_mask(la, lb, ia, None)


# --- SIGE pyramid ---------------------------------------------------------------------------------


def test_threshold_halved_rules():
    x = np.array([[0.25, 0.5], [0.0, 0.25]], np.float32)
    np.testing.assert_array_equal(threshold_halved(x), x > 0.3)
    small = np.array([[0.25, 0.0]], np.float32)  # max 0.25 < 0.3: threshold max - 1e-3 keeps the max
    np.testing.assert_array_equal(threshold_halved(small), [[True, False]])
    assert not threshold_halved(np.zeros((3, 3), np.float32)).any()  # all zero stays all zero


def test_mask_pyramid_halving_and_sizes():
    m = np.zeros((16, 16), bool)
    m[5, 5] = True
    pyr = mask_pyramid(m, [(16, 16), (8, 8), (4, 4), (6, 6)], level_dilation=0)
    assert pyr[(16, 16)] is not None and pyr[(16, 16)].sum() == 1
    # a single pixel averages to 0.25 < 0.3: the "max - eps" rule keeps it at every level
    assert pyr[(8, 8)].sum() == 1 and pyr[(8, 8)][2, 2]
    assert pyr[(4, 4)].sum() == 1 and pyr[(4, 4)][1, 1]
    np.testing.assert_array_equal(pyr[(6, 6)], resize_nearest(pyr[(8, 8)], (6, 6)))
    d1 = mask_pyramid(m, [(8, 8)], level_dilation=1)[(8, 8)]
    np.testing.assert_array_equal(d1, dilate(pyr[(8, 8)], 1))


def test_mask_pyramid_non_square_and_odd():
    rng = np.random.default_rng(0)
    m = rng.random((256, 512)) < 0.001
    sizes = [(256, 512), (128, 256), (64, 128), (32, 64), (16, 32)]
    pyr = mask_pyramid(m, sizes, level_dilation=2)
    assert {k: v.shape for k, v in pyr.items()} == {s: s for s in sizes}
    odd = mask_pyramid(np.ones((9, 7), bool), [(4, 3), (2, 1)], 1)
    assert odd[(4, 3)].all() and odd[(2, 1)].all()


def test_empty_mask_stays_empty():
    pyr = mask_pyramid(np.zeros((32, 32), bool), [(32, 32), (16, 16), (8, 8), (12, 12)], 2)
    assert not any(v.any() for v in pyr.values())
    assert active_tiles(pyr[(8, 8)], 2).shape == (0, 2)


# --- active tiles ---------------------------------------------------------------------------------


def _active_tiles_slow(m: np.ndarray, t: int, halo: int) -> np.ndarray:
    h, w = m.shape
    out = [(y, x) for y in range(0, h, t) for x in range(0, w, t)
           if m[max(0, y - halo):y + t + halo, max(0, x - halo):x + t + halo].any()]
    return np.array(out, np.int64).reshape(-1, 2)


@settings(max_examples=80, deadline=None)
@given(_masks(), st.integers(1, 6), st.integers(0, 3))
def test_active_tiles_matches_definition(mask, tile, halo):
    got = active_tiles(mask, tile, halo)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _active_tiles_slow(mask, tile, halo))


def test_active_tiles_all_and_border():
    assert len(active_tiles(np.ones((10, 7), bool), 4, 0)) == 3 * 2
    m = np.zeros((10, 7), bool)
    m[9, 6] = True  # the last pixel: the clipped bottom-right cell
    np.testing.assert_array_equal(active_tiles(m, 4, 0), [[8, 4]])
    np.testing.assert_array_equal(active_tiles(m, 4, 1), [[8, 4]])
    m[:] = False
    m[4, 4] = True  # a halo of 1 reaches the three neighbours up and left
    np.testing.assert_array_equal(active_tiles(m, 4, 1), [[0, 0], [0, 4], [4, 0], [4, 4]])


# --- the real edits -------------------------------------------------------------------------------


def test_church_difference_is_12_1_percent():
    pair = load_edit_pair("church")
    if pair is None:
        pytest.skip(NO_SHARED)
    assert pair["original"].shape == (256, 256, 3)
    assert pair["original"].min() >= -1 and pair["original"].max() <= 1
    frac = difference_mask(pair["original"], pair["edited"], eps=0.01).mean()
    assert abs(frac - 0.121) < 0.002, frac


def test_cityscapes_label_difference_is_0_95_percent():
    pair = load_edit_pair("cityscapes")
    if pair is None:
        pytest.skip(NO_SHARED)
    assert pair["label_a"].shape == (256, 512)
    frac = label_difference_mask(pair["label_a"], pair["label_b"]).mean()
    assert abs(frac - 0.0095) < 0.0002, frac
    with_edges = label_difference_mask(pair["label_a"], pair["label_b"], pair["instance_a"], pair["instance_b"])
    assert with_edges.mean() >= frac


def test_mask_256_is_15_5_percent():
    pair = load_edit_pair("mask_256")
    if pair is None:
        pytest.skip(NO_SHARED)
    assert abs(pair["mask"].mean() - 0.155) < 0.002


def test_missing_shared_dir_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("SSIC_SHARED_DIR", str(tmp_path))
    assert edits_dir() is None
    assert load_edit_pair("church") is None
    with pytest.raises(ValueError, match="unknown edit pair"):
        monkeypatch.setenv("SSIC_SHARED_DIR", str(tmp_path))
        (tmp_path / "data" / "edits").mkdir(parents=True)
        load_edit_pair("nope")
