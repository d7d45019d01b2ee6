"""The Stable Diffusion VAE on the real church edit: the encoder (photo -> latent) and the decoder
(latent -> photo) sparse against ONNX Runtime dense, as a latent edit runs them.

The church photos (../shared/data/edits) are resized to the encoder's image size; the pixel mask is
where they differ by more than half an 8-bit level and the latent mask its 8x8 max-pool (as
ssic.latent.latent_edit maps it). The decoder is primed on the original photo's latent and edited to
the edited photo's latent inside the latent mask (both from the encoder, dense; outside the mask a
latent edit keeps the original trajectory's latent). PSNR (peak 2: images in [-1, 1]) against
the dense output, inside and outside the mask, beside "doing nothing" (the primed output).

    python bench/sd_vae.py ENCODER.ssic DECODER.ssic --runs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sd_cfg import _median_ms  # bench/ is the script's folder


def _psnr(y: np.ndarray, want: np.ndarray, sel: np.ndarray) -> float:
    mse = float(((y - want) ** 2).mean(axis=1)[0][sel].mean())
    return 10 * np.log10(4.0 / max(mse, 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("encoder")
    ap.add_argument("decoder")
    ap.add_argument("--edits", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "edits"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ssic
    from ssic.images import Placement, read_image
    from ssic.masks import resize_mask_any

    files = [Path(args.edits) / f"church_{k}.png" for k in ("original", "edited")]
    if not all(f.is_file() for f in files):
        raise SystemExit(f"no church_original.png/church_edited.png in {args.edits}")
    enc, dec = ssic.load(args.encoder, threads=args.threads), ssic.load(args.decoder, threads=args.threads)
    H, W = enc.manifest.input("image").shape[2:]
    h, w = dec.manifest.input("latent").shape[2:]
    a, b = (read_image(f) for f in files)
    place = Placement.plan(a.shape[:2], (H, W), "fit")
    m_px = place.mask_to_model((np.abs(a - b) > 0.5 / 255).any(axis=2))
    m_lat = resize_mask_any(m_px, (h, w))
    xa, xb = (np.ascontiguousarray(place.to_model(x * 2 - 1).transpose(2, 0, 1)[None], np.float32) for x in (a, b))

    rows = []
    # encoder: prime on the original photo, edit to the edited one
    want = enc.dense({"image": xb})["latent"]
    dense_ms = _median_ms(lambda: enc.dense({"image": xb}), args.runs)
    primed = enc.prime({"image": xa})["latent"]
    got = enc.edit({"image": xb}, mask=m_px, mode="sparse")["latent"]
    st = enc.last
    sparse_ms = _median_ms(lambda: enc.edit({"image": xb}, mask=m_px, mode="sparse"), args.runs)
    peak = 2 * float(np.abs(want).max())

    def psnr_lat(y, sel):
        return 10 * np.log10(peak**2 / max(float(((y - want) ** 2)[..., sel].mean()), 1e-30))

    rows.append({"part": "encoder", "mask_fraction": float(m_px.mean()), "active_fraction": st.active_fraction,
                 "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                 "mac_ratio": st.macs_dense / st.macs, "psnr_in": psnr_lat(got, m_lat), "psnr_in_nothing":
                 psnr_lat(primed, m_lat), "psnr_out": psnr_lat(got, ~m_lat), "psnr_out_nothing": psnr_lat(primed, ~m_lat),
                 "cache_mb": enc.cache_bytes() / 2**20})
    print(json.dumps(rows[-1]), flush=True)
    # a latent edit blends the edited latent with the original trajectory's outside the mask: the
    # decoder sees a latent that changed inside the mask only
    za = enc.dense({"image": xa})["latent"]
    zb = np.where(m_lat[None, None], want, za).astype(np.float32)
    enc.release("dense", "prime", "sparse")
    enc.forget(0)

    # decoder: prime on the original latent, edit to the edited one
    want = dec.dense({"latent": zb})["image"]
    dense_ms = _median_ms(lambda: dec.dense({"latent": zb}), args.runs)
    dec.release("dense")
    t0 = time.perf_counter()
    primed = dec.prime({"latent": za})["image"]
    prime_ms = 1000 * (time.perf_counter() - t0)
    dec.release("prime")
    got = dec.edit({"latent": zb}, mask=m_lat, mode="sparse")["image"]
    st = dec.last
    sparse_ms = _median_ms(lambda: dec.edit({"latent": zb}, mask=m_lat, mode="sparse"), args.runs)
    rows.append({"part": "decoder", "mask_fraction": float(m_lat.mean()), "active_fraction": st.active_fraction,
                 "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                 "mac_ratio": st.macs_dense / st.macs, "psnr_in": _psnr(got, want, m_px),
                 "psnr_in_nothing": _psnr(primed, want, m_px), "psnr_out": _psnr(got, want, ~m_px),
                 "psnr_out_nothing": _psnr(primed, want, ~m_px), "prime_ms": prime_ms,
                 "cache_mb": dec.cache_bytes() / 2**20})
    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
