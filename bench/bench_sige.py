"""The SIGE engine side by side: SIGE sparse vs PyTorch dense on the full models, same weights, same masks.

Runs only in ``make bench-sige`` (needs ``sige`` 0.3.0, installed by ``bench/install_sige.sh``), never
in CI. For each model (DDIM full, GauGAN full) and each edit (the real edit pair of
``../shared/data/edits`` and seeded brush-stroke masks of 1.2%, 5%, 15%, 30%):

1. build the ssic PyTorch model (``ssic.models.build_model(name, "full", seed=0)``) and its SIGE
   variant with the same weights (``bench/sige_models.py``);
2. SIGE's mode switching: a full run on the original input fills the caches, ``set_masks`` with
   SIGE's own per-resolution masks, then sparse runs on the edited input;
3. time SIGE sparse and PyTorch dense alternately (warm-ups first, median of ``--runs``), with
   ``--threads`` intra-op threads (2 by default);
4. compare SIGE's sparse output with the PyTorch dense model on the edited input: max abs error,
   PSNR inside / outside the mask (``ssic.quality.compare``; peak 2 for GauGAN's [-1, 1] image,
   the dense output's value range for DDIM's eps), beside the PSNR of doing nothing.

Edited inputs:
- DDIM real (``church``): SDEdit input at t = 500 (SIGE's noise level): ``x = sqrt(a) img +
  sqrt(1 - a) noise`` (noise seeded 0) for the original image; the edited input is the same with
  the edited image inside the mask and the original outside (SDEdit's blend). Mask: ``|orig - edited|
  > 0.01`` any channel, dilated by a square of radius 5.
- GauGAN real (``cityscapes``): one-hot label + instance-edge input of the ground-truth and the
  synthetic label/instance maps; mask: where the label or the instance edge differs, dilated by 1.
- brush edits (``brush1.2`` ...): ``ssic.models.example_inputs(name, "full", seed=0)`` changed inside
  ``ssic.masks.brush_stroke_mask(H, W, area, seed=0)`` exactly as ``ssic.bench.edited_inputs`` does
  (DDIM: + 0.5 N(0,1) clipped to [-1, 1]; GauGAN: the label shifted to another class).

Usage::

    python bench/bench_sige.py --out bench_out/sige.json [--models ddim,gaugan] [--edits real,1.2,5,15,30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BRUSH_AREAS = (0.012, 0.05, 0.15, 0.30)
DDIM_T = 500


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------ edits


def _ddim_real(cfg):
    from ssic.masks import difference_mask, dilate, load_edit_pair

    pair = load_edit_pair("church")
    if pair is None:
        return None
    a = pair["original"].transpose(2, 0, 1)[None].astype(np.float32)
    b = pair["edited"].transpose(2, 0, 1)[None].astype(np.float32)
    mask = dilate(difference_mask(a, b, eps=0.01, channel_axis=1), 5)
    alpha = float(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[DDIM_T])
    noise = np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
    xa = (np.sqrt(alpha) * a + np.sqrt(1 - alpha) * noise).astype(np.float32)
    xb = (np.sqrt(alpha) * b + np.sqrt(1 - alpha) * noise).astype(np.float32)
    xb = np.where(mask[None, None], xb, xa).astype(np.float32)
    t = np.array([float(DDIM_T)], np.float32)
    return {"x": xa, "t": t}, {"x": xb, "t": t}, mask


def _gaugan_real(cfg):
    from ssic.masks import dilate, label_difference_mask, load_edit_pair
    from ssic.models.gaugan import make_gaugan_input

    pair = load_edit_pair("cityscapes")
    if pair is None:
        return None
    sa = make_gaugan_input(pair["label_a"], pair["instance_a"], label_nc=cfg.label_nc)
    sb = make_gaugan_input(pair["label_b"], pair["instance_b"], label_nc=cfg.label_nc)
    mask = dilate(label_difference_mask(pair["label_a"], pair["label_b"], pair["instance_a"], pair["instance_b"]), 1)
    return {"seg": sa}, {"seg": sb}, mask


def _brush(name, area, seed=7, base="sdedit", preset="full"):
    from ssic.masks import brush_stroke_mask, load_edit_pair
    from ssic.models import example_inputs

    inputs = {k: np.asarray(v, np.float32) for k, v in example_inputs(name, preset, seed=0).items()}
    if name == "ddim" and base == "sdedit":  # as bench/run_bench.py: the church image noised to t=500
        pair = load_edit_pair("church")
        img = pair["original"].transpose(2, 0, 1)[None].astype(np.float32) if pair is not None else \
            np.clip(inputs["x"] * 0.5, -1, 1)
        alpha = float(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[DDIM_T])
        noise = np.random.default_rng(0).standard_normal(img.shape).astype(np.float32)
        inputs["x"] = (np.sqrt(alpha) * img + np.sqrt(1 - alpha) * noise).astype(np.float32)
        inputs["t"] = np.array([float(DDIM_T)], np.float32)
    src = "seg" if name == "gaugan" else "x"
    h, w = inputs[src].shape[2:]
    mask = brush_stroke_mask(h, w, area, seed=seed)
    try:  # the main benchmark's edit, when that module is there
        from types import SimpleNamespace

        from ssic.bench import edited_inputs

        # the two manifest fields edited_inputs reads (ssic.artefact.Manifest), for an NCHW input
        source = SimpleNamespace(input=src, height=h, width=w, channel_axis=1)
        manifest = SimpleNamespace(mask=SimpleNamespace(primary=source), model=SimpleNamespace(family=name))
        edited = edited_inputs(manifest, inputs, mask, seed=seed + 1)
    except ImportError:
        rng = np.random.default_rng(seed + 1)
        x = inputs[src].copy()
        if name == "gaugan":
            labels = x[0, :-1].argmax(0)
            classes = x.shape[1] - 1
            new = (labels + 1 + rng.integers(0, classes - 1)) % classes
            x[0, :-1] = np.eye(classes, dtype=np.float32)[np.where(mask, new, labels)].transpose(2, 0, 1)
        else:
            noise = rng.standard_normal(x.shape).astype(np.float32) * 0.5
            x = np.where(mask[None, None], np.clip(x + noise, -1, 1), x).astype(np.float32)
        edited = dict(inputs)
        edited[src] = x
    return inputs, edited, mask


# -------------------------------------------------------------------------------------- bench


def _t(d: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(v)) for v in d.values()]


def _compare(result, reference, mask, original, peak):
    try:
        from ssic.quality import compare

        return compare(result, reference, mask, original=original, peak=peak)
    except ImportError:  # minimal fallback with the same keys
        def p(a, b):
            mse = float(np.mean((a.astype(np.float64) - b) ** 2)) if a.size else 0.0
            return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)

        m = np.asarray(mask, bool)
        out = {"max_abs_err": float(np.abs(result - reference).max()), "psnr": p(result, reference)}
        for tag, reg in (("in", m), ("out", ~m)):
            out[f"psnr_{tag}"] = p(result[:, :, reg], reference[:, :, reg])
            out[f"max_abs_err_{tag}"] = float(np.abs(result[:, :, reg] - reference[:, :, reg]).max()) if reg.any() else 0.0
            out[f"psnr_nothing_{tag}"] = p(original[:, :, reg], reference[:, :, reg])
        return out


def _rnd(x, nd=3):
    if x is None or not np.isfinite(x):
        return None if x is None else ("inf" if x > 0 else "-inf")
    return round(float(x), nd)


def bench_one(name, torch_model, sige_model, original, edited, mask, *, warmup, runs, log):
    from sige_models import sige_masks

    xa, xb = _t(original), _t(edited)
    with torch.inference_mode():
        dense_orig = torch_model(*xa).numpy()
        dense_edit = torch_model(*xb).numpy()
        sige_model.clear_cache()
        sige_model.set_mode("full")
        full_orig = sige_model(*xa).numpy()
        sige_model.set_masks(sige_masks(name, mask, torch_model.cfg))
        sige_model.set_mode("sparse")
        sparse = sige_model(*xb).numpy()
        t_sparse, t_dense = [], []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            sige_model(*xb)
            t1 = time.perf_counter()
            torch_model(*xb)
            t2 = time.perf_counter()
            if i >= warmup:
                t_sparse.append(t1 - t0)
                t_dense.append(t2 - t1)
            log(f"    run {i + 1}/{warmup + runs}: sige {1000 * (t1 - t0):.0f} ms, dense {1000 * (t2 - t1):.0f} ms"
                + (" (warm-up)" if i < warmup else ""))
    # block sparsity at the full resolution (SIGE's 6x6 blocks, 4x4 tiles)
    n_active, n_total = _block_stats(sige_model)
    peak = 2.0 if name == "gaugan" else max(float(np.ptp(dense_edit)), 1e-6)
    q = _compare(sparse, dense_edit, mask, dense_orig, peak)
    full_err = float(np.abs(full_orig - dense_orig).max())
    sige_ms = 1000 * statistics.median(t_sparse)
    dense_ms = 1000 * statistics.median(t_dense)
    return {
        "sige_ms": round(sige_ms, 1),
        "torch_dense_ms": round(dense_ms, 1),
        "sige_speedup_vs_torch_dense": round(dense_ms / sige_ms, 3),
        "sige_ms_min": round(1000 * min(t_sparse), 1),
        "torch_dense_ms_min": round(1000 * min(t_dense), 1),
        "noisy": bool(max(t_sparse) > 1.3 * min(t_sparse) or max(t_dense) > 1.3 * min(t_dense)),
        "sige_ms_all": [round(1000 * s, 1) for s in t_sparse],
        "torch_dense_ms_all": [round(1000 * s, 1) for s in t_dense],
        "sige_vs_dense_psnr_in": _rnd(q.get("psnr_in")),
        "sige_vs_dense_psnr_out": _rnd(q.get("psnr_out")),
        "sige_vs_dense_psnr": _rnd(q.get("psnr")),
        "max_abs_err": _rnd(q["max_abs_err"], 6),
        "max_abs_err_in": _rnd(q.get("max_abs_err_in"), 6),
        "max_abs_err_out": _rnd(q.get("max_abs_err_out"), 6),
        "nothing_vs_dense_psnr_in": _rnd(q.get("psnr_nothing_in")),
        "nothing_vs_dense_psnr_out": _rnd(q.get("psnr_nothing_out")),
        "psnr_peak": round(peak, 4),
        "sige_full_vs_torch_max_abs_err": _rnd(full_err, 7),
        "active_blocks_full_res": n_active,
        "total_blocks_full_res": n_total,
    }


def _block_stats(model):
    """Active / total SIGE blocks of the first gather at the model's highest resolution."""
    from sige.nn import Gather

    best = None
    for m in model.modules():
        if isinstance(m, Gather) and m.active_indices is not None and m.input_res is not None:
            h, w = m.input_res
            if best is None or h * w > best[0]:
                sh, sw = m.block_stride
                total = -(-(h + m.offset[0]) // sh) * -(-(w + m.offset[1]) // sw)
                best = (h * w, int(m.active_indices.shape[0]), int(total))
    return (best[1], best[2]) if best else (None, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out/sige.json")
    ap.add_argument("--models", default="ddim,gaugan")
    ap.add_argument("--edits", default="real,1.2,5,15,30", help="'real' and/or brush areas in percent")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--brush-seed", type=int, default=7,
                    help="brush mask seed (the edited input uses seed + 1); 7 as bench/run_bench.py")
    ap.add_argument("--brush-base", choices=("sdedit", "example"), default="sdedit",
                    help="DDIM brush base input: the church image noised to t=500 (as bench/run_bench.py) "
                         "or ssic.models.example_inputs")
    ap.add_argument("--merge-from", action="append", default=[], metavar="JSON",
                    help="also merge the rows of this earlier result file (with the --merge rule); repeatable")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing --out file, replacing those (model, edit) measured now")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        import sige
        import sige.cpu  # noqa: F401  (the compiled CPU kernels)
    except ImportError as e:
        print(f"sige is not installed ({e}); run: bash bench/install_sige.sh", file=sys.stderr)
        return 2
    from sige_models import build_sige_model

    from ssic.models import build_model

    def log(msg):
        print(msg, flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "engine": f"sige {sige.__version__} (PyPI sdist, CPU kernels built locally)",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "preset": args.preset,
        "warmup": args.warmup,
        "runs": args.runs,
        "statistic": "median",
        "command": "python bench/bench_sige.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "brush_seed": args.brush_seed,
        "brush_base": args.brush_base,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "results": [],
    }
    if args.merge and out.is_file():
        old = json.loads(out.read_text())
        doc["results"] = old.get("results", [])
        for r in doc["results"]:  # rows written before the min/noisy fields existed
            a, d = r.get("sige_ms_all") or [r["sige_ms"]], r.get("torch_dense_ms_all") or [r["torch_dense_ms"]]
            r.setdefault("sige_ms_min", min(a))
            r.setdefault("torch_dense_ms_min", min(d))
            r.setdefault("noisy", bool(max(a) > 1.3 * min(a) or max(d) > 1.3 * min(d)))
        doc["merged_runs"] = old.get("merged_runs", []) + [old.get("command")]

    def put(row):
        """Add a row; with --merge, of two runs of one (model, edit) keep the one measured under less
        contention from other jobs: the lower PyTorch dense median (the dense work is the same in
        every run), recording the other run's medians in ``other_runs``."""
        key = (row["model"], row["edit"])
        prev = [r for r in doc["results"] if (r["model"], r["edit"]) == key]
        doc["results"] = [r for r in doc["results"] if (r["model"], r["edit"]) != key]
        keep = row
        for p in prev:
            if (p.get("sige_ms_all"), p.get("torch_dense_ms_all")) == (keep.get("sige_ms_all"), keep.get("torch_dense_ms_all")):
                continue  # the same run read twice
            lose = p if p["torch_dense_ms"] >= keep["torch_dense_ms"] else keep
            keep = keep if lose is p else p
            keep["other_runs"] = keep.get("other_runs", []) + lose.get("other_runs", []) + [
                {k: lose[k] for k in ("sige_ms", "torch_dense_ms", "sige_ms_min", "torch_dense_ms_min",
                                      "load_average_1min") if k in lose}]
        if "other_runs" in keep:
            seen = []
            for o in keep["other_runs"]:
                if o not in seen:
                    seen.append(o)
            keep["other_runs"] = seen
        doc["results"].append(keep)

    for extra in args.merge_from:
        other = json.loads(Path(extra).read_text())
        doc["merged_runs"] = doc.get("merged_runs", []) + [other.get("command")]
        for r in other.get("results", []):
            a, d = r.get("sige_ms_all") or [r["sige_ms"]], r.get("torch_dense_ms_all") or [r["torch_dense_ms"]]
            r.setdefault("sige_ms_min", min(a))
            r.setdefault("torch_dense_ms_min", min(d))
            r.setdefault("noisy", bool(max(a) > 1.3 * min(a) or max(d) > 1.3 * min(d)))
            put(r)

    edits = [e.strip() for e in args.edits.split(",") if e.strip()]
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        log(f"== {name} ({args.preset}): building models")
        tm = build_model(name, args.preset, seed=0).eval()
        sm = build_sige_model(name, tm)
        for e in edits:
            if e == "real":
                case = (_gaugan_real if name == "gaugan" else _ddim_real)(tm.cfg)
                label = "real"
                if case is None:
                    log("  real edit: ../shared/data/edits absent, skipped")
                    continue
            else:
                area = float(e) / 100.0
                case = _brush(name, area, args.brush_seed, args.brush_base, args.preset)
                label = f"brush{e}"
            original, edited, mask = case
            log(f"  {label}: edited area {100 * mask.mean():.2f}%")
            row = {"model": name, "edit": label, "area": round(float(mask.mean()), 5)}
            row.update(bench_one(name, tm, sm, original, edited, mask, warmup=args.warmup, runs=args.runs, log=log))
            row["load_average_1min"] = round(os.getloadavg()[0], 2)
            put(row)
            out.write_text(json.dumps(doc, indent=1) + "\n")
            log(f"  -> sige {row['sige_ms']:.0f} ms, torch dense {row['torch_dense_ms']:.0f} ms "
                f"({row['sige_speedup_vs_torch_dense']:.2f}x), PSNR in {row['sige_vs_dense_psnr_in']} / out "
                f"{row['sige_vs_dense_psnr_out']} dB, max abs err {row['max_abs_err']}")
    order = {m: i for i, m in enumerate(("ddim", "pd", "gaugan"))}
    doc["results"].sort(key=lambda r: (order.get(r["model"], 9), r["edit"] != "real", r["area"]))
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(doc)
    return 0


def print_table(doc) -> None:
    hdr = f"{'model':7} {'edit':9} {'area%':>6} {'SIGE ms':>8} {'torch ms':>9} {'x':>5} {'PSNR in':>8} {'PSNR out':>9} " \
          f"{'nothing out':>11} {'max err':>8} {'min SIGE':>9} {'min torch':>9}"
    print(f"\nSIGE sparse vs PyTorch dense, {doc['threads']} threads, {doc['machine']['cpu']}")
    print(hdr)
    print("-" * len(hdr))
    for r in doc["results"]:
        print(f"{r['model']:7} {r['edit']:9} {100 * r['area']:6.2f} {r['sige_ms']:8.0f} {r['torch_dense_ms']:9.0f} "
              f"{r['sige_speedup_vs_torch_dense']:5.2f} {str(r['sige_vs_dense_psnr_in']):>8} "
              f"{str(r['sige_vs_dense_psnr_out']):>9} {str(r['nothing_vs_dense_psnr_out']):>11} "
              f"{r['max_abs_err']:8.4f} {r.get('sige_ms_min', float('nan')):9.0f} "
              f"{r.get('torch_dense_ms_min', float('nan')):9.0f}" + ("  (noisy)" if r.get("noisy") else ""))


if __name__ == "__main__":
    raise SystemExit(main())
