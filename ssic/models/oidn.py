"""Intel Open Image Denoise's U-Net (OIDN 2.x ``RT`` filter, LDR colour), written for ssic.

Topology and names follow OIDN's ``core/unet_filter.cpp`` (``addUNet``) and ``training/model.py``:
3x3 convs + ReLU; ``enc_conv0``, ``enc_conv1`` + 2x2 max-pool, ``enc_conv2``/``3``/``4`` + pool,
``enc_conv5a``/``5b`` + nearest 2x upsampling, decoder stages ``dec_conv4a/b``, ``3a/b``, ``2a/b``
each on the concatenation [upsampled, skip] (skips: pool3, pool2, pool1, the network input),
``dec_conv1a/b``, ``dec_conv0`` (ReLU too: the C++ runtime applies it). Channels per stage
(base / ``small``): encoder 32-48-64-80-96 / 32, decoder 112-96-64-64 (dc1a 64, dc1b 32) / 64-64-64-32.

Pre/post-processing of OIDN's CPU device (``cpu_input_process.isph`` / ``cpu_output_process.isph``)
is part of the graph, so the ONNX model is a drop-in for ``oidnExecuteFilter`` on an LDR image:
input clamped to [0, 1], the sRGB transfer function forward (``transfer="srgb"``: linear input, the
OIDN default; ``"linear"``: the filter's ``srgb=true`` mode, input already sRGB-encoded), the
network, output clamped at 0, transfer inverse, clamped to 1.

Input ``color`` float32 NCHW RGB ``[1, 3, H, W]``, H and W multiples of 16 (four 2x pools); output
``denoised`` ``[1, 3, H, W]`` in [0, 1]. Weights: :mod:`ssic.models.trained_weights` (the ``.tza``
blobs inside ``pyoidn==2.5.1.0``'s core library) or a ``.tza`` file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FILTERS", "OIDNUNet", "build_oidn", "srgb_forward", "srgb_inverse"]

# filter name -> (small network?, transfer function); names as OIDN's weight blobs
FILTERS: dict[str, tuple[bool, str]] = {
    "rt_ldr": (False, "srgb"),
    "rt_ldr_small": (True, "srgb"),
}

_BASE = dict(ec1=32, ec2=48, ec3=64, ec4=80, ec5=96, dc4=112, dc3=96, dc2a=64, dc2b=64, dc1a=64, dc1b=32)
_SMALL = dict(ec1=32, ec2=32, ec3=32, ec4=32, ec5=32, dc4=64, dc3=64, dc2a=64, dc2b=32, dc1a=32, dc1b=32)

# OIDN's sRGB transfer constants (core/color.h)
_A, _B, _C, _D, _Y0, _X0 = 12.92, 1.055, 1.0 / 2.4, -0.055, 0.0031308, 0.04045


def srgb_forward(y: torch.Tensor) -> torch.Tensor:
    """Linear -> sRGB-encoded, OIDN's piecewise curve (y in [0, 1])."""
    return torch.where(y <= _Y0, y * _A, _B * torch.pow(torch.clamp(y, min=_Y0), _C) + _D)


def srgb_inverse(x: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded -> linear, OIDN's piecewise curve (x >= 0)."""
    return torch.where(x <= _X0, x / _A, torch.pow((torch.clamp(x, min=_X0) - _D) / _B, 1.0 / _C))


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class OIDNUNet(nn.Module):
    """OIDN's U-Net with its LDR pre/post-processing: ``color [1,3,H,W]`` -> ``denoised [1,3,H,W]``."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, small: bool = False, transfer: str = "srgb"):
        super().__init__()
        if transfer not in ("srgb", "linear"):
            raise ValueError(f"transfer must be 'srgb' or 'linear', got {transfer!r}")
        c = _SMALL if small else _BASE
        ic = in_channels
        self.transfer = transfer
        self.enc_conv0 = _conv(ic, c["ec1"])
        self.enc_conv1 = _conv(c["ec1"], c["ec1"])
        self.enc_conv2 = _conv(c["ec1"], c["ec2"])
        self.enc_conv3 = _conv(c["ec2"], c["ec3"])
        self.enc_conv4 = _conv(c["ec3"], c["ec4"])
        self.enc_conv5a = _conv(c["ec4"], c["ec5"])
        self.enc_conv5b = _conv(c["ec5"], c["ec5"])
        self.dec_conv4a = _conv(c["ec5"] + c["ec3"], c["dc4"])
        self.dec_conv4b = _conv(c["dc4"], c["dc4"])
        self.dec_conv3a = _conv(c["dc4"] + c["ec2"], c["dc3"])
        self.dec_conv3b = _conv(c["dc3"], c["dc3"])
        self.dec_conv2a = _conv(c["dc3"] + c["ec1"], c["dc2a"])
        self.dec_conv2b = _conv(c["dc2a"], c["dc2b"])
        self.dec_conv1a = _conv(c["dc2b"] + ic, c["dc1a"])
        self.dec_conv1b = _conv(c["dc1a"], c["dc1b"])
        self.dec_conv0 = _conv(c["dc1b"], out_channels)

    def unet(self, x: torch.Tensor) -> torch.Tensor:
        """The network alone, on transfer-encoded input."""
        inp = x
        x = F.relu(self.enc_conv0(x))
        pool1 = x = F.max_pool2d(F.relu(self.enc_conv1(x)), 2, 2)
        pool2 = x = F.max_pool2d(F.relu(self.enc_conv2(x)), 2, 2)
        pool3 = x = F.max_pool2d(F.relu(self.enc_conv3(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.enc_conv4(x)), 2, 2)
        x = F.relu(self.enc_conv5a(x))
        x = F.relu(self.enc_conv5b(x))
        for skip, conv_a, conv_b in ((pool3, self.dec_conv4a, self.dec_conv4b),
                                     (pool2, self.dec_conv3a, self.dec_conv3b),
                                     (pool1, self.dec_conv2a, self.dec_conv2b),
                                     (inp, self.dec_conv1a, self.dec_conv1b)):
            x = torch.cat((F.interpolate(x, scale_factor=2, mode="nearest"), skip), 1)
            x = F.relu(conv_b(F.relu(conv_a(x))))
        return F.relu(self.dec_conv0(x))

    def forward(self, color: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(color, 0.0, 1.0)
        if self.transfer == "srgb":
            x = srgb_forward(x)
        y = self.unet(x)  # >= 0 after the last ReLU (OIDN clamps the same way)
        if self.transfer == "srgb":
            y = srgb_inverse(y)
        return torch.clamp(y, max=1.0)


def build_oidn(filter_name: str = "rt_ldr") -> OIDNUNet:
    """The U-Net of ``filter_name`` (``rt_ldr``/``rt_ldr_small``), default-initialised, eval mode.
    Raises SSICError for an unknown filter."""
    from ssic.errors import SSICError

    if filter_name not in FILTERS:
        raise SSICError(f"unknown OIDN filter {filter_name!r}: choose one of {', '.join(FILTERS)}")
    small, transfer = FILTERS[filter_name]
    return OIDNUNet(small=small, transfer=transfer).eval()
