"""Stable Diffusion 1.x: the denoising UNet and the VAE decoder/encoder, built with ``diffusers``.

Three exportable models (``SD_MODEL_NAMES``), each a thin ``nn.Module`` around a diffusers model so
that the ONNX graph has plain tensor inputs and outputs:

- ``sd-unet`` (:class:`UNetStep`): ``sample`` float32 ``[B, 4, h, w]`` (the noisy latent),
  ``timestep`` float32 ``[1]`` (the DDPM step in ``[0, 1000)``, broadcast over the batch; float so
  that one graph serves fractional schedules too), ``encoder_hidden_states`` float32
  ``[B, 77, D]`` (the text embedding; no text encoder is needed) -> ``out_sample`` ``[B, 4, h, w]``
  (the predicted noise). ``B`` is 1, or 2 for classifier-free guidance (unconditional and
  conditional halves in one run).
- ``sd-vae-decoder`` (:class:`VAEDecoder`): ``latent`` ``[1, 4, h, w]`` in the UNet's (scaled)
  latent space -> ``image`` ``[1, 3, 8h, 8w]`` clamped to ``[-1, 1]``. It divides by the scaling
  factor itself, then runs ``post_quant_conv`` and the decoder.
- ``sd-vae-encoder`` (:class:`VAEEncoder`): ``image`` ``[1, 3, H, W]`` in ``[-1, 1]`` ->
  ``latent`` ``[1, 4, H/8, W/8]``: the mean of the posterior (no sampling, so the graph is
  deterministic) times the scaling factor, i.e. directly in the UNet's latent space.

``SCALING_FACTOR`` is SD 1.x's 0.18215 (the VAE config's ``scaling_factor``; a loaded VAE uses its
own value).

Presets (``SD_PRESETS``):

- ``full``: the SD 1.5 configuration. UNet 859.5M parameters (``block_out_channels`` 320/640/1280/
  1280, 2 layers per block, cross-attention in the first three levels and the middle, 8 heads,
  context ``77 x 768``), default latent 64x64 (512x512 images); VAE 83.7M parameters
  (128/256/512/512, 2 layers per block, mid attention).
- ``tiny``: the same block kinds in the same order with few channels and levels (a cross-attention
  level, then a plain last level; a cross-attention middle block; mirrored up blocks), UNet 32/64
  channels, 1 layer per block, 8 heads, context ``77 x 32``, default latent 32x32 (0.79M parameters);
  VAE 16/16/32/32 (four levels, the 8x scale of the real one; 0.26M), 1 layer per block, mid attention,
  default latent 16x16 (128x128 images). Two UNet levels keep the test exports short (the dynamo
  exporter's time grows with the number of transformer blocks).

Weights are seeded and deterministic (``ssic.models.presets.initialize``: variance-preserving normal
weights, GroupNorm affine near 1/0; the global torch RNG is left as it was). Loading real weights:
:func:`ssic.models.sd_checkpoints.load_sd_weights` (diffusers and CompVis layouts).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ssic.errors import SSICError
from ssic.models.sd_config import (  # noqa: F401 - re-exported
    CONTEXT_LENGTH,
    SCALING_FACTOR,
    SD_PRESETS,
    SDPreset,
    check_preset,
    unet_config,
    vae_config,
)

__all__ = [
    "SD_MODEL_NAMES",
    "SD_PRESETS",
    "SCALING_FACTOR",
    "CONTEXT_LENGTH",
    "SDPreset",
    "unet_config",
    "vae_config",
    "build_unet",
    "build_vae",
    "wrap",
    "build_sd_model",
    "sd_example_inputs",
    "sd_input_names",
    "sd_output_names",
    "parse_size",
]

SD_MODEL_NAMES: tuple[str, ...] = ("sd-unet", "sd-vae-decoder", "sd-vae-encoder")
def _seeded(build, name: str, seed: int) -> nn.Module:
    from ssic.models.init_weights import initialize

    with torch.random.fork_rng(devices=[]):  # diffusers initialises with the global RNG
        torch.manual_seed(int(seed))
        model = build()
    return initialize(model, name, seed)


def build_unet(preset: str = "tiny", seed: int = 0) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` of ``preset`` with seeded weights, eval mode."""
    from diffusers import UNet2DConditionModel

    cfg = unet_config(preset)
    return _seeded(lambda: UNet2DConditionModel(**cfg), "sd-unet", seed)


def build_vae(preset: str = "tiny", seed: int = 0) -> nn.Module:
    """A diffusers ``AutoencoderKL`` of ``preset`` with seeded weights, eval mode."""
    from diffusers import AutoencoderKL

    cfg = vae_config(preset)
    return _seeded(lambda: AutoencoderKL(**cfg), "sd-vae", seed)


class UNetStep(nn.Module):
    """``(sample [B,4,h,w], timestep [1], encoder_hidden_states [B,77,D]) -> out_sample [B,4,h,w]``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEDecoder(nn.Module):
    """``latent [1,4,h,w]`` (scaled latent space) -> ``image [1,3,8h,8w]`` clamped to ``[-1, 1]``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", SCALING_FACTOR) or SCALING_FACTOR)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.post_quant_conv(latent / self.scaling_factor)
        return self.decoder(z).clamp(-1.0, 1.0)


class VAEEncoder(nn.Module):
    """``image [1,3,H,W]`` in ``[-1, 1]`` -> ``latent [1,4,H/8,W/8]`` = posterior mean * scaling factor."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", SCALING_FACTOR) or SCALING_FACTOR)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(image))
        return moments[:, : self.latent_channels] * self.scaling_factor


def wrap(name: str, model: nn.Module) -> nn.Module:
    """The exportable module of ``name`` around a diffusers UNet (``sd-unet``) or VAE (the others)."""
    if name == "sd-unet":
        return UNetStep(model).eval()
    if name == "sd-vae-decoder":
        return VAEDecoder(model).eval()
    if name == "sd-vae-encoder":
        return VAEEncoder(model).eval()
    raise SSICError(f"unknown model {name!r}: choose one of {', '.join(SD_MODEL_NAMES)}")


def build_sd_model(name: str, preset: str = "tiny", seed: int = 0, weights: str | None = None) -> nn.Module:
    """The exportable module of ``name`` at ``preset``: seeded weights, or ``weights`` loaded from a
    diffusers directory/safetensors or a CompVis ``.ckpt``/``.safetensors`` (see
    :mod:`ssic.models.sd_checkpoints`). Eval mode."""
    check_preset(name, preset)
    if weights is not None:
        from ssic.models.sd_checkpoints import load_sd_weights

        inner = load_sd_weights("unet" if name == "sd-unet" else "vae", weights, preset)
    else:
        inner = build_unet(preset, seed) if name == "sd-unet" else build_vae(preset, seed)
    return wrap(name, inner)


def parse_size(size: str | int | None) -> tuple[int, int] | None:
    """``"512"``, ``"512x768"`` (H x W) or an int -> ``(H, W)`` in image pixels; None stays None.
    Raises SSICError unless both are positive multiples of 8."""
    if size is None:
        return None
    text = str(size).lower().strip()
    try:
        parts = [int(p) for p in text.split("x")]
    except ValueError:
        raise SSICError(f"--size takes N or HxW in image pixels (e.g. 512 or 512x768), got {size!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or any(p <= 0 or p % 8 for p in parts):
        raise SSICError(f"--size must be positive multiples of 8 (image pixels; the latent is 1/8), got {size!r}")
    return parts[0], parts[1]


def _model_dims(name: str, module: nn.Module | None, preset: str) -> dict:
    if module is not None:
        if name == "sd-unet":
            cfg = module.unet.config
            return {"in": int(cfg.in_channels), "ctx": int(cfg.cross_attention_dim)}
        if name == "sd-vae-decoder":
            return {"in": int(module.post_quant_conv.in_channels)}
        return {"in": int(module.encoder.conv_in.in_channels)}
    p = SD_PRESETS[preset]
    if name == "sd-unet":
        return {"in": p.unet["in_channels"], "ctx": p.unet["cross_attention_dim"]}
    return {"in": p.vae["latent_channels"] if name == "sd-vae-decoder" else p.vae["in_channels"]}


def sd_example_inputs(name: str, preset: str = "tiny", seed: int = 0, size: tuple[int, int] | None = None,
                      batch: int = 1, module: nn.Module | None = None) -> dict[str, np.ndarray]:
    """Seeded example inputs, keyed by ONNX input name, all float32.

    ``size`` is ``(H, W)`` in image pixels (default: the preset's latent side * 8); ``batch`` (1 or 2)
    applies to ``sd-unet`` only. ``module`` (a loaded model) overrides the preset's channel counts.
    ``sd-unet``: ``sample`` N(0,1) ``[B,4,H/8,W/8]``, ``timestep`` ``[1]`` (an integer-valued step in
    ``[0, 1000)``), ``encoder_hidden_states`` N(0,1) ``[B,77,D]``; ``sd-vae-decoder``: ``latent``
    N(0,1) ``[1,4,H/8,W/8]``; ``sd-vae-encoder``: ``image`` uniform in [-1,1] ``[1,3,H,W]``.
    """
    check_preset(name, preset)
    if batch not in (1, 2):
        raise SSICError(f"--batch must be 1 or 2 (2 = classifier-free guidance), got {batch}")
    if batch != 1 and name != "sd-unet":
        raise SSICError(f"--batch 2 applies to sd-unet only (classifier-free guidance), not {name}")
    p = SD_PRESETS[preset]
    if size is None:
        side = 8 * (p.unet_latent if name == "sd-unet" else p.vae_latent)
        size = (side, side)
    h, w = size
    dims = _model_dims(name, module, preset)
    rng = np.random.default_rng(seed)
    if name == "sd-unet":
        return {
            "sample": rng.standard_normal((batch, dims["in"], h // 8, w // 8)).astype(np.float32),
            "timestep": np.array([float(rng.integers(0, 1000))], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, CONTEXT_LENGTH, dims["ctx"])).astype(np.float32),
        }
    if name == "sd-vae-decoder":
        return {"latent": rng.standard_normal((1, dims["in"], h // 8, w // 8)).astype(np.float32)}
    return {"image": rng.uniform(-1.0, 1.0, (1, dims["in"], h, w)).astype(np.float32)}


def sd_input_names(name: str) -> list[str]:
    """ONNX input names of ``name``."""
    check_preset(name, "tiny")
    return {"sd-unet": ["sample", "timestep", "encoder_hidden_states"], "sd-vae-decoder": ["latent"],
            "sd-vae-encoder": ["image"]}[name]


def sd_output_names(name: str) -> list[str]:
    """ONNX output names of ``name``."""
    check_preset(name, "tiny")
    return {"sd-unet": ["out_sample"], "sd-vae-decoder": ["image"], "sd-vae-encoder": ["latent"]}[name]
