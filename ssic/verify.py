"""Golden-output regression checks for compiled artefacts (``ssic verify``).

A golden directory holds the inputs (``original.npz``, ``edited.npz``, ``mask.npy``) and the
expected outputs of the prime run and of the sparse edit (``expected.npz``, keys ``prime/<out>``
and ``edit/<out>``). ``ssic verify OUT --golden DIR --update`` writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssic.errors import SSICError
from ssic.quality import psnr


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise SSICError(f"golden file missing: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise SSICError(f"cannot read golden file {path}: {type(exc).__name__}") from None


def write_golden(session, golden: Path, original: dict | None = None, edited: dict | None = None,
                 mask: np.ndarray | None = None) -> None:
    """Run prime and edit and store inputs and outputs as goldens."""
    from ssic.bench import edited_inputs, example_inputs
    from ssic.masks import brush_stroke_mask

    golden.mkdir(parents=True, exist_ok=True)
    h, w = session.manifest.mask.height, session.manifest.mask.width
    original = original or example_inputs(session.manifest, 0)
    mask = brush_stroke_mask(h, w, 0.05, 0) if mask is None else mask
    edited = edited or edited_inputs(session.manifest, original, mask, 1)
    prime = session.prime(original)
    edit = session.edit(edited, mask=mask, mode="sparse")
    np.savez(golden / "original.npz", **original)
    np.savez(golden / "edited.npz", **edited)
    np.save(golden / "mask.npy", mask)
    np.savez(golden / "expected.npz", **{f"prime/{k}": v for k, v in prime.items()},
             **{f"edit/{k}": v for k, v in edit.items()})


def check_golden(session, golden: Path, *, atol: float = 1e-4, rtol: float = 1e-3, min_psnr: float = 60.0) -> dict:
    """Compare prime and edit outputs with the goldens; returns a report with one row per output."""
    if not golden.is_dir():
        raise SSICError(f"golden directory not found: {golden}")
    original = _load_npz(golden / "original.npz")
    edited = _load_npz(golden / "edited.npz")
    expected = _load_npz(golden / "expected.npz")
    mask_path = golden / "mask.npy"
    if not mask_path.exists():
        raise SSICError(f"golden file missing: {mask_path}")
    mask = np.load(mask_path, allow_pickle=False)
    got = {f"prime/{k}": v for k, v in session.prime(original).items()}
    got.update({f"edit/{k}": v for k, v in session.edit(edited, mask=mask, mode="sparse").items()})
    rows = []
    for name, want in expected.items():
        if name not in got:
            rows.append({"name": name, "ok": False, "max_abs_err": float("inf"), "psnr": 0.0, "mismatched": -1})
            continue
        have = got[name]
        if have.shape != want.shape:
            rows.append({"name": name, "ok": False, "max_abs_err": float("inf"), "psnr": 0.0, "mismatched": -1})
            continue
        bad = ~np.isclose(have, want, atol=atol, rtol=rtol)
        p = psnr(have, want, peak=max(float(np.ptp(want)), 1e-6))
        rows.append({"name": name, "ok": bool(not bad.any() and p >= min_psnr),
                     "max_abs_err": float(np.max(np.abs(have - want))), "psnr": p, "mismatched": int(bad.sum())})
    return {"ok": all(r["ok"] for r in rows), "checks": rows}
