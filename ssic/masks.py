"""Edit masks in NumPy: difference masks, dilation, SIGE's per-resolution pyramid, active tiles.

These functions are the reference for the default-mode mask graph (``ssic.passes.mask_pipeline``):
``active_tiles(mask_pyramid(dilate(m, r), sizes, d)[(h, w)], t, halo)`` is what the graph's output
``ssic.tiles.{h}x{w}`` must equal, row for row. They are also what benchmarks use to make synthetic
brush-stroke edits and to read the real edits of ``../shared/data/edits/``.

No onnx here: this module must stay importable without the compiler.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "active_tiles",
    "brush_stroke_mask",
    "difference_mask",
    "dilate",
    "edits_dir",
    "instance_edges",
    "label_difference_mask",
    "load_edit_pair",
    "mask_pyramid",
    "pyramid_chain",
    "resize_nearest",
    "threshold_halved",
]

# SIGE's threshold for a halved mask: a cell stays active when at least this fraction of it was.
PYRAMID_THRESHOLD = 0.3
PYRAMID_EPS = 1e-3


def _squeeze_to_2d(a: np.ndarray, what: str) -> np.ndarray:
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{what} must reduce to a 2-D [H, W] array, got shape {a.shape}")
    return a


def changed(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Bool array of ``a``'s shape: ``|a - b| > eps`` elementwise, computed in float64.

    Only the elements that differ at all are subtracted in float64 (for ``eps >= 0`` no other can pass):
    an edit changes few of them, and GauGAN's 36-channel label map took 17-24 ms subtracted whole in
    float64, 1.5 ms this way. ``a`` and ``b`` must have one shape.
    """
    if eps < 0:
        return np.abs(a.astype(np.float64) - b.astype(np.float64)) > eps
    diff = np.not_equal(a, b)
    diff[diff] = np.abs(a[diff].astype(np.float64) - b[diff].astype(np.float64)) > eps
    return diff


def difference_mask(
    original: np.ndarray, edited: np.ndarray, eps: float = 0.01, channel_axis: int | None = -1
) -> np.ndarray:
    """Return the bool ``[H, W]`` mask where ``|original - edited| > eps`` in any channel.

    ``channel_axis`` names the channel axis of 3-D/4-D inputs (``-1`` for HWC, ``0`` for CHW,
    ``1`` for NCHW with batch 1); ``None`` means the inputs are already ``[H, W]``. Leading
    singleton (batch) axes left after the channel reduction are dropped.
    """
    a, b = np.asarray(original), np.asarray(edited)
    if a.shape != b.shape:
        raise ValueError(f"original {a.shape} and edited {b.shape} differ in shape")
    diff = changed(a, b, eps)
    if channel_axis is not None and diff.ndim > 2:
        diff = diff.any(axis=channel_axis)
    return _squeeze_to_2d(diff, "difference mask")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Return ``mask`` dilated by a ``(2r+1) x (2r+1)`` square (a max filter, zero outside).

    Matches ONNX ``MaxPool(kernel 2r+1, pads r, stride 1)`` on a 0/1 mask.
    """
    m = np.asarray(mask) != 0
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0 or m.size == 0:
        return m.copy()
    # Separable: a square max filter is a row max filter followed by a column one.
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        p = np.pad(m, pad, constant_values=False)
        m = np.lib.stride_tricks.sliding_window_view(p, k, axis=axis).any(axis=-1)
    return m


def _disc_offsets(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = yy * yy + xx * xx <= radius * radius
    off = np.stack([yy[keep], xx[keep]], axis=1)
    # Nearest pixels first: when a disc only partly fits the area budget, its core is drawn.
    order = np.argsort(off[:, 0] ** 2 + off[:, 1] ** 2, kind="stable")
    return off[order]


def brush_stroke_mask(height: int, width: int, area: float, seed: int = 0) -> np.ndarray:
    """Return a bool ``[height, width]`` mask of random brush strokes covering ``area`` of it.

    Strokes are smooth random walks (the heading turns by small Gaussian steps and bounces off the
    border) painted with a round brush of a random radius per stroke. Strokes are added until the
    painted pixel count reaches ``round(area * H * W)``; the last disc is painted only partly
    (nearest pixels first), so the count is exact whenever at least one pixel is asked for — well
    within the +-10% relative tolerance. The brush radius scales with the target area so that small
    edits still look like strokes. Deterministic for a given ``seed``.
    """
    if not 0.0 <= area <= 1.0:
        raise ValueError(f"area must be in [0, 1], got {area}")
    mask = np.zeros((height, width), dtype=bool)
    target = int(round(area * height * width))
    if target == 0:
        return mask
    rng = np.random.default_rng(seed)
    r_max = max(1.0, min(math.sqrt(target) / 4.0, min(height, width) / 8.0))
    r_min = max(1.0, r_max / 3.0)
    count = 0
    while count < target:
        radius = rng.uniform(r_min, r_max)
        disc = _disc_offsets(radius)
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        heading = rng.uniform(0, 2 * math.pi)
        steps = int(rng.integers(10, 40)) * max(1, int(radius))
        for _ in range(steps):
            heading += rng.normal(0.0, 0.15)
            y += math.sin(heading)
            x += math.cos(heading)
            if not 0 <= y < height:
                heading = -heading
                y = min(max(y, 0.0), height - 1e-6)
            if not 0 <= x < width:
                heading = math.pi - heading
                x = min(max(x, 0.0), width - 1e-6)
            pix = disc + np.array([int(y), int(x)])
            pix = pix[(pix[:, 0] >= 0) & (pix[:, 0] < height) & (pix[:, 1] >= 0) & (pix[:, 1] < width)]
            new = pix[~mask[pix[:, 0], pix[:, 1]]]
            if len(new) == 0:
                continue
            new = new[: target - count]
            mask[new[:, 0], new[:, 1]] = True
            count += len(new)
            if count >= target:
                break
    return mask


def instance_edges(instance: np.ndarray) -> np.ndarray:
    """Return SPADE's instance-edge map: bool ``[H, W]``, True where a 4-neighbour differs."""
    t = _squeeze_to_2d(np.asarray(instance), "instance map")
    e = np.zeros(t.shape, dtype=bool)
    dx = t[:, 1:] != t[:, :-1]
    dy = t[1:, :] != t[:-1, :]
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    e[1:, :] |= dy
    e[:-1, :] |= dy
    return e


def label_difference_mask(
    label_a: np.ndarray,
    label_b: np.ndarray,
    instance_a: np.ndarray | None = None,
    instance_b: np.ndarray | None = None,
) -> np.ndarray:
    """Return the bool ``[H, W]`` GauGAN edit mask: where the label or the instance edge differs.

    A label change changes the one-hot input in that pixel; an instance change matters only where it
    changes the edge map (GauGAN's extra input channel). Both instance maps or neither.
    """
    a = _squeeze_to_2d(np.asarray(label_a), "label map")
    b = _squeeze_to_2d(np.asarray(label_b), "label map")
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    mask = a != b
    if (instance_a is None) != (instance_b is None):
        raise ValueError("give both instance maps or neither")
    if instance_a is not None:
        mask |= instance_edges(instance_a) != instance_edges(instance_b)
    return mask


def threshold_halved(halved: np.ndarray) -> np.ndarray:
    """Threshold a 2x2-averaged mask as SIGE does: ``x > min(0.3, max - 1e-3)``; all zero stays zero.

    Written as ``x > max(min(0.3, max - 1e-3), 0)`` in float32 — the same arithmetic as the graph.
    """
    x = halved.astype(np.float32)
    top = x.max() if x.size else np.float32(0)
    t = max(min(np.float32(PYRAMID_THRESHOLD), np.float32(top - np.float32(PYRAMID_EPS))), np.float32(0))
    return x > t


def pyramid_chain(input_hw: tuple[int, int], sizes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the halving chain ``[(H0, W0), (H0//2, W0//2), ...]`` needed to serve ``sizes``.

    Halving stops once the level is no larger than every requested size in both dimensions, or when
    a dimension would reach 0.
    """
    h, w = input_hw
    sizes = list(sizes)
    min_h = min((s[0] for s in sizes), default=h)
    min_w = min((s[1] for s in sizes), default=w)
    chain = [(h, w)]
    while (h > min_h or w > min_w) and h // 2 >= 1 and w // 2 >= 1:
        h, w = h // 2, w // 2
        chain.append((h, w))
    return chain


def nearest_source_level(chain: list[tuple[int, int]], size: tuple[int, int]) -> tuple[int, int]:
    """Return the chain level a size is taken from: itself, else the smallest level covering it."""
    if size in chain:
        return size
    covering = [lv for lv in chain if lv[0] >= size[0] and lv[1] >= size[1]]
    return covering[-1] if covering else chain[0]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Return the source index of each output position of a nearest resize: ``floor(o * in / out)``.

    (PyTorch's ``nearest``; ONNX ``Resize`` asymmetric/floor. Integer arithmetic, so exact.)
    """
    return (np.arange(out_size, dtype=np.int64) * in_size) // out_size


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return ``mask`` resized to ``size`` by nearest neighbour (``src = floor(dst * in / out)``)."""
    h, w = mask.shape
    return mask[nearest_indices(h, size[0])][:, nearest_indices(w, size[1])]


def resize_mask_any(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool ``[h, w]`` mask to ``size`` conservatively: an output pixel is set when any input
    pixel its footprint overlaps is set (max-pooling when shrinking, replication when growing).

    Used to carry an edit mask between inputs and grids of different resolutions without losing a
    changed pixel. Returns bool ``[H, W]``.
    """
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return m.copy()
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(m, axis=0), axis=1)

    def bounds(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        lo = (np.arange(n_out) * n_in) // n_out
        hi = -((-(np.arange(1, n_out + 1) * n_in)) // n_out)
        return lo, np.maximum(hi, lo + 1)

    r0, r1 = bounds(h, H)
    c0, c1 = bounds(w, W)
    count = (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0])
    return count > 0


def mask_pyramid(
    mask: np.ndarray, sizes: Iterable[tuple[int, int]], level_dilation: int = 1
) -> dict[tuple[int, int], np.ndarray]:
    """Return SIGE's per-resolution masks: ``{(h, w): bool [h, w]}`` for every requested size.

    ``mask`` is the full-resolution mask, already dilated by the edit radius; it is the level of its
    own size. Each further level halves the previous *level* (its thresholded, dilated bool mask, as
    float) by 2x2 averaging — what bilinear 0.5 scaling with half-pixel centres computes; an odd row
    or column is dropped — then thresholds it with :func:`threshold_halved` and dilates it by
    ``level_dilation`` (1 for diffusion models, 2 for GauGAN).

    A size that halving does not reach (e.g. 48x48 from 256x256) is made by nearest resizing
    (:func:`resize_nearest`) of the smallest halving level that covers it in both dimensions (the
    input level if it is larger than the input); no extra dilation is applied to it.
    """
    m = _squeeze_to_2d(np.asarray(mask), "mask") != 0
    sizes = [tuple(int(v) for v in s) for s in sizes]
    chain = pyramid_chain(m.shape, sizes)
    levels = {chain[0]: m}
    cur = m
    for h, w in chain[1:]:
        x = cur[: 2 * h, : 2 * w].astype(np.float32)
        halved = (x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]) / np.float32(4)
        cur = dilate(threshold_halved(halved), level_dilation)
        levels[(h, w)] = cur
    out = {}
    for s in sizes:
        src = nearest_source_level(chain, s)
        out[s] = levels[src] if src == s else resize_nearest(levels[src], s)
    return out


def active_tiles(mask: np.ndarray, tile: int, halo: int = 1) -> np.ndarray:
    """Return the active tiles of ``mask`` as int64 ``[n, 2]`` top-left corners ``(y, x)`` in pixels.

    The grid has ``ceil(H/t) x ceil(W/t)`` cells starting at pixel 0; a cell is active when the mask
    is nonzero anywhere in the cell grown by ``halo`` pixels on each side (clipped at the border).
    Rows are in row-major cell order.
    """
    m = _squeeze_to_2d(np.asarray(mask), "mask") != 0
    h, w = m.shape
    gh, gw = -(-h // tile), -(-w // tile)
    grown = dilate(m, halo) if halo > 0 else m
    # A cell grown by `halo` touches the mask iff the cell touches the mask dilated by `halo`.
    padded = np.zeros((gh * tile, gw * tile), dtype=bool)
    padded[:h, :w] = grown
    cells = padded.reshape(gh, tile, gw, tile).any(axis=(1, 3))
    ys, xs = np.nonzero(cells)
    return (np.stack([ys, xs], axis=1).astype(np.int64) * tile).reshape(-1, 2)


# --- the real edits of ../shared/data/edits/ -------------------------------------------------------


def edits_dir() -> Path | None:
    """Return the directory of the real edit pairs, or None when it is not on this machine.

    ``$SSIC_SHARED_DIR/data/edits`` when the variable is set, else ``<repo>/../shared/data/edits``.
    """
    env = os.environ.get("SSIC_SHARED_DIR")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"
    d = root / "data" / "edits"
    return d if d.is_dir() else None




def load_edit_pair(kind: str) -> dict[str, np.ndarray] | None:
    """Return one real edit pair as a dict of arrays, or None when the data is absent.

    ``kind``:
    - ``"church"``: ``original``/``edited`` float32 ``[256, 256, 3]`` in [-1, 1] (HWC);
    - ``"cityscapes"``: ``label_a``/``label_b`` int64 ``[256, 512]``, ``instance_a``/``instance_b``
      int32 ``[256, 512]`` (ground truth, then the synthetic edit);
    - ``"mask_256"``: ``mask`` bool ``[256, 256]`` (SIGE's single-conv example).
    """
    d = edits_dir()
    if d is None:
        return None
    if kind == "church":
        paths = [d / "church_original.png", d / "church_edited.png"]
        if not all(p.is_file() for p in paths):
            return None
        from ssic.images import read_image

        a, b = (read_image(p, "church edit") * np.float32(2) - np.float32(1) for p in paths)
        return {"original": a, "edited": b}
    if kind == "cityscapes":
        names = {
            "label_a": "cityscapes_gt_label.npy",
            "label_b": "cityscapes_synthetic_label.npy",
            "instance_a": "cityscapes_gt_instance.npy",
            "instance_b": "cityscapes_synthetic_instance.npy",
        }
        if not all((d / f).is_file() for f in names.values()):
            return None
        return {k: np.load(d / f) for k, f in names.items()}
    if kind == "mask_256":
        p = d / "mask_256.npy"
        return {"mask": np.load(p).astype(bool)} if p.is_file() else None
    raise ValueError(f"unknown edit pair {kind!r}; expected 'church', 'cityscapes' or 'mask_256'")
