"""Published image-to-image architectures rebuilt small (64x64, a few channels) with seeded weights.

Each is exported the way its users export it (torch's TorchScript exporter, or a hand-built graph
that mimics tf2onnx) so ssic sees what a user would bring. ``ARCHITECTURES[name](dir)`` writes the
ONNX file and returns a :class:`Foreign` with the inputs of one prime/edit pair.

The models follow the published block structure, scaled down; none loads published weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn import functional as F

HW = 64
EDIT = (slice(24, 34), slice(28, 38))  # a 10x10 edit: 2.4% of 64x64


@dataclass
class Foreign:
    """One exported architecture: its file, the original and edited inputs, and what it has."""

    name: str
    path: Path
    original: dict[str, np.ndarray]
    edited: dict[str, np.ndarray]
    output: str = "y"
    global_ops: list[str] = field(default_factory=list)  # ops that make --exact inexact by design
    compile_kwargs: dict = field(default_factory=dict)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=["y"],
                          opset_version=opset, dynamo=False)


def _image(seed: int, shape=(1, 3, HW, HW)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth content plus noise: closer to an image than white noise, so the edit is local
    base = rng.standard_normal((shape[0], shape[1], shape[2] // 8, shape[3] // 8)).astype(np.float32)
    up = np.kron(base, np.ones((1, 1, 8, 8), np.float32))
    return (up + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def _edited(x: np.ndarray, region=EDIT, delta: float = 1.0) -> np.ndarray:
    y = x.copy()
    if y.shape[-1] == 3 and y.shape[1] != 3:  # NHWC
        y[:, region[0], region[1], :] += delta
    else:
        y[:, :, region[0], region[1]] += delta
    return y


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise norm affines with seeded non-trivial values (defaults 1/0 hide scale bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(0.75 + 0.5 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


# ------------------------------------------------------------------------------ LaMa (inpainting)
class LamaLike(nn.Module):
    """LaMa's generator shape (Suvorov et al. 2022): image * (1 - mask) ++ mask -> 7x7 conv (reflect)
    -> two stride-2 convs -> residual blocks (dilated 3x3 convs in place of the Fourier units, which
    the TorchScript exporter cannot write) -> two ConvTranspose x2 -> 7x7 conv -> sigmoid."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.inc = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(4, c, 7), nn.BatchNorm2d(c), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                  nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.BatchNorm2d(4 * c), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4 * c, 4 * c, 3, padding=d, dilation=d),
                                                  nn.BatchNorm2d(4 * c), nn.ReLU(),
                                                  nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.BatchNorm2d(4 * c))
                                    for d in (1, 2))
        self.up = nn.Sequential(nn.ConvTranspose2d(4 * c, 2 * c, 3, 2, 1, output_padding=1), nn.BatchNorm2d(2 * c),
                                nn.ReLU(), nn.ConvTranspose2d(2 * c, c, 3, 2, 1, output_padding=1),
                                nn.BatchNorm2d(c), nn.ReLU())
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Sigmoid())

    def forward(self, image, mask):
        h = self.down(self.inc(torch.cat([image * (1 - mask), mask], 1)))
        for b in self.blocks:
            h = F.relu(h + b(h))
        return self.out(self.up(h))


def lama(d: Path) -> Foreign:
    torch.manual_seed(10)
    path = d / "lama.onnx"
    _export(_seeded(LamaLike(), 10), (torch.zeros(1, 3, HW, HW), torch.zeros(1, 1, HW, HW)), ["image", "mask"], path, 17)
    image = _image(10)
    mask = np.zeros((1, 1, HW, HW), np.float32)
    mask[:, :, 8:16, 8:16] = 1
    new_mask = mask.copy()
    new_mask[:, :, EDIT[0], EDIT[1]] = 1  # the user paints a new hole, and the image changes under it
    return Foreign("lama", path, {"image": image, "mask": mask}, {"image": _edited(image), "mask": new_mask})


# ------------------------------------------------------------------------- EDSR (super-resolution)
class EDSRLike(nn.Module):
    """EDSR (Lim et al. 2017): head conv, residual blocks conv-ReLU-conv scaled by 0.1, body conv +
    global skip, upsampler conv -> PixelShuffle(2), tail conv. 32x32 in, 64x64 out."""

    def __init__(self, c: int = 16, blocks: int = 3):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
                                  for _ in range(blocks))
        self.body_end = nn.Conv2d(c, c, 3, padding=1)
        self.up = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2))
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        r = h
        for b in self.body:
            r = r + 0.1 * b(r)
        return self.tail(self.up(h + self.body_end(r)))


def edsr(d: Path) -> Foreign:
    torch.manual_seed(11)
    path = d / "edsr.onnx"
    _export(EDSRLike(), (torch.zeros(1, 3, HW // 2, HW // 2),), ["x"], path, 17)
    x = _image(11, (1, 3, HW // 2, HW // 2))
    return Foreign("edsr", path, {"x": x}, {"x": _edited(x, (slice(12, 17), slice(14, 19)))})


# -------------------------------------------------------------------------- SD VAE decoder
class ResnetGN(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 4):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class AttnBlock(nn.Module):
    """The VAE's single-head spatial self-attention (GroupNorm, q/k/v 1x1 convs, softmax, proj)."""

    def __init__(self, c: int, groups: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c)
        self.q, self.k, self.v, self.proj = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(n).reshape(b, c, h * w)
        v = self.v(n).reshape(b, c, h * w)
        a = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
        o = torch.bmm(v, a.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(o)


class VAEDecoderLike(nn.Module):
    """Stable Diffusion's VAE decoder (Rombach et al. 2022): conv_in, mid (resnet, attention,
    resnet), up blocks (resnets + nearest x2 + conv), GroupNorm -> SiLU -> conv_out. 16x16x4 latent
    -> 64x64x3 image."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 2 * c, 3, padding=1)
        self.mid = nn.Sequential(ResnetGN(2 * c, 2 * c), AttnBlock(2 * c), ResnetGN(2 * c, 2 * c))
        self.up1 = ResnetGN(2 * c, 2 * c)
        self.up1_conv = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up2 = ResnetGN(2 * c, c)
        self.up2_conv = nn.Conv2d(c, c, 3, padding=1)
        self.up3 = ResnetGN(c, c)
        self.norm_out, self.conv_out = nn.GroupNorm(4, c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        h = self.up1_conv(F.interpolate(self.up1(h), scale_factor=2.0, mode="nearest"))
        h = self.up2_conv(F.interpolate(self.up2(h), scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(self.up3(h))))


def vae_decoder(d: Path) -> Foreign:
    torch.manual_seed(12)
    path = d / "vae_decoder.onnx"
    _export(_seeded(VAEDecoderLike(), 12), (torch.zeros(1, 4, 16, 16),), ["z"], path, 18)
    z = np.random.default_rng(12).standard_normal((1, 4, 16, 16)).astype(np.float32)
    return Foreign("vae_decoder", path, {"z": z}, {"z": _edited(z, (slice(6, 9), slice(7, 10)))},
                   global_ops=["GroupNorm", "attention"])


# -------------------------------------------------------------------------- pix2pix U-Net
class Pix2PixUNet(nn.Module):
    """pix2pix's U-Net generator (Isola et al. 2017): 4x4 stride-2 convs with LeakyReLU(0.2) and
    BatchNorm down, 4x4 stride-2 ConvTranspose with ReLU up, skip concatenations, tanh."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.d1 = nn.Conv2d(3, c, 4, 2, 1)
        self.d2 = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c))
        self.d3 = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(2 * c, 4 * c, 4, 2, 1))
        self.u3 = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(4 * c, 2 * c, 4, 2, 1), nn.BatchNorm2d(2 * c))
        self.u2 = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(4 * c, c, 4, 2, 1), nn.BatchNorm2d(c))
        self.u1 = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * c, 3, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        h1 = self.d1(x)
        h2 = self.d2(h1)
        h3 = self.d3(h2)
        return self.u1(torch.cat([self.u2(torch.cat([self.u3(h3), h2], 1)), h1], 1))


def pix2pix(d: Path) -> Foreign:
    torch.manual_seed(13)
    path = d / "pix2pix.onnx"
    _export(_seeded(Pix2PixUNet(), 13), (torch.zeros(1, 3, HW, HW),), ["x"], path, 17)
    x = _image(13)
    return Foreign("pix2pix", path, {"x": x}, {"x": _edited(x)})


# -------------------------------------------------------------------------- CycleGAN ResNet generator
class CycleGANResnet(nn.Module):
    """CycleGAN's ResNet generator (Zhu et al. 2017): reflect pad + 7x7 conv, two stride-2 convs,
    residual blocks (reflect pad, conv, InstanceNorm, ReLU), two ConvTranspose x2, reflect pad +
    7x7 conv, tanh."""

    def __init__(self, c: int = 8, blocks: int = 2):
        super().__init__()

        def cir(cin, cout, k, s=1, p=0):
            return [nn.Conv2d(cin, cout, k, s, p), nn.InstanceNorm2d(cout, affine=True), nn.ReLU()]

        self.head = nn.Sequential(nn.ReflectionPad2d(3), *cir(3, c, 7), *cir(c, 2 * c, 3, 2, 1), *cir(2 * c, 4 * c, 3, 2, 1))
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReflectionPad2d(1), *cir(4 * c, 4 * c, 3), nn.ReflectionPad2d(1),
                                                  nn.Conv2d(4 * c, 4 * c, 3), nn.InstanceNorm2d(4 * c, affine=True))
                                    for _ in range(blocks))
        self.tail = nn.Sequential(
            nn.ConvTranspose2d(4 * c, 2 * c, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(2 * c, affine=True), nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(c, affine=True), nn.ReLU(),
            nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh())

    def forward(self, x):
        h = self.head(x)
        for b in self.blocks:
            h = h + b(h)
        return self.tail(h)


def cyclegan(d: Path) -> Foreign:
    torch.manual_seed(14)
    path = d / "cyclegan.onnx"
    _export(_seeded(CycleGANResnet(), 14), (torch.zeros(1, 3, HW, HW),), ["x"], path, 17)
    x = _image(14)
    return Foreign("cyclegan", path, {"x": x}, {"x": _edited(x)}, global_ops=["InstanceNorm"])


# -------------------------------------------------------------------------- tf2onnx NHWC / SAME_UPPER
def nhwc_same_upper(d: Path) -> Foreign:
    """A Keras-style encoder-decoder as tf2onnx writes it: NHWC input, Transpose to NCHW, convs
    with ``auto_pad=SAME_UPPER`` (stride 1 and 2), nearest x2 Resize, Transpose back to NHWC."""
    rng = np.random.default_rng(15)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    c = 8
    inits = [w("w1", (c, 3, 3, 3)), w("w2", (2 * c, c, 3, 3)), w("w3", (c, 2 * c, 3, 3)), w("w4", (3, c, 3, 3)),
             numpy_helper.from_array(np.linspace(-0.1, 0.1, c).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="StatefulPartitionedCall/transpose"),
        helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["c1"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2],
                         name="conv2_s2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Resize", ["r2", "", "scales"], ["u"], mode="nearest", nearest_mode="floor",
                         coordinate_transformation_mode="asymmetric"),
        helper.make_node("Conv", ["u", "w3"], ["c3"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["c4"], auto_pad="SAME_UPPER", kernel_shape=[3, 3], name="conv4"),
        helper.make_node("Transpose", ["c4"], ["y"], perm=[0, 2, 3, 1]),
    ]
    g = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HW, HW, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, HW, HW, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    m.ir_version = 8
    path = d / "nhwc_same_upper.onnx"
    onnx.save(m, str(path))
    x = _image(15).transpose(0, 2, 3, 1).copy()
    return Foreign("nhwc_same_upper", path, {"x": x}, {"x": _edited(x)})


# -------------------------------------------------------------------------- legacy opset-17 UNet
class LegacyUNet(nn.Module):
    """A DDPM-style UNet level exported at opset 17 by the TorchScript exporter: GroupNorm (written
    as Reshape/InstanceNormalization/Reshape), SiLU, the asymmetric ``F.pad(h, (0, 1, 0, 1))`` before
    a 3x3 stride-2 downsample (as in Stable Diffusion's Downsample), nearest x2 upsample, skip."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.inc = nn.Conv2d(3, c, 3, padding=1)
        self.r1 = ResnetGN(c, c, groups=2)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2)
        self.r2 = ResnetGN(2 * c, 2 * c, groups=2)
        self.up = nn.Conv2d(2 * c, c, 3, padding=1)
        self.r3 = ResnetGN(2 * c, c, groups=2)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h1 = self.r1(self.inc(x))
        h2 = self.r2(self.down(F.pad(h1, (0, 1, 0, 1))))
        u = self.up(F.interpolate(h2, scale_factor=2.0, mode="nearest"))
        return self.out(self.r3(torch.cat([u, h1], 1)))


def legacy_unet(d: Path) -> Foreign:
    torch.manual_seed(16)
    path = d / "legacy_unet.onnx"
    _export(_seeded(LegacyUNet(), 16), (torch.zeros(1, 3, HW, HW),), ["x"], path, 17)
    x = _image(16)
    return Foreign("legacy_unet_opset17", path, {"x": x}, {"x": _edited(x)}, global_ops=["GroupNorm"])


# -------------------------------------------------------------------------- NAFNet
class LayerNorm2d(nn.Module):
    """NAFNet's channel LayerNorm: mean and variance over C at every pixel."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-6) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class NAFBlock(nn.Module):
    """NAFNet's block (Chen et al. 2022): LN -> 1x1 -> depthwise 3x3 -> SimpleGate -> simplified
    channel attention (global average pool -> 1x1 -> multiply) -> 1x1, scaled residual; then LN ->
    1x1 -> SimpleGate -> 1x1, scaled residual."""

    def __init__(self, c: int):
        super().__init__()
        self.n1, self.n2 = LayerNorm2d(c), LayerNorm2d(c)
        self.pw1, self.dw = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1))
        self.pw2 = nn.Conv2d(c, c, 1)
        self.ffn1, self.ffn2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(c, c, 1)
        self.beta = nn.Parameter(0.5 * torch.ones(1, c, 1, 1))
        self.gamma = nn.Parameter(0.5 * torch.ones(1, c, 1, 1))

    @staticmethod
    def gate(x):
        a, b = x.chunk(2, dim=1)
        return a * b

    def forward(self, x):
        h = self.gate(self.dw(self.pw1(self.n1(x))))
        h = self.pw2(h * self.sca(h))
        y = x + h * self.beta
        return y + self.ffn2(self.gate(self.ffn1(self.n2(y)))) * self.gamma


class NAFNetLike(nn.Module):
    """NAFNet's UNet: intro conv, an encoder level (block, 2x2 stride-2 conv), a middle block, a
    decoder level (1x1 conv -> PixelShuffle(2), skip add, block), ending conv, input residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.intro = nn.Conv2d(3, c, 3, padding=1)
        self.enc, self.down = NAFBlock(c), nn.Conv2d(c, 2 * c, 2, 2)
        self.mid = NAFBlock(2 * c)
        self.up = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1, bias=False), nn.PixelShuffle(2))
        self.dec, self.ending = NAFBlock(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        e = self.enc(self.intro(x))
        h = self.up(self.mid(self.down(e)))
        return x + self.ending(self.dec(h + e))


def nafnet(d: Path) -> Foreign:
    torch.manual_seed(17)
    path = d / "nafnet.onnx"
    _export(NAFNetLike(), (torch.zeros(1, 3, HW, HW),), ["x"], path, 17)
    x = _image(17)
    return Foreign("nafnet", path, {"x": x}, {"x": _edited(x)}, global_ops=["channel attention (global pool)"])


ARCHITECTURES: dict[str, Callable[[Path], Foreign]] = {
    "lama": lama, "edsr": edsr, "vae_decoder": vae_decoder, "pix2pix": pix2pix, "cyclegan": cyclegan,
    "nhwc_same_upper": nhwc_same_upper, "legacy_unet_opset17": legacy_unet, "nafnet": nafnet,
}
