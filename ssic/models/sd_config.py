"""Stable Diffusion 1.x configurations (SD 1.5 sizes and the tiny test preset), shared by the model
builders (:mod:`ssic.models.sd`) and the checkpoint loaders (:mod:`ssic.models.sd_checkpoints`)."""

from __future__ import annotations

from dataclasses import dataclass

from ssic.errors import SSICError
from ssic.models import SD_MODEL_NAMES

SCALING_FACTOR = 0.18215
CONTEXT_LENGTH = 77  # CLIP's token count in SD 1.x


@dataclass(frozen=True)
class SDPreset:
    """Configs of one preset: diffusers keyword arguments for the UNet and the VAE, default sizes."""

    unet: dict
    vae: dict
    unet_latent: int  # default latent side of the UNet (image side / 8)
    vae_latent: int  # default latent side of the VAE decoder/encoder


SD_PRESETS: dict[str, SDPreset] = {
    # diffusers' UNet2DConditionModel defaults are SD 1.x's; the values are spelled out so that a
    # change of diffusers' defaults cannot change the model silently.
    "full": SDPreset(
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                              "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
            flip_sin_to_cos=True, freq_shift=0, act_fn="silu", use_linear_projection=False,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu",
            scaling_factor=SCALING_FACTOR,
        ),
        unet_latent=64, vae_latent=64,
    ),
    "tiny": SDPreset(
        unet=dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, norm_eps=1e-5,
            flip_sin_to_cos=True, freq_shift=0, act_fn="silu", use_linear_projection=False,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=128,
            block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, act_fn="silu",
            scaling_factor=SCALING_FACTOR,
        ),
        unet_latent=32, vae_latent=16,
    ),
}


def check_preset(name: str, preset: str) -> None:
    if name not in SD_MODEL_NAMES:
        raise SSICError(f"unknown model {name!r}: choose one of {', '.join(SD_MODEL_NAMES)}")
    if preset not in SD_PRESETS:
        raise SSICError(f"unknown preset {preset!r}: choose one of {', '.join(SD_PRESETS)}")


def unet_config(preset: str) -> dict:
    """diffusers ``UNet2DConditionModel`` keyword arguments of ``preset``."""
    check_preset("sd-unet", preset)
    return dict(SD_PRESETS[preset].unet)


def vae_config(preset: str) -> dict:
    """diffusers ``AutoencoderKL`` keyword arguments of ``preset``."""
    check_preset("sd-vae-decoder", preset)
    return dict(SD_PRESETS[preset].vae)
