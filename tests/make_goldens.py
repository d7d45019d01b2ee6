"""Write the golden outputs of the tiny presets to tests/golden/<model>/ (checked by `ssic verify`).

Regenerate with:   make goldens      (the same as: python -m tests.make_goldens)
Options:           python -m tests.make_goldens --models ddim gaugan --out tests/golden

Regenerate them when a change to ssic *intends* to change the tiny presets' outputs (a new model
definition, a different default mask pipeline or tile size), and say so in the commit message;
tests/test_verify_golden.py checks every artefact against them with verify's default tolerances
(atol 1e-4, rtol 1e-3, PSNR >= 60 dB).

Each golden directory is what ``ssic.verify.write_golden`` writes (original.npz, edited.npz,
mask.npy, expected.npz with prime/<output> and edit/<output>), for an artefact compiled from
``ssic.models.export_model(name, "tiny", path, seed=0)`` with ``COMPILE_OPTIONS``. Arrays are stored
as float32 in compressed .npz files; the image inputs of DDIM/PD are made of 8x8 constant blocks so
that they compress (the outputs do not compress, they dominate the ~7 MB).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

MODELS = ("ddim", "pd", "gaugan")
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
#: how the golden artefacts are compiled: the defaults of `ssic compile` (ONNX Runtime, fused ops, SIGE masks)
COMPILE_OPTIONS = {"target": "ort", "lowering": "fused", "exact": False}


def golden_inputs(manifest) -> dict[str, np.ndarray]:
    """The model family's example inputs, with image inputs replaced by compressible 8x8-block images."""
    from ssic.bench import example_inputs

    inputs = example_inputs(manifest, 0)
    src = manifest.mask.primary.input or None
    family = manifest.model.family
    if src is not None and family in ("ddim", "pd"):
        x = inputs[src]
        _, c, h, w = x.shape
        rng = np.random.default_rng(0)
        low = np.round(rng.uniform(-1, 1, (1, c, -(-h // 8), -(-w // 8))) * 32) / 32
        inputs[src] = np.ascontiguousarray(low.repeat(8, 2).repeat(8, 3)[:, :, :h, :w], dtype=np.float32)
    return inputs


def compress_npz(directory: Path) -> None:
    """Rewrite every .npz in ``directory`` compressed (same keys, same float32 values)."""
    for path in sorted(directory.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)


def make_golden(name: str, out_dir: Path, workdir: Path) -> Path:
    import ssic
    from ssic.models import export_model
    from ssic.models.export import tag_model
    from ssic.verify import write_golden

    onnx_path = workdir / f"{name}_tiny.onnx"
    export_model(name, "tiny", onnx_path, seed=0)
    tag_model(onnx_path, name, "tiny")
    art = ssic.compile(onnx_path, output_dir=workdir / f"{name}.ssic", force=True, **COMPILE_OPTIONS)
    sess = ssic.load(art)
    golden = out_dir / name
    golden.mkdir(parents=True, exist_ok=True)
    for old in golden.iterdir():
        old.unlink()
    write_golden(sess, golden, original=golden_inputs(sess.manifest))
    compress_npz(golden)
    return golden


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ssic-goldens-") as tmp:
        for name in args.models:
            golden = make_golden(name, args.out, Path(tmp))
            size = sum(p.stat().st_size for p in golden.iterdir())
            print(f"wrote {golden} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
