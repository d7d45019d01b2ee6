"""Editing workflows on a loaded artefact: SDEdit with DDIM (per-step caches) and GauGAN label edits."""

from __future__ import annotations

import time

import numpy as np

from ssic.errors import SSICError
from ssic.images import Placement, model_to_image, save_output  # noqa: F401 - re-exported for callers
from ssic.quality import compare


def check_same_size(a, b, model_hw: tuple[int, int]) -> None:
    """Raise ``SSICError`` unless ``a`` and ``b`` have one shape; for images (``[H, W]`` or
    ``[H, W, C]``) the message names both sizes, the model's ``model_hw`` and the ``--resize`` way out."""
    sa, sb = np.shape(a), np.shape(b)
    if sa == sb:
        return
    if len(sa) not in (2, 3) or len(sb) not in (2, 3):  # model inputs, not images
        raise SSICError(f"original and edited differ in shape: {list(sa)} vs {list(sb)}")
    raise SSICError(f"original ({sa[0]}x{sa[1]}) and edited ({sb[0]}x{sb[1]}) differ in size; give both at one size "
                    f"(the model takes {model_hw[0]}x{model_hw[1]}; --resize fit|crop|pad places another size)")


def image_to_model(img: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Image ``[H, W, 3|4]`` (uint8, or float in [0, 1]) -> float32 ``[1, 3, H, W]`` in [-1, 1].

    ``size`` (H, W), when given, must be the image's size: resizing is the caller's choice
    (:class:`ssic.images.Placement`). Raises ``SSICError`` on another shape or size.
    """
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SSICError(f"expected an RGB image, got an array of shape {list(arr.shape)}")
    arr = arr[..., :3]
    if size is not None and arr.shape[:2] != tuple(size):
        raise SSICError(f"the image is {arr.shape[0]}x{arr.shape[1]} (HxW) but the model takes {size[0]}x{size[1]}")
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return (arr * 2.0 - 1.0).transpose(2, 0, 1)[None].copy()


class DDIMSchedule:
    """The DDIM (eta = 0) sampler of the church model: linear betas 1e-4..0.02 over 1000 steps.

    ``beta_schedule="scaled_linear"`` (betas = linspace(sqrt(start), sqrt(end))**2, diffusers' name)
    with ``beta_start=0.00085, beta_end=0.012`` is Stable Diffusion 1.x's (:meth:`stable_diffusion`).
    """

    def __init__(self, num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear") -> None:
        if beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64)
        elif beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=np.float64) ** 2
        else:
            raise SSICError(f"unknown beta schedule '{beta_schedule}' (linear or scaled_linear)")
        self.alphas_cumprod = np.cumprod(1.0 - betas)

    @classmethod
    def stable_diffusion(cls) -> DDIMSchedule:
        """SD 1.x's noise schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
        return cls(1000, 0.00085, 0.012, "scaled_linear")

    def alpha(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def step(self, x: np.ndarray, eps: np.ndarray, t: int, t_prev: int) -> np.ndarray:
        a, a_prev = self.alpha(t), self.alpha(t_prev)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        return (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)

    def noise(self, x0: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
        a = self.alpha(t)
        return (np.sqrt(a) * x0 + np.sqrt(1 - a) * noise).astype(np.float32)


def sdedit_timesteps(strength: float, steps: int) -> list[tuple[int, int]]:
    """The ``(t, t_prev)`` DDPM steps of an SDEdit run: ``steps`` evenly spaced steps from
    ``int(strength * 999)`` down, the last one to ``t_prev = -1`` (the clean sample)."""
    t0 = max(1, int(strength * 999))
    ts = np.linspace(t0, 0, steps + 1).round().astype(int)
    return [(int(ts[i]), int(ts[i + 1]) if i + 1 < steps else -1) for i in range(steps)]


def sdedit(session, original: np.ndarray, edited: np.ndarray, mask: np.ndarray, *, steps: int = 10,
           strength: float = 0.5, seed: int = 0, log=None) -> dict:
    """SDEdit with per-step caches: prime every step on the original trajectory, then edit sparsely.

    Returns ``{"sparse", "dense", "original", "prime_s", "sparse_s", "dense_s", "quality"}``; the
    dense run is the same loop with the plain model, for comparison.
    """
    if not 0 < strength <= 1:
        raise SSICError("strength must be in (0, 1]")
    if steps < 1:
        raise SSICError("steps must be >= 1")
    sched = DDIMSchedule()
    seq = sdedit_timesteps(strength, steps)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(original.shape).astype(np.float32)
    from ssic.masks import dilate

    # blend with the mask the graph uses at full resolution (the raw mask dilated by the radius)
    m = dilate(np.asarray(mask, bool), int(session.manifest.mask.radius))[None, None].astype(np.float32)
    tname = "t"

    # the original trajectory: caches per step (done once when an image is opened in an editor)
    start = time.perf_counter()
    xo = sched.noise(original, noise, seq[0][0])
    traj = [xo]
    for i, (t, tp) in enumerate(seq):
        eps = session.prime({"x": xo, tname: np.array([t], np.float32)}, cache_id=i)[session.output_names[0]]
        xo = sched.step(xo, eps[:, :3], t, tp)
        traj.append(xo)
    prime_s = time.perf_counter() - start

    def run(fn):
        x = m * sched.noise(edited, noise, seq[0][0]) + (1 - m) * traj[0]
        for i, (t, tp) in enumerate(seq):
            eps = fn({"x": x, tname: np.array([t], np.float32)}, i)[session.output_names[0]]
            x = sched.step(x, eps[:, :3], t, tp)
            x = (m * x + (1 - m) * traj[i + 1]).astype(np.float32)
        return x

    start = time.perf_counter()
    sparse = run(lambda inp, i: session.edit(inp, mask=mask, cache_id=i))
    sparse_s = time.perf_counter() - start
    start = time.perf_counter()
    dense = run(lambda inp, i: session.dense(inp))
    dense_s = time.perf_counter() - start
    q = compare(sparse, dense, m[0, 0] > 0, traj[-1])
    if log:
        log(f"SDEdit {steps} steps: dense {dense_s:.2f} s, sparse {sparse_s:.2f} s ({dense_s / sparse_s:.2f}x), "
            f"priming {prime_s:.2f} s; sparse vs dense PSNR {q['psnr']:.1f} dB")
    return {"sparse": sparse, "dense": dense, "original": traj[-1], "prime_s": prime_s, "sparse_s": sparse_s,
            "dense_s": dense_s, "quality": q}


#: Value range of the image input and output per model family; other families take [0, 1] (the
#: convention of Real-ESRGAN, OIDN and most image-to-image models) unless the caller says otherwise.
IMAGE_RANGES: dict[str, tuple[float, float]] = {"ddim": (-1.0, 1.0), "pd": (-1.0, 1.0), "gaugan": (-1.0, 1.0)}


def image_range(family: str | None) -> tuple[float, float]:
    """The ``(low, high)`` values a model family maps black and white to (default ``(0, 1)``)."""
    return IMAGE_RANGES.get(family or "", (0.0, 1.0))


def edit_files(session, a: np.ndarray, b: np.ndarray, *, mask=None, extra=None, steps=10, strength=0.5, seed=0,
               log=None, resize: str | None = None, value_range: tuple[float, float] | None = None) -> dict:
    """Edit with arrays read from the command line; returns ``{"sparse": output, "summary": str,
    "range": (low, high)}`` (the output's value range when it is an image, else None).

    ``a``/``b``: images ``[H, W, 3]`` (float in [0, 1] or uint8) for DDIM/PD (SDEdit) and for image
    models (Real-ESRGAN, OIDN, any model whose main input has 3 channels: the image is scaled to
    ``value_range``, default :func:`image_range`), label maps ``[H, W]`` for GauGAN, else model inputs
    as they are. ``mask``: bool ``[H, W]`` at the inputs' size. Images of another size than the
    model's are refused unless ``resize`` is ``"fit"``, ``"crop"`` or ``"pad"``
    (:class:`ssic.images.Placement`); the output ``[1, C, H, W]`` then has the input's size (times
    the model's scale for a super-resolution model). Raises ``SSICError`` for inputs that do not fit,
    before any model runs.
    """
    family = session.manifest.model.family
    h, w = session.manifest.mask.height, session.manifest.mask.width
    check_same_size(a, b, (h, w))
    if family in ("ddim", "pd") and np.asarray(a).ndim == 3:
        fa, fb = (image_to_model(x)[0].transpose(1, 2, 0) for x in (a, b))  # [H, W, 3] in [-1, 1]
        place = Placement.plan(fa.shape[:2], (h, w), resize)
        if mask is None:
            mask = (np.abs(fa - fb) > float(session.manifest.mask.eps)).any(axis=2)
        mask = _input_mask(mask, fa.shape[:2])
        xa, xb = (place.to_model(x).transpose(2, 0, 1)[None].copy() for x in (fa, fb))
        m = session.check_mask(place.mask_to_model(mask))
        result = sdedit(session, xa, xb, m, steps=steps, strength=strength, seed=seed, log=log)
        out = place.from_model(result["sparse"][0].transpose(1, 2, 0), fb).transpose(2, 0, 1)[None]
        return {"sparse": out, "range": (-1.0, 1.0), "summary": f"{steps} steps, sparse {result['sparse_s']:.2f} s "
                f"vs dense {result['dense_s']:.2f} s, PSNR {result['quality']['psnr']:.1f} dB"}
    if family not in ("ddim", "pd", "gaugan") and np.ndim(a) == 3 and np.shape(a)[2] in (3, 4):
        return _edit_images(session, a, b, mask=mask, extra=extra, log=log, resize=resize,
                            value_range=value_range or image_range(family))
    if resize is not None:
        raise SSICError("--resize applies to images; give label maps and model inputs "
                        f"at the model's size ({h}x{w})")
    if family == "gaugan" and np.asarray(a).ndim == 2:
        from ssic.models.gaugan import make_gaugan_input

        if np.shape(a) != (h, w):
            raise SSICError(f"the label maps are {np.shape(a)[0]}x{np.shape(a)[1]} (HxW) but the model takes {h}x{w}")
        inst_a = (extra or {}).get("instance_original")
        inst_b = (extra or {}).get("instance_edited")
        inputs_a = {"seg": make_gaugan_input(a, inst_a)}
        inputs_b = {"seg": make_gaugan_input(b, inst_b)}
    else:
        src = session.manifest.mask.primary.input
        inputs_a = {**(extra or {}), src: np.asarray(a, np.float32)}
        inputs_b = {**(extra or {}), src: np.asarray(b, np.float32)}
    m = None if mask is None else session.check_mask(mask)
    session.prime(inputs_a)
    start = time.perf_counter()
    out = session.edit(inputs_b, mask=m)
    secs = time.perf_counter() - start
    st = session.last
    return {"sparse": out[session.output_names[0]], "range": (-1.0, 1.0) if family == "gaugan" else None,
            "summary": f"{st.mode} run in {1000 * secs:.0f} ms, {100 * st.active_fraction:.1f}% tiles active"}


def image_pair_inputs(session, a, b, *, mask=None, resize: str | None = None,
                      value_range: tuple[float, float] | None = None):
    """An image pair as an image model's inputs: ``(x_a, x_b, mask, placement)``.

    ``a``/``b``: ``[H, W, 3|4]`` uint8 or float in [0, 1]. ``x_a``/``x_b``: float32 ``[1, 3, h, w]``
    (NHWC where the model's image input is) in ``value_range`` (default :func:`image_range` of the
    family) at the main input's size ``h x w`` (placed by ``resize``); ``mask``: bool at the model
    input's size (where the images differ by more than half an 8-bit level, or the given one).
    Raises ``SSICError`` when the model has no RGB image input or the sizes do not fit.
    """
    src = session.manifest.mask.primary
    if not src.input:
        raise SSICError("this model has no image input to take the images")
    spec = session.manifest.input(src.input)
    if len(spec.shape) != 4 or spec.shape[src.channel_axis] != 3:
        raise SSICError(f"input '{src.input}' has shape {list(spec.shape)}, not an RGB image; give .npy model inputs")
    check_same_size(a, b, (src.height, src.width))
    lo, hi = value_range or image_range(session.manifest.model.family)
    fa, fb = (image_to_model(x)[0].transpose(1, 2, 0) * 0.5 + 0.5 for x in (a, b))  # [H, W, 3] in [0, 1]
    place = Placement.plan(fa.shape[:2], (src.height, src.width), resize)
    if mask is None:
        mask = (np.abs(fa - fb) > 0.5 / 255).any(axis=2)
    mask = _input_mask(mask, fa.shape[:2])

    def model_input(x):
        x = place.to_model(x) * (hi - lo) + lo
        return (x.transpose(2, 0, 1) if src.channel_axis == 1 else x)[None].astype(np.float32).copy()

    return model_input(fa), model_input(fb), session.check_mask(place.mask_to_model(mask)), place


def _edit_images(session, a, b, *, mask, extra, log, resize, value_range) -> dict:
    """Prime on image ``a``, edit to image ``b`` (``[H, W, 3|4]``) with an image model; see :func:`edit_files`."""
    src = session.manifest.mask.primary
    lo, hi = value_range
    xa, xb, m, place = image_pair_inputs(session, a, b, mask=mask, resize=resize, value_range=value_range)
    hw = (src.height, src.width)
    name = src.input
    start = time.perf_counter()
    session.prime({**(extra or {}), name: xa})
    prime_s = time.perf_counter() - start
    start = time.perf_counter()
    y = session.edit({**(extra or {}), name: xb}, mask=m)[session.output_names[0]]
    sparse_s = time.perf_counter() - start
    st = session.last
    y = np.asarray(y, np.float32)
    if y.ndim == 4 and y.shape[1] not in (1, 3, 4) and y.shape[3] in (1, 3, 4):
        y = y.transpose(0, 3, 1, 2)  # NHWC output
    if y.ndim != 4:
        raise SSICError(f"output '{session.output_names[0]}' has shape {list(y.shape)}, not an image")
    if place.src != place.dst:
        # map back to the input's size, times the model's scale (a super-resolution model's output)
        sy, sx = y.shape[2] / hw[0], y.shape[3] / hw[1]
        big = (round(place.src[0] * sy), round(place.src[1] * sx))
        out_place = Placement.plan(big, (y.shape[2], y.shape[3]), resize)
        fb = image_to_model(b)[0].transpose(1, 2, 0) * 0.5 + 0.5  # the edited image, [0, 1]: crop's surround
        base = Placement.plan(fb.shape[:2], big, "fit").to_model(fb) * (hi - lo) + lo
        y = out_place.from_model(y[0].transpose(1, 2, 0), base).transpose(2, 0, 1)[None]
    if log:
        log(f"primed in {prime_s:.2f} s; edit: {st.mode}, {100 * st.active_fraction:.1f}% tiles active")
    return {"sparse": y, "range": (lo, hi), "summary": f"{st.mode} edit in {1000 * sparse_s:.0f} ms "
            f"({100 * st.active_fraction:.1f}% tiles active; prime {prime_s:.2f} s), output "
            f"{y.shape[3]}x{y.shape[2]} (WxH)"}


def _input_mask(mask, hw: tuple[int, int]) -> np.ndarray:
    """A user mask at the images' size ``hw`` -> bool ``[H, W]``; ``SSICError`` otherwise."""
    m = np.asarray(mask)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
        raise SSICError(f"mask has dtype {m.dtype}; use bool or a number array")
    if m.shape != tuple(hw):
        raise SSICError(f"mask has shape {list(m.shape)}, the images are {hw[0]}x{hw[1]} (HxW)")
    if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
        raise SSICError("mask has non-finite values")
    return m != 0
