"""Classifier-free guidance on the SD UNet: two batch-1 cache states per step (ssic.latent.GuidedUNet)
against ONNX Runtime dense at batch 2 and two dense batch-1 runs. One denoising step, brush edits and
the real church edit (../shared/data/edits, resized to the image size; its pixel mask max-pooled 8x8
to the latent, as ssic.latent.latent_edit maps it), the latent changed by +1 inside each mask.

    python bench/sd_cfg.py --preset tiny --size 256 --out bench_out/sd_cfg
    python bench/sd_cfg.py --preset full --size 512 --areas church,0.15 --runs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=256, help="image side (latent = size / 8)")
    ap.add_argument("--areas", default="0.012,0.05,0.15,church",
                    help="brush-edit area fractions and/or 'church' (the real edit, skipped where absent)")
    ap.add_argument("--edits", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "edits"),
                    help="folder of church_original.png and church_edited.png")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out/sd_cfg")
    args = ap.parse_args()

    import onnxruntime as ort

    import ssic
    from ssic.artefact import is_current, read_manifest
    from ssic.latent import GuidedUNet
    from ssic.masks import brush_stroke_mask
    from ssic.models.export import export_sd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = (args.size, args.size)
    b1 = out / f"unet_{args.preset}_{args.size}_b1.onnx"
    b2 = out / f"unet_{args.preset}_{args.size}_b2.onnx"
    if not b1.exists():
        export_sd("sd-unet", args.preset, b1, seed=0, size=size)
    if not b2.exists():
        export_sd("sd-unet", args.preset, b2, seed=0, size=size, batch=2)
    art = out / f"unet_{args.preset}_{args.size}.ssic"
    if not is_current(art):  # absent, or compiled by another build of ssic
        ssic.compile(b1, output_dir=art, force=True)
    # ONNX Runtime dense at batch 2 first (its session freed before ssic loads: the full UNet's weights
    # are 3.4 GB per session)
    spec = read_manifest(art).input("sample").shape
    ctx_shape = read_manifest(art).input("encoder_hidden_states").shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(spec).astype(np.float32)
    cond = rng.standard_normal(ctx_shape).astype(np.float32)
    uncond = rng.standard_normal(ctx_shape).astype(np.float32)
    t, g_scale = 501.0, 7.5
    h, w = spec[2], spec[3]
    masks = {}
    for a in args.areas.split(","):
        if a == "church":
            m = church_latent_mask(Path(args.edits), size, (h, w))
            if m is None:
                print(f"church edit skipped: no church_original.png/church_edited.png in {args.edits}")
            else:
                masks[a] = m
        else:
            masks[float(a)] = brush_stroke_mask(h, w, float(a), 0)
    areas = list(masks)
    edits = {a: np.where(m[None, None], x + 1.0, x).astype(np.float32) for a, m in masks.items()}
    feeds2 = {"sample": np.concatenate([x, x]), "timestep": np.array([t], np.float32),
              "encoder_hidden_states": np.concatenate([uncond, cond])}

    def dense_batch2() -> tuple[float, dict]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        dense2 = ort.InferenceSession(str(b2), so, providers=["CPUExecutionProvider"])
        ms = _median_ms(lambda: dense2.run(None, feeds2), args.runs)
        wants = {}
        for a, e in edits.items():
            y2 = dense2.run(None, dict(feeds2, sample=np.concatenate([e, e])))[0]
            wants[a] = y2[:1] + g_scale * (y2[1:] - y2[:1])
        return ms, wants

    dense2_ms, wants = dense_batch2()

    sess = ssic.load(art, threads=args.threads)
    g = GuidedUNet(sess, cond, uncond, guidance=g_scale)
    g.prime(x, t, step=0)
    dense11_ms = _median_ms(lambda: g.dense(x, t), args.runs)
    primed = g.prime(x, t, step=0)  # the output for the unedited latent: "doing nothing"
    rows = []
    for area in areas:
        m, e, want = masks[area], edits[area], wants[area]
        got = g.edit(e, t, step=0, mask=m, mode="sparse")
        sparse_ms = _median_ms(lambda m=m, e=e: g.edit(e, t, step=0, mask=m, mode="sparse"), args.runs)
        peak = 2 * float(np.abs(want).max())

        def psnr(y, sel, want=want, peak=peak):
            return 10 * np.log10(peak**2 / max(float(((y - want) ** 2)[..., sel].mean()), 1e-30))

        row = {"area": area, "mask_fraction": float(m.mean()), "active_fraction": g.last["cond"].active_fraction, "dense_b2_ms": dense2_ms,
               "dense_2x_b1_ms": dense11_ms, "sparse_two_states_ms": sparse_ms,
               "speedup_vs_b2": dense2_ms / sparse_ms, "mac_ratio": g.last["cond"].macs_dense / g.last["cond"].macs,
               "psnr_in": psnr(got, m), "psnr_in_nothing": psnr(primed, m),
               "psnr_out": psnr(got, ~m), "psnr_out_nothing": psnr(primed, ~m),
               "cache_mb_per_step": sess.cache_bytes() / 2**20}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / f"sd_cfg_{args.preset}_{args.size}.json").write_text(json.dumps(rows, indent=1))


def church_latent_mask(folder: Path, size: tuple[int, int], latent: tuple[int, int]) -> np.ndarray | None:
    """The church edit's mask on the latent grid: the photos resized to ``size`` (H, W), where they differ
    by more than half an 8-bit level, max-pooled to ``latent`` (bool ``[h, w]``); None where absent."""
    from ssic.images import Placement, read_image
    from ssic.masks import resize_mask_any

    files = [folder / f"church_{k}.png" for k in ("original", "edited")]
    if not all(f.is_file() for f in files):
        return None
    a, b = (read_image(f) for f in files)
    place = Placement.plan(a.shape[:2], size, "fit")
    m = place.mask_to_model((np.abs(a - b) > 0.5 / 255).any(axis=2))
    return resize_mask_any(m, latent)


if __name__ == "__main__":
    main()
