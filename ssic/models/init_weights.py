"""Seeded, variance-preserving initialisation of the models' weights (see :mod:`ssic.models.presets`
for the rules), shared by the paper models and the Stable Diffusion parts."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator, mean: float = 0.0) -> None:
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std + mean)


def initialize(model: nn.Module, name: str, seed: int = 0) -> nn.Module:
    """Seeded variance-preserving initialisation in place (see the module docstring)."""
    gen = torch.Generator().manual_seed(int(seed))
    relu_fed = set()
    seg_fed = set()
    if name == "gaugan":
        for mname, m in model.named_modules():
            if mname == "fc" or mname.endswith("mlp_shared.0"):
                seg_fed.add(m)
            elif mname.endswith(("mlp_gamma", "mlp_beta")):
                relu_fed.add(m)
            elif mname.endswith(("conv_0", "conv_1")) or mname == "conv_img":
                relu_fed.add(m)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                fan_in = k if m in seg_fed else k * m.in_channels // m.groups
            else:
                fan_in = m.in_features
            gain = math.sqrt(2.0) if m in relu_fed else 1.0
            _normal_(m.weight, gain / math.sqrt(fan_in), gen)
            if m.bias is not None:
                _normal_(m.bias, 0.02, gen)
        elif isinstance(m, nn.GroupNorm) and m.affine:
            _normal_(m.weight, 0.1, gen, mean=1.0)
            _normal_(m.bias, 0.1, gen)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    if name == "gaugan":
        _calibrate_batchnorm(model, seed)
    return model.eval()


def _calibrate_batchnorm(model: nn.Module, seed: int) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, the batch statistics
    cfg = model.cfg
    seg = torch.from_numpy(gaugan_example(cfg, seed))
    model.train()
    with torch.no_grad():
        model(seg)
    model.eval()
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def gaugan_example(cfg, seed: int) -> np.ndarray:
    from ssic.models.gaugan import make_gaugan_input, synthetic_label_map

    label, inst = synthetic_label_map(cfg.height, cfg.width, seed=seed, label_nc=cfg.label_nc)
    return make_gaugan_input(label, inst, label_nc=cfg.label_nc)


