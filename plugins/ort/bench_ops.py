"""Microbenchmark of libssic_ort (not a test): TileGather and TileScatter at DESIGN.md 1b's size.

TileGather: 128-channel 256x256 NHWC source, 3x3 kernel, pad 1, ~2% and ~10% active tiles,
t = 4, 8, 16 (source tiles of the same size, half of them new). TileScatter: the matching
128-channel 256x256 NCHW output. Prints ms per call and GB/s (bytes written + bytes read).

    python plugins/ort/bench_ops.py [--threads 2] [--repeat 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from ssic import ops
from ssic.library import get_library_path, library_version

C, H, W, K = 128, 256, 256, 3


def _session(node, inputs, threads):
    vis = [helper.make_tensor_value_info(n, TensorProto.INT64 if n.endswith("idx") else TensorProto.FLOAT, None)
           for n in inputs]
    graph = helper.make_graph([node], "bench", vis, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=ops.opset_imports(), ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _time(sess, feeds, out_shape, repeat):
    """Median ms of run_with_iobinding with inputs and the output bound once (no copies in the loop)."""
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
    binding.bind_ortvalue_output("out", ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32))
    for _ in range(3):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _tiles(rng, t, frac):
    cells = [(y, x) for y in range(0, H, t) for x in range(0, W, t)]
    n = max(1, round(frac * len(cells)))
    # A compact blob (a brush edit), not scattered cells: rows of the grid around the centre.
    cy, cx = H // 2, W // 2
    cells.sort(key=lambda c: (c[0] + t / 2 - cy) ** 2 + (c[1] + t / 2 - cx) ** 2)
    return np.array(sorted(cells[:n]), dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"libssic_ort {library_version()} ({get_library_path()}), {args.threads} threads")

    cache_nhwc = rng.standard_normal((H, W, C)).astype(np.float32)
    cache_nchw = rng.standard_normal((1, C, H, W)).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(10):
        cache_nchw.copy()
    copy_ms = (time.perf_counter() - t0) / 10 * 1e3
    print(f"reference: numpy copy of a {cache_nchw.nbytes / 1e6:.1f} MB tensor: {copy_ms:.2f} ms "
          f"({2 * cache_nchw.nbytes / copy_ms / 1e6:.1f} GB/s)")
    print(f"{'op':<12}{'t':>4}{'active':>8}{'tiles':>7}{'out MB':>9}{'ms':>9}{'GB/s':>8}  variant")
    for t in (4, 8, 16):
        for frac in (0.02, 0.10):
            dst = _tiles(rng, t, frac)
            src = dst[::2].copy()
            n, m = len(dst), len(src)
            scale = rng.standard_normal(C).astype(np.float32)
            shift = rng.standard_normal(C).astype(np.float32)
            tiles = rng.standard_normal((m * t * t, C)).astype(np.float32)
            out_shape = [n * t * t, K * K * C]
            out_bytes = 4 * out_shape[0] * out_shape[1]
            for variant, act, affine in (("copy", 0, False), ("scale/shift+swish", 3, True)):
                inputs = ["tiles", "cache", "src_idx", "dst_idx"] + (["scale", "shift"] if affine else [])
                node = ops.make_node("TileGather", inputs, ["out"], src_tile=t, tile=t, kernel=K,
                                     pad_top=1, pad_left=1, activation=act)
                feeds = dict(tiles=tiles, cache=cache_nhwc, src_idx=src, dst_idx=dst)
                if affine:
                    feeds.update(scale=scale, shift=shift)
                ms = _time(_session(node, inputs, args.threads), feeds, out_shape, args.repeat)
                moved = 2 * out_bytes  # every output float is written once and read (about) once
                print(f"{'TileGather':<12}{t:>4}{frac:>8.0%}{n:>7}{out_bytes / 1e6:>9.1f}{ms:>9.3f}"
                      f"{moved / ms / 1e6:>8.1f}  {variant}")
            node = ops.make_node("TileScatter", ["tiles", "cache", "idx"], ["out"], tile=t)
            feeds = dict(tiles=rng.standard_normal((n * t * t, C)).astype(np.float32), cache=cache_nchw, idx=dst)
            ms = _time(_session(node, list(feeds), args.threads), feeds, [1, C, H, W], args.repeat)
            moved = 2 * cache_nchw.nbytes + 2 * feeds["tiles"].nbytes
            print(f"{'TileScatter':<12}{t:>4}{frac:>8.0%}{n:>7}{cache_nchw.nbytes / 1e6:>9.1f}{ms:>9.3f}"
                  f"{moved / ms / 1e6:>8.1f}  copy cache + overwrite")


if __name__ == "__main__":
    main()
