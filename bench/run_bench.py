"""`make bench`: full-size models, ONNX Runtime dense vs ssic sparse, written to BENCHMARKS.md.

For each model (GauGAN, DDIM, PD-256; full presets, seeded random weights) and each edit (the real
edits of the SIGE paper from ../shared/data/edits, and synthetic brush strokes of 1.2/5/15/30% area)
it measures dense and sparse alternately in one process (warm-up first, median of --runs), the MAC
ratio, PSNR inside/outside the edit against dense-on-edited, per-op-type time of one sparse run, and
the SDEdit loop end to end. Results go to bench_out/results.json and the report.

    python bench/run_bench.py --out bench_out --report BENCHMARKS.md [--models gaugan,ddim,pd] [--runs 5]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ssic  # noqa: E402
from ssic.bench import benchmark, edited_inputs  # noqa: E402
from ssic.masks import brush_stroke_mask, load_edit_pair  # noqa: E402

AREAS = [0.012, 0.05, 0.15, 0.30]


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    import onnxruntime

    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}"


#: With ``--reuse-artefacts`` an existing artefact is used even when another build of ssic compiled it.
_REUSE = False


def prepare(name: str, out: Path, log, extra: dict | None = None, tag: str = "") -> Path:
    """The artefact of ``name``'s full preset, compiled by the compiler checked out now: an artefact
    an earlier run left is reused only while its ``compiler_digest`` matches (``--reuse-artefacts``
    keeps it regardless)."""
    from ssic.models import export_model
    from ssic.models.export import tag_model

    onnx_path = out / f"{name}_full.onnx"
    if not onnx_path.exists():
        log(f"[{name}] exporting the full preset")
        export_model(name, "full", onnx_path, seed=0)
        tag_model(onnx_path, name, "full")
    art = out / f"{name}_full{tag}.ssic"
    from ssic.artefact import is_current

    if not (art / "manifest.json").exists() or not (_REUSE or is_current(art)):
        log(f"[{name}] compiling{tag}")
        ssic.compile(onnx_path, output_dir=art, force=True, **(extra or {}))
    return art


def real_edit(name: str, sess):
    if name == "gaugan":
        pair = load_edit_pair("cityscapes")
        if pair is None:
            return None
        from ssic.models.gaugan import make_gaugan_input

        return ({"seg": make_gaugan_input(pair["label_a"], pair["instance_a"])},
                {"seg": make_gaugan_input(pair["label_b"], pair["instance_b"])}, None, "real label edit")
    pair = load_edit_pair("church")
    if pair is None:
        return None
    a = pair["original"].transpose(2, 0, 1)[None].astype(np.float32)
    b = pair["edited"].transpose(2, 0, 1)[None].astype(np.float32)
    mask = (np.abs(a - b) > float(sess.manifest.mask.eps)).any(axis=1)[0]
    t, xa, xb = _noised(name, a, b)
    return {"x": xa, "t": t}, {"x": xb, "t": t}, mask, "real church edit"


def _noised(name: str, a: np.ndarray, b: np.ndarray | None = None):
    """The UNet's input in an SDEdit step at mid strength: the image noised to t=500 (PD: t=0.5)."""
    noise = np.random.default_rng(0).standard_normal(a.shape).astype(np.float32)
    if name == "ddim":
        from ssic.editing import DDIMSchedule

        alpha, t = DDIMSchedule().alpha(500), 500.0
    else:
        alpha, t = float(np.cos(0.5 * np.pi * 0.5) ** 2), 0.5
    def mix(x):
        return None if x is None else (np.sqrt(alpha) * x + np.sqrt(1 - alpha) * noise).astype(np.float32)

    return np.array([t], np.float32), mix(a), mix(b)


def base_inputs(name: str):
    from ssic.models import example_inputs

    inputs = example_inputs(name, "full", seed=0)
    if name in ("ddim", "pd"):
        pair = load_edit_pair("church")
        img = pair["original"].transpose(2, 0, 1)[None].astype(np.float32) if pair is not None else \
            np.clip(inputs["x"] * 0.5, -1, 1)
        inputs["t"], inputs["x"], _ = _noised(name, img)
    return inputs


def profile_sparse(sess, inputs: dict, mask) -> dict:
    """Per-op-type milliseconds of one sparse run (ONNX Runtime's profiler)."""
    import onnxruntime as ort

    from ssic.library import make_session_options

    so = make_session_options(sess.threads) if sess.manifest.lowering == "fused" else ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "ssic_profile")
    prof = ort.InferenceSession(str(sess.path / "sparse.onnx"), so, providers=["CPUExecutionProvider"])
    saved = sess.backend._sessions["sparse"]
    sess.backend._sessions["sparse"] = prof
    try:
        for _ in range(2):
            sess.edit(inputs, mask=mask, mode="sparse")
    finally:
        sess.backend._sessions["sparse"] = saved
    trace = json.loads(Path(prof.end_profiling()).read_text())
    agg: dict[str, float] = collections.Counter()
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            op = ev["args"]["op_name"]
            agg[{"Conv": "Conv (dense part)", "MatMul": "MatMul (sparse convs)", "Gemm": "MatMul (sparse convs)"}.get(op, op)] += ev["dur"]
    return {k: round(v / 2000.0, 1) for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}


def run_model(name: str, out: Path, runs: int, log, variant: dict | None = None, tag: str = "") -> list[dict]:
    art = prepare(name, out, log, variant, tag)
    sess = ssic.load(art, threads=2)
    h, w = sess.manifest.mask.height, sess.manifest.mask.width
    rows = []
    edits = []
    real = real_edit(name, sess)
    if real is not None:
        edits.append(real)
    base = base_inputs(name)
    for area in AREAS:
        mask = brush_stroke_mask(h, w, area, seed=7)
        edits.append((base, edited_inputs(sess.manifest, base, mask, seed=8), mask, f"brush {100 * area:g}%"))
    for original, edited, mask, label in edits:
        log(f"[{name}{tag}] {label}")
        r = benchmark(sess, original, edited, mask, runs=runs, warmup=1, prime_runs=3)
        r.update(model=name, variant=tag.strip("_") or "default", edit=label)
        if label.startswith("real") or label == "brush 1.2%":
            r["profile_ms"] = profile_sparse(sess, edited, mask)
        log(f"    dense {r['dense_ms']:.0f} ms, sparse {r['sparse_ms']:.0f} ms, {r['speedup']:.2f}x "
            f"(MAC ratio {r['mac_ratio']:.2f}), PSNR in {r['psnr_in']:.1f} out {r['psnr_out']:.2f} "
            f"(nothing {r['psnr_nothing_out']:.2f})")
        rows.append(r)
    return rows


def run_sdedit(out: Path, steps: int, log) -> dict | None:
    from ssic.editing import sdedit

    pair = load_edit_pair("church")
    if pair is None:
        return None
    art = prepare("ddim", out, log)
    sess = ssic.load(art, threads=2)
    a = pair["original"].transpose(2, 0, 1)[None].astype(np.float32)
    b = pair["edited"].transpose(2, 0, 1)[None].astype(np.float32)
    mask = (np.abs(a - b) > float(sess.manifest.mask.eps)).any(axis=1)[0]
    log(f"[ddim] SDEdit loop, {steps} steps")
    res = sdedit(sess, a, b, mask, steps=steps, strength=0.5, log=log)
    q = res["quality"]
    return {"steps": steps, "dense_s": round(res["dense_s"], 2), "sparse_s": round(res["sparse_s"], 2),
            "prime_s": round(res["prime_s"], 2), "speedup": round(res["dense_s"] / res["sparse_s"], 2),
            "psnr": q["psnr"], "psnr_in": q["psnr_in"], "psnr_out": q["psnr_out"],
            "cache_mb": round(sess.cache_bytes() / 2**20)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, name in zip(axes, ["gaugan", "ddim", "pd"], strict=True):
        sel = [r for r in rows if r["model"] == name and r["variant"] == "default"]
        if not sel:
            ax.set_visible(False)
            continue
        sel.sort(key=lambda r: r["edited_fraction"])
        x = [100 * r["edited_fraction"] for r in sel]
        ax.plot(x, [r["speedup"] for r in sel], "o-", label="ssic speedup vs ORT dense")
        ax.plot(x, [r["mac_ratio"] for r in sel], "s--", label="MAC ratio (limit)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 30], ["1", "2", "5", "10", "20", "30"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ticks = [1, 2, 3, 5, 8, 12, 16]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("edited area (% of pixels, before dilation)")
        ax.set_title(name)
        ax.legend()
    axes[0].set_ylabel("x faster than ONNX Runtime dense")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float) and v == float("inf"):
        return "exact"
    return f"{v:.{nd}f}"


def report(results: dict, path: Path, cmd: str) -> None:
    rows = results["rows"]
    lines = ["# Benchmarks", "",
             f"Command: `{cmd}` (`make bench`). Machine: {results['machine']}. Batch 1, float32, "
             "2 intra-op threads, seeded random weights (no checkpoints can be downloaded here). Dense = "
             "ONNX Runtime on the exported model; sparse = ssic's fused lowering (C++ ops); measured "
             "alternately in one process after a warm-up, median of "
             f"{results['runs']} runs. Quality: sparse output against the dense model on the edited "
             "input, PSNR (peak 2) inside and outside the (dilated) edit mask, beside doing nothing. Prime / dense: "
             "the median of three warm prime runs (the dense run that also writes the caches) over the dense median; commit: "
             "folding the edit into the caches (`Session.commit`, incremental or a re-prime).", "",
             f"Generated {results['date']} in {results['seconds'] / 60:.0f} min.", "",
             "![speedup vs edited area](bench/results/speedup.png)", "",
             "| model | variant | edit | edited | tiles active | dense ms | sparse ms | speedup | MAC ratio | "
             "efficiency | PSNR in | PSNR out (nothing) | max abs err | caches MB | prime / dense | commit ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['edit']} | {100 * r['edited_fraction']:.1f}% | "
            f"{100 * r['active_fraction']:.1f}% | {r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | **{r['speedup']:.2f}x** | "
            f"{r['mac_ratio']:.2f}x | {r['efficiency']:.2f} | {fmt(r['psnr_in'])} | {fmt(r['psnr_out'], 2)} "
            f"({fmt(r['psnr_nothing_out'], 2)}) | {r['max_abs_err']:.3g} | {r['cache_mb']:.0f} | "
            f"{r['prime_ms'] / r['dense_ms']:.2f}x | {r['commit_ms']:.0f} ({r['commit_mode']}) |")
    lines += ["", "## Where the time goes (one sparse run, ms per op type)", ""]
    for r in rows:
        if "profile_ms" in r:
            top = ", ".join(f"{k} {v}" for k, v in list(r["profile_ms"].items())[:8])
            lines.append(f"- {r['model']} ({r['variant']}), {r['edit']}: {top}")
    if results.get("sdedit"):
        s = results["sdedit"]
        lines += ["", "## SDEdit editing loop (DDIM full, real church edit, as a user feels it)", "",
                  f"{s['steps']} denoising steps with per-step caches: dense {s['dense_s']} s, sparse {s['sparse_s']} s "
                  f"(**{s['speedup']}x**); priming the original trajectory once {s['prime_s']} s; resident caches "
                  f"{s['cache_mb']} MB; final image PSNR sparse vs dense {fmt(s['psnr'])} dB (inside "
                  f"{fmt(s['psnr_in'])}, outside {fmt(s['psnr_out'])})."]
    sige = REPO / "bench" / "results" / "sige.json"
    if sige.exists():
        lines += ["", "## The SIGE engine side by side", "",
                  "From `make bench-sige` (bench/results/sige.json, same machine, same weights and masks; see "
                  "bench/README.md). ssic sparse ms from the table above.", ""]
        try:
            data = json.loads(sige.read_text())
            entries = data if isinstance(data, list) else data.get("results", [])
            lines += ["| model | edit | SIGE ms | PyTorch dense ms | SIGE vs PyTorch | ssic ms | ORT dense ms | "
                      "ssic vs ORT | **ssic vs SIGE** |", "|---|---|---|---|---|---|---|---|---|"]
            for e in entries:
                label = str(e.get("edit"))
                want = "real" if label == "real" else f"brush {label.removeprefix('brush')}%"
                match = [r for r in rows if r["model"] == e.get("model") and r["variant"] == "default"
                         and (r["edit"].startswith(want) if want == "real" else r["edit"] == want)]
                r = match[0] if match else None
                ratio = f"**{e['sige_ms'] / r['sparse_ms']:.1f}x faster**" if r and e.get("sige_ms") else "-"
                if e.get("noisy") or (e.get("load_average_1min") or 0) > 2.5:
                    ratio += f" (SIGE measured under load {e.get('load_average_1min')}: unreliable)"
                lines.append(f"| {e.get('model')} | {label} | {fmt(e.get('sige_ms'), 0)} | {fmt(e.get('torch_dense_ms'), 0)} | "
                             f"{fmt(e.get('sige_speedup_vs_torch_dense'), 2)}x | {fmt(r['sparse_ms'] if r else None, 0)} | "
                             f"{fmt(r['dense_ms'] if r else None, 0)} | {fmt(r['speedup'] if r else None, 2)}x | {ratio} |")
            lines += ["", "SIGE's brush rows use the same seeds and base inputs as ssic's (bench/README.md); rows "
                      "the SIGE script marks noisy were measured while other jobs loaded the machine."]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            lines.append(f"(could not read sige.json: {exc})")
    # the sections after the marker are written by hand or by other scripts (bench/trained_grid.py): kept
    tail = ""
    if path.exists() and GENERATED_END in path.read_text():
        tail = path.read_text().split(GENERATED_END, 1)[1]
    path.write_text("\n".join(lines) + "\n\n" + GENERATED_END + (tail if tail else "\n"))


#: BENCHMARKS.md: everything after this line survives a `make bench`
GENERATED_END = "<!-- end of the part bench/run_bench.py writes -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--report", default="BENCHMARKS.md")
    ap.add_argument("--models", default="gaugan,ddim,pd")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sdedit-steps", type=int, default=5)
    ap.add_argument("--anchor-split", action="store_true", help="also DDIM/PD with the anchor's >= 64 sparse split")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from bench/results/results.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of models not re-run from bench/results/results.json")
    ap.add_argument("--reuse-artefacts", action="store_true",
                    help="use the artefacts an earlier run left in --out even when another build of ssic "
                         "compiled them")
    args = ap.parse_args()
    global _REUSE
    _REUSE = args.reuse_artefacts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.report_only:
        results = json.loads((REPO / "bench" / "results" / "results.json").read_text())
        plot(results["rows"], REPO / "bench" / "results" / "speedup.png")
        report(results, Path(args.report), results.get("command", "python bench/run_bench.py"))
        return

    def log(msg):
        print(msg, flush=True)

    rows = []
    for name in args.models.split(","):
        rows += run_model(name, out, args.runs, log)
        if args.anchor_split and name in ("ddim", "pd"):
            rows += run_model(name, out, args.runs, log, {"sparse_min_res": 64}, "_anchor-split")
    sd = run_sdedit(out, args.sdedit_steps, log) if "ddim" in args.models.split(",") else None
    previous = REPO / "bench" / "results" / "results.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        redone = {(r["model"], r["variant"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["variant"]) not in redone] + rows
        order = {"gaugan": 0, "ddim": 1, "pd": 2}
        rows.sort(key=lambda r: (order.get(r["model"], 9), r["variant"] != "default"))
        sd = sd or old.get("sdedit")
    results = {"machine": machine(), "runs": args.runs, "rows": rows, "sdedit": sd,
               "command": "python bench/run_bench.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, res_dir / "speedup.png")
    report(results, Path(args.report), results["command"])
    log(f"wrote {args.report} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
