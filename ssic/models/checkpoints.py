"""Loaders for the official checkpoint layouts.

- DDIM (ermongroup/ddim, LSUN Church): a plain ``state_dict`` of ``Model`` (the converted
  ``ema_lsun_church`` file), or a training checkpoint ``[state_dict, optimizer, epoch, step, ema]``
  (the EMA state dict, when present, is used), optionally with the ``module.`` prefix of
  ``DataParallel``. Names match :class:`ssic.models.ddim.UNet` one to one.
- PD: a plain ``state_dict`` in the layout of :class:`ssic.models.ddim.UNet` with the PD config
  (the official PD weights are Flax; convert them to this layout first).
- SPADE (NVlabs/SPADE ``latest_net_G.pth``): a plain ``state_dict`` of ``SPADEGenerator``; the
  ``conv_0``/``conv_1``/``conv_s`` convs carry spectral norm (``weight_orig``, ``weight_u``,
  ``weight_v``). The loader folds it away: ``weight = weight_orig / sigma`` with
  ``sigma = u . (W v)``, ``W = weight_orig.reshape(out, -1)`` (what ``torch.nn.utils.spectral_norm``
  computes in eval mode from the stored vectors).

Every loader raises :class:`ssic.errors.SSICError` naming the first missing or unexpected key (or
the first shape mismatch) when the file does not have the expected layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ssic.errors import SSICError

__all__ = [
    "load_ddim_checkpoint",
    "load_pd_checkpoint",
    "load_spade_checkpoint",
    "load_weights",
    "fold_spectral_norm",
    "read_state_dict",
]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its (unwrapped) tensor state dict."""
    p = Path(path)
    if not p.is_file():
        raise SSICError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise SSICError(f"cannot read weights file {p}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if isinstance(obj, (list, tuple)):
        # ermongroup/ddim training checkpoint: [model, optimizer, epoch, step, (ema)]
        dicts = [o for o in obj if isinstance(o, Mapping)]
        if not dicts:
            raise SSICError(f"weights file {p} holds no state dict")
        obj = dicts[-1] if len(obj) >= 5 and isinstance(obj[-1], Mapping) else dicts[0]
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "net_G", "G"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise SSICError(f"weights file {p} holds a {type(obj).__name__}, not a state dict")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = str(k)
        if k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    if not sd:
        raise SSICError(f"weights file {p} holds no tensors")
    return sd


def _load_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    expected = model.state_dict()
    for k in expected:
        if k not in sd:
            raise SSICError(f"{what}: missing key {k!r} (the file does not have the expected layout)")
    for k in sd:
        if k not in expected:
            raise SSICError(f"{what}: unexpected key {k!r} (the file does not have the expected layout)")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise SSICError(
                f"{what}: key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)} "
                "(wrong preset?)"
            )
    model.load_state_dict({k: sd[k].to(v.dtype) for k, v in expected.items()}, strict=True)
    return model.eval()


def load_ddim_checkpoint(path: str | Path, preset: str = "full") -> nn.Module:
    """Load an ermongroup/ddim church checkpoint into :class:`ssic.models.ddim.UNet`."""
    from ssic.models.presets import build_architecture

    model = build_architecture("ddim", preset)
    return _load_checked(model, read_state_dict(path), f"DDIM checkpoint {path}")


def load_pd_checkpoint(path: str | Path, preset: str = "full") -> nn.Module:
    """Load a PD state dict (ssic/ermongroup naming, PD config) into the PD UNet."""
    from ssic.models.presets import build_architecture

    model = build_architecture("pd", preset)
    return _load_checked(model, read_state_dict(path), f"PD checkpoint {path}")


def fold_spectral_norm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every ``X.weight_orig``/``X.weight_u``/``X.weight_v`` triple by ``X.weight``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith((".weight_u", ".weight_v")):
            continue
        if k.endswith(".weight_orig"):
            base = k[: -len(".weight_orig")]
            u, vv = sd.get(base + ".weight_u"), sd.get(base + ".weight_v")
            if u is None:
                raise SSICError(f"spectral-norm key {base + '.weight_u'!r} missing next to {k!r}")
            if vv is None:
                raise SSICError(f"spectral-norm key {base + '.weight_v'!r} missing next to {k!r}")
            w = v.to(torch.float64)
            wm = w.reshape(w.shape[0], -1)
            if u.numel() != wm.shape[0] or vv.numel() != wm.shape[1]:
                raise SSICError(f"spectral-norm vectors of {base!r} do not match its weight shape")
            sigma = torch.dot(u.to(torch.float64).reshape(-1), wm @ vv.to(torch.float64).reshape(-1))
            out[base + ".weight"] = (w / sigma).to(v.dtype)
        else:
            out[k] = v
    for k in sd:
        if k.endswith((".weight_u", ".weight_v")):
            base = k[: -len(".weight_u")]
            if base + ".weight_orig" not in sd:
                raise SSICError(f"unexpected key {k!r} (spectral-norm vector without weight_orig)")
    return out


def load_spade_checkpoint(path: str | Path, preset: str = "full") -> nn.Module:
    """Load NVlabs/SPADE's generator state dict (spectral norm folded) into
    :class:`ssic.models.gaugan.SPADEGenerator`."""
    from ssic.models.presets import build_architecture

    model = build_architecture("gaugan", preset)
    sd = fold_spectral_norm(read_state_dict(path))
    return _load_checked(model, sd, f"SPADE checkpoint {path}")


def load_weights(name: str, preset: str, path: str | Path) -> nn.Module:
    """Dispatch to the loader of model ``name``."""
    loaders = {"ddim": load_ddim_checkpoint, "pd": load_pd_checkpoint, "gaugan": load_spade_checkpoint}
    if name not in loaders:
        raise SSICError(f"unknown model {name!r}: choose one of {', '.join(loaders)}")
    return loaders[name](path, preset)
