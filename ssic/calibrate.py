"""Calibrating bounded exact mode: the smallest radius budget whose sample edits reach a target PSNR.

Exact mode recomputes every value an edit can reach; in a deep trained network (Real-ESRGAN: 345
convs) that is the whole image, while the dense output barely moves beyond a few dozen pixels of the
edit (DESIGN.md section 6: 0.24 of the range 16 input pixels away, 0.08 at 32, 0.006 at 64). A radius
budget ``R`` (pixels of the finest grid) recomputes every reachable value within ``R`` of the edit and
reads caches beyond it (the ``radius`` of :func:`ssic.passes.exact_masks.build_exact_mask_model`), so the error is bounded by
what the network carries further than ``R``.

:func:`calibrate` measures that on sample edits of the user's images: for growing ``R`` it runs
prime, the bounded sparse edit and the dense model on each sample and keeps the smallest ``R`` whose
*worst* sample reaches ``target_psnr`` over the whole output (PSNR with the dense output's range).
The whole curve (``R``, worst and mean PSNR, mean active-tile fraction) is recorded in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from ssic.artefact import Manifest
from ssic.errors import SSICError

#: Edit areas of the calibration samples (fractions of the image), as in the benchmarks.
SAMPLE_AREAS = (0.012, 0.05)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """PSNR in dB of ``a`` against ``b`` with the given data range (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(max(data_range, 1e-12) ** 2 / mse)


def sample_edits(manifest: Manifest, images: list[Path], seed: int = 0) -> list[tuple[dict, dict]]:
    """(original, edited) input pairs: each image at the main input's size, edited by brush strokes
    of :data:`SAMPLE_AREAS` whose pixels take the mirrored image's values (a content change).

    Images are read with Pillow (``ssic.images``) as RGB in [0, 1] (``[-1, 1]`` for DDIM/PD); other
    inputs take the model family's example values.
    """
    from PIL import Image

    from ssic.bench import example_inputs
    from ssic.images import read_image
    from ssic.masks import brush_stroke_mask

    src = manifest.mask.primary
    if not src.input:
        raise SSICError("--calibrate needs a model with an image input")
    spec = manifest.input(src.input)
    channels = spec.shape[src.channel_axis]
    base = example_inputs(manifest, seed)
    signed = manifest.model.family in ("ddim", "pd")
    pairs = []
    for k, path in enumerate(images):
        img = read_image(path, "calibration image")
        pil = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))
        img = np.asarray(pil.resize((src.width, src.height), Image.Resampling.BICUBIC), np.float32) / 255.0
        if channels != 3:
            img = np.repeat(img.mean(axis=2, keepdims=True), channels, axis=2)
        if signed:
            img = img * 2 - 1
        for j, area in enumerate(SAMPLE_AREAS):
            mask = brush_stroke_mask(src.height, src.width, area, seed=seed + 7 * k + j)
            edited = np.where(mask[..., None], img[:, ::-1], img)
            to_model = (lambda a: a[None]) if src.channel_axis == 3 else (lambda a: a.transpose(2, 0, 1)[None])
            a = dict(base, **{src.input: np.ascontiguousarray(to_model(img), np.float32)})
            b = dict(base, **{src.input: np.ascontiguousarray(to_model(edited), np.float32)})
            pairs.append((a, b))
    if not pairs:
        raise SSICError("--calibrate needs at least one image")
    return pairs


def calibrate(art: Path, manifest: Manifest, make_mask: Callable[[int | None], onnx.ModelProto],
              images: list[Path], target_psnr: float, log: Callable[[str], None] | None = None,
              threads: int | None = None) -> tuple[int | None, dict]:
    """Choose the radius budget; writes the chosen mask graph to ``art/mask.onnx``.

    ``make_mask(R)`` builds the mask graph for budget ``R`` (``None``: unbounded exact). Returns
    ``(R or None, record)`` where the record holds the target, the samples and the measured curve.
    """
    from ssic.session import Session
    from ssic.targets.ort import OrtBackend

    log = log or (lambda m: None)
    pairs = sample_edits(manifest, images)
    backend = OrtBackend(art, manifest, threads=threads)
    sess = Session(art, manifest, backend, threads=threads)
    out_name = manifest.output_names[0]
    dense, ranges = [], []
    for i, (a, b) in enumerate(pairs):
        sess.prime(a, cache_id=i)
        d = sess.dense(b)[out_name]
        dense.append(d)
        ranges.append(float(d.max() - d.min()) or 1.0)
    finest = max(manifest.mask.height, manifest.mask.width)
    candidates: list[int | None] = []
    r = 2
    while r < finest:
        candidates.append(r)
        r *= 2
    candidates.append(None)
    curve = []
    chosen: int | None = None
    for r in candidates:
        onnx.save(make_mask(r), str(art / manifest.graphs["mask"]))
        backend.reload("mask")
        scores, fractions = [], []
        for i, (_a, b) in enumerate(pairs):
            out = sess.edit(b, cache_id=i, mode="sparse")[out_name]
            scores.append(psnr(out, dense[i], ranges[i]))
            fractions.append(sess.last.active_fraction)
        row = {"radius": r, "psnr_min": round(min(scores), 2), "psnr_mean": round(float(np.mean(scores)), 2),
               "active_fraction": round(float(np.mean(fractions)), 4)}
        curve.append(row)
        log(f"calibrate: radius {r if r is not None else 'unbounded'}: worst {row['psnr_min']:.1f} dB, "
            f"mean {row['psnr_mean']:.1f} dB, {100 * row['active_fraction']:.1f}% tiles active")
        if min(scores) >= target_psnr:
            chosen = r
            break
    else:
        log(f"calibrate: no budget reaches {target_psnr} dB on the samples; using unbounded exact mode")
    onnx.save(make_mask(chosen), str(art / manifest.graphs["mask"]))
    record = {"target_psnr": target_psnr, "images": [Path(p).name for p in images], "areas": list(SAMPLE_AREAS),
              "samples": len(pairs), "radius": chosen, "curve": curve}
    sess.close()
    return chosen, record
