"""GauGAN / SPADE generator (Park et al., 2019), Cityscapes 256x512.

Module names follow NVlabs/SPADE's ``SPADEGenerator`` so that its state dict loads (after
spectral norm is folded away, see :func:`ssic.models.checkpoints.load_spade_checkpoint`)::

    fc                                3x3 conv, segmap resized to 4x8 -> 16*ngf
    head_0, G_middle_0, G_middle_1    SPADEResnetBlock 16*ngf -> 16*ngf
    up_0 .. up_3                      SPADEResnetBlock 16->8, 8->4, 4->2, 2->1 *ngf
    conv_img                          3x3 conv ngf -> 3, after leaky-ReLU(0.2); then tanh
    <block>.conv_0 / conv_1 / conv_s  (conv_s: 1x1, no bias, only when fin != fout)
    <block>.norm_0 / norm_1 / norm_s  SPADE: param_free_norm (BatchNorm2d, affine=False),
                                      mlp_shared.0 (3x3 conv label_nc -> 128, then ReLU),
                                      mlp_gamma, mlp_beta (3x3 conv 128 -> C)

``num_upsampling_layers = "more"``: head_0 at 4x8, nearest 2x, G_middle_0 at 8x16, 2x,
G_middle_1 at 16x32, then 2x before each of up_0 (32x64), up_1 (64x128), up_2 (128x256),
up_3 (256x512). Segmaps are resized with ``F.interpolate(size=..., mode="nearest")``.

Input: ``seg`` float32 ``[1, 36, 256, 512]`` = one-hot of the 35 Cityscapes label ids + one
instance-edge channel (see :func:`make_gaugan_input`). Output: ``image`` float32
``[1, 3, 256, 512]`` in ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GauGANConfig",
    "GAUGAN_CONFIGS",
    "SPADE",
    "SPADEResnetBlock",
    "SPADEGenerator",
    "make_gaugan_input",
    "instance_edges",
    "synthetic_label_map",
]


@dataclass(frozen=True)
class GauGANConfig:
    ngf: int = 64
    label_nc: int = 35
    #: 1 when the instance-edge channel is part of the input (Cityscapes: yes)
    instance: bool = True
    nhidden: int = 128
    height: int = 256
    width: int = 512
    #: spatial size of the first feature map (num_upsampling_layers="more": 512 // 2**6 = 8 wide)
    sh: int = 4
    sw: int = 8
    bn_eps: float = 1e-5

    @property
    def semantic_nc(self) -> int:
        return self.label_nc + (1 if self.instance else 0)


GAUGAN_CONFIGS: dict[str, GauGANConfig] = {
    "full": GauGANConfig(),
    # same input, same blocks and resolutions; 16*ngf = 64 channels at the head, 4 at up_3
    "tiny": GauGANConfig(ngf=4, nhidden=16),
}


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``BN(x) * (1 + gamma(seg)) + beta(seg)``."""

    def __init__(self, norm_nc: int, label_nc: int, nhidden: int = 128, eps: float = 1e-5):
        super().__init__()
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False, eps=eps)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, 3, padding=1)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, 3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, cfg: GauGANConfig):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
        nc = cfg.semantic_nc
        self.norm_0 = SPADE(fin, nc, cfg.nhidden, cfg.bn_eps)
        self.norm_1 = SPADE(fmiddle, nc, cfg.nhidden, cfg.bn_eps)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, nc, cfg.nhidden, cfg.bn_eps)

    @staticmethod
    def actvn(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(self.actvn(self.norm_0(x, seg)))
        dx = self.conv_1(self.actvn(self.norm_1(dx, seg)))
        return x_s + dx


class SPADEGenerator(nn.Module):
    """``forward(seg) -> image``; ``num_upsampling_layers="more"``, no VAE."""

    def __init__(self, cfg: GauGANConfig):
        super().__init__()
        self.cfg = cfg
        nf = cfg.ngf
        self.fc = nn.Conv2d(cfg.semantic_nc, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, cfg)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, cfg)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, cfg)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, cfg)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, cfg)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, cfg)
        self.up_3 = SPADEResnetBlock(2 * nf, 1 * nf, cfg)
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    @staticmethod
    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(seg, size=(self.cfg.sh, self.cfg.sw), mode="nearest")
        x = self.fc(x)
        x = self.head_0(x, seg)
        x = self.up(x)
        x = self.G_middle_0(x, seg)
        x = self.up(x)
        x = self.G_middle_1(x, seg)
        x = self.up(x)
        x = self.up_0(x, seg)
        x = self.up(x)
        x = self.up_1(x, seg)
        x = self.up(x)
        x = self.up_2(x, seg)
        x = self.up(x)
        x = self.up_3(x, seg)
        x = self.conv_img(F.leaky_relu(x, 0.2))
        return torch.tanh(x)


def instance_edges(instance_map: np.ndarray) -> np.ndarray:
    """Boundary map of an instance map ``[H, W]`` as SPADE's ``get_edges``: a pixel is an edge
    when its left/right/up/down neighbour has another instance id. Returns float32 ``[H, W]``."""
    t = np.asarray(instance_map)
    if t.ndim != 2:
        raise ValueError(f"instance map must be [H, W], got shape {t.shape}")
    edge = np.zeros(t.shape, dtype=bool)
    dh = t[:, 1:] != t[:, :-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    dv = t[1:, :] != t[:-1, :]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    return edge.astype(np.float32)


def make_gaugan_input(label_map: np.ndarray, instance_map: np.ndarray | None = None,
                      label_nc: int = 35) -> np.ndarray:
    """Build the generator input from a label map (``[H, W]`` ints in ``[0, label_nc)``) and an
    instance map (``[H, W]`` ints; None means "same as the label map"): one-hot of ``label_nc``
    classes then the instance-edge channel, float32 ``[1, label_nc + 1, H, W]``."""
    from ssic.errors import SSICError

    lab = np.asarray(label_map)
    if lab.ndim == 3 and lab.shape[0] == 1:
        lab = lab[0]
    if lab.ndim != 2:
        raise SSICError(f"label map must be [H, W], got shape {lab.shape}")
    lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= label_nc:
        raise SSICError(f"label ids must be in [0, {label_nc}), got [{lab.min()}, {lab.max()}]")
    inst = lab if instance_map is None else np.asarray(instance_map)
    if inst.ndim == 3 and inst.shape[0] == 1:
        inst = inst[0]
    if inst.shape != lab.shape:
        raise SSICError(f"instance map shape {inst.shape} != label map shape {lab.shape}")
    h, w = lab.shape
    out = np.zeros((1, label_nc + 1, h, w), dtype=np.float32)
    np.put_along_axis(out[0, :label_nc], lab[None], 1.0, axis=0)
    out[0, label_nc] = instance_edges(inst)
    return out


def synthetic_label_map(height: int = 256, width: int = 512, seed: int = 0,
                        num_regions: int = 24, label_nc: int = 35) -> tuple[np.ndarray, np.ndarray]:
    """A seeded street-scene-like stand-in for a Cityscapes label map: Voronoi regions with random
    class ids (label ``[H, W]`` int64) and distinct instance ids (instance ``[H, W]`` int64)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform([0, 0], [height, width], size=(num_regions, 2))
    classes = rng.integers(0, label_nc, size=num_regions)
    yy, xx = np.mgrid[0:height, 0:width]
    d = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    region = np.argmin(d, axis=0)
    label = classes[region].astype(np.int64)
    instance = (label * 1000 + region).astype(np.int64)
    return label, instance
