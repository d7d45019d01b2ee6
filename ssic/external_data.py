"""ONNX models over 2 GB: weights kept as external data, read lazily, shared between graphs.

Protobuf cannot serialize a message over 2 GB, so a model such as SD 1.5's UNet (3.4 GB in float32)
lives as ``model.onnx`` (the graph, < 1 MB) plus ``model.onnx.data`` (the weights), and every tool
that would serialize the whole proto breaks on it: ``onnx.checker.check_model(proto)``,
``onnx.shape_inference.infer_shapes(proto)``, ``onnx.save(proto)``. The helpers here keep the
weights on disk:

- :func:`load_lazily` reads the graph without the weights' bytes (``load_external_data=False``) and
  checks the file with ``onnx.checker`` *by path*; initializers stay ``EXTERNAL`` references.
- :func:`share_external_data` prepares a graph that references external data for saving into
  another directory (an artefact): each referenced data file is copied once
  into that directory as ``weights.data`` (``weights.1.data``, ... for further files) and the
  references are rewritten to it, so the dense, prime and sparse graphs of an artefact share one
  copy of the weights instead of three.

ONNX Runtime resolves external data relative to the model file's directory, so the graphs load with
``InferenceSession(path)`` as usual.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from ssic.errors import SSICError
from ssic.passes.normalize import all_tensors

__all__ = ["load_lazily", "external_locations", "share_external_data", "WEIGHTS_NAME"]

WEIGHTS_NAME = "weights.data"


def load_lazily(path: str | os.PathLike, absolute: bool = True) -> onnx.ModelProto:
    """The graph of the ONNX file ``path`` with external initializers left on disk (read and
    checked as :func:`ssic.macs.load_model_for_analysis` does). With ``absolute`` (default) the
    references are rewritten to absolute paths, so that ``onnx_ir`` (``ir.serde.deserialize_model``
    gives external tensors no base directory) can read a weight a pass needs from any working
    directory, memory-mapped; :func:`share_external_data` turns them back into relative names when
    the graphs are saved. Raises SSICError for a missing, unreadable or invalid file."""
    from ssic.macs import load_model_for_analysis

    model = load_model_for_analysis(path)
    if absolute:
        base = Path(path).resolve().parent
        for t in all_tensors(model):
            if _location(t) is not None:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = str(base / entry.value)
    return model


def _location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise SSICError(f"tensor {tensor.name!r} is marked external but has no location")


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external-data file names ``model`` references (relative to its directory)."""
    seen: dict[str, None] = {}
    for t in all_tensors(model):
        loc = _location(t)
        if loc is not None:
            seen.setdefault(loc, None)
    return list(seen)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` once. (A hard link would save the disk space, but ``onnx.checker``
    refuses external data files with more than one link, and the artefact is checked by path.)"""
    if dst.exists() and dst.stat().st_size == src.stat().st_size:
        return
    shutil.copyfile(src, dst)


def share_external_data(model: onnx.ModelProto, source_dir: str | os.PathLike,
                        target_dir: str | os.PathLike) -> onnx.ModelProto:
    """Make ``model`` (whose external references are relative to ``source_dir``) loadable from
    ``target_dir``: each referenced data file is copied into ``target_dir`` once as
    ``weights.data`` / ``weights.N.data`` and the references are rewritten in place. Calling it for
    several graphs with the same ``target_dir`` reuses the same files (offsets are unchanged).
    Returns ``model``. Raises SSICError when a referenced file is missing."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    names: dict[str, str] = {}
    for i, loc in enumerate(external_locations(model)):
        src = source_dir / loc
        if not src.is_file():
            raise SSICError(f"external data file {src} is missing (it must sit beside the .onnx file)")
        name = WEIGHTS_NAME if i == 0 else f"weights.{i}.data"
        _link_or_copy(src, target_dir / name)
        names[loc] = name
    if not names:
        return model
    for t in all_tensors(model):
        loc = _location(t)
        if loc is not None:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = names[loc]
    return model
