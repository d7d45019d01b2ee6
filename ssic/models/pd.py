"""Progressive Distillation (Salimans & Ho, 2022) UNet configs, LSUN Church.

The network is :class:`ssic.models.ddim.UNet` (one UNet implementation for both diffusion
models) with the options of google-research ``diffusion_distillation`` (``unet_iddpm``):

- church-128 (``church128_base.py``): ch 64, ch_mult (1, 2, 4, 6, 8), 3 ResBlocks per level,
  attention at 8/16/32 with head dim 64 (multi-head), embedding width 768, FiLM timestep
  conditioning (``norm2(h) * (1 + scale) + shift``), ``resblock_resample=True`` and 6 output
  channels (``mean_type='both'``: eps and x);
- PD-256, the SIGE paper's profiling model, adds a level: ch_mult (1, 1, 2, 4, 6, 8).

Choices the paper leaves open, settled by the MAC target (119G for PD-256, SIGE paper):

- attention resolutions stay at **8/16/32** (absolute pixels, as in the 128 config). Moving them
  to 16/32/64 would give 150G; keeping 8/16/32 gives 118.7G;
- resampling is **BigGAN-style ResBlocks** (``resblock_resample=True`` as in the official
  config): down = norm1/swish, then 2x2 average pooling on both branches before conv1; up =
  nearest 2x on both branches. Plain conv resampling would give 108.4G.

With these, the full preset counts 118.73 GMACs (within 0.3% of 119G).

Inputs: ``x`` float32 ``[1, 3, 256, 256]``; ``t`` float32 ``[1]``, the continuous time in
``[0, 1]`` (the official model feeds ``arctan(exp(-logsnr/2)) / (pi/2)``, which is this time for the
cosine schedule); the model scales it by 1000 and computes the sinusoidal embedding itself.
Output: ``out`` float32 ``[1, 6, 256, 256]`` (channels 0-2: eps, 3-5: x prediction).
Dropout (0.1 in training) is absent at inference. The 1x1 q/k/v/proj_out of attention are
convs, and module names follow the ermongroup layout of :mod:`ssic.models.ddim`.
"""

from __future__ import annotations

from ssic.models.ddim import UNet, UNetConfig

__all__ = ["PD_CONFIGS", "build_pd"]

_PD_COMMON = dict(
    num_res_blocks=3,
    attn_resolutions=(8, 16, 32),
    resolution=256,
    in_channels=3,
    out_ch=6,
    scale_shift=True,
    resblock_updown=True,
    time_scale=1000.0,
    output_name="out",
)

PD_CONFIGS: dict[str, UNetConfig] = {
    "full": UNetConfig(ch=64, ch_mult=(1, 1, 2, 4, 6, 8), emb_ch=768, head_dim=64,
                       num_groups=32, norm_eps=1e-6, **_PD_COMMON),
    # same topology; widths 8..64, 4 GroupNorm groups, head dim 8 (multi-head everywhere)
    "tiny": UNetConfig(ch=8, ch_mult=(1, 1, 2, 4, 6, 8), emb_ch=32, head_dim=8,
                       num_groups=4, norm_eps=1e-6, **_PD_COMMON),
}


def build_pd(preset: str) -> UNet:
    return UNet(PD_CONFIGS[preset])
