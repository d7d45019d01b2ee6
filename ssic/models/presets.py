"""Model registry: ``build_model(name, preset, seed)`` and ``example_inputs(name, preset, seed)``.

Models: ``ddim`` (LSUN Church 256 UNet), ``pd`` (Progressive Distillation PD-256 UNet),
``gaugan`` (SPADE generator, Cityscapes 256x512). Presets: ``full`` (the SIGE paper's sizes) and
``tiny`` (same input resolution, topology and layer kinds, few channels).

Initialisation is seeded and deterministic (a private ``torch.Generator``; the global RNG is not
touched) and variance-preserving, so activations stay in a sane range through the whole network:

- Conv2d / Linear weights ~ N(0, gain^2 / fan_in) (gain sqrt(2) after ReLU/leaky-ReLU, else 1),
  biases ~ N(0, 0.02^2); the last convs are *not* zero-initialised;
- convs that read the one-hot label map (GauGAN ``fc`` and every ``mlp_shared.0``) use
  ``fan_in = k*k`` (only ~one channel is hot per pixel);
- GroupNorm affine: weight ~ 1 + N(0, 0.1^2), bias ~ N(0, 0.1^2);
- BatchNorm running statistics (GauGAN) are calibrated: one forward in training mode on the
  seeded example input with a cumulative average, so every BN layer normalises that input to
  roughly zero mean / unit variance; then the model is put in eval mode.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ssic.errors import SSICError
from ssic.models import MODEL_NAMES, PRESETS, SD_MODEL_NAMES  # defined in the light package module
from ssic.models.init_weights import gaugan_example, initialize  # noqa: F401 - part of this module's API

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "build_model",
    "example_inputs",
    "input_names",
    "output_names",
    "model_config",
    "initialize",
]

def _check(name: str, preset: str) -> None:
    if name not in MODEL_NAMES:
        raise SSICError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if preset not in PRESETS:
        raise SSICError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")


def model_config(name: str, preset: str):
    """The config dataclass of a model/preset (``UNetConfig`` or ``GauGANConfig``)."""
    _check(name, preset)
    if name == "ddim":
        from ssic.models.ddim import DDIM_CONFIGS

        return DDIM_CONFIGS[preset]
    if name == "pd":
        from ssic.models.pd import PD_CONFIGS

        return PD_CONFIGS[preset]
    from ssic.models.gaugan import GAUGAN_CONFIGS

    return GAUGAN_CONFIGS[preset]


def input_names(name: str) -> list[str]:
    if name in SD_MODEL_NAMES:
        from ssic.models.sd import sd_input_names

        return sd_input_names(name)
    if name not in MODEL_NAMES:
        raise SSICError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return ["seg"] if name == "gaugan" else ["x", "t"]


def output_names(name: str) -> list[str]:
    if name in SD_MODEL_NAMES:
        from ssic.models.sd import sd_output_names

        return sd_output_names(name)
    if name not in MODEL_NAMES:
        raise SSICError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return {"ddim": ["eps"], "pd": ["out"], "gaugan": ["image"]}[name]


def build_architecture(name: str, preset: str) -> nn.Module:
    """The model with PyTorch's default (unseeded) initialisation; used by loaders."""
    cfg = model_config(name, preset)
    if name in ("ddim", "pd"):
        from ssic.models.ddim import UNet

        return UNet(cfg)
    from ssic.models.gaugan import SPADEGenerator

    return SPADEGenerator(cfg)


def build_model(name: str, preset: str = "tiny", seed: int = 0) -> nn.Module:
    """Build ``name`` (``ddim``/``pd``/``gaugan``) at ``preset`` (``full``/``tiny``) with seeded
    deterministic weights, in eval mode. Stable Diffusion parts (``SD_MODEL_NAMES``) come from
    :func:`ssic.models.sd.build_sd_model`."""
    if name in SD_MODEL_NAMES:
        from ssic.models.sd import build_sd_model

        return build_sd_model(name, preset, seed)
    model = build_architecture(name, preset)
    return initialize(model, name, seed)


def example_inputs(name: str, preset: str = "tiny", seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded example inputs, keyed by the ONNX input names.

    ``ddim``: ``x`` N(0,1) float32 [1,3,256,256], ``t`` float32 [1] (a step in [0, 1000));
    ``pd``: ``x`` as above, ``t`` float32 [1] in [0, 1]; ``gaugan``: ``seg`` float32
    [1,36,256,512] built from a synthetic label/instance map. Stable Diffusion parts: see
    :func:`ssic.models.sd.sd_example_inputs` (default size, batch 1).
    """
    if name in SD_MODEL_NAMES:
        from ssic.models.sd import sd_example_inputs

        return sd_example_inputs(name, preset, seed)
    cfg = model_config(name, preset)
    rng = np.random.default_rng(seed)
    if name == "gaugan":
        return {"seg": gaugan_example(cfg, seed)}
    x = rng.standard_normal((1, cfg.in_channels, cfg.resolution, cfg.resolution)).astype(np.float32)
    if name == "ddim":
        t = np.array([float(rng.integers(0, 1000))], dtype=np.float32)
    else:
        t = np.array([float(rng.uniform(0.0, 1.0))], dtype=np.float32)
    return {"x": x, "t": t}
