"""Reading and writing the files of ``ssic edit``: images, masks, label maps, arrays, and resizing.

Every image goes through Pillow (``Image.open``, ``ImageOps.exif_transpose``), never by hand:

- images (:func:`read_image`): float32 ``[H, W, 3]`` in [0, 1] for every mode: ``1``, ``L``, ``LA``,
  ``P``/``PA`` (through the palette), ``RGB``, ``RGBA``, ``CMYK``..., 16-bit ``I;16``/``I`` divided by
  65535 (scaled, never clipped to 8 bits), ``F`` as is; gray is repeated over the three channels;
  alpha is dropped; EXIF orientation is applied;
- masks (:func:`read_mask`): bool ``[H, W]``; where the image has an alpha channel that is not
  opaque everywhere, the mask is alpha > 0 (painted strokes on a transparent layer); otherwise a
  pixel is in the mask where any channel is non-zero (white or coloured strokes on black);
- label maps (:func:`read_labels`, GauGAN): int64 ``[H, W]`` of the raw values of a single-channel
  image (``L``, ``P`` indices, ``I``, ``I;16``);
- ``.npy``/``.npz`` (:func:`read_array`): the array as stored (no pickles).

Sizes (:class:`Placement`): an image whose size is not the model's is refused, naming the model's
size, unless a resize mode is chosen: ``fit`` stretches to the model's size, ``crop`` scales to cover
it and crops the centre, ``pad`` scales to fit inside it and pads by repeating the border; the
result is mapped back to the input's size (``crop``: the uncovered border is the edited input).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssic.errors import SSICError
from ssic.outputs import OUTPUT_SUFFIXES, OUTPUT_SUFFIXES_TEXT, write_atomically

ARRAY_SUFFIXES = (".npy", ".npz")
RESIZE_MODES = ("fit", "crop", "pad")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _exists(path: Path, what: str) -> None:
    if not path.exists():
        raise SSICError(f"{what} file not found: {path}")
    if path.is_dir():
        raise SSICError(f"{what} must be a file, got a directory: {path}")


def _open(path: str | os.PathLike, what: str):
    """Open ``path`` with Pillow, apply its EXIF orientation, load the pixels; returns the image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    _exists(path, what)
    try:
        with Image.open(path) as img:
            img.load()
            out = ImageOps.exif_transpose(img)
            return out if out is not None else img
    except UnidentifiedImageError:
        raise SSICError(f"cannot read {what} {path}: not an image Pillow can read, nor a .npy/.npz array") from None
    except OSError as exc:
        raise SSICError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise assorted errors on damaged files
        raise SSICError(f"cannot read {what} {path}: {type(exc).__name__}") from None


def _alpha(img) -> np.ndarray | None:
    """The alpha channel as float32 [H, W] in [0, 1], or None when the image has none."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode in ("RGBa", "La"):
        img = img.convert(img.mode.upper())
    if img.mode not in ("RGBA", "LA"):
        return None
    return np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0


def _values(img, what: str, path) -> np.ndarray:
    """The colour/gray values as float32 [H, W, C] (C = 1 or 3) in [0, 1], alpha dropped."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        return (np.asarray(img).astype(np.float32) / 65535.0)[..., None]
    if mode == "I":
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise SSICError(f"{what} {path} is a 32-bit integer image with values outside 0..65535")
        return (a.astype(np.float32) / 65535.0)[..., None]
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            raise SSICError(f"{what} {path} is a float image with values outside [0, 1]")
        return a[..., None].copy()
    if mode in ("1", "L", "LA", "La"):
        return (np.asarray(img.getchannel(0).convert("L"), dtype=np.float32) / 255.0)[..., None]
    rgb = img.convert("RGBA").convert("RGB") if mode in ("P", "PA", "RGBa") else img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def read_image(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """Read an image file; returns float32 ``[H, W, 3]`` in [0, 1] (see the module notes per mode).

    Raises ``SSICError`` (one line) when the file is missing or not a readable image.
    """
    img = _open(path, what)
    v = _values(img, what, path)
    return np.repeat(v, 3, axis=2) if v.shape[2] == 1 else v


def read_mask(path: str | os.PathLike, what: str = "mask") -> np.ndarray:
    """Read an edit mask; returns bool ``[H, W]`` (``.npy``/``.npz``: the array as stored, squeezed).

    Images: alpha > 0 where there is an alpha channel not opaque everywhere, else any channel
    non-zero. Arrays are returned as stored (the session checks their dtype and shape).
    Raises ``SSICError`` (one line) when the file cannot be read.
    """
    p = Path(path)
    if p.suffix.lower() in ARRAY_SUFFIXES:
        m = read_array(p, what)
        return m.any(axis=-1) if m.ndim == 3 and m.shape[-1] in (3, 4) and m.dtype.kind in "biuf" else m
    img = _open(p, what)
    alpha = _alpha(img)
    if alpha is not None and not (alpha >= 1.0).all():
        return alpha > 0
    return (_values(img, what, p) > 0).any(axis=2)


def read_labels(path: str | os.PathLike, what: str = "label map") -> np.ndarray:
    """Read a label map; returns int64 ``[H, W]`` (images: the raw values of mode L, P, I, I;16 or 1).

    Raises ``SSICError`` for colour images (labels are indices, not colours) and unreadable files.
    """
    p = Path(path)
    if p.suffix.lower() in ARRAY_SUFFIXES:
        return read_array(p, what)
    img = _open(p, what)
    if img.mode not in ("1", "L", "P", "I", *_SIXTEEN_BIT):
        raise SSICError(f"{what} {p} is a {img.mode} image; a label map is a single-channel image of label "
                        "indices (mode L, P, I or I;16) or a .npy array")
    return np.asarray(img).astype(np.int64)


def read_array(path: str | os.PathLike, what: str = "array") -> np.ndarray:
    """Read a ``.npy`` array or the first array of a ``.npz``; returns it as stored (no pickles)."""
    path = Path(path)
    _exists(path, what)
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if not data.files:
                    raise SSICError(f"cannot read {what} {path}: the .npz holds no array")
                return data[data.files[0]]
        return np.load(path, allow_pickle=False)
    except SSICError:
        raise
    except OSError as exc:
        raise SSICError(f"cannot read {what} {path}: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError/EOFError/... on damaged files
        raise SSICError(f"cannot read {what} {path}: {type(exc).__name__}") from None


def read_input(path: str | os.PathLike, what: str = "input") -> np.ndarray:
    """``.npy``/``.npz``: the array as stored; anything else: :func:`read_image` (float32 [H, W, 3])."""
    p = Path(path)
    return read_array(p, what) if p.suffix.lower() in ARRAY_SUFFIXES else read_image(p, what)


# ---------------------------------------------------------------------------- writing


def model_to_image(x: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """float ``[1, C, H, W]`` in ``value_range`` (black, white) -> uint8 ``[H, W, 3]`` (C >= 3: the
    first three; C = 1: gray). Values outside the range are clipped."""
    x = np.asarray(x)
    lo, hi = value_range
    chans = x[0, :3] if x.shape[1] >= 3 else np.repeat(x[0, :1], 3, axis=0)
    unit = (np.clip(chans.transpose(1, 2, 0), lo, hi) - lo) / (hi - lo)
    return (unit * 255.0).round().astype(np.uint8)


def save_image(img: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 ``[H, W, 3]`` (or ``[H, W]``) image as PNG or JPEG (by suffix), atomically."""
    from PIL import Image

    path = Path(path)
    fmt = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if fmt not in ("PNG", "JPEG"):
        raise SSICError(f"image output must end in .png, .jpg or .jpeg, got {path.name}")
    pil = Image.fromarray(np.ascontiguousarray(img))
    write_atomically(path, lambda f: pil.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})))


def save_output(x: np.ndarray, path: str | os.PathLike, value_range: tuple[float, float] | None = None) -> None:
    """Write a model output ``[1, C, H, W]``: ``.npy`` as is, ``.png``/``.jpg``/``.jpeg`` as an image
    whose ``value_range`` (default ``(-1, 1)``) maps to black..white.

    Written atomically (a failure leaves an existing file as it was). Raises ``SSICError`` for
    another suffix or a missing folder.
    """
    path = Path(path)
    fmt = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise SSICError(f"output must end in {OUTPUT_SUFFIXES_TEXT}, got {path.name}")
    if not path.parent.is_dir():
        raise SSICError(f"cannot write {path}: directory {path.parent} does not exist")
    if fmt == "NPY":
        write_atomically(path, lambda f: np.save(f, np.asarray(x), allow_pickle=False))
    else:
        save_image(model_to_image(x, value_range or (-1.0, 1.0)), path)


# ---------------------------------------------------------------------------- sizes


def _resize(a: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    """Resize float32 ``[H, W, C]`` to ``hw`` channel by channel with Pillow (mode F)."""
    from PIL import Image

    if a.shape[:2] == tuple(hw):
        return a.astype(np.float32, copy=True)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c], dtype=np.float32), mode="F")
                        .resize((hw[1], hw[0]), resample)) for c in range(a.shape[2])]
    return np.stack(chans, axis=2)


@dataclass(frozen=True)
class Placement:
    """How an input of size ``src`` (H, W) is placed on a model of size ``dst`` (H, W).

    ``scaled`` is the size the input is resized to; ``offset`` (y, x) is where the model's window
    starts in the scaled input (``crop``) or where the scaled input starts in the window (``pad``).
    """

    src: tuple[int, int]
    dst: tuple[int, int]
    mode: str
    scaled: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def plan(cls, src: tuple[int, int], dst: tuple[int, int], mode: str | None, what: str = "the images"):
        """Plan the placement; ``mode`` None refuses a size other than the model's (``SSICError``)."""
        src, dst = (int(src[0]), int(src[1])), (int(dst[0]), int(dst[1]))
        if min(src) < 1:
            raise SSICError(f"{what} are empty ({src[0]}x{src[1]} pixels)")
        if mode is None or src == dst:
            if src != dst:
                raise SSICError(f"{what} are {src[0]}x{src[1]} (HxW) but the model takes {dst[0]}x{dst[1]}; "
                                "resize them or pass --resize fit|crop|pad")
            return cls(src, dst, "fit", dst, (0, 0))
        if mode not in RESIZE_MODES:
            raise SSICError(f"unknown resize mode '{mode}' (fit, crop or pad)")
        (h, w), (mh, mw) = src, dst
        if mode == "fit":
            return cls(src, dst, mode, dst, (0, 0))
        if mode == "crop":
            s = max(mh / h, mw / w)
            sh, sw = max(mh, round(h * s)), max(mw, round(w * s))
            return cls(src, dst, mode, (sh, sw), ((sh - mh) // 2, (sw - mw) // 2))
        s = min(mh / h, mw / w)
        sh, sw = min(mh, max(1, round(h * s))), min(mw, max(1, round(w * s)))
        return cls(src, dst, mode, (sh, sw), ((mh - sh) // 2, (mw - sw) // 2))

    def to_model(self, a: np.ndarray) -> np.ndarray:
        """float ``[H, W, C]`` at the input's size -> ``[mh, mw, C]`` (bicubic through Pillow)."""
        from PIL import Image

        r = _resize(a, self.scaled, Image.BICUBIC)
        (oy, ox), (mh, mw), (sh, sw) = self.offset, self.dst, self.scaled
        if self.mode == "crop":
            return r[oy:oy + mh, ox:ox + mw].copy()
        if self.mode == "pad":
            return np.pad(r, ((oy, mh - sh - oy), (ox, mw - sw - ox), (0, 0)), mode="edge")
        return r

    def mask_to_model(self, m: np.ndarray) -> np.ndarray:
        """bool ``[H, W]`` -> bool ``[mh, mw]``: every model pixel an edited pixel touches is set."""
        from PIL import Image

        r = _resize(np.asarray(m, np.float32)[..., None], self.scaled, Image.BILINEAR)[..., 0] > 1e-6
        (oy, ox), (mh, mw), (sh, sw) = self.offset, self.dst, self.scaled
        if self.mode == "crop":
            return r[oy:oy + mh, ox:ox + mw].copy()
        if self.mode == "pad":
            return np.pad(r, ((oy, mh - sh - oy), (ox, mw - sw - ox)), constant_values=False)
        return r

    def from_model(self, y: np.ndarray, base: np.ndarray) -> np.ndarray:
        """A result ``[mh, mw, C]`` -> ``[H, W, C]`` at the input's size.

        ``crop``: the part of the input outside the crop is taken from ``base`` (``[H, W, C]``).
        """
        from PIL import Image

        (oy, ox), (mh, mw), (sh, sw), (h, w) = self.offset, self.dst, self.scaled, self.src
        if self.mode == "pad":
            return _resize(y[oy:oy + sh, ox:ox + sw], self.src, Image.BICUBIC)
        if self.mode == "crop":
            y0, y1 = round(oy * h / sh), round((oy + mh) * h / sh)
            x0, x1 = round(ox * w / sw), round((ox + mw) * w / sw)
            out = np.array(base, dtype=np.float32, copy=True)
            out[y0:y1, x0:x1] = _resize(y, (y1 - y0, x1 - x0), Image.BICUBIC)
            return out
        return _resize(y, self.src, Image.BICUBIC)
