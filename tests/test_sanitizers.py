"""libssic_ort built with -fsanitize=address,undefined runs op cases without a sanitizer report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run in a subprocess with libasan preloaded: random cases of every op, checked against the
# references (so the sanitized build is also exercised on correct results).
CASES = textwrap.dedent(
    """
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto, helper
    from ssic import ops
    from ssic.library import get_library_path

    def run(op, feeds, **attrs):
        names = [i.name for i in ops.OPS[op].inputs]
        given = [n if feeds.get(n) is not None else "" for n in names]
        while given and given[-1] == "":
            given.pop()
        node = ops.make_node(op, given, ["out"], **attrs)
        ints = {"src_idx", "dst_idx", "idx"}
        vis = [helper.make_tensor_value_info(n, TensorProto.INT64 if n in ints else TensorProto.FLOAT, None)
               for n in given if n]
        g = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
        m = helper.make_model(g, opset_imports=ops.opset_imports(), ir_version=10)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.register_custom_ops_library(get_library_path())
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return s.run(None, {n: feeds[n] for n in given if n})[0]

    def corners(rng, h, w, t, p):
        c = [(y, x) for y in range(0, h, t) for x in range(0, w, t) if rng.random() < p]
        return np.array(c, np.int64).reshape(-1, 2)

    rng = np.random.default_rng(0)
    for case in range(40):
        c = int(rng.integers(1, 20)); ts = int(rng.integers(1, 7)); t = int(rng.integers(1, 7))
        k = int(rng.choice([1, 3, 5])); s = int(rng.choice([1, 2])); u = int(rng.choice([1, 2]))
        hs = int(rng.integers(1, 15)); ws = int(rng.integers(1, 15)); layout = case % 2
        p = [0.0, 1.0, 0.4][case % 3]
        src = corners(rng, hs, ws, ts, p)
        dst = corners(rng, -(-hs * u // s) + t, -(-ws * u // s) + t, t, [1.0, 0.5, 0.0][case % 3])
        cache = rng.standard_normal((hs, ws, c)).astype(np.float32)
        if layout:
            cache = np.ascontiguousarray(cache.transpose(2, 0, 1)[None])
        feeds = dict(tiles=rng.standard_normal((len(src) * ts * ts, c)).astype(np.float32), cache=cache,
                     src_idx=src, dst_idx=dst,
                     scale=rng.standard_normal(c).astype(np.float32) if case % 4 < 2 else None,
                     shift=rng.standard_normal(c).astype(np.float32) if case % 4 in (0, 2) else None)
        attrs = dict(src_tile=ts, tile=t, kernel=k, stride=s, pad_top=int(rng.integers(0, k + 1)),
                     pad_left=int(rng.integers(0, k + 1)), upsample=u, activation=case % 4, src_layout=layout)
        got = run("TileGather", feeds, **attrs)
        want = ops.tile_gather_ref(feeds["tiles"], feeds["cache"], src, dst, feeds["scale"], feeds["shift"], **attrs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

        h, w = hs, ws
        idx = corners(rng, h, w, t, p)
        rows = len(idx) * t * t
        feeds = dict(tiles=rng.standard_normal((rows, c)).astype(np.float32),
                     cache=rng.standard_normal((1, c, h, w)).astype(np.float32), idx=idx,
                     residual=rng.standard_normal((rows, c)).astype(np.float32) if case % 2 else None)
        got = run("TileScatter", feeds, tile=t, activation=case % 4)
        want = ops.tile_scatter_ref(feeds["tiles"], feeds["cache"], idx, feeds["residual"], tile=t, activation=case % 4)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Error paths must not leak or touch memory either.
    try:
        run("TileScatter", dict(tiles=np.zeros((4, 2), np.float32), cache=np.zeros((1, 2, 4, 4), np.float32),
                                idx=np.array([[1, 0]], np.int64)), tile=2)
    except Exception as e:
        assert "multiple of 2" in str(e)
    else:
        raise AssertionError("bad corner accepted")
    print("SANITIZED-CASES-OK")
    """
)


def _runtime(name: str) -> str | None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def test_ops_under_asan_ubsan(tmp_path):
    asan = _runtime("libasan.so")
    if asan is None or _runtime("libubsan.so") is None:
        pytest.skip("the compiler has no AddressSanitizer/UBSan runtime (libasan.so/libubsan.so)")
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), "-DSSIC_SANITIZE=ON", "-DSSIC_BUILD_TESTS=OFF",
                    "-DCMAKE_BUILD_TYPE=Debug"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "ssic_ort", "-j2"], check=True, capture_output=True)
    lib = next(build.rglob("libssic_ort.so"))
    env = dict(os.environ)
    env.update(
        SSIC_ORT_LIBRARY=str(lib),
        # libstdc++ preloaded too: python does not link it, and ASan's __cxa_throw interceptor
        # must find the real one when ONNX Runtime raises an error (the error-path case below).
        LD_PRELOAD=os.pathsep.join(p for p in (asan, _runtime("libstdc++.so.6")) if p),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=23",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=24",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, "-c", CASES], env=env, capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-4000:]
    assert "SANITIZED-CASES-OK" in proc.stdout
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "SUMMARY: UndefinedBehaviorSanitizer"):
        assert marker not in report, report[-4000:]
