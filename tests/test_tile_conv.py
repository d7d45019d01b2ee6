"""ssic::TileConv (TileGather fused with the conv's GEMM, plugins/ort/gemm.cpp) and the fuse-tile-conv pass.

- the C++ kernel equals ``ops.tile_conv_ref`` (gather reference @ unpacked weight + bias + addend) over
  random geometries, epilogues, float16 caches, output widths that are not multiples of 16, row
  counts around the 96-row blocks and the 6-row register tiles, both micro-kernels (AVX2+FMA and
  portable, chosen with SSIC_DISABLE_AVX2 in a subprocess) and 1/2/4 threads;
- pack_weight / unpack_weight are inverse;
- the pass fuses the convs of compiled models (plain, concat-part Gemm chains, biases) and the fused
  artefact's sparse output equals the unfused one (``--disable-pass fuse-tile-conv``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssic import ops
from tests.test_ops_kernels import _corners, run_op

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv_cases(draw):
    c = draw(st.integers(1, 24))
    ts = draw(st.integers(1, 4))
    t = draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 3]))
    hs, ws = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    layout = draw(st.sampled_from([ops.LAYOUT_NHWC, ops.LAYOUT_NCHW]))
    f16 = draw(st.booleans())
    cout = draw(st.sampled_from([1, 5, 16, 17, 40]))
    act = draw(st.sampled_from([0, 1, 2, 3]))
    has_scale, has_bias, has_addend = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    src_idx = _corners(draw, hs, ws, ts, draw(st.sampled_from(["none", "all", "some"])))
    dst_idx = _corners(draw, hs, ws, t, draw(st.sampled_from(["none", "all", "some", "some"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    cache = rng.standard_normal((hs, ws, c)).astype(np.float16 if f16 else np.float32)
    if layout == ops.LAYOUT_NCHW:
        cache = np.ascontiguousarray(cache.transpose(2, 0, 1)[None])
    m = len(dst_idx) * t * t
    w = rng.standard_normal((k * k * c, cout)).astype(np.float32)
    feeds = dict(tiles=rng.standard_normal((len(src_idx) * ts * ts, c)).astype(np.float32), cache=cache,
                 src_idx=src_idx, dst_idx=dst_idx, weight=ops.pack_weight(w),
                 scale=rng.standard_normal(c).astype(np.float32) if has_scale else None,
                 shift=rng.standard_normal(c).astype(np.float32) if has_scale else None,
                 bias=rng.standard_normal(cout).astype(np.float32) if has_bias else None,
                 addend=rng.standard_normal((m, cout)).astype(np.float32) if has_addend else None)
    attrs = dict(src_tile=ts, tile=t, kernel=k, pad_top=k // 2, pad_left=k // 2, activation=act, alpha=0.2,
                 src_layout=layout, cout=cout)
    return feeds, attrs


def _ref(feeds, attrs):
    f = feeds
    return ops.tile_conv_ref(f["tiles"], f["cache"], f["src_idx"], f["dst_idx"], f["weight"], f["scale"],
                             f["shift"], f["bias"], f["addend"], **attrs)


@SETTINGS
@given(conv_cases())
def test_tile_conv_matches_reference(case):
    feeds, attrs = case
    got = run_op("TileConv", feeds, **attrs)
    want = _ref(feeds, attrs)
    assert got.shape == want.shape == (len(feeds["dst_idx"]) * attrs["tile"] ** 2, attrs["cout"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _block_case(rows_tiles: int, c: int, cout: int, seed: int = 0):
    """A 3x3 conv on a 40x40 NHWC source with ``rows_tiles`` output tiles of 2x2 (4 rows each)."""
    rng = np.random.default_rng(seed)
    cells = [(y, x) for y in range(0, 40, 2) for x in range(0, 40, 2)]
    dst = np.array([cells[i] for i in rng.choice(len(cells), rows_tiles, replace=False)], np.int64).reshape(-1, 2)
    src = dst[: rows_tiles // 2]
    w = rng.standard_normal((9 * c, cout)).astype(np.float32) / np.sqrt(9 * c)
    feeds = dict(tiles=rng.standard_normal((len(src) * 4, c)).astype(np.float32),
                 cache=rng.standard_normal((40, 40, c)).astype(np.float32), src_idx=src, dst_idx=dst,
                 weight=ops.pack_weight(w), scale=None, shift=None,
                 bias=rng.standard_normal(cout).astype(np.float32), addend=None)
    attrs = dict(src_tile=2, tile=2, kernel=3, pad_top=1, pad_left=1, cout=cout)
    return feeds, attrs


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("tiles,c,cout", [(1, 3, 7), (23, 64, 32), (24, 16, 48), (25, 8, 33), (100, 130, 64)])
def test_blocks_threads_and_splits_cover_every_row_once(tiles, c, cout, threads):
    """Row counts below, at and above one 96-row block (and the column split used for few blocks),
    K = 9*C that is and is not a multiple of the K slice; every thread count gives the reference."""
    feeds, attrs = _block_case(tiles, c, cout)
    got = run_op("TileConv", feeds, threads=threads, **attrs)
    np.testing.assert_allclose(got, _ref(feeds, attrs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tiles,c,cout", [(30, 160, 200), (100, 128, 240)])
def test_streamed_weights_blocks_and_repeated_calls(tiles, c, cout, threads):
    """Weights over kConvResidentWeights (1 MiB) take the large blocks with their columns split, and a
    thread keeps one block's windows across the parts it takes: two calls in a row on one session (other
    tiles, other values) each equal the reference, so no call reads windows another call gathered."""
    for seed in (0, 1):
        feeds, attrs = _block_case(tiles - seed, c, cout, seed=seed)
        assert 9 * c * cout * 4 > 1 << 20
        got = run_op("TileConv", feeds, threads=threads, **attrs)
        np.testing.assert_allclose(got, _ref(feeds, attrs), rtol=1e-4, atol=1e-4)


def test_portable_micro_kernel_matches():
    """SSIC_DISABLE_AVX2=1 selects the portable micro-kernel; it gives the reference too."""
    code = (
        "import numpy as np\n"
        "from tests.test_tile_conv import _block_case, _ref\n"
        "from tests.test_ops_kernels import run_op\n"
        "for tiles, c, cout in [(25, 8, 33), (100, 70, 16)]:\n"
        "    feeds, attrs = _block_case(tiles, c, cout, seed=3)\n"
        "    np.testing.assert_allclose(run_op('TileConv', feeds, **attrs), _ref(feeds, attrs), rtol=1e-4, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SSIC_DISABLE_AVX2="1")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_bad_weight_shape_is_an_error():
    feeds, attrs = _block_case(3, 4, 20)
    feeds["weight"] = feeds["weight"][:, :-1]
    with pytest.raises(Exception, match="weight must be packed"):
        run_op("TileConv", feeds, **attrs)


def test_pack_unpack_roundtrip():
    w = np.random.default_rng(0).standard_normal((27, 35)).astype(np.float32)
    p = ops.pack_weight(w)
    assert p.shape == (3, 27, 16)
    assert np.all(p[2, :, 3:] == 0)
    np.testing.assert_array_equal(ops.unpack_weight(p, 35), w)


@pytest.mark.parametrize("family", ["gaugan", "realesrgan"])
def test_pass_fuses_and_keeps_the_output(tmp_path, family):
    """The tiny GauGAN (plain convs, SPADE biases) and Real-ESRGAN (RRDB: concat-part Gemm chains)
    fuse nearly every TileGather; the fused sparse graph gives the unfused one's output."""
    import ssic
    from ssic.bench import edited_inputs, example_inputs
    from ssic.masks import brush_stroke_mask
    from ssic.models import export_model

    if family == "realesrgan":
        import torch

        from ssic.models.export import export_module_to_file
        from ssic.models.realesrgan import RRDBNet

        torch.manual_seed(0)
        net = RRDBNet(num_feat=16, num_block=1, num_grow_ch=8).eval()
        model = export_module_to_file(net, {"image": np.random.default_rng(0).random((1, 3, 24, 24), np.float32)},
                                      ["image_x4"], tmp_path / "rrdb.onnx")
    else:
        model = export_model(family, "tiny", tmp_path / f"{family}.onnx", seed=0)
    fused = ssic.compile(model, output_dir=tmp_path / "fused.ssic")
    plain = ssic.compile(model, output_dir=tmp_path / "plain.ssic", disabled_passes=["fuse-tile-conv"])
    ops_fused = [n.op_type for n in onnx.load(str(fused / "sparse.onnx"), load_external_data=False).graph.node]
    ops_plain = [n.op_type for n in onnx.load(str(plain / "sparse.onnx"), load_external_data=False).graph.node]
    assert "TileConv" not in ops_plain
    assert ops_fused.count("TileConv") >= 0.8 * ops_plain.count("TileGather")
    if family == "realesrgan":
        assert ops_plain.count("Gemm") > 0 and ops_fused.count("Gemm") == 0  # the concat-part chains fused too
    outs = []
    for art in (fused, plain):
        sess = ssic.load(art, threads=2)
        inputs = example_inputs(sess.manifest, seed=0)
        sess.prime(inputs)
        mask = brush_stroke_mask(sess.manifest.mask.height, sess.manifest.mask.width, 0.05, seed=1)
        outs.append(sess.edit(edited_inputs(sess.manifest, inputs, mask), mask=mask, mode="sparse"))
    for name in outs[0]:
        np.testing.assert_allclose(outs[0][name], outs[1][name], rtol=1e-4, atol=1e-4)
