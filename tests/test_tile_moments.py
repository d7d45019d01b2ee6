"""ssic::TileMoments (the incremental GroupNorm statistics' correction in one pass) and the
fuse-tile-moments pass.

- The C++ kernel equals ``ssic.ops.tile_moments_ref`` on random cases: float32 and float16 caches,
  tiles clipped at the image's edge, a corner listed twice, no tiles; invalid corners are errors.
- On models with GroupNorm (a channel concat before one, image sides that are not multiples of the
  tile), the default artefact has TileMoments in place of the stock-op form and its sparse output
  equals the artefact compiled with ``--disable-pass fuse-tile-moments``.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from op_session import op_session

import ssic
from ssic import ops


@functools.cache
def _session(tile: int, cache_type: int) -> ort.InferenceSession:
    node = ops.make_node("TileMoments", ["tiles", "cache", "idx"], ["sum", "sumsq"], tile=tile)
    return op_session(node, {"tiles": TensorProto.FLOAT, "cache": cache_type, "idx": TensorProto.INT64},
                      {"sum": TensorProto.DOUBLE, "sumsq": TensorProto.DOUBLE})


def run_moments(tiles, cache, idx, tile: int):
    cache_type = TensorProto.FLOAT16 if cache.dtype == np.float16 else TensorProto.FLOAT
    return _session(tile, cache_type).run(None, {"tiles": tiles, "cache": cache, "idx": idx})


@st.composite
def moment_cases(draw):
    h, w, t, c = draw(st.integers(1, 23)), draw(st.integers(1, 23)), draw(st.integers(1, 8)), draw(st.integers(1, 40))
    cells = [(y, x) for y in range(0, h, t) for x in range(0, w, t)]
    chosen = draw(st.lists(st.sampled_from(cells), max_size=len(cells) + 2))  # repeats allowed
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    idx = np.array(chosen, np.int64).reshape(-1, 2)
    cache = (rng.standard_normal((h, w, c)) * 3).astype(np.float16 if draw(st.booleans()) else np.float32)
    tiles = (rng.standard_normal((len(idx) * t * t, c)) * 3).astype(np.float32)
    return tiles, cache, idx, t


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moment_cases())
def test_tile_moments_matches_reference(case):
    tiles, cache, idx, t = case
    got = run_moments(tiles, cache, idx, t)
    want = ops.tile_moments_ref(tiles, cache, idx, tile=t)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float64 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * max(1, len(idx) * t * t) ** 0.5)


def test_tile_moments_counts_only_in_image_pixels():
    """A tile clipped at the bottom-right edge adds its in-image pixels only (its other rows hold
    whatever the conv computed there)."""
    cache = np.zeros((5, 6, 2), np.float32)
    tiles = np.full((16, 2), 7.0, np.float32)  # one 4x4 tile at (4, 4): 1 x 2 pixels are inside
    s1, s2 = run_moments(tiles, cache, np.array([[4, 4]], np.int64), 4)
    np.testing.assert_array_equal(s1, [14.0, 14.0])
    np.testing.assert_array_equal(s2, [98.0, 98.0])


def test_tile_moments_bad_corner_is_an_error():
    cache = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(Exception, match="not a multiple of 4"):
        run_moments(np.zeros((16, 3), np.float32), cache, np.array([[2, 0]], np.int64), 4)


def _groupnorm_model(path, concat: bool, size: int):
    import torch

    from ssic.models.export import export_module_to_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.b = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.norm = torch.nn.GroupNorm(4, 32 if concat else 16)
            self.out = torch.nn.Conv2d(32 if concat else 16, 3, 3, padding=1)

        def forward(self, x):
            h = torch.cat([self.a(x), self.b(x)], 1) if concat else self.a(x)
            return self.out(torch.nn.functional.silu(self.norm(h)))

    torch.manual_seed(0)
    x = np.random.default_rng(0).random((1, 3, size, size), np.float32)
    return export_module_to_file(Net().eval(), {"x": x}, ["y"], path)


@pytest.mark.parametrize("concat,size", [(False, 32), (True, 30)])
def test_fused_moments_equal_the_stock_form(tmp_path, concat, size):
    from ssic.bench import edited_inputs, example_inputs
    from ssic.masks import brush_stroke_mask

    model = _groupnorm_model(tmp_path / "gn.onnx", concat, size)
    opts = dict(tile=4, sparse_min_res=8)
    fused = ssic.compile(model, output_dir=tmp_path / "fused.ssic", **opts)
    plain = ssic.compile(model, output_dir=tmp_path / "plain.ssic", disabled_passes=["fuse-tile-moments"], **opts)
    ops_fused = [n.op_type for n in onnx.load(str(fused / "sparse.onnx"), load_external_data=False).graph.node]
    ops_plain = [n.op_type for n in onnx.load(str(plain / "sparse.onnx"), load_external_data=False).graph.node]
    parts = 2 if concat else 1
    assert "TileMoments" not in ops_plain
    assert ops_fused.count("TileMoments") == parts  # one per concat part
    assert ops_plain.count("ReduceSum") - ops_fused.count("ReduceSum") == 2 * parts
    if size % 4:  # the valid-row mask of clipped tiles went with the stock form
        assert ops_fused.count("Mul") < ops_plain.count("Mul")
    outs = []
    for art in (fused, plain):
        sess = ssic.load(art, threads=2)
        inputs = example_inputs(sess.manifest, seed=0)
        sess.prime(inputs)
        mask = brush_stroke_mask(size, size, 0.1, seed=1)
        outs.append(sess.edit(edited_inputs(sess.manifest, inputs, mask), mask=mask, mode="sparse"))
    np.testing.assert_allclose(outs[0]["y"], outs[1]["y"], rtol=1e-4, atol=1e-5)
