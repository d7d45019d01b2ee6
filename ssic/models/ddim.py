"""UNet for DDIM (LSUN Church 256) and, through the same code with another config, PD.

One parameterised implementation (:class:`UNet` + :class:`UNetConfig`) serves both diffusion
models; :mod:`ssic.models.pd` only holds the Progressive-Distillation configs.

The module/parameter names follow the layout of ermongroup/ddim's ``Model`` class so that the
official church checkpoint's state dict loads directly (see
:func:`ssic.models.checkpoints.load_ddim_checkpoint`)::

    temb.dense.{0,1}                  Linear(ch, 4ch), Linear(4ch, 4ch)
    conv_in                           3x3 conv in_ch -> ch
    down.{i}.block.{j}                ResnetBlock (norm1, conv1, temb_proj, norm2, conv2,
                                      nin_shortcut when channels change)
    down.{i}.attn.{j}                 AttnBlock (norm, q, k, v, proj_out as 1x1 convs)
    down.{i}.downsample.conv          3x3 stride-2 conv after F.pad(x, (0, 1, 0, 1))
    mid.block_1 / mid.attn_1 / mid.block_2
    up.{i}.block.{j} / up.{i}.attn.{j} / up.{i}.upsample.conv   (nearest 2x, then 3x3 conv)
    norm_out, conv_out

Inputs of the DDIM model (batch 1, static shapes):

- ``x``: float32 ``[1, 3, 256, 256]``, the noisy image;
- ``t``: float32 ``[1]``, the timestep (DDIM: an integer-valued step in ``[0, 1000)``); the model
  computes the sinusoidal embedding (dimension ``ch``) itself.

Output: ``eps`` float32 ``[1, 3, 256, 256]``, the predicted noise.

Normalisation is GroupNorm (32 groups, eps 1e-6, affine) followed by swish (x * sigmoid(x));
dropout is 0 (inference), so there is no Dropout module in the graph.

Options used only by PD (see :mod:`ssic.models.pd`): multi-head attention with a fixed head
dimension, a separate embedding width ``emb_ch``, FiLM-style timestep conditioning
(``norm2(h) * (1 + scale) + shift``) and BigGAN-style resampling ResBlocks (avg-pool 2x2 down /
nearest 2x up on both branches, then the block's convs at the new resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNetConfig",
    "UNet",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "timestep_embedding",
    "DDIM_CONFIGS",
]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet`."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    num_groups: int = 32
    norm_eps: float = 1e-6
    #: embedding width; None means 4 * ch (ermongroup/ddim)
    emb_ch: int | None = None
    #: attention head dimension; None means one head over all channels (ermongroup/ddim)
    head_dim: int | None = None
    #: FiLM conditioning ``norm2(h) * (1 + scale) + shift`` instead of ``h + temb_proj(temb)``
    scale_shift: bool = False
    #: BigGAN-style up/down-sampling ResBlocks instead of the conv Downsample/Upsample
    resblock_updown: bool = False
    #: the timestep is multiplied by this before the sinusoidal embedding
    time_scale: float = 1.0
    #: output name used in the ONNX export
    output_name: str = "eps"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def temb_ch(self) -> int:
        return self.emb_ch if self.emb_ch is not None else 4 * self.ch


DDIM_CONFIGS: dict[str, UNetConfig] = {
    # the anchor: ermongroup/ddim configs/church.yml
    "full": UNetConfig(),
    # same topology (6 levels, 2 blocks, attention at 16, channel changes at the same places),
    # 8 GroupNorm groups so that every width (16..64) divides
    "tiny": UNetConfig(ch=16, num_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding as in ermongroup/ddim (``[sin, cos]`` halves, base 10000)."""
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - 1))
    )
    args = t.to(torch.float32)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(cfg: UNetConfig, channels: int) -> nn.GroupNorm:
    if channels % cfg.num_groups:
        raise ValueError(f"GroupNorm groups {cfg.num_groups} do not divide {channels} channels")
    return nn.GroupNorm(cfg.num_groups, channels, eps=cfg.norm_eps, affine=True)


class Upsample(nn.Module):
    """Nearest 2x then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    """3x3 stride-2 conv with asymmetric zero padding (0, 1, 0, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class ResnetBlock(nn.Module):
    """GroupNorm/swish/conv residual block with timestep conditioning."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int | None = None,
                 resample: str | None = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale_shift = cfg.scale_shift
        self.resample = resample
        self.norm1 = _norm(cfg, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.temb_proj = nn.Linear(cfg.temb_ch, out_channels * (2 if cfg.scale_shift else 1))
        self.norm2 = _norm(cfg, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = swish(self.norm1(x))
        if self.resample is not None:
            h = self._resample(h)
            x = self._resample(x)
        h = self.conv1(h)
        emb = self.temb_proj(swish(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = torch.chunk(emb, 2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(swish(h))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all pixels; one head (DDIM) or ``C // head_dim`` heads (PD)."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.channels = channels
        if cfg.head_dim is None:
            self.num_heads = 1
        else:
            if channels % cfg.head_dim:
                raise ValueError(f"head_dim {cfg.head_dim} does not divide {channels} channels")
            self.num_heads = channels // cfg.head_dim
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1, 1, 0)
        self.k = nn.Conv2d(channels, channels, 1, 1, 0)
        self.v = nn.Conv2d(channels, channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        n, d = self.num_heads, c // self.num_heads
        h = self.norm(x)
        q = self.q(h).reshape(b * n, d, hh * ww).transpose(1, 2)  # [bn, hw, d]
        k = self.k(h).reshape(b * n, d, hh * ww)  # [bn, d, hw]
        v = self.v(h).reshape(b * n, d, hh * ww)  # [bn, d, hw]
        w = torch.softmax(torch.bmm(q, k) * (float(d) ** -0.5), dim=2)  # [bn, hw(q), hw(k)]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class UNet(nn.Module):
    """The diffusion UNet (ermongroup/ddim layout). ``forward(x, t) -> eps``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, ch_mult, nrb = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks
        self.num_resolutions = len(ch_mult)
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, cfg.temb_ch), nn.Linear(cfg.temb_ch, cfg.temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)

        curr_res = cfg.resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(nrb):
                block.append(ResnetBlock(cfg, block_in, block_out))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(cfg, block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                if cfg.resblock_updown:
                    down.downsample = ResnetBlock(cfg, block_in, block_in, resample="down")
                else:
                    down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, block_in, block_in)
        self.mid.attn_1 = AttnBlock(cfg, block_in)
        self.mid.block_2 = ResnetBlock(cfg, block_in, block_in)

        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            skip_in = ch * ch_mult[i_level]
            for i_block in range(nrb + 1):
                if i_block == nrb:
                    skip_in = ch * in_ch_mult[i_level]
                block.append(ResnetBlock(cfg, block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(cfg, block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                if cfg.resblock_updown:
                    up.upsample = ResnetBlock(cfg, block_in, block_in, resample="up")
                else:
                    up.upsample = Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.time_scale != 1.0:
            t = t * cfg.time_scale
        temb = timestep_embedding(t, cfg.ch)
        temb = self.temb.dense[1](swish(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            down = self.down[i_level]
            for i_block in range(cfg.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1], temb))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(cfg.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h, temb)
        return self.conv_out(swish(self.norm_out(h)))
