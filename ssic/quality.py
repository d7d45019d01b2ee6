"""Output quality: how far a sparse result is from the dense model, inside and outside the edit."""

from __future__ import annotations

import math

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 2.0) -> float:
    """PSNR in dB between two arrays with value range ``peak`` (2 for images in [-1, 1]); inf if equal."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return float("inf")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _region(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return x.reshape(-1)
    m = np.asarray(mask, bool)
    if x.ndim == 4:
        h, w = x.shape[2:]
        if m.shape != (h, w):
            # nearest resize of the mask to the output size
            ys = np.arange(h) * m.shape[0] // h
            xs = np.arange(w) * m.shape[1] // w
            m = m[ys][:, xs]
        return x[:, :, m].reshape(-1)
    return x.reshape(-1)


def compare(result: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None,
            original: np.ndarray | None = None, peak: float = 2.0) -> dict:
    """Errors of ``result`` against ``reference``; with ``mask`` split inside/outside the edit.

    Returns max_abs_err, psnr, and where a mask is given psnr_in/psnr_out/max_abs_err_in/out; with
    ``original`` (the output before the edit) also the PSNR of doing nothing, inside and outside.
    """
    out = {"max_abs_err": float(np.max(np.abs(result - reference))) if result.size else 0.0,
           "psnr": psnr(result, reference, peak)}
    if mask is not None:
        m = np.asarray(mask, bool)
        for tag, region in (("in", m), ("out", ~m)):
            r, ref = _region(result, region), _region(reference, region)
            out[f"psnr_{tag}"] = psnr(r, ref, peak)
            out[f"max_abs_err_{tag}"] = float(np.max(np.abs(r - ref))) if r.size else 0.0
            if original is not None:
                out[f"psnr_nothing_{tag}"] = psnr(_region(original, region), ref, peak)
    if original is not None:
        out["psnr_nothing"] = psnr(original, reference, peak)
    return out
