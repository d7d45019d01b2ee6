"""Loading compiled artefacts: :func:`load` returns a :class:`ssic.session.Session` on the right backend.

The session (``prime``/``edit``/``dense``/``commit``) lives in :mod:`ssic.session`; the backends in
:mod:`ssic.targets` (ONNX Runtime on the CPU, TensorRT on NVIDIA GPUs).
"""

from __future__ import annotations

from pathlib import Path

from ssic.artefact import read_manifest
from ssic.library import check_threads
from ssic.session import CacheState, EditStats, Session

__all__ = ["CacheState", "EditStats", "Session", "load"]


def load(path: str | Path, *, threads: int | None = None) -> Session:
    """Load a compiled artefact directory; returns a :class:`Session`.

    ``threads`` is the intra-op thread count (``None``: ONNX Runtime's default). Artefacts compiled with
    ``--target trt`` run on TensorRT (an NVIDIA GPU is needed). Raises ``SSICError`` for a missing,
    corrupt or incompatible artefact.
    """
    threads = check_threads(threads)
    manifest = read_manifest(path)
    if manifest.target == "trt":
        from ssic.targets.trt_session import load_trt

        return load_trt(Path(path), manifest, threads=threads)
    from ssic.targets.ort import OrtBackend

    return Session(path, manifest, OrtBackend(path, manifest, threads=threads), threads=threads)
