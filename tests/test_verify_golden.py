"""CI regression on compiled-artefact outputs: `ssic verify` against tests/golden (see tests/make_goldens.py).

Each tiny preset is compiled as make_goldens compiles it and checked through the command line
(exit 0); a perturbed copy of a golden must fail with a non-zero exit, a FAIL row naming the output
and its error on stdout, and one `error:` line on stderr.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.make_goldens import COMPILE_OPTIONS, GOLDEN_DIR, MODELS

REPO = Path(__file__).resolve().parent.parent


def verify(art: Path, golden: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssic.cli", "verify", str(art), "--golden", str(golden), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def artefact(tiny_artefact):
    def get(name: str) -> Path:
        assert COMPILE_OPTIONS["target"] == "ort"
        return tiny_artefact(name, COMPILE_OPTIONS["lowering"], COMPILE_OPTIONS["exact"])

    return get


def test_goldens_present_and_small():
    total = 0
    for name in MODELS:
        d = GOLDEN_DIR / name
        names = {p.name for p in d.iterdir()}
        assert names - {"artefact.json"} == {"original.npz", "edited.npz", "mask.npy", "expected.npz"}, d
        with np.load(d / "expected.npz") as data:
            assert all(data[k].dtype == np.float32 for k in data.files)
            assert any(k.startswith("prime/") for k in data.files) and any(k.startswith("edit/") for k in data.files)
        total += sum(p.stat().st_size for p in d.iterdir())
    assert total < 8e6, f"goldens take {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", MODELS)
def test_verify_golden_passes(artefact, name):
    proc = verify(artefact(name), GOLDEN_DIR / name, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and len(report["checks"]) == 2, report
    for row in report["checks"]:
        print(f"{name} {row['name']}: max abs err {row['max_abs_err']:.2e}, PSNR {row['psnr']:.1f} dB")


@pytest.mark.parametrize("name,what", [("ddim", "edit"), ("gaugan", "prime")])
def test_perturbed_golden_fails_with_a_readable_report(artefact, name, what, tmp_path):
    golden = tmp_path / name
    shutil.copytree(GOLDEN_DIR / name, golden)
    with np.load(golden / "expected.npz") as data:
        arrays = {k: data[k].copy() for k in data.files}
    key = next(k for k in arrays if k.startswith(what + "/"))
    flat = arrays[key].reshape(-1)
    flat[1234] += 0.05  # one element, far outside atol 1e-4 + rtol 1e-3
    np.savez_compressed(golden / "expected.npz", **arrays)

    proc = verify(artefact(name), golden)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: verification failed for 1 output(s)"), proc.stderr
    rows = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "FAIL"))}
    assert set(rows) == set(arrays), proc.stdout
    assert rows[key].startswith("FAIL") and "1 element(s) out of tolerance" in rows[key], rows[key]
    assert "max abs err 0.05" in rows[key], rows[key]
    assert all(line.startswith("ok") for k, line in rows.items() if k != key), proc.stdout


def test_perturbed_input_fails(artefact, tmp_path):
    """A golden whose stored edited input changed no longer matches its expected outputs."""
    golden = tmp_path / "gaugan"
    shutil.copytree(GOLDEN_DIR / "gaugan", golden)
    mask = np.load(golden / "mask.npy")
    with np.load(golden / "edited.npz") as data:
        edited = {k: data[k].copy() for k in data.files}
    seg = edited["seg"]
    ys, xs = np.nonzero(mask)
    y, x = int(ys[len(ys) // 2]), int(xs[len(xs) // 2])
    seg[0, :-1, y - 4:y + 4, x - 4:x + 4] = 0
    seg[0, 0, y - 4:y + 4, x - 4:x + 4] = 1  # another label inside the edit
    np.savez_compressed(golden / "edited.npz", **edited)
    proc = verify(artefact("gaugan"), golden, "--json")
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["ok"]
    bad = [r["name"] for r in report["checks"] if not r["ok"]]
    assert bad == ["edit/image"], report


def test_goldens_of_other_options_fail_with_a_hint(artefact, tiny_artefact, tmp_path):
    """Goldens written by the default compile, checked against an exact-mode artefact: the one-line
    error names the option that differs and --update; with the same options but another compiler it
    names the build instead."""
    golden = tmp_path / "ddim"
    proc = verify(artefact("ddim"), golden, "--update")
    assert proc.returncode == 0, proc.stderr
    identity = json.loads((golden / "artefact.json").read_text())
    assert identity["options"]["exact"] is False and identity["compiler_digest"]
    proc = verify(tiny_artefact("ddim", "fused", exact=True), golden)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "compiled with other options (" in err[0] and "--update" in err[0], err
    assert "exact False -> True" in err[0], err

    identity["compiler_digest"] = "0" * 16  # the same options, written by another build
    (golden / "artefact.json").write_text(json.dumps(identity))
    with np.load(golden / "expected.npz") as data:
        arrays = {k: data[k] + 1.0 for k in data.files}
    np.savez(golden / "expected.npz", **arrays)
    proc = verify(artefact("ddim"), golden)
    assert proc.returncode == 2
    assert "written by another build of ssic" in proc.stderr and "other options" not in proc.stderr, proc.stderr
