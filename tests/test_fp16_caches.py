"""float16 caches (``cache_dtype="float16"``): the kernels, the compiled graphs, the memory and the error.

The ops read a float16 cache as its exact float32 value, so the kernels must equal the NumPy reference
on ``cache.astype(float32)`` (to the same tolerance as with a float32 cache, and bit for bit where no
arithmetic follows the read). A compiled model with float16 caches holds half the cache bytes and its
sparse output differs from the float32-cache output only by the caches' rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto

import ssic
from ssic import ops
from ssic.artefact import read_manifest
from ssic.errors import SSICError
from tests.test_ops_kernels import run_op  # one single-node session builder for every kernel test


def _corners(rng, h: int, w: int, t: int, frac: float) -> np.ndarray:
    cells = [(y, x) for y in range(0, h, t) for x in range(0, w, t) if rng.random() < frac]
    return np.array(cells, np.int64).reshape(-1, 2)


GATHER_CASES = [  # (layout, kernel, stride, upsample, activation, affine, pad_mode)
    (ops.LAYOUT_NHWC, 3, 1, 1, ops.ACT_IDENTITY, False, ops.PAD_ZEROS),
    (ops.LAYOUT_NHWC, 3, 1, 1, ops.ACT_SWISH, True, ops.PAD_ZEROS),
    (ops.LAYOUT_NHWC, 3, 2, 1, ops.ACT_LEAKY_RELU, True, ops.PAD_REFLECT),
    (ops.LAYOUT_NHWC, 3, 1, 2, ops.ACT_RELU, False, ops.PAD_EDGE),
    (ops.LAYOUT_NHWC, 1, 1, 1, ops.ACT_IDENTITY, False, ops.PAD_ZEROS),
    (ops.LAYOUT_NCHW, 3, 1, 1, ops.ACT_IDENTITY, False, ops.PAD_ZEROS),
    (ops.LAYOUT_NCHW, 5, 2, 2, ops.ACT_SWISH, True, ops.PAD_REFLECT),
]


@pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tile_gather_with_float16_cache_equals_reference(case):
    layout, k, s, u, act, affine, pad_mode = case
    rng = np.random.default_rng(k * 100 + s * 10 + u + act)
    # C = 19: the vector conversion's 8-wide loop and its scalar tail both run
    c, hs, ws, ts, t = 19, 13, 11, 2, 3
    cache = (3 * rng.standard_normal((hs, ws, c))).astype(np.float16)
    if layout == ops.LAYOUT_NCHW:
        cache = np.ascontiguousarray(cache.transpose(2, 0, 1)[None])
    src_idx = _corners(rng, hs, ws, ts, 0.4)
    ho, wo = -(-hs * u // s), -(-ws * u // s)
    feeds = dict(tiles=rng.standard_normal((len(src_idx) * ts * ts, c)).astype(np.float32), cache=cache,
                 src_idx=src_idx, dst_idx=_corners(rng, ho + t, wo + t, t, 0.7),
                 scale=rng.standard_normal(c).astype(np.float32) if affine else None,
                 shift=rng.standard_normal(c).astype(np.float32) if affine else None)
    attrs = dict(src_tile=ts, tile=t, kernel=k, stride=s, pad_top=k // 2, pad_left=k // 2, upsample=u,
                 activation=act, src_layout=layout, pad_mode=pad_mode)
    got = run_op("TileGather", feeds, **attrs)
    want = ops.tile_gather_ref(*(feeds[n] for n in ("tiles", "cache", "src_idx", "dst_idx", "scale", "shift")),
                               **attrs)
    assert got.dtype == np.float32 and got.shape == want.shape
    if act == ops.ACT_IDENTITY and not affine:  # a plain read: the exact float32 value of each half
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the same as the float32 kernel on the widened cache
    wide = run_op("TileGather", feeds | {"cache": cache.astype(np.float32)}, **attrs)
    np.testing.assert_array_equal(got, wide)


@pytest.mark.parametrize("residual", [False, True])
def test_tile_scatter_with_float16_cache_equals_reference(residual):
    rng = np.random.default_rng(5)
    c, h, w, t = 21, 17, 15, 4
    idx = _corners(rng, h, w, t, 0.5)
    rows = len(idx) * t * t
    feeds = dict(tiles=rng.standard_normal((rows, c)).astype(np.float32),
                 cache=rng.standard_normal((1, c, h, w)).astype(np.float16), idx=idx,
                 residual=rng.standard_normal((rows, c)).astype(np.float32) if residual else None)
    got = run_op("TileScatter", feeds, tile=t, activation=ops.ACT_SWISH)
    want = ops.tile_scatter_ref(feeds["tiles"], feeds["cache"], idx, feeds["residual"], tile=t,
                                activation=ops.ACT_SWISH)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# Every float16 bit pattern through TileScatter (no tiles: the output is the converted cache) and an
# identity 1x1 TileGather (the NHWC read); NaNs compare as NaNs (F16C quietens signalling NaNs).
_ALL_HALVES = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_ops_kernels import run_op
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    want = halves.astype(np.float32)
    def same(got):
        got = got.ravel()
        nan = np.isnan(want)
        return bool(np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32),
                                                                           want[~nan].view(np.uint32)))
    scatter = run_op("TileScatter", dict(tiles=np.zeros((0, 256), np.float32), cache=halves.reshape(1, 256, 16, 16),
                                         idx=np.zeros((0, 2), np.int64)), tile=1)
    nchw = halves.reshape(1, 256, 16, 16)
    expect_scatter = nchw.astype(np.float32)
    gather = run_op("TileGather", dict(tiles=np.zeros((0, 64), np.float32), cache=halves.reshape(32, 32, 64),
                                       src_idx=np.zeros((0, 2), np.int64),
                                       dst_idx=np.array([(y, x) for y in range(32) for x in range(32)], np.int64)),
                    src_tile=1, tile=1, kernel=1)
    print(json.dumps({"scatter": same(scatter), "gather": same(gather)}))
""")


@pytest.mark.parametrize("path", ["dispatched", "portable"])
def test_every_half_converts_exactly(path):
    """The runtime-dispatched conversion (F16C on most x86 CPUs) and the portable one, forced with
    SSIC_DISABLE_F16C=1, both give numpy's value for all 65,536 float16 bit patterns."""
    env = dict(os.environ)
    env.pop("SSIC_DISABLE_F16C", None)
    if path == "portable":
        env["SSIC_DISABLE_F16C"] = "1"
    out = subprocess.run([sys.executable, "-c", _ALL_HALVES, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"scatter": True, "gather": True}


# ---------------------------------------------------------------------------------------- compiled
class Net(torch.nn.Module):
    """Convs at two resolutions, a skip concat and activations: the caches are gather sources (NHWC) and
    the output (NCHW); the kernel tests above cover float16 NCHW reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h = torch.nn.functional.leaky_relu(self.c0(x), 0.2)
        h = torch.nn.functional.silu(self.c1(h)) + h
        d = torch.relu(self.c2(torch.relu(self.down(h))))
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return self.out(torch.cat([u, h], 1))


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp16")
    path = tmp / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 48, 48),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    out = {}
    for dtype in ("float32", "float16"):
        for lowering in ("fused", "standard"):
            out[dtype, lowering] = ssic.compile(path, output_dir=tmp / f"{dtype}-{lowering}.ssic", exact=True,
                                                cache_dtype=dtype, lowering=lowering)
    return out


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 48, 48)).astype(np.float32)
    edited = x.copy()
    edited[:, :, 14:22, 20:31] += rng.standard_normal((1, 3, 8, 11)).astype(np.float32)
    return x, edited


def test_cache_bytes_halve(arts):
    m32, m16 = read_manifest(arts["float32", "fused"]), read_manifest(arts["float16", "fused"])
    assert {c.kind for c in m16.caches} == {"activation"}
    assert [(c.name, c.shape) for c in m16.caches] == [(c.name, c.shape) for c in m32.caches]
    assert {c.dtype for c in m32.caches} == {"float32"}
    # every cache is float16 but the model output's own (returned as is outside the active tiles)
    dtypes = {c.source: c.dtype for c in m16.caches}
    assert dtypes.pop("y") == "float32"
    assert set(dtypes.values()) == {"float16"}
    out_bytes = next(c.nbytes for c in m16.caches if c.source == "y")
    assert 2 * (m16.cache_bytes() - out_bytes) == m32.cache_bytes() - out_bytes
    # the prime graph really returns tensors of those types and sizes, and the session counts them
    x, _ = _inputs()
    held = {}
    for dtype in ("float32", "float16"):
        s = ssic.load(arts[dtype, "fused"], threads=1)
        _, caches, nbytes = s.backend.run_prime({"x": x})
        arrays = {k: v.numpy() for k, v in caches.items()}
        m = read_manifest(arts[dtype, "fused"])
        assert {k: str(a.dtype) for k, a in arrays.items()} == {c.name: c.dtype for c in m.caches}
        held[dtype] = sum(a.nbytes for a in arrays.values())
        assert nbytes == held[dtype] == m.cache_bytes()
        s.prime({"x": x})
        assert s.cache_bytes() == held[dtype]
    assert held["float16"] < 0.6 * held["float32"]


def test_exact_output_within_float16_rounding_of_float32_caches(arts):
    """Exact mode: with float32 caches the sparse output equals dense (float tolerance); float16 caches
    add only their rounding, where the recomputed tiles read cached neighbours. float16 keeps 11
    significant bits (relative error <= 2^-11, 66 dB below the value); a few 3x3 convs sum such errors
    over their taps with the weights' gain, so we require >= 60 dB of PSNR against the float32-cache
    output over the pixels the edit changed (peak = the output's range), well above an 8-bit image's
    48 dB; measured: 112 dB (only the changed pixels near the edge of the active region read cached
    neighbours). Pixels outside the active tiles come from the output's own float32 cache: unchanged.
    The fused and standard lowerings agree to float tolerance."""
    x, edited = _inputs()
    outs = {}
    for key, art in arts.items():
        s = ssic.load(art, threads=1)
        primed = s.prime({"x": x})["y"]
        outs[key] = s.edit({"x": edited}, mode="sparse")["y"]
        assert s.last.mode == "sparse"
    dense = ssic.load(arts["float32", "fused"], threads=1).dense({"x": edited})["y"]
    np.testing.assert_allclose(outs["float32", "fused"], dense, atol=1e-5)
    changed = np.abs(dense - primed) > 1e-6
    assert 0.05 < changed.mean() < 0.6
    peak = float(np.ptp(outs["float32", "fused"]))
    f16, f32 = outs["float16", "fused"], outs["float32", "fused"]
    inside = psnr(f16[changed], f32[changed], peak)
    assert 60 <= inside < 200, f"float16 caches: {inside:.1f} dB vs float32 caches inside the edit"  # < 200: rounded
    np.testing.assert_array_equal(f16[~changed & (f16 == primed)], f32[~changed & (f16 == primed)])
    assert (f16[~changed] == primed[~changed]).mean() > 0.5  # most unchanged pixels: the primed output as is
    for dtype in ("float32", "float16"):
        np.testing.assert_allclose(outs[dtype, "standard"], outs[dtype, "fused"], atol=1e-5)


def test_standard_lowering_reads_float16_caches_with_stock_ops(arts):
    import onnx

    sparse = onnx.load(str(arts["float16", "standard"] / "sparse.onnx"))
    assert not any(n.domain == "ssic" for n in sparse.graph.node)
    types = {i.name: i.type.tensor_type.elem_type for i in sparse.graph.input if i.name.startswith("ssic.cache.")}
    assert types.pop("ssic.cache.nchw.y") == TensorProto.FLOAT
    assert types and set(types.values()) == {TensorProto.FLOAT16}
    assert any(n.op_type == "Cast" for n in sparse.graph.node)


def test_defaults_trt_and_exact_keep_float32():
    from ssic.options import resolve_options

    o = resolve_options({"target": "trt"})
    assert (o.cache_dtype, o.sources["cache_dtype"]) == ("float32", "target:trt")
    assert resolve_options({}).cache_dtype == "float16"
    # unbounded exact mode keeps float32 (its contract: sparse == dense to float tolerance); a radius
    # budget bounds it anyway, so float16's rounding is no loss there
    assert resolve_options({"exact": True}).cache_dtype == "float32"
    assert resolve_options({"exact": True, "cache_dtype": "float16"}).cache_dtype == "float16"
    assert resolve_options({"radius_budget": 8}).cache_dtype == "float16"
    with pytest.raises(SSICError, match="cache-dtype float16 is not supported with --target trt"):
        resolve_options({"target": "trt", "cache_dtype": "float16"})
