"""Microbenchmark (not a test): TileGather and TileConv of two builds of libssic_ort, side by side.

Each case runs one op of build A and of build B alternately (9 rounds, 1 thread, min time), on the
shapes of the models' gathers: DDIM-like (float16 cache, GroupNorm affine + swish), GauGAN-like
(float32, no epilogue), Real-ESRGAN-like (float16, leaky relu). Prints both times, the ratio and the
largest difference between the outputs (0 when only speed changed).

    python plugins/ort/bench_ab.py A/libssic_ort.so B/libssic_ort.so
    python plugins/ort/bench_ab.py --fusion [--threads 2]

``--fusion`` instead compares, in the installed library, TileGather followed by ONNX Runtime's MatMul
and bias Add (what `--disable-pass fuse-tile-conv` compiles) with the one TileConv node the pass builds,
on the shapes of FUSION_CASES (BENCHMARKS.md, "fused gather + GEMM").
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ssic import ops

CASES = [  # label, H, W, C, cout, active fraction, float16 cache, activation, affine
    ("ddim-like 64x64 C256 f16 gn+swish 10%", 64, 64, 256, 256, 0.10, True, ops.ACT_SWISH, True),
    ("ddim-like 256x256 C128 f16 gn+swish 5%", 256, 256, 128, 128, 0.05, True, ops.ACT_SWISH, True),
    ("gaugan-like 128x256 C256 f32 5%", 128, 256, 256, 256, 0.05, False, ops.ACT_IDENTITY, False),
    ("esrgan-like 256x256 C64 f16 lrelu 5%", 256, 256, 64, 32, 0.05, True, ops.ACT_LEAKY_RELU, False),
    ("esrgan-like 256x256 C64 f32 5%", 256, 256, 64, 32, 0.05, False, ops.ACT_IDENTITY, False),
]


FUSION_CASES = [  # label, H, W, C, cout, active fraction, float16 cache, activation, affine
    ("GauGAN 16x32 C1024", 16, 32, 1024, 1024, 0.07, False, ops.ACT_IDENTITY, False),
    ("GauGAN 64x128 C512", 64, 128, 512, 512, 0.06, False, ops.ACT_IDENTITY, False),
    ("GauGAN 64x128 C128", 64, 128, 128, 128, 0.06, False, ops.ACT_IDENTITY, False),
    ("GauGAN 256x512 C128->64", 256, 512, 128, 64, 0.023, False, ops.ACT_IDENTITY, False),
    ("DDIM 64x64 C256 f16 gn+swish", 64, 64, 256, 256, 0.10, True, ops.ACT_SWISH, True),
    ("DDIM 128x128 C256 f16 gn+swish", 128, 128, 256, 256, 0.05, True, ops.ACT_SWISH, True),
    ("DDIM 256x256 C128 f16 gn+swish", 256, 256, 128, 128, 0.05, True, ops.ACT_SWISH, True),
    ("DDIM 32x32 C512 f16 gn+swish", 32, 32, 512, 512, 0.15, True, ops.ACT_SWISH, True),
    ("ESRGAN 256x256 C192->32 f16 lrelu", 256, 256, 192, 32, 0.05, True, ops.ACT_LEAKY_RELU, False),
    ("ESRGAN 256x256 C64->64 f16", 256, 256, 64, 64, 0.05, True, ops.ACT_IDENTITY, False),
]


def _session(lib: str, nodes, names: list[str], inits, cache_type: int, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session of ``nodes`` (graph inputs ``names``, output ``out``) with library ``lib``."""

    def kind(n: str) -> int:
        return TensorProto.INT64 if "idx" in n else cache_type if n == "cache" else TensorProto.FLOAT

    vis = [helper.make_tensor_value_info(n, kind(n), None) for n in names]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    model = helper.make_model(helper.make_graph(nodes, "ab", vis, out, inits),
                              opset_imports=ops.opset_imports(), ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(case: tuple, t: int) -> tuple[np.random.Generator, dict[str, np.ndarray]]:
    """The case's tile corners (a seeded ``frac`` of the grid, used as both source and output tiles),
    new tiles and cache; returns the generator for the case's weights."""
    _, h, w, c, _, frac, f16, _, _ = case
    rng = np.random.default_rng(0)
    cells = [(y, x) for y in range(0, h, t) for x in range(0, w, t)]
    chosen = sorted(rng.choice(len(cells), max(1, int(len(cells) * frac)), replace=False))
    idx = np.array([cells[i] for i in chosen], np.int64)
    feeds = dict(tiles=rng.standard_normal((len(idx) * t * t, c)).astype(np.float32),
                 cache=rng.standard_normal((h, w, c)).astype(np.float16 if f16 else np.float32),
                 src_idx=idx, dst_idx=idx)
    return rng, feeds


def _alternate(sessions: list, feeds: dict, rounds: int) -> list[float]:
    """Min milliseconds of each session over ``rounds`` rounds that run them one after the other."""
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for j, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[j].append(time.perf_counter() - t0)
    return [min(x) * 1e3 for x in times]


def run_fusion_case(case: tuple, threads: int, rounds: int, t: int = 2) -> None:
    from ssic.library import get_library_path

    label, _, _, c, cout, _, f16, act, affine = case
    rng, feeds = _feeds(case, t)
    matrix = (rng.standard_normal((9 * c, cout)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    epi = ["scale", "shift"] if affine else []
    epi_inits = [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), n) for n in epi]
    attrs = dict(src_tile=t, tile=t, kernel=3, pad_top=1, pad_left=1, activation=act)
    src = ["tiles", "cache", "src_idx", "dst_idx"]
    unfused = [ops.make_node("TileGather", src + epi, ["cols"], **attrs),
               helper.make_node("MatMul", ["cols", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["out"])]
    fused = [ops.make_node("TileConv", src + ["w"] + (epi or ["", ""]) + ["b"], ["out"], cout=cout, **attrs)]
    cache_type = TensorProto.FLOAT16 if f16 else TensorProto.FLOAT
    lib, b_init = get_library_path(), numpy_helper.from_array(bias, "b")
    sessions = [
        _session(lib, unfused, list(feeds), [numpy_helper.from_array(matrix, "w"), b_init] + epi_inits,
                 cache_type, threads),
        _session(lib, fused, list(feeds), [numpy_helper.from_array(ops.pack_weight(matrix), "w"), b_init] + epi_inits,
                 cache_type, threads),
    ]
    a, b = _alternate(sessions, feeds, rounds)
    m = len(feeds["dst_idx"]) * t * t
    print(f"{label:36s} M {m:6d} K {9 * c:5d} N {cout:5d}: TileGather+MatMul {a:7.2f} ms  "
          f"TileConv {b:7.2f} ms  {a / b:.2f}x")


def run_case(libs: list[str], op: str, case: tuple, threads: int, rounds: int, t: int = 2) -> None:
    label, _, _, c, cout, _, f16, act, affine = case
    rng, feeds = _feeds(case, t)
    inputs, inits = ["tiles", "cache", "src_idx", "dst_idx"], []
    attrs = dict(src_tile=t, tile=t, kernel=3, pad_top=1, pad_left=1, activation=act)
    if op == "TileConv":
        weight = ops.pack_weight(rng.standard_normal((9 * c, cout)).astype(np.float32))
        inits.append(numpy_helper.from_array(weight, "weight"))
        inputs.append("weight")
        attrs["cout"] = cout
    if affine:
        for name in ("scale", "shift"):
            inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), name))
            inputs.append(name)
    node = ops.make_node(op, inputs, ["out"], **attrs)
    cache_type = TensorProto.FLOAT16 if f16 else TensorProto.FLOAT
    try:
        sessions = [_session(lib, [node], list(feeds), inits, cache_type, threads) for lib in libs]
    except Exception as e:  # noqa: BLE001 - e.g. an older build without TileConv
        print(f"{op:10s} {label:40s} skipped: {str(e).splitlines()[0][:80]}")
        return
    results = [s.run(None, feeds)[0] for s in sessions]
    a, b = _alternate(sessions, feeds, rounds)
    diff = float(np.abs(results[0] - results[1]).max())
    print(f"{op:10s} {label:40s} A {a:7.2f} ms  B {b:7.2f} ms  A/B {a / b:.2f}x  max diff {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lib_a", nargs="?")
    ap.add_argument("lib_b", nargs="?")
    ap.add_argument("--fusion", action="store_true", help="TileGather+MatMul vs TileConv (installed library)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads [1; --fusion: 2]")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    if args.fusion:
        for case in FUSION_CASES:
            run_fusion_case(case, args.threads or 2, args.rounds)
        return
    if not (args.lib_a and args.lib_b):
        ap.error("give two library paths, or --fusion")
    args.threads = args.threads or 1
    for op in ("TileGather", "TileConv"):
        for case in CASES:
            run_case([args.lib_a, args.lib_b], op, case, args.threads, args.rounds)


if __name__ == "__main__":
    main()
