"""Stable Diffusion weights in the two layouts people have them in.

- **diffusers** layout: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``
  (the ``unet/`` or ``vae/`` folder of a pipeline; the pipeline root works too), or the
  ``.safetensors`` file itself with its ``config.json`` beside it. Loaded with diffusers'
  ``from_pretrained`` on the local path (nothing is downloaded); the architecture comes from the
  config, so any SD 1.x/2.x-shaped UNet or VAE loads, not only the presets.
- **CompVis** (original, ``ldm``) layout: one ``.ckpt`` (a pickled dict, read with
  ``torch.load(weights_only=True)``; the tensors may sit under ``state_dict``) or a single-file
  ``.safetensors``, with the UNet under ``model.diffusion_model.*`` and the VAE under
  ``first_stage_model.*`` (a standalone VAE file without the prefix works too). The architecture is
  the preset's (``full`` = SD 1.5); the keys are converted by :func:`compvis_to_diffusers_unet` /
  :func:`compvis_to_diffusers_vae`. EMA copies (``model_ema.*``), the text encoder
  (``cond_stage_model.*``) and the VAE's training loss (``loss.*``) are ignored.

Key correspondence (learnt from the layout of diffusers' single-file conversion; written here
from the module structure). With ``L`` = layers per block of the UNet, level ``l``, layer ``p``:

    time_embed.{0,2}                     time_embedding.linear_{1,2}
    input_blocks.0.0                     conv_in
    input_blocks.{1+l(L+1)+p}.0          down_blocks.l.resnets.p         (p < L)
    input_blocks.{1+l(L+1)+p}.1          down_blocks.l.attentions.p
    input_blocks.{1+l(L+1)+L}.0.op       down_blocks.l.downsamplers.0.conv
    middle_block.{0,1,2}                 mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{l(L+1)+p}.0           up_blocks.l.resnets.p           (p <= L)
    output_blocks.{l(L+1)+p}.1           up_blocks.l.attentions.p        (attention levels)
    output_blocks.{l(L+1)+L}.{1|2}.conv  up_blocks.l.upsamplers.0.conv   (2 after an attention)
    out.{0,2}                            conv_norm_out, conv_out
    resnet in_layers.{0,2} / emb_layers.1 / out_layers.{0,3} / skip_connection
                                         norm1, conv1 / time_emb_proj / norm2, conv2 / conv_shortcut

VAE (``N`` levels): ``encoder.down.i.block.j`` = ``encoder.down_blocks.i.resnets.j``,
``encoder.down.i.downsample.conv`` = ``...downsamplers.0.conv``, ``decoder.up.i`` =
``decoder.up_blocks.(N-1-i)`` (CompVis numbers the decoder's levels from the output resolution
up, diffusers in the order they run), ``mid.block_{1,2}`` = ``mid_block.resnets.{0,1}``, ``mid.attn_1.{norm, q,
k, v, proj_out}`` = ``mid_block.attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}`` (CompVis
stores the attention projections as 1x1 convs ``[C, C, 1, 1]``, diffusers as linears ``[C, C]``),
``norm_out`` = ``conv_norm_out``, ``nin_shortcut`` = ``conv_shortcut``.

Every loader raises :class:`ssic.errors.SSICError` naming the first missing/unexpected key or shape
mismatch when a file does not have the expected layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ssic.errors import SSICError

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "load_sd_weights",
    "load_diffusers",
    "load_compvis",
    "read_compvis_state_dict",
    "compvis_to_diffusers_unet",
    "diffusers_to_compvis_unet",
    "compvis_to_diffusers_vae",
    "diffusers_to_compvis_vae",
    "save_diffusers",
    "save_compvis",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_TO_COMPVIS = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}
_VAE_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_TO_COMPVIS = {v: k for k, v in _VAE_ATTN_TO_DIFFUSERS.items()}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module path of ``rest`` (e.g. ``in_layers.0.weight``) through ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


# ------------------------------------------------------------------------------------------- UNet

def _unet_shape(config: Mapping) -> tuple[int, int, list[bool]]:
    """(levels, layers per block, which up levels have attention) of a diffusers UNet config."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    return levels, layers, up_attn


def compvis_to_diffusers_unet(key: str, config: Mapping) -> str:
    """The diffusers name of CompVis UNet key ``key`` (without ``model.diffusion_model.``).
    Raises SSICError for a key that has no place in a UNet of ``config``."""
    levels, layers, up_attn = _unet_shape(config)
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        level, pos = divmod(i - 1, layers + 1)
        if i >= 1 and level < levels:
            if pos == layers and j == 0 and rest.startswith("op."):
                return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
            if pos < layers and j == 0:
                return f"down_blocks.{level}.resnets.{pos}.{_rename_head(rest, _RESNET_TO_DIFFUSERS)}"
            if pos < layers and j == 1:
                return f"down_blocks.{level}.attentions.{pos}.{rest}"
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", key)
    if m:
        j, rest = int(m[1]), m[2]
        if j in (0, 2):
            return f"mid_block.resnets.{j // 2}.{_rename_head(rest, _RESNET_TO_DIFFUSERS)}"
        if j == 1:
            return f"mid_block.attentions.0.{rest}"
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        level, pos = divmod(i, layers + 1)
        if level < levels:
            up_j = 2 if up_attn[level] else 1
            if j == 0:
                return f"up_blocks.{level}.resnets.{pos}.{_rename_head(rest, _RESNET_TO_DIFFUSERS)}"
            if j == up_j and pos == layers and level < levels - 1 and rest.startswith("conv."):
                return f"up_blocks.{level}.upsamplers.0.{rest}"
            if j == 1 and up_attn[level]:
                return f"up_blocks.{level}.attentions.{pos}.{rest}"
    raise SSICError(f"CompVis UNet key {UNET_PREFIX + key!r} has no place in this UNet (wrong preset or layout?)")


def diffusers_to_compvis_unet(key: str, config: Mapping) -> str:
    """The CompVis name (without ``model.diffusion_model.``) of diffusers UNet key ``key``."""
    levels, layers, up_attn = _unet_shape(config)
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, pos, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = 1 + level * (layers + 1)
        if kind == "resnets":
            return f"input_blocks.{base + pos}.0.{_rename_head(rest, _RESNET_TO_COMPVIS)}"
        if kind == "attentions":
            return f"input_blocks.{base + pos}.1.{rest}"
        return f"input_blocks.{base + layers}.0.op.{rest[len('conv.'):]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", key)
    if m:
        kind, pos, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * pos}.{_rename_head(rest, _RESNET_TO_COMPVIS)}"
        return f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, pos, rest = int(m[1]), m[2], int(m[3]), m[4]
        base = level * (layers + 1)
        if kind == "resnets":
            return f"output_blocks.{base + pos}.0.{_rename_head(rest, _RESNET_TO_COMPVIS)}"
        if kind == "attentions":
            return f"output_blocks.{base + pos}.1.{rest}"
        return f"output_blocks.{base + layers}.{2 if up_attn[level] else 1}.{rest}"
    raise SSICError(f"diffusers UNet key {key!r} has no CompVis counterpart")


# -------------------------------------------------------------------------------------------- VAE

def compvis_to_diffusers_vae(key: str, config: Mapping) -> str:
    """The diffusers name of CompVis VAE key ``key`` (without ``first_stage_model.``)."""
    levels = len(config["block_out_channels"])
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m:
        part, rest = m[1], m[2]
        if rest.startswith(("conv_in.", "conv_out.")):
            return key
        if rest.startswith("norm_out."):
            return f"{part}.conv_norm_out.{rest[len('norm_out.'):]}"
        mm = re.fullmatch(r"mid\.block_([12])\.(.+)", rest)
        if mm:
            return f"{part}.mid_block.resnets.{int(mm[1]) - 1}.{_rename_head(mm[2], {'nin_shortcut': 'conv_shortcut'})}"
        mm = re.fullmatch(r"mid\.attn_1\.(.+)", rest)
        if mm:
            return f"{part}.mid_block.attentions.0.{_rename_head(mm[1], _VAE_ATTN_TO_DIFFUSERS)}"
        mm = re.fullmatch(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)", rest)
        if mm and ((part == "encoder") == (mm[1] == "down")) and int(mm[2]) < levels:
            i = int(mm[2])
            block = f"down_blocks.{i}" if part == "encoder" else f"up_blocks.{levels - 1 - i}"
            if mm[4] is not None:
                return f"{part}.{block}.resnets.{mm[4]}.{_rename_head(mm[5], {'nin_shortcut': 'conv_shortcut'})}"
            sampler = "downsamplers" if part == "encoder" else "upsamplers"
            if (mm[3] == "downsample") == (part == "encoder"):
                return f"{part}.{block}.{sampler}.0.{mm[5]}"
    raise SSICError(f"CompVis VAE key {VAE_PREFIX + key!r} has no place in this VAE (wrong preset or layout?)")


def diffusers_to_compvis_vae(key: str, config: Mapping) -> str:
    """The CompVis name (without ``first_stage_model.``) of diffusers VAE key ``key``."""
    levels = len(config["block_out_channels"])
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m:
        part, rest = m[1], m[2]
        if rest.startswith(("conv_in.", "conv_out.")):
            return key
        if rest.startswith("conv_norm_out."):
            return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
        mm = re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)
        if mm:
            return f"{part}.mid.block_{int(mm[1]) + 1}.{_rename_head(mm[2], {'conv_shortcut': 'nin_shortcut'})}"
        mm = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)
        if mm:
            return f"{part}.mid.attn_1.{_rename_head(mm[1], _VAE_ATTN_TO_COMPVIS)}"
        mm = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)", rest)
        if mm:
            i = int(mm[2])
            block = f"down.{i}" if part == "encoder" else f"up.{levels - 1 - i}"
            if mm[4] is not None:
                return f"{part}.{block}.block.{mm[4]}.{_rename_head(mm[5], {'conv_shortcut': 'nin_shortcut'})}"
            return f"{part}.{block}.{'downsample' if part == 'encoder' else 'upsample'}.{mm[5]}"
    raise SSICError(f"diffusers VAE key {key!r} has no CompVis counterpart")


def _is_vae_attn_proj(diffusers_key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


# ---------------------------------------------------------------------------------------- loading

def _build_empty(kind: str, preset: str) -> nn.Module:
    """The preset's architecture on the meta device: no memory, no initialisation (the full UNet
    would take seconds and 3.4 GB just to be overwritten); ``load_state_dict(assign=True)`` fills it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ssic.models.sd_config import unet_config, vae_config

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config(preset)) if kind == "unet" else AutoencoderKL(**vae_config(preset))


def read_compvis_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a CompVis checkpoint (``.ckpt``/``.pt``/``.pth`` or ``.safetensors``), keyed as
    in the file (the ``state_dict`` wrapper of a Lightning checkpoint is removed)."""
    p = Path(path)
    if not p.is_file():
        raise SSICError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p)))
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            raise SSICError(f"cannot read {p}: {type(e).__name__}: {e}".splitlines()[0]) from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise SSICError(f"cannot read weights file {p} (a CompVis .ckpt is read with weights_only=True): "
                        f"{type(e).__name__}: {e}".splitlines()[0]) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise SSICError(f"weights file {p} holds a {type(obj).__name__}, not a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _select(sd: Mapping[str, torch.Tensor], kind: str, path) -> dict[str, torch.Tensor]:
    prefix = UNET_PREFIX if kind == "unet" else VAE_PREFIX
    picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not picked and kind == "vae":  # a standalone VAE file: encoder.*, decoder.*, (post_)quant_conv.*
        picked = {k: v for k, v in sd.items()
                  if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    if not picked:
        raise SSICError(f"{path} has no {prefix}* keys: not a CompVis Stable Diffusion checkpoint")
    return picked


def load_compvis(kind: str, path: str | Path, preset: str = "full") -> nn.Module:
    """Load the UNet (``kind="unet"``) or VAE (``"vae"``) of a CompVis checkpoint into the diffusers
    model of ``preset``. Returns it in eval mode."""
    model = _build_empty(kind, preset)
    config = model.config
    convert = compvis_to_diffusers_unet if kind == "unet" else compvis_to_diffusers_vae
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in _select(read_compvis_state_dict(path), kind, path).items():
        dk = convert(k, config)
        if dk not in expected:
            raise SSICError(f"{path}: key {k!r} maps to {dk!r}, which this {kind} does not have (wrong preset?)")
        if kind == "vae" and _is_vae_attn_proj(dk) and v.ndim == 4:
            v = v[:, :, 0, 0]
        if tuple(v.shape) != tuple(expected[dk].shape):
            raise SSICError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[dk].shape)} "
                            "(wrong preset?)")
        out[dk] = v.to(torch.float32).contiguous()
    for k in expected:
        if k not in out:
            back = diffusers_to_compvis_unet(k, config) if kind == "unet" else diffusers_to_compvis_vae(k, config)
            prefix = UNET_PREFIX if kind == "unet" else VAE_PREFIX
            raise SSICError(f"{path}: missing key {prefix + back!r} (the file does not have the expected layout)")
    model.load_state_dict(out, strict=True, assign=True)
    return model.float().eval()


def _diffusers_dir(kind: str, path: Path) -> Path | None:
    """The folder holding config.json + weights for ``kind`` under ``path``, or None."""
    sub = "unet" if kind == "unet" else "vae"
    if path.is_dir():
        for d in (path, path / sub):
            if (d / "config.json").is_file():
                return d
        return None
    if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        if not any(k.startswith((UNET_PREFIX, VAE_PREFIX)) for k in keys):
            return path.parent
    return None


def load_diffusers(kind: str, folder: str | Path) -> nn.Module:
    """Load a diffusers ``UNet2DConditionModel`` (``kind="unet"``) or ``AutoencoderKL`` (``"vae"``)
    from a local folder with ``config.json`` and ``diffusion_pytorch_model.safetensors``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    try:
        # low_cpu_mem_usage=True needs accelerate
        model = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - a broken folder is a user error
        raise SSICError(f"cannot load a diffusers {cls.__name__} from {folder}: {type(e).__name__}: {e}"
                        .splitlines()[0]) from e
    return model.float().eval()


def load_sd_weights(kind: str, path: str | Path, preset: str = "full") -> nn.Module:
    """Load ``kind`` (``"unet"`` or ``"vae"``) from ``path`` in either layout (detected): a diffusers
    folder / safetensors with config.json, else a CompVis checkpoint in the ``preset``'s architecture."""
    if kind not in ("unet", "vae"):
        raise SSICError(f"unknown Stable Diffusion part {kind!r} (unet or vae)")
    p = Path(path)
    if not p.exists():
        raise SSICError(f"weights not found: {p}")
    folder = _diffusers_dir(kind, p)
    if folder is not None:
        return load_diffusers(kind, folder)
    if p.is_dir():
        raise SSICError(f"{p} is a directory without config.json (expected a diffusers {kind} folder)")
    return load_compvis(kind, p, preset)


# ---------------------------------------------------------------------------------------- saving

def save_diffusers(model: nn.Module, folder: str | Path) -> Path:
    """Write a diffusers model as ``folder/config.json`` + ``diffusion_pytorch_model.safetensors``."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_compvis(path: str | Path, unet: nn.Module | None = None, vae: nn.Module | None = None) -> Path:
    """Write a CompVis-layout checkpoint: ``{"state_dict": {model.diffusion_model.*, first_stage_model.*}}``
    with ``torch.save`` (``.ckpt``) or safetensors (``.safetensors``). VAE attention projections are
    written as 1x1 convs, as CompVis stores them."""
    sd: dict[str, torch.Tensor] = {}
    if unet is not None:
        for k, v in unet.state_dict().items():
            sd[UNET_PREFIX + diffusers_to_compvis_unet(k, unet.config)] = v.detach().clone()
    if vae is not None:
        for k, v in vae.state_dict().items():
            if _is_vae_attn_proj(k):
                v = v[:, :, None, None]
            sd[VAE_PREFIX + diffusers_to_compvis_vae(k, vae.config)] = v.detach().clone().contiguous()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 0}, path)
    return path
