"""Turning HTTP parts into model inputs and model outputs into JSON, with the size guards.

Each model input arrives as one file part named after the input, holding ``.npy`` bytes (the array
as is, or a ``[H, W]`` label map for a GauGAN-style one-hot input) or a PNG (an RGB picture for a
``[1, 3, H, W]`` input in [-1, 1], or a one-channel label map). Outputs leave as base64 of their
``.npy`` bytes. Nothing here imports Ray, so the codec is tested without a cluster.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

import numpy as np

from ssic.errors import SSICError

# Decompression-bomb guard: Pillow raises DecompressionBombError past twice this many pixels and
# warns past it; the warning is turned into an error where PNGs are opened.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class IOSpec:
    """One model input or output: ``name``, ``shape`` (ints) and ``dtype`` (manifest spelling)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def kind(self) -> str:
        """"image" (``[1, 3, H, W]``), "labels" (``[1, C > 3, H, W]``: one-hot + edge) or "tensor"."""
        if len(self.shape) == 4 and self.shape[0] == 1:
            return "image" if self.shape[1] == 3 else ("labels" if self.shape[1] > 3 else "tensor")
        return "tensor"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}


def _field(item, key: str):
    return item[key] if isinstance(item, dict) else getattr(item, key)


def model_io(manifest) -> tuple[list[IOSpec], list[IOSpec]]:
    """The inputs and outputs of an artefact's manifest as :class:`IOSpec` lists.

    The one place the serving code reads the manifest: it accepts today's dict (``"inputs"`` /
    ``"outputs"`` lists of ``{name, shape, dtype}``) and an object with ``inputs``/``outputs``
    attributes holding items with ``name``/``shape``/``dtype`` attributes.
    """
    def specs(key: str) -> list[IOSpec]:
        items = _field(manifest, key)
        return [IOSpec(str(_field(i, "name")), tuple(int(d) for d in _field(i, "shape")), str(_field(i, "dtype")))
                for i in items]

    return specs("inputs"), specs("outputs")


def cache_specs(manifest) -> list[IOSpec]:
    """The caches a primed session holds (name, shape, dtype), from a dict or typed manifest."""
    return [IOSpec(str(_field(c, "name")), tuple(int(d) for d in _field(c, "shape")), str(_field(c, "dtype")))
            for c in _field(manifest, "caches")]


def mask_size(manifest) -> tuple[int, int]:
    """``(H, W)`` of the edit mask an artefact takes."""
    m = _field(manifest, "mask")
    return int(_field(m, "height")), int(_field(m, "width"))


def _open_png(data: bytes, what: str):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format != "PNG":
                raise SSICError(f"{what}: expected a PNG or .npy file, got {img.format}")
            img.load()
            return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SSICError(f"{what}: image too large (more than {MAX_IMAGE_PIXELS} pixels)") from None
    except SSICError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the client's corrupt file
        raise SSICError(f"{what}: not a readable PNG") from None


def _load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - corrupt or pickled payloads are the client's error
        raise SSICError(f"{what}: not a readable .npy file (pickled arrays are refused)") from None
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise SSICError(f"{what}: .npy must hold a numeric array")
    return arr


def labels_to_input(labels: np.ndarray, channels: int, what: str) -> np.ndarray:
    """A label map ``[H, W]`` (ints in ``[0, channels - 1)``) -> float32 ``[1, channels, H, W]``:
    one-hot of the labels, then an edge channel where a 4-neighbour has another label (SPADE's
    ``get_edges`` with the label map as the instance map)."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise SSICError(f"{what}: a label map must be [H, W], got shape {list(lab.shape)}")
    if np.issubdtype(lab.dtype, np.floating) and not np.array_equal(lab, np.round(lab)):
        raise SSICError(f"{what}: label ids must be integers")
    lab = lab.astype(np.int64)
    nc = channels - 1
    if lab.size and (lab.min() < 0 or lab.max() >= nc):
        raise SSICError(f"{what}: label ids must be in [0, {nc}), got [{lab.min()}, {lab.max()}]")
    out = np.zeros((1, channels) + lab.shape, dtype=np.float32)
    np.put_along_axis(out[0, :nc], lab[None], 1.0, axis=0)
    edge = np.zeros(lab.shape, dtype=bool)
    dh = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    dv = lab[1:, :] != lab[:-1, :]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    out[0, nc] = edge
    return out


def decode_input(spec: IOSpec, data: bytes) -> np.ndarray:
    """One file part -> the model input ``spec`` (float32 for float inputs); raises SSICError."""
    what = f"part '{spec.name}'"
    if data[:6] == b"\x93NUMPY":
        arr = _load_npy(data, what)
        if spec.kind == "labels" and arr.ndim == 2:
            arr = labels_to_input(arr, spec.shape[1], what)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        img = _open_png(data, what)
        h, w = spec.shape[2:] if len(spec.shape) == 4 else (None, None)
        if (img.height, img.width) != (h, w):
            raise SSICError(f"{what}: PNG is {img.width}x{img.height}, the model takes {w}x{h}")
        if spec.kind == "image":
            from ssic.editing import image_to_model

            arr = image_to_model(np.asarray(img.convert("RGB")), (h, w))
        elif spec.kind == "labels":
            if img.mode not in ("L", "P", "I", "I;16"):
                raise SSICError(f"{what}: a label-map PNG must have one channel (mode L, P or I), got {img.mode}")
            arr = labels_to_input(np.asarray(img), spec.shape[1], what)
        else:
            raise SSICError(f"{what}: this input takes .npy bytes, not a PNG")
    else:
        raise SSICError(f"{what}: expected .npy bytes or a PNG")
    if list(arr.shape) != list(spec.shape):
        raise SSICError(f"{what}: shape {list(arr.shape)}, the model takes {list(spec.shape)}")
    if spec.dtype in ("float", "float32"):
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise SSICError(f"{what}: non-finite values")
    return np.ascontiguousarray(arr)


def decode_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A mask part (.npy or one-channel PNG, nonzero = edited) -> bool ``[H, W]``."""
    what = "part 'mask'"
    if data[:6] == b"\x93NUMPY":
        m = _load_npy(data, what)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        m = np.asarray(_open_png(data, what).convert("L"))
    else:
        raise SSICError(f"{what}: expected .npy bytes or a PNG")
    m = m.reshape(m.shape[-2:]) if m.ndim == 4 and m.shape[:2] == (1, 1) else m
    if m.shape != size:
        raise SSICError(f"{what}: shape {list(m.shape)}, the model's mask is {list(size)}")
    if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
        raise SSICError(f"{what}: non-finite values")
    return m != 0


def encode_array(arr: np.ndarray) -> str:
    """An array -> base64 of its ``.npy`` bytes (what the JSON responses carry)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_array(text: str) -> np.ndarray:
    """base64 of ``.npy`` bytes -> array (the inverse of :func:`encode_array`, for clients)."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array's ``.npy`` bytes (for building request parts)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()
