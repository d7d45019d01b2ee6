"""Run the TensorRT plugins' CUDA kernels on a GPU against ssic.ops's NumPy references, and time them.

Usage (on a host with an NVIDIA GPU and nvcc; ``run.sh`` beside this file builds the library first)::

    python plugins/trt/gpu_check/check_kernels.py LIB.so [--cases 200] [--quick] [--json OUT.json]

``LIB.so`` is ``kernel_api.cu`` built with the two kernel sources (see its header). The check runs
random TileGather and TileScatter cases (both index dtypes, both cache layouts, all pad modes and
activations, optional scale/shift/residual, duplicate tiles, clipped edge tiles) through the same
launchers the plugins' ``enqueue`` calls, and compares every output element with
``ssic.ops.tile_gather_ref`` / ``tile_scatter_ref`` (float32; tolerance 1e-5 absolute + 1e-5
relative; swish goes through ``expf``). Then it times both kernels on edit-sized layers (mean of
CUDA-event-timed launches, cell map included) and, where PyTorch with CUDA is importable, the dense
cuDNN convolution and the cuBLAS GEMM of the same layer for scale. Exit status 1 on any mismatch, 2
when the library or GPU is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from ssic import ops  # noqa: E402  (numpy + onnx only)


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(ctypes.c_void_p)


class Kernels:
    """ctypes view of ``libssic_trt_kernel_api.so``; raises ``RuntimeError`` with CUDA's message."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.ssic_error_string.restype = ctypes.c_char_p
        self.lib.ssic_error_string.argtypes = [ctypes.c_int]
        name = ctypes.create_string_buffer(256)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.ssic_device(name, 256, ctypes.byref(major), ctypes.byref(minor)), "device query")
        self.device = f"{name.value.decode()} (sm_{major.value}{minor.value})"

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what}: CUDA error {err}: {self.lib.ssic_error_string(err).decode()}")

    def gather(self, tiles, cache, src_idx, dst_idx, scale, shift, *, idx64: bool, iters: int = 0,
               baseline: bool = False, **a) -> tuple[np.ndarray, float]:
        """The plugin's TileGather launcher (or, with ``baseline``, the first per-element kernel)."""
        layout = a.get("src_layout", ops.LAYOUT_NHWC)
        hs, ws, c = cache.shape if layout == ops.LAYOUT_NHWC else cache.shape[2:] + cache.shape[1:2]
        t, k = a["tile"], a["kernel"]
        geom = np.array([hs, ws, c, a["src_tile"], t, k, a.get("stride", 1), a.get("pad_top", 0),
                         a.get("pad_left", 0), a.get("upsample", 1), a.get("activation", 0), layout,
                         len(src_idx), len(dst_idx), a.get("pad_mode", ops.PAD_ZEROS)], np.int64)
        it = np.int64 if idx64 else np.int32
        src, dst = np.ascontiguousarray(src_idx, it), np.ascontiguousarray(dst_idx, it)
        cols = np.empty((len(dst_idx) * t * t, k * k * c), np.float32)
        ms = ctypes.c_float(0.0)
        args = [np.ascontiguousarray(x, np.float32) if x is not None else None for x in (tiles, cache, scale, shift)]
        err = self.lib.ssic_tile_gather(_ptr(geom), ctypes.c_float(a.get("alpha", ops.DEFAULT_ALPHA)), int(idx64),
                                        int(baseline), *(_ptr(x) for x in args[:2]), _ptr(src), _ptr(dst),
                                        *(_ptr(x) for x in args[2:]), _ptr(cols), iters, ctypes.byref(ms))
        self._check(err, "TileGather")
        return cols, ms.value

    def scatter(self, tiles, cache, idx, residual, *, idx64: bool, iters: int = 0, tile: int,
                activation: int = 0, alpha: float = ops.DEFAULT_ALPHA) -> tuple[np.ndarray, float]:
        _, c, h, w = cache.shape
        geom = np.array([h, w, c, tile, activation, len(idx)], np.int64)
        it = np.int64 if idx64 else np.int32
        out = np.empty_like(cache, np.float32)
        ms = ctypes.c_float(0.0)
        res = None if residual is None else np.ascontiguousarray(residual, np.float32)
        err = self.lib.ssic_tile_scatter(_ptr(geom), ctypes.c_float(alpha), int(idx64),
                                         _ptr(np.ascontiguousarray(tiles, np.float32)),
                                         _ptr(np.ascontiguousarray(cache, np.float32)),
                                         _ptr(np.ascontiguousarray(idx, it)), _ptr(res), _ptr(out), iters,
                                         ctypes.byref(ms))
        self._check(err, "TileScatter")
        return out, ms.value


def _corners(rng, h: int, w: int, t: int, count: int, dup: bool) -> np.ndarray:
    cells = np.array([(y, x) for y in range(0, h, t) for x in range(0, w, t)], np.int64).reshape(-1, 2)
    pick = rng.choice(len(cells), size=min(count, len(cells)), replace=False)
    idx = cells[pick]
    if dup and len(idx):  # a corner listed twice: the later entry must win
        idx = np.concatenate([idx, idx[rng.integers(0, len(idx), size=2)]])
    return idx.reshape(-1, 2)


def gather_case(rng, case: int) -> tuple[dict, tuple]:
    hs, ws, ts = int(rng.integers(3, 40)), int(rng.integers(3, 40)), int(rng.integers(1, 9))
    k, stride = int(rng.choice([1, 3, 5])), int(rng.choice([1, 2]))
    up = 1 if stride == 2 else int(rng.choice([1, 2]))
    t, c = int(rng.integers(1, 9)), int(rng.integers(1, 17))
    pad_mode = int(rng.integers(0, 3))
    if pad_mode == ops.PAD_REFLECT and min(hs, ws) * up < k:
        pad_mode = ops.PAD_ZEROS
    attrs = dict(src_tile=ts, tile=t, kernel=k, stride=stride, pad_top=k // 2, pad_left=k // 2, upsample=up,
                 activation=int(rng.integers(0, 4)), alpha=float(rng.uniform(0.01, 0.3)),
                 src_layout=int(rng.integers(0, 2)), pad_mode=pad_mode)
    grid_cells = -(-hs // ts) * -(-ws // ts)
    src = _corners(rng, hs, ws, ts, int(rng.integers(0, grid_cells + 1)), dup=bool(rng.integers(0, 2)))
    oh = (hs * up + 2 * (k // 2) - k) // stride + 1
    ow = (ws * up + 2 * (k // 2) - k) // stride + 1
    dst = _corners(rng, oh, ow, t, int(rng.integers(1, -(-oh // t) * -(-ow // t) + 1)), dup=False)
    tiles = rng.standard_normal((len(src) * ts * ts, c)).astype(np.float32)
    shape = (hs, ws, c) if attrs["src_layout"] == ops.LAYOUT_NHWC else (1, c, hs, ws)
    cache = rng.standard_normal(shape).astype(np.float32)
    scale = rng.standard_normal(c).astype(np.float32) if rng.integers(0, 2) else None
    shift = rng.standard_normal(c).astype(np.float32) if rng.integers(0, 2) else None
    return attrs, (tiles, cache, src, dst, scale, shift)


def scatter_case(rng, case: int) -> tuple[dict, tuple]:
    h, w, t, c = int(rng.integers(1, 50)), int(rng.integers(1, 50)), int(rng.integers(1, 12)), int(rng.integers(1, 17))
    cells = -(-h // t) * -(-w // t)
    idx = _corners(rng, h, w, t, int(rng.integers(0, cells + 1)), dup=bool(rng.integers(0, 2)))
    tiles = rng.standard_normal((len(idx) * t * t, c)).astype(np.float32)
    residual = rng.standard_normal(tiles.shape).astype(np.float32) if rng.integers(0, 2) else None
    cache = rng.standard_normal((1, c, h, w)).astype(np.float32)
    attrs = dict(tile=t, activation=int(rng.integers(0, 4)), alpha=float(rng.uniform(0.01, 0.3)))
    return attrs, (tiles, cache, idx, residual)


def correctness(kern: Kernels, cases: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    worst = {"TileGather": 0.0, "TileScatter": 0.0}
    failures = []
    for case in range(cases):
        for op, make in (("TileGather", gather_case), ("TileScatter", scatter_case)):
            attrs, arrays = make(rng, case)
            idx64 = bool(case % 2)
            if op == "TileGather":
                want = ops.tile_gather_ref(*arrays, **attrs)
                got, _ = kern.gather(*arrays, idx64=idx64, baseline=case % 4 == 3, **attrs)
            else:
                want = ops.tile_scatter_ref(*arrays, **attrs)
                got, _ = kern.scatter(*arrays, idx64=idx64, **attrs)
            err = float(np.max(np.abs(got - want), initial=0.0))
            worst[op] = max(worst[op], err)
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                failures.append(f"{op} case {case} (idx64={idx64}) {attrs}: max abs error {err:.3g}")
    return {"cases_per_op": cases, "max_abs_error": worst, "failures": failures}


# Edit-sized layers: (name, H, W, C, cout, tile, active fraction, cache layout). As in the sparse
# graph, a TileGather reads the active tiles of its input plus the NHWC cache of the prime run around
# them (an NCHW source is a dense low-resolution value read in full) and feeds a 3x3 conv's GEMM
# ([n*t*t, 9C] x [9C, cout]); TileScatter writes the output tiles into the [1, cout, H, W] output.
# Shapes after DDIM's 256x256 top level, an SD-latent 64x64 level and a 32x32 level.
LAYERS = (("256x256 C=128 t=16", 256, 256, 128, 128, 16, 0.05, ops.LAYOUT_NHWC),
          ("256x256 C=128 t=16", 256, 256, 128, 128, 16, 0.30, ops.LAYOUT_NHWC),
          ("64x64 C=320 t=8", 64, 64, 320, 320, 8, 0.05, ops.LAYOUT_NHWC),
          ("32x32 C=640 t=4", 32, 32, 640, 640, 4, 0.05, ops.LAYOUT_NHWC),
          ("64x64 C=320 t=8 dense NCHW source", 64, 64, 320, 320, 8, 0.05, ops.LAYOUT_NCHW))


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_ms(torch, fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def timing(kern: Kernels, iters: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    torch = _torch_cuda()
    if torch is not None:  # float32 throughout, cuDNN's fastest algorithm for each shape
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    rows = []
    for name, h, w, c, cout, t, frac, layout in LAYERS:
        cells = (h // t) * (w // t)
        n = max(1, round(frac * cells))
        idx = _corners(rng, h, w, t, n, dup=False)
        if layout == ops.LAYOUT_NHWC:
            src_idx, tiles = idx, rng.standard_normal((n * t * t, c)).astype(np.float32)
            cache = rng.standard_normal((h, w, c)).astype(np.float32)
        else:
            src_idx, tiles = np.zeros((0, 2), np.int64), np.zeros((0, c), np.float32)
            cache = rng.standard_normal((1, c, h, w)).astype(np.float32)
        attrs = dict(src_tile=t if layout == ops.LAYOUT_NHWC else 1, tile=t, kernel=3, pad_top=1, pad_left=1,
                     src_layout=layout)
        cols, g_ms = kern.gather(tiles, cache, src_idx, idx, None, None, idx64=True, iters=iters, **attrs)
        _, b_ms = kern.gather(tiles, cache, src_idx, idx, None, None, idx64=True, iters=iters, baseline=True,
                              **attrs)
        out_tiles = rng.standard_normal((n * t * t, cout)).astype(np.float32)
        out_cache = rng.standard_normal((1, cout, h, w)).astype(np.float32)
        _, s_ms = kern.scatter(out_tiles, out_cache, idx, None, idx64=True, iters=iters, tile=t)
        read = tiles.nbytes + cols.nbytes // 9  # each source pixel read about once (L2 serves the taps)
        row = {"layer": name, "active_tiles": int(n), "grid_cells": int(cells), "fraction": n / cells,
               "gather_ms": g_ms, "gather_baseline_ms": b_ms, "scatter_ms": s_ms,
               "gather_GBps": (cols.nbytes + read) / g_ms / 1e6,
               "scatter_GBps": (2 * out_cache.nbytes + out_tiles.nbytes) / s_ms / 1e6}
        if torch is not None:
            x = torch.randn(1, c, h, w, device="cuda")
            wt = torch.randn(cout, c, 3, 3, device="cuda")
            a = torch.from_numpy(cols).cuda()
            b = wt.permute(2, 3, 1, 0).reshape(9 * c, cout).contiguous()
            conv = torch.nn.functional.conv2d
            row["dense_conv_ms"] = _torch_ms(torch, lambda x=x, wt=wt, conv=conv: conv(x, wt, padding=1), iters)
            row["sparse_gemm_ms"] = _torch_ms(torch, lambda a=a, b=b: a @ b, iters)
            row["sparse_layer_ms"] = g_ms + row["sparse_gemm_ms"] + s_ms
            row["speedup_vs_dense"] = row["dense_conv_ms"] / row["sparse_layer_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("library", help="libssic_trt_kernel_api.so built from kernel_api.cu")
    ap.add_argument("--cases", type=int, default=200, help="random cases per op (default 200)")
    ap.add_argument("--quick", action="store_true", help="a few small cases, no timing (for compute-sanitizer)")
    ap.add_argument("--iters", type=int, default=50, help="timed launches per layer (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        kern = Kernels(args.library)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"device: {kern.device}")
    result = {"device": kern.device, **correctness(kern, 8 if args.quick else args.cases, args.seed)}
    print(f"correctness: {result['cases_per_op']} cases per op, max abs error {result['max_abs_error']}, "
          f"{len(result['failures'])} failures")
    for line in result["failures"][:20]:
        print("  FAIL", line)
    if not args.quick:
        result["timing"] = timing(kern, args.iters, args.seed + 1)
        print("| layer | active | gather ms | first kernel ms | scatter ms | gather GB/s | scatter GB/s | GEMM ms "
              "| dense conv ms | dense / sparse layer |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["timing"]:
            print(f"| {r['layer']} | {r['active_tiles']}/{r['grid_cells']} | {r['gather_ms']:.4f} | "
                  f"{r['gather_baseline_ms']:.4f} | "
                  f"{r['scatter_ms']:.4f} | {r['gather_GBps']:.0f} | {r['scatter_GBps']:.0f} | "
                  f"{r.get('sparse_gemm_ms', float('nan')):.4f} | {r.get('dense_conv_ms', float('nan')):.4f} | "
                  f"{r.get('speedup_vs_dense', float('nan')):.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
