"""Golden-output regression checks for compiled artefacts (``ssic verify``).

A golden directory holds the inputs (``original.npz``, ``edited.npz``, ``mask.npy``) and the
expected outputs of the prime run and of the sparse edit (``expected.npz``, keys ``prime/<out>``
and ``edit/<out>``), and ``artefact.json``: the compile options, ssic version and compiler digest of
the artefact that wrote them. ``ssic verify OUT --golden DIR --update`` writes them. When a check
fails, :func:`check_golden` says whether the artefact under test was compiled with other options or
by another build of ssic than the goldens' (``report["hint"]``).
"""

from __future__ import annotations

import json
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


def _identity(session) -> dict:
    """What decides an artefact's outputs besides the model: its resolved options and the compiler."""
    m = session.manifest
    return {"options": m.options.model_dump(mode="json"), "ssic_version": m.ssic_version,
            "compiler_digest": m.compiler_digest}


def _hint(session, golden: Path) -> str:
    """Why goldens may not match this artefact: other compile options or another compiler ("" if neither)."""
    try:
        then = json.loads((golden / "artefact.json").read_text())
    except (OSError, ValueError):
        return ""
    now = _identity(session)
    old, new = then.get("options", {}), now["options"]
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        return ("the goldens were written by an artefact compiled with other options (" + ", ".join(changed[:4])
                + (", ..." if len(changed) > 4 else "") + "); if that change is intended, rewrite them with --update")
    if then.get("compiler_digest") and then.get("compiler_digest") != now["compiler_digest"]:
        return (f"the goldens were written by another build of ssic ({then.get('ssic_version')}, compiler "
                f"{str(then.get('compiler_digest'))[:12]}; this artefact: {now['compiler_digest'][:12]}); if the "
                "change is intended, rewrite them with --update")
    return ""


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
    (golden / "artefact.json").write_text(json.dumps(_identity(session), indent=1) + "\n")


def check_golden(session, golden: Path, *, atol: float = 1e-4, rtol: float = 1e-3, min_psnr: float = 60.0) -> dict:
    """Compare prime and edit outputs with the goldens; returns ``{"ok", "checks": [one row per output],
    "hint"}`` (``hint``: on a failure, the compile options or compiler that differ from the goldens'
    artefact, else ""). Raises ``SSICError`` for a missing or unreadable golden file."""
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
    ok = all(r["ok"] for r in rows)
    return {"ok": ok, "checks": rows, "hint": "" if ok else _hint(session, golden)}
