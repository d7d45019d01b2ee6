"""Compile and run one foreign architecture in the three modes and measure it.

``measure(foreign, workdir)`` returns a :class:`Result`; ``python tests/foreign/measure.py`` prints
the status table of tests/foreign/README.md.

Modes: ``default`` (fused lowering, SIGE-pyramid masks), ``exact`` (fused, ``--exact``) and
``standard`` (stock-ONNX lowering). Figures:

- ``exact_err``: max |edit - dense| / (max - min of the dense output) in exact mode;
- ``psnr_in``: PSNR (dB, peak = the dense output's range) inside the edit, default mode;
- ``sparse_macs``: MACs of the convs that run sparse / all MACs of the model (manifest);
- ``auto_mask``: whether ``edit`` found the edit without a ``mask=`` (the mask-source input).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import ssic
from ssic.errors import SSICError

MODES = {"default": {}, "exact": {"exact": True}, "standard": {"lowering": "standard"}}


@dataclass
class Result:
    name: str
    compiled: dict[str, str] = field(default_factory=dict)  # mode -> "ok" or the error line
    edited: dict[str, str] = field(default_factory=dict)  # mode -> "sparse"/"dense"/error
    auto_mask: bool = False
    exact_err: float | None = None
    all_tiles_err: float | None = None
    psnr_in: float | None = None
    sparse_macs: float | None = None
    macs: int = 0
    mac_ratio: float | None = None  # dense MACs / MACs of the default-mode edit
    mask_only_seen: bool | None = None  # only a second input (an inpainting mask) changed: edit saw it
    sparse_layers: str = ""
    dense_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _manifest(art: Path) -> dict:
    return json.loads((Path(art) / "manifest.json").read_text())


def _nchw(y: np.ndarray) -> np.ndarray:
    return y.transpose(0, 3, 1, 2) if y.ndim == 4 and y.shape[-1] == 3 and y.shape[1] != 3 else y


def _edit_box(foreign, out_hw: tuple[int, int]) -> np.ndarray:
    """Where the inputs differ, as a bool mask at ``out_hw`` (nearest resize of the any-input diff)."""
    masks = []
    for name, x in foreign.original.items():
        diff = np.abs(_nchw(foreign.edited[name]) - _nchw(x)).max(axis=(0, 1)) > 0
        h, w = diff.shape
        ys = np.arange(out_hw[0]) * h // out_hw[0]
        xs = np.arange(out_hw[1]) * w // out_hw[1]
        masks.append(diff[ys][:, xs])
    return np.logical_or.reduce(masks)


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _run(art: Path, foreign, result: Result, mode: str) -> tuple[np.ndarray, np.ndarray] | None:
    sess = ssic.load(art, threads=1)
    sess.prime(foreign.original)
    want = _nchw(sess.dense(foreign.edited)[foreign.output])
    mask = _manifest(art)["mask"]
    mask_hw = (mask["height"], mask["width"])
    try:
        got = sess.edit(foreign.edited, mode="sparse")[foreign.output]
        if mode == "default":
            result.auto_mask = True
    except SSICError as exc:
        result.edited[mode] = f"auto mask: {exc}"
        got = sess.edit(foreign.edited, mask=_edit_box(foreign, mask_hw), mode="sparse")[foreign.output]
    result.edited.setdefault(mode, sess.last.mode)
    if mode == "default":
        result.mac_ratio = sess.last.macs_dense / max(sess.last.macs, 1)
    if mode == "exact":
        # exact mode: default mode's capped halo cannot follow LaMa's dilated convs, and the change of
        # a mask alone is small (8e-4 here), so only exact mode separates "seen" from "stale"
        if len(foreign.original) > 1:  # change only the non-first inputs, as a user painting a new hole
            first = next(iter(foreign.original))
            only = dict(foreign.edited) | {first: foreign.original[first]}
            before = _nchw(sess.prime(foreign.original)[foreign.output])
            want_only = _nchw(sess.dense(only)[foreign.output])
            got_only = _nchw(sess.edit(only, mode="sparse")[foreign.output])
            # seen: inside the edit, the result is far closer to dense than the stale output is
            box = _edit_box(foreign, want_only.shape[2:])
            err, stale = np.abs(got_only - want_only)[:, :, box].max(), np.abs(before - want_only)[:, :, box].max()
            result.mask_only_seen = bool(err < 0.25 * stale)
    if mode == "exact":
        full = sess.edit(foreign.edited, mask=np.ones(mask_hw, bool), mode="sparse")[foreign.output]
        rng = float(want.max() - want.min())
        result.all_tiles_err = float(np.abs(_nchw(full) - want).max()) / rng
    return _nchw(got), want


def measure(foreign, workdir: Path) -> Result:
    """Compile ``foreign`` in every mode, prime and edit each artefact; never raises for ssic's
    own errors (they are recorded)."""
    t0 = time.perf_counter()
    r = Result(foreign.name)
    for mode, kwargs in MODES.items():
        out = workdir / f"{foreign.name}.{mode}.ssic"
        try:
            art = ssic.compile(foreign.path, output_dir=out, force=True, **foreign.compile_kwargs, **kwargs)
        except SSICError as exc:
            r.compiled[mode] = str(exc)
            continue
        r.compiled[mode] = "ok"
        if mode == "default":
            manifest = _manifest(art)
            layers = manifest["layers"]
            r.macs = int(manifest["macs"]["dense"])
            r.sparse_macs = sum(la["macs_dense"] for la in layers if la["sparse"]) / max(r.macs, 1)
            r.sparse_layers = f"{sum(la['sparse'] for la in layers)}/{len(layers)}"
            r.dense_reasons = sorted({la["reason"] for la in layers if not la["sparse"]})
        try:
            pair = _run(art, foreign, r, mode)
        except SSICError as exc:
            r.edited[mode] = f"error: {exc}"
            continue
        got, want = pair
        rng = float(want.max() - want.min())
        if mode == "exact":
            r.exact_err = float(np.abs(got - want).max()) / rng
        if mode == "default":
            box = _edit_box(foreign, want.shape[2:])
            r.psnr_in = _psnr(got[:, :, box], want[:, :, box], rng)
    r.seconds = time.perf_counter() - t0
    return r


def table(results: list[Result]) -> str:
    rows = ["| model | compiles (default/exact/standard) | edit mask found | sparse convs | MACs sparse | "
            "MAC ratio at the edit | exact err / range | all tiles err | PSNR in edit (default) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        comp = "/".join("yes" if r.compiled.get(m) == "ok" else "NO" for m in MODES)
        rows.append(f"| {r.name} | {comp} | {'yes' if r.auto_mask else 'no'} | {r.sparse_layers} | "
                    f"{'' if r.sparse_macs is None else f'{100 * r.sparse_macs:.0f}%'} | "
                    f"{'' if r.mac_ratio is None else f'{r.mac_ratio:.1f}x'} | "
                    f"{'' if r.exact_err is None else f'{r.exact_err:.1e}'} | "
                    f"{'' if r.all_tiles_err is None else f'{r.all_tiles_err:.1e}'} | "
                    f"{'' if r.psnr_in is None else f'{r.psnr_in:.1f} dB'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from architectures import ARCHITECTURES

    names = sys.argv[1:] or list(ARCHITECTURES)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            foreign = ARCHITECTURES[name](Path(tmp))
            r = measure(foreign, Path(tmp))
            results.append(r)
            print(name, f"{r.seconds:.1f}s", r.compiled, r.edited, r.dense_reasons, file=sys.stderr)
    print(table(results))
