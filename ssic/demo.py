"""The editing demo (the README's main command): SDEdit with DDIM, dense vs sparse, per-step caches.

It exports the DDIM UNet (random seeded weights: no checkpoint can be downloaded here), compiles it
for ONNX Runtime with the fused ops, and edits the real LSUN church edit pair from the SIGE paper when
``../shared/data/edits`` is present, else a generated image with a brush-stroke edit. It writes the
dense and sparse results and a side-by-side PNG, and prints the time of both loops and their PSNR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssic.errors import SSICError


def _inputs(size: int, radius_eps: float):
    from ssic.masks import brush_stroke_mask, load_edit_pair

    pair = load_edit_pair("church")
    if pair is not None:
        a = pair["original"].transpose(2, 0, 1)[None].astype(np.float32)
        b = pair["edited"].transpose(2, 0, 1)[None].astype(np.float32)
        return a, b, "the real LSUN church edit (../shared/data/edits)"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.stack([np.sin(6 * yy + c) * np.cos(4 * xx - c) for c in range(3)])[None].astype(np.float32)
    a += 0.05 * rng.standard_normal(a.shape).astype(np.float32)
    mask = brush_stroke_mask(size, size, 0.05, seed=1)
    b = np.where(mask[None, None], -a, a).astype(np.float32)
    return np.clip(a, -1, 1), np.clip(b, -1, 1), "a generated image with a 5% brush-stroke edit (../shared absent)"


def run_demo(preset: str = "tiny", steps: int = 10, out_dir: Path = Path("out/demo"), threads: int = 2, log=print,
             weights: str | None = None) -> dict:
    """Run the demo; returns the SDEdit result dict (see :func:`ssic.editing.sdedit`).

    ``weights`` is the official DDIM church checkpoint; without it the UNet has seeded random weights
    and the generated images are noise (the dense-vs-sparse comparison is what the demo shows).
    """
    import ssic
    from ssic.editing import model_to_image, sdedit
    from ssic.models import export_model
    from ssic.models.export import tag_model

    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"ddim_{preset}" + ("_ckpt" if weights else "")
    onnx_path = out_dir / f"{tag}.onnx"
    art = out_dir / f"{tag}.ssic"
    if not onnx_path.exists():
        log(f"exporting the DDIM UNet ({preset}, {'weights ' + str(weights) if weights else 'random weights'}) to {onnx_path}")
        export_model("ddim", preset, onnx_path, seed=0, weights=weights)
        tag_model(onnx_path, "ddim", preset)
    if not (art / "manifest.json").exists():
        log(f"compiling {onnx_path} -> {art} (ONNX Runtime, fused ops)")
        ssic.compile(onnx_path, target="ort", lowering="fused", output_dir=art, force=True)
    sess = ssic.load(art, threads=threads)
    spec = sess.manifest.mask
    a, b, what = _inputs(spec.height, spec.eps)
    if a.shape[2:] != (spec.height, spec.width):
        raise SSICError(f"demo images are {a.shape[2:]}, the model takes {spec.height}")
    mask = (np.abs(a - b) > float(spec.eps)).any(axis=1)[0]
    log(f"editing {what}: {100 * mask.mean():.1f}% of pixels changed")
    result = sdedit(sess, a, b, mask, steps=steps, strength=0.5, seed=0, log=log)
    from ssic.images import save_image

    tiles = [model_to_image(x) for x in (a, b, result["dense"], result["sparse"])]
    diff = np.abs(result["sparse"] - result["dense"]).max(axis=1)[0]
    tiles.append(np.repeat(np.clip(diff * 10 * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    save_image(model_to_image(result["dense"]), out_dir / "dense.png")
    save_image(model_to_image(result["sparse"]), out_dir / "sparse.png")
    save_image(np.concatenate(tiles, axis=1), out_dir / "side_by_side.png")
    q = result["quality"]
    def db(v):
        return "identical" if v == float("inf") else f"{v:.1f} dB"

    log(f"dense loop {result['dense_s']:.2f} s, sparse loop {result['sparse_s']:.2f} s "
        f"({result['dense_s'] / result['sparse_s']:.2f}x); PSNR sparse vs dense {db(q['psnr'])} "
        f"(inside the edit {db(q['psnr_in'])}, outside {db(q['psnr_out'])})")
    log(f"wrote {out_dir}/dense.png, sparse.png, side_by_side.png (original | edited | dense | sparse | "
        "|sparse - dense| x10)")
    if not weights:
        log("note: the UNet has seeded random weights (no checkpoint can be downloaded here), so the generated "
            "images are noise; pass --weights with the official DDIM church checkpoint for real images")
    return result
