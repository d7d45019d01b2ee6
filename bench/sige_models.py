"""SIGE-engine variants of ssic's PyTorch models, for the side-by-side benchmark only.

Bench-only: imports the ``sige`` package (0.3.0, see ``bench/install_sige.sh``), which CI never
installs. Nothing in ``ssic`` imports this module.

The models are assembled from SIGE's public ``sige.nn`` building blocks (``Gather``, ``Scatter``,
``ScatterGather``, ``ScatterWithBlockResidual``, ``SIGEConv2d``, ``SIGEModel``) following the way the
SIGE paper's engine builds its own DDIM UNet and fused SPADE generator, with SIGE's defaults:

- block size 6 for 3x3 convs (4x4 output tiles), 4 for 1x1 shortcut convs;
- DDIM: ResBlocks / stride-2 downsamples at resolutions >= 64 are sparse, every upsample conv is
  sparse (as in SIGE's UNet), attention (16x16), the middle, conv_in / norm_out / conv_out are dense;
  GroupNorm scale/shift (timestep embedding folded into shift) come from the full run and are reused
  in sparse mode, also by the dense blocks (SIGE's approximation);
- GauGAN: the last 5 SPADE blocks (G_middle_1, up_0..up_3) are sparse; the three SPADE
  ``mlp_shared`` convs of a block are fused into one conv and each SPADE's ``mlp_gamma``/``mlp_beta``
  into one (exact: they read the same input); BatchNorm running statistics are an exact affine.

Weights are converted from the ssic models' state dicts (``ssic.models.build_model(name, "full")``)
so the outputs are comparable to ssic's dense PyTorch model. PD is not implemented here.

Usage::

    m = build_sige_model("ddim", ssic_torch_model)
    m.set_mode("full"); m(x_orig, t)              # fills the caches
    m.set_masks(sige_masks("ddim", mask_hw))      # per-resolution masks (SIGE's downsample_mask)
    m.set_mode("sparse"); y = m(x_edit, t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sige.nn import (
    Gather,
    Scatter,
    ScatterGather,
    ScatterWithBlockResidual,
    SIGEConv2d,
    SIGEModel,
    SIGEModule,
)
from sige.utils import downsample_mask
from torch import nn

__all__ = ["SIGEUNet", "SIGESPADEGenerator", "build_sige_model", "sige_masks", "SIGE_DEFAULTS"]

#: SIGE's defaults (diffusion/configs/church_ddim256-sige.yml, the GauGAN runner's options).
SIGE_DEFAULTS = {
    "block_3x3": 6,
    "block_1x1": 4,
    "ddim_sparse_min_res": 64,
    "ddim_pyramid_dilation": 1,
    "gaugan_num_sparse_blocks": 5,
    "gaugan_pyramid_dilation": 2,
}


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _gn_affine(x: torch.Tensor, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) such that ``norm(x) == x * scale + shift`` for this batch-1 x."""
    n, c, h, w = x.shape
    g = norm.num_groups
    var, mean = torch.var_mean(x.reshape(n, g, -1), dim=2, unbiased=False)
    inv = torch.rsqrt(var + norm.eps)[0].repeat_interleave(c // g)
    mean = mean[0].repeat_interleave(c // g)
    scale = inv * norm.weight
    shift = norm.bias - mean * scale
    return scale, shift


def _v(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------- DDIM


class _ResBlock(SIGEModule):
    """ssic's DDIM ``ResnetBlock`` (same parameter names) on SIGE modules."""

    def __init__(self, cfg, cin: int, cout: int, sparse: bool):
        super().__init__()
        self.in_channels, self.out_channels, self.sparse = cin, cout, sparse
        Conv = SIGEConv2d if sparse else nn.Conv2d
        self.norm1 = nn.GroupNorm(cfg.num_groups, cin, eps=cfg.norm_eps)
        self.conv1 = Conv(cin, cout, 3, 1, 1)
        self.temb_proj = nn.Linear(cfg.temb_ch, cout)
        self.norm2 = nn.GroupNorm(cfg.num_groups, cout, eps=cfg.norm_eps)
        self.conv2 = Conv(cout, cout, 3, 1, 1)
        self.has_shortcut = cin != cout
        if self.has_shortcut:
            self.nin_shortcut = Conv(cin, cout, 1, 1, 0)
        if sparse:
            self.gather = Gather(self.conv1, SIGE_DEFAULTS["block_3x3"], activation_name="swish")
            self.scatter_gather = ScatterGather(self.gather, activation_name="swish")
            if self.has_shortcut:
                self.shortcut_gather = Gather(self.nin_shortcut, SIGE_DEFAULTS["block_1x1"])
                self.scatter = ScatterWithBlockResidual(self.gather, self.shortcut_gather)
            else:
                self.scatter = Scatter(self.gather)
        self.s1 = self.b1 = self.s2 = self.b2 = None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        full = self.mode == "full"
        res = x
        if self.has_shortcut:
            if self.sparse:
                res = self.shortcut_gather(res)
            res = self.nin_shortcut(res)
        if full:
            self.s1, self.b1 = _gn_affine(x, self.norm1)
        h = x
        if self.sparse:
            h = self.gather(h) if full else self.gather(h, _v(self.s1), _v(self.b1))
        if full or not self.sparse:
            h = _swish(h * _v(self.s1) + _v(self.b1))
        h = self.conv1(h)
        if self.sparse:
            h = self.scatter_gather(h) if full else self.scatter_gather(h, _v(self.s2), _v(self.b2))
        if full:
            emb = self.temb_proj(_swish(temb))[0]
            s, b = _gn_affine(h + _v(emb), self.norm2)
            self.s2, self.b2 = s, b + emb * s
        if full or not self.sparse:
            h = _swish(h * _v(self.s2) + _v(self.b2))
        h = self.conv2(h)
        if self.sparse:
            return self.scatter(h, res)
        return h + res


class _Attn(SIGEModule):
    """Dense single-head attention (16x16); GroupNorm affine cached from the full run."""

    def __init__(self, cfg, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.num_groups, c, eps=cfg.norm_eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))
        self.s = self.b = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            self.s, self.b = _gn_affine(x, self.norm)
        b_, c, hh, ww = x.shape
        h = x * _v(self.s) + _v(self.b)
        q = self.q(h).reshape(b_, c, hh * ww).transpose(1, 2)
        k = self.k(h).reshape(b_, c, hh * ww)
        v = self.v(h).reshape(b_, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (float(c) ** -0.5), dim=2)
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b_, c, hh, ww)
        return x + self.proj_out(out)


class _Down(SIGEModule):
    def __init__(self, c: int, sparse: bool):
        super().__init__()
        self.sparse = sparse
        self.conv = nn.Conv2d(c, c, 3, 2, 0)
        if sparse:
            self.gather = Gather(self.conv, SIGE_DEFAULTS["block_3x3"])  # -> block 5, stride 4, offset 0
            self.scatter = Scatter(self.gather)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        x = self.gather(x)
        if self.mode == "full":
            x = F.pad(x, (0, 1, 0, 1))
        return self.scatter(self.conv(x))


class _Up(SIGEModule):
    """Nearest 2x then a sparse 3x3 conv (SIGE's UNet makes every upsample conv sparse)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = SIGEConv2d(c, c, 3, 1, 1)
        self.gather = Gather(self.conv, SIGE_DEFAULTS["block_3x3"])
        self.scatter = Scatter(self.gather)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.scatter(self.conv(self.gather(x)))


class SIGEUNet(SIGEModel):
    """ssic's DDIM UNet (``UNetConfig`` without the PD options) on SIGE; same state-dict keys."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.scale_shift or cfg.resblock_updown or cfg.head_dim is not None:
            raise NotImplementedError("SIGEUNet covers the DDIM configuration only (PD options unsupported)")
        self.cfg = cfg
        ch, mult, nrb = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks
        thr = SIGE_DEFAULTS["ddim_sparse_min_res"]
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, cfg.temb_ch), nn.Linear(cfg.temb_ch, cfg.temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        res = cfg.resolution
        in_mult = (1,) + mult
        self.down = nn.ModuleList()
        bin_ = ch
        for i, m in enumerate(mult):
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            bin_ = ch * in_mult[i]
            for _ in range(nrb):
                blocks.append(_ResBlock(cfg, bin_, ch * m, res >= thr))
                bin_ = ch * m
                if res in cfg.attn_resolutions:
                    attn.append(_Attn(cfg, bin_))
            d = nn.Module()
            d.block, d.attn = blocks, attn
            if i != len(mult) - 1:
                d.downsample = _Down(bin_, res >= thr)
                res //= 2
            self.down.append(d)
        self.mid = nn.Module()
        self.mid.block_1 = _ResBlock(cfg, bin_, bin_, False)
        self.mid.attn_1 = _Attn(cfg, bin_)
        self.mid.block_2 = _ResBlock(cfg, bin_, bin_, False)
        ups = []
        for i in reversed(range(len(mult))):
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            bout, skip = ch * mult[i], ch * mult[i]
            for j in range(nrb + 1):
                if j == nrb:
                    skip = ch * in_mult[i]
                blocks.append(_ResBlock(cfg, bin_ + skip, bout, res >= thr))
                bin_ = bout
                if res in cfg.attn_resolutions:
                    attn.append(_Attn(cfg, bin_))
            u = nn.Module()
            u.block, u.attn = blocks, attn
            if i != 0:
                u.upsample = _Up(bin_)
                res *= 2
            ups.insert(0, u)
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(cfg.num_groups, bin_, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(bin_, cfg.out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from ssic.models.ddim import timestep_embedding

        cfg = self.cfg
        temb = None
        if self.mode == "full":
            temb = timestep_embedding(t * cfg.time_scale if cfg.time_scale != 1.0 else t, cfg.ch)
            temb = self.temb.dense[1](_swish(self.temb.dense[0](temb)))
        hs = [self.conv_in(x)]
        for i, d in enumerate(self.down):
            for j in range(cfg.num_res_blocks):
                h = d.block[j](hs[-1], temb)
                if len(d.attn):
                    h = d.attn[j](h)
                hs.append(h)
            if i != len(self.down) - 1:
                hs.append(d.downsample(hs[-1]))
        h = self.mid.block_1(hs[-1], temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)
        for i in reversed(range(len(self.up))):
            u = self.up[i]
            for j in range(cfg.num_res_blocks + 1):
                h = u.block[j](torch.cat([h, hs.pop()], dim=1), temb)
                if len(u.attn):
                    h = u.attn[j](h)
            if i != 0:
                h = u.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


# -------------------------------------------------------------------------------------- GauGAN


class _SPADE(SIGEModule):
    """SPADE with fused ``mlp_gamma_beta``; BN (running stats) as a cached exact affine."""

    def __init__(self, norm_nc: int, nhidden: int, eps: float, seg_gather: Gather | None,
                 shortcut_conv: nn.Conv2d | None = None):
        super().__init__()
        self.norm_nc = norm_nc
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False, eps=eps)
        self.sparse = seg_gather is not None
        self.is_shortcut = shortcut_conv is not None
        Conv = SIGEConv2d if self.sparse else nn.Conv2d
        self.mlp_gamma_beta = Conv(nhidden, 2 * norm_nc, 3, padding=1)
        if self.sparse:
            if self.is_shortcut:
                # gamma/beta tiles are scattered, then re-gathered on the 1x1 shortcut's blocks
                self.scatter = Scatter(seg_gather)
                self.gather = Gather(shortcut_conv, SIGE_DEFAULTS["block_1x1"])
            else:
                self.scatter_gather = ScatterGather(seg_gather)
        self.scale = self.shift = None

    def forward(self, x: torch.Tensor, actv: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            bn = self.param_free_norm
            inv = torch.rsqrt(bn.running_var + bn.eps)
            self.scale, self.shift = inv, -bn.running_mean * inv
            normalized = bn(x)
        else:
            normalized = x  # the caller applied the BN affine (fused into Gather, or dense)
        gb = self.mlp_gamma_beta(actv)
        if self.sparse:
            gb = self.gather(self.scatter(gb)) if self.is_shortcut else self.scatter_gather(gb)
        gamma, beta = torch.split(gb, self.norm_nc, dim=1)
        return normalized * (1 + gamma) + beta


class _SPADEBlock(SIGEModule):
    def __init__(self, fin: int, fout: int, cfg, sparse: bool):
        super().__init__()
        self.learned_shortcut = fin != fout
        self.sparse = sparse
        fmid = min(fin, fout)
        nh = cfg.nhidden
        self.nhidden = nh
        Conv = SIGEConv2d if sparse else nn.Conv2d
        nshared = 3 if self.learned_shortcut else 2
        self.mlp_shared = nn.Sequential(Conv(cfg.semantic_nc, nh * nshared, 3, padding=1), nn.ReLU())
        self.conv_0 = Conv(fin, fmid, 3, padding=1)
        self.conv_1 = Conv(fmid, fout, 3, padding=1)
        b3 = SIGE_DEFAULTS["block_3x3"]
        seg_gather = None
        if sparse:
            self.seg_gather = seg_gather = Gather(self.mlp_shared[0], b3)
            self.seg_scatter_gather = ScatterGather(self.seg_gather)
            self.main_gather = Gather(self.conv_0, b3)
            self.main_scatter_gather = ScatterGather(self.main_gather)
        if self.learned_shortcut:
            self.conv_s = Conv(fin, fout, 1, bias=False)
            if sparse:
                self.shortcut_gather = Gather(self.conv_s, SIGE_DEFAULTS["block_1x1"])
                self.scatter = ScatterWithBlockResidual(self.main_gather, self.shortcut_gather)
        elif sparse:
            self.scatter = Scatter(self.main_gather)
        self.norm_0 = _SPADE(fin, nh, cfg.bn_eps, seg_gather)
        self.norm_1 = _SPADE(fmid, nh, cfg.bn_eps, seg_gather)
        if self.learned_shortcut:
            self.norm_s = _SPADE(fin, nh, cfg.bn_eps, seg_gather, shortcut_conv=self.conv_s)

    @staticmethod
    def _act(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        full = self.mode == "full"
        sp = self.sparse
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        if sp:
            seg = self.seg_gather(seg)
        actvs = self.mlp_shared(seg)
        if sp:
            actvs = self.seg_scatter_gather(actvs)
        parts = torch.split(actvs, self.nhidden, dim=1)
        if self.learned_shortcut:
            xs = x
            if sp:
                xs = self.shortcut_gather(xs) if full else self.shortcut_gather(
                    xs, _v(self.norm_s.scale), _v(self.norm_s.shift))
            elif not full:
                xs = self.norm_s.param_free_norm(xs)
            xs = self.conv_s(self.norm_s(xs, parts[2]))
        else:
            xs = x
        if sp:
            dx = self.main_gather(x) if full else self.main_gather(x, _v(self.norm_0.scale), _v(self.norm_0.shift))
        else:
            dx = x if full else self.norm_0.param_free_norm(x)
        dx = self.conv_0(self._act(self.norm_0(dx, parts[0])))
        if sp:
            dx = self.main_scatter_gather(dx) if full else self.main_scatter_gather(
                dx, _v(self.norm_1.scale), _v(self.norm_1.shift))
        elif not full:
            dx = self.norm_1.param_free_norm(dx)
        dx = self.conv_1(self._act(self.norm_1(dx, parts[1])))
        if sp:
            return self.scatter(dx, xs)
        return xs + dx


class SIGESPADEGenerator(SIGEModel):
    """ssic's SPADE generator on SIGE (fused SPADE convs; see :func:`gaugan_state_dict`)."""

    BLOCKS = ("head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3")

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        nf = cfg.ngf
        self.sh, self.sw = cfg.sh, cfg.sw
        chans = [(16, 16), (16, 16), (16, 16), (16, 8), (8, 4), (4, 2), (2, 1)]
        nsparse = SIGE_DEFAULTS["gaugan_num_sparse_blocks"]
        self.fc = nn.Conv2d(cfg.semantic_nc, 16 * nf, 3, padding=1)
        for k, (name, (a, b)) in enumerate(zip(self.BLOCKS, chans, strict=True)):
            setattr(self, name, _SPADEBlock(a * nf, b * nf, cfg, sparse=k >= len(self.BLOCKS) - nsparse))
        self.conv_img = nn.Conv2d(nf, 3, 3, padding=1)

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        x = self.fc(F.interpolate(seg, size=(self.sh, self.sw), mode="nearest"))
        for k, name in enumerate(self.BLOCKS):
            if k > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = getattr(self, name)(x, seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def gaugan_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an ssic ``SPADEGenerator`` state dict to the fused layout of :class:`SIGESPADEGenerator`."""
    out: dict[str, torch.Tensor] = {}
    for k in ("fc.weight", "fc.bias", "conv_img.weight", "conv_img.bias"):
        out[k] = sd[k]
    for blk in SIGESPADEGenerator.BLOCKS:
        norms = [n for n in ("norm_0", "norm_1", "norm_s") if f"{blk}.{n}.mlp_shared.0.weight" in sd]
        for p in ("weight", "bias"):
            out[f"{blk}.mlp_shared.0.{p}"] = torch.cat([sd[f"{blk}.{n}.mlp_shared.0.{p}"] for n in norms], 0)
        for n in norms:
            for p in ("weight", "bias"):
                out[f"{blk}.{n}.mlp_gamma_beta.{p}"] = torch.cat(
                    [sd[f"{blk}.{n}.mlp_gamma.{p}"], sd[f"{blk}.{n}.mlp_beta.{p}"]], 0)
            for p in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{blk}.{n}.param_free_norm.{p}"] = sd[f"{blk}.{n}.param_free_norm.{p}"]
        for c in ("conv_0.weight", "conv_0.bias", "conv_1.weight", "conv_1.bias", "conv_s.weight"):
            if f"{blk}.{c}" in sd:
                out[f"{blk}.{c}"] = sd[f"{blk}.{c}"]
    return out


# ------------------------------------------------------------------------------------ builders


def build_sige_model(name: str, torch_model: nn.Module) -> SIGEModel:
    """The SIGE variant of an ssic PyTorch model (``ddim`` or ``gaugan``) with the same weights."""
    sd = torch_model.state_dict()
    if name == "ddim":
        m = SIGEUNet(torch_model.cfg)
        m.load_state_dict(sd, strict=True)
    elif name == "gaugan":
        m = SIGESPADEGenerator(torch_model.cfg)
        m.load_state_dict(gaugan_state_dict(sd), strict=True)
    else:
        raise NotImplementedError(f"no SIGE variant of {name!r} (only ddim and gaugan)")
    return m.eval()


def sige_masks(name: str, mask, cfg=None) -> dict:
    """SIGE's per-resolution masks (``sige.utils.downsample_mask``) from a full-resolution bool mask."""
    m = torch.as_tensor(mask).bool()
    if name == "gaugan":
        return downsample_mask(m, (cfg.sh, cfg.sw), dilation=SIGE_DEFAULTS["gaugan_pyramid_dilation"])
    return downsample_mask(m, dilation=SIGE_DEFAULTS["ddim_pyramid_dilation"])
