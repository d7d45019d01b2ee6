"""Property tests: every op of libssic_ort against the NumPy reference in ssic/ops.py."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ssic import ops
from ssic.library import get_library_path, library_version

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _session(op: str, inputs: tuple[str, ...], attrs: tuple, threads: int = 2,
             cache_type: int = TensorProto.FLOAT) -> ort.InferenceSession:
    """A single-node model of ``op`` (inputs named as given, "" = omitted), cached per signature."""
    node = ops.make_node(op, list(inputs), ["out"], **dict(attrs))
    int_inputs = {"src_idx", "dst_idx", "idx"}
    vis = [helper.make_tensor_value_info(
        n, TensorProto.INT64 if n in int_inputs else cache_type if n == "cache" else TensorProto.FLOAT, None)
        for n in inputs if n]
    graph = helper.make_graph([node], op, vis, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=ops.opset_imports(), ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_op(op: str, feeds: dict[str, np.ndarray | None], threads: int = 2, **attrs) -> np.ndarray:
    names = [i.name for i in ops.OPS[op].inputs]
    given_names = [n if feeds.get(n) is not None else "" for n in names]
    while given_names and given_names[-1] == "":
        given_names.pop()
    cache = feeds.get("cache")
    cache_type = TensorProto.FLOAT16 if cache is not None and cache.dtype == np.float16 else TensorProto.FLOAT
    sess = _session(op, tuple(given_names), tuple(sorted(attrs.items())), threads, cache_type)
    return sess.run(None, {n: feeds[n] for n in given_names if n})[0]


def _corners(draw, extent_y: int, extent_x: int, t: int, mode: str) -> np.ndarray:
    cells = [(y, x) for y in range(0, extent_y, t) for x in range(0, extent_x, t)]
    if mode == "none":
        chosen = []
    elif mode == "all":
        chosen = cells
    else:
        chosen = draw(st.lists(st.sampled_from(cells), unique=True, max_size=len(cells))) if cells else []
    return np.array(chosen, dtype=np.int64).reshape(-1, 2)


@st.composite
def gather_cases(draw):
    c = draw(st.integers(1, 40))
    ts = draw(st.integers(1, 9))
    t = draw(st.integers(1, 9))
    k = draw(st.sampled_from([1, 3, 5]))
    s = draw(st.sampled_from([1, 2]))
    u = draw(st.sampled_from([1, 2]))
    hs = draw(st.integers(1, 20))
    ws = draw(st.integers(1, 20))
    pad_top = draw(st.integers(0, k))
    pad_left = draw(st.integers(0, k))
    layout = draw(st.sampled_from([ops.LAYOUT_NHWC, ops.LAYOUT_NCHW]))
    pad_mode = draw(st.sampled_from([ops.PAD_ZEROS, ops.PAD_ZEROS, ops.PAD_REFLECT, ops.PAD_EDGE]))
    act = draw(st.sampled_from([0, 1, 2, 3]))
    alpha = draw(st.sampled_from([0.01, 0.2]))
    has_scale, has_shift = draw(st.booleans()), draw(st.booleans())
    src_idx = _corners(draw, hs, ws, ts, draw(st.sampled_from(["none", "all", "some", "some"])))
    # Output grid of a "same"-style conv on the upsampled source, plus one ring of extra tiles
    # beyond the image on the bottom/right to hit the zero region.
    ho, wo = -(-hs * u // s), -(-ws * u // s)
    dst_idx = _corners(draw, ho + t, wo + t, t, draw(st.sampled_from(["none", "all", "some", "some"])))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    cache = rng.standard_normal((hs, ws, c)).astype(np.float32)
    if layout == ops.LAYOUT_NCHW:
        cache = np.ascontiguousarray(cache.transpose(2, 0, 1)[None])
    return dict(
        feeds=dict(
            tiles=rng.standard_normal((len(src_idx) * ts * ts, c)).astype(np.float32),
            cache=cache, src_idx=src_idx, dst_idx=dst_idx,
            scale=rng.standard_normal(c).astype(np.float32) if has_scale else None,
            shift=rng.standard_normal(c).astype(np.float32) if has_shift else None,
        ),
        attrs=dict(src_tile=ts, tile=t, kernel=k, stride=s, pad_top=pad_top, pad_left=pad_left,
                   upsample=u, activation=act, alpha=alpha, src_layout=layout, pad_mode=pad_mode),
    )


def _ref_gather(feeds, attrs):
    f = feeds
    return ops.tile_gather_ref(f["tiles"], f["cache"], f["src_idx"], f["dst_idx"], f["scale"], f["shift"], **attrs)


def _ref_scatter(feeds, attrs):
    f = feeds
    return ops.tile_scatter_ref(f["tiles"], f["cache"], f["idx"], f["residual"], **attrs)


@SETTINGS
@given(gather_cases())
def test_tile_gather_matches_reference(case):
    feeds, attrs = case["feeds"], case["attrs"]
    got = run_op("TileGather", feeds, **attrs)
    want = _ref_gather(feeds, attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@st.composite
def scatter_cases(draw):
    c = draw(st.integers(1, 40))
    t = draw(st.integers(1, 9))
    h = draw(st.integers(1, 24))
    w = draw(st.integers(1, 24))
    idx = _corners(draw, h, w, t, draw(st.sampled_from(["none", "all", "some", "some"])))
    act = draw(st.sampled_from([0, 1, 2, 3]))
    alpha = draw(st.sampled_from([0.01, 0.2]))
    has_res = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    rows = len(idx) * t * t
    return dict(
        feeds=dict(
            tiles=rng.standard_normal((rows, c)).astype(np.float32),
            cache=rng.standard_normal((1, c, h, w)).astype(np.float32),
            idx=idx,
            residual=rng.standard_normal((rows, c)).astype(np.float32) if has_res else None,
        ),
        attrs=dict(tile=t, activation=act, alpha=alpha),
    )


@SETTINGS
@given(scatter_cases())
def test_tile_scatter_matches_reference(case):
    feeds, attrs = case["feeds"], case["attrs"]
    got = run_op("TileScatter", feeds, **attrs)
    want = _ref_scatter(feeds, attrs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _big_gather_case(rng, c=48, hs=37, ws=29, ts=4, t=4):
    src_idx = np.array([(y, x) for y in range(0, hs, ts) for x in range(0, ws, ts) if rng.random() < 0.5],
                       dtype=np.int64).reshape(-1, 2)
    dst_idx = np.array([(y, x) for y in range(0, hs, t) for x in range(0, ws, t) if rng.random() < 0.6],
                       dtype=np.int64).reshape(-1, 2)
    feeds = dict(tiles=rng.standard_normal((len(src_idx) * ts * ts, c)).astype(np.float32),
                 cache=rng.standard_normal((hs, ws, c)).astype(np.float32), src_idx=src_idx, dst_idx=dst_idx,
                 scale=rng.standard_normal(c).astype(np.float32), shift=rng.standard_normal(c).astype(np.float32))
    attrs = dict(src_tile=ts, tile=t, kernel=3, stride=1, pad_top=1, pad_left=1, activation=ops.ACT_SWISH)
    return feeds, attrs


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_thread_counts_agree(threads):
    """Parallel chunks cover the work exactly once whatever the pool size."""
    feeds, attrs = _big_gather_case(np.random.default_rng(1))
    got = run_op("TileGather", feeds, threads=threads, **attrs)
    np.testing.assert_allclose(got, _ref_gather(feeds, attrs), rtol=1e-5, atol=1e-5)


def test_swish_extreme_values():
    x = np.array([-200, -90, -88, -20, -1e-3, 0, 1e-3, 20, 88, 90, 200], dtype=np.float32)
    c = len(x)
    feeds = dict(tiles=np.zeros((0, c), np.float32), cache=x.reshape(1, 1, c),
                 src_idx=np.zeros((0, 2), np.int64), dst_idx=np.zeros((1, 2), np.int64), scale=None, shift=None)
    attrs = dict(src_tile=1, tile=1, kernel=1, activation=ops.ACT_SWISH)
    got = run_op("TileGather", feeds, **attrs)
    np.testing.assert_allclose(got, _ref_gather(feeds, attrs), rtol=1e-5, atol=1e-6)


def test_duplicate_tiles_last_wins():
    rng = np.random.default_rng(2)
    c, t = 3, 2
    idx = np.array([[0, 0], [2, 2], [0, 0]], np.int64)
    tiles = rng.standard_normal((3 * t * t, c)).astype(np.float32)
    cache = rng.standard_normal((1, c, 5, 5)).astype(np.float32)
    got = run_op("TileScatter", dict(tiles=tiles, cache=cache, idx=idx), tile=t)
    np.testing.assert_array_equal(got, ops.tile_scatter_ref(tiles, cache, idx, tile=t))
    np.testing.assert_array_equal(got[0, :, 0, 0], tiles[2 * t * t])
    nhwc = np.ascontiguousarray(cache[0].transpose(1, 2, 0))
    feeds = dict(tiles=tiles, cache=nhwc, src_idx=idx, dst_idx=np.array([[0, 0]], np.int64), scale=None, shift=None)
    attrs = dict(src_tile=t, tile=t, kernel=1)
    np.testing.assert_array_equal(run_op("TileGather", feeds, **attrs), _ref_gather(feeds, attrs))


@pytest.mark.parametrize("op", ["TileGather", "TileScatter"])
def test_bad_tile_corner_is_an_error(op):
    c = 2
    bad = np.array([[1, 0]], np.int64)
    if op == "TileGather":
        feeds = dict(tiles=np.zeros((4, c), np.float32), cache=np.zeros((4, 4, c), np.float32),
                     src_idx=bad, dst_idx=np.zeros((1, 2), np.int64))
        attrs = dict(src_tile=2, tile=2, kernel=3, pad_top=1, pad_left=1)
        ref = lambda: _ref_gather({**feeds, "scale": None, "shift": None}, attrs)  # noqa: E731
    else:
        feeds = dict(tiles=np.zeros((4, c), np.float32), cache=np.zeros((1, c, 4, 4), np.float32), idx=bad)
        attrs = dict(tile=2)
        ref = lambda: _ref_scatter({**feeds, "residual": None}, attrs)  # noqa: E731
    with pytest.raises(Exception, match="multiple of 2"):
        run_op(op, feeds, **attrs)
    with pytest.raises(ValueError):
        ref()


def test_wrong_shapes_are_errors():
    feeds = dict(tiles=np.zeros((3, 2), np.float32), cache=np.zeros((4, 4, 2), np.float32),
                 src_idx=np.zeros((1, 2), np.int64), dst_idx=np.zeros((1, 2), np.int64))
    with pytest.raises(Exception, match="tiles must be"):
        run_op("TileGather", feeds, src_tile=2, tile=2, kernel=1)


def test_library_version_matches_package():
    import ssic

    assert library_version() == ssic.__version__


def test_tile_geometry_header(tmp_path):
    """plugins/common/test_tile_geometry.cpp: host test of the shared tile arithmetic."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "test_tile_geometry"
    src = REPO / "plugins" / "common" / "test_tile_geometry.cpp"
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    subprocess.run([str(exe)], check=True)
