"""Shared fixtures: tiny exported models and compiled artefacts, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SSIC_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ssic")


@pytest.fixture(scope="session")
def tiny_onnx(workdir):
    """Export a tiny preset once per session: ``tiny_onnx("ddim") -> Path``."""
    from ssic.models import export_model
    from ssic.models.export import tag_model

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = workdir / f"{name}_tiny.onnx"
            export_model(name, "tiny", path, seed=0)
            tag_model(path, name, "tiny")
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_artefact(workdir, tiny_onnx):
    """Compile a tiny preset once per (model, lowering, exact): ``tiny_artefact("gaugan", "fused")``."""
    import ssic

    cache: dict[tuple, Path] = {}

    def get(name: str, lowering: str = "fused", exact: bool = False) -> Path:
        key = (name, lowering, exact)
        if key not in cache:
            out = workdir / f"{name}_{lowering}{'_exact' if exact else ''}.ssic"
            ssic.compile(tiny_onnx(name), target="ort", lowering=lowering, output_dir=out, exact=exact, force=True)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(0)
