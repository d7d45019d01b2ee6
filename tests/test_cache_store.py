"""ssic::CacheStore (the prime run's write of an NHWC cache and its per-channel moments) and the
fuse-cache-store pass.

- The C++ kernel equals ``ssic.ops.cache_store_ref`` bit for bit on the cache (float32, and float16
  rounded to nearest even like numpy, for every float32 class: normals, float16 subnormals, ties, the
  overflow threshold, infinities, NaN) and to float tolerance on the sums; the AVX2 path and the
  portable one (SSIC_DISABLE_AVX2 / SSIC_DISABLE_F16C in a subprocess) both; channel and width counts
  that are not multiples of 8.
- On DDIM, PD and GauGAN presets the default artefact's prime graph writes its NHWC caches with
  CacheStore (no Transpose left for them), and every cache it writes equals the one the artefact
  compiled with ``--disable-pass fuse-cache-store`` writes (bit for bit; GroupNorm sums to float
  tolerance).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

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
def _session(to: int) -> ort.InferenceSession:
    node = ops.make_node("CacheStore", ["x"], ["cache", "sum", "sumsq"], to=to)
    return op_session(node, {"x": TensorProto.FLOAT}, {"cache": to, "sum": TensorProto.DOUBLE, "sumsq": TensorProto.DOUBLE})


#: float32 values around every float16 rounding case: the largest half, the ties to inf, subnormal
#: halves and ties between them, the smallest normal half, zeros, infinities and NaN.
SPECIAL = np.array([65504, 65519.996, 65520, -65520, 1e5, 6.1035156e-05, 6.0975552e-05, 2**-24, 2**-25,
                    2**-25 * 1.0001, 3 * 2**-25, 1e-8, 1.0009765625, 1.00048828125, 1.00146484375, 0.0, -0.0,
                    np.inf, -np.inf, np.nan], np.float32)


def check(x: np.ndarray, to: int, got) -> None:
    want = ops.cache_store_ref(x, to=to)
    cache, s1, s2 = got
    assert cache.dtype == want[0].dtype and cache.shape == want[0].shape
    nan = np.isnan(want[0])
    assert np.array_equal(np.isnan(cache), nan)
    bits = np.uint16 if to == ops.CACHE_FLOAT16 else np.uint32
    assert np.array_equal(cache[~nan].view(bits), want[0][~nan].view(bits))
    finite = np.isfinite(x[0]).all(axis=(1, 2))
    scale = np.abs(x[0]).reshape(x.shape[1], -1).max(1, initial=0)[finite] * np.sqrt(x[0, 0].size)
    np.testing.assert_allclose(s1[finite], want[1][finite], rtol=1e-5, atol=1e-5 * (1 + float(scale.max(initial=0))))
    np.testing.assert_allclose(s2[finite], want[2][finite], rtol=1e-5,
                               atol=1e-5 * (1 + float(scale.max(initial=0)) ** 2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(1, 40), h=st.integers(1, 19), w=st.integers(1, 37), half=st.booleans(),
       seed=st.integers(0, 2**31 - 1), special=st.booleans())
def test_cache_store_matches_reference(c, h, w, half, seed, special):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, c, h, w)) * rng.choice([1e-6, 1.0, 3e4])).astype(np.float32)
    if special:
        flat = x.reshape(-1)
        n = min(flat.size, SPECIAL.size)
        flat[rng.choice(flat.size, n, replace=False)] = SPECIAL[:n]
    to = ops.CACHE_FLOAT16 if half else ops.CACHE_FLOAT
    with np.errstate(over="ignore", invalid="ignore"):
        check(x, to, _session(to).run(None, {"x": x}))


_PATHS = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_cache_store import SPECIAL, _session, check
from ssic import ops
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 21, 9, 27)).astype(np.float32) * 100
x.reshape(-1)[:SPECIAL.size] = SPECIAL
with np.errstate(over="ignore", invalid="ignore"):
    for to in (ops.CACHE_FLOAT, ops.CACHE_FLOAT16):
        check(x, to, _session(to).run(None, {"x": x}))
print(json.dumps("ok"))
"""


@pytest.mark.parametrize("disable", ["", "SSIC_DISABLE_AVX2", "SSIC_DISABLE_F16C"])
def test_every_code_path_gives_the_reference(disable):
    """The AVX2 transpose (the default on this CPU), and the portable blocks chosen by disabling AVX2 or
    F16C (then the float16 rounding is the portable float_to_half too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSIC_DISABLE_AVX2", "SSIC_DISABLE_F16C")}
    if disable:
        env[disable] = "1"
    out = subprocess.run([sys.executable, "-c", _PATHS, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == "ok"


def test_a_cache_output_of_another_type_is_an_error():
    """The cache output's type is the node's (left open in the op's registration); `to` must agree."""
    node = ops.make_node("CacheStore", ["x"], ["cache", "sum", "sumsq"], to=ops.CACHE_FLOAT16)
    sess = op_session(node, {"x": TensorProto.FLOAT},
                      {"cache": TensorProto.FLOAT, "sum": TensorProto.DOUBLE, "sumsq": TensorProto.DOUBLE})
    with pytest.raises(Exception, match="attribute to 10"):
        sess.run(None, {"x": np.zeros((1, 2, 3, 4), np.float32)})


@pytest.mark.parametrize("name", ["ddim", "pd", "gaugan"])
def test_fused_prime_writes_the_same_caches(name, tmp_path):
    from ssic.models import example_inputs, export_model

    model = tmp_path / "m.onnx"
    export_model(name, "tiny", model, seed=0)
    fused = ssic.compile(model, output_dir=tmp_path / "fused.ssic")
    plain = ssic.compile(model, output_dir=tmp_path / "plain.ssic", disabled_passes=["fuse-cache-store"])
    graph = onnx.load(str(fused / "prime.onnx"), load_external_data=False).graph
    stores = [n for n in graph.node if n.op_type == "CacheStore"]
    nhwc = [c for c in ssic.load(fused).manifest.caches if c.kind == "activation" and c.layout != "NCHW"]
    assert len(stores) == len(nhwc) > 0
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.name.startswith("ssic/prime")]
    inputs = example_inputs(name, "tiny", seed=0)
    got, want = ssic.load(fused), ssic.load(plain)
    _, caches_a, _ = got.backend.run_prime(got._check_inputs(inputs))
    _, caches_b, _ = want.backend.run_prime(want._check_inputs(inputs))
    assert set(caches_a) == set(caches_b)
    for k in caches_a:
        a, b = got.backend.host_view(caches_a[k]), want.backend.host_view(caches_b[k])
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if a.dtype == np.float64:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * (1 + np.abs(b).max()), err_msg=k)
        else:
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), k
