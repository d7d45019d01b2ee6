"""Latent diffusion on compiled Stable Diffusion parts: classifier-free guidance with two cache states.

ssic compiles batch 1. Classifier-free guidance (Ho & Salimans, 2022: ``eps = eps_u + g * (eps_c -
eps_u)``) needs the UNet on two text embeddings per denoising step, the unconditional (an empty
prompt's or a negative prompt's embedding) and the conditional one. :class:`GuidedUNet` runs them as
two batch-1 cache states of one session per step, ``cache_id=(step, "uncond")`` and
``(step, "cond")``, edited with one mask: the same active tiles, twice the dispatch of a batch-2 run,
the same MACs.
"""

from __future__ import annotations

import time

import numpy as np

from ssic.errors import SSICError

#: The names ``ssic export sd-unet`` gives the UNet's inputs and output.
SAMPLE, TIMESTEP, CONTEXT, EPS = "sample", "timestep", "encoder_hidden_states", "out_sample"
UNCOND, COND = "uncond", "cond"


def cfg_cache_ids(step: int) -> tuple[tuple[int, str], tuple[int, str]]:
    """The cache ids of denoising step ``step``: ``((step, "uncond"), (step, "cond"))``."""
    return (step, UNCOND), (step, COND)


class GuidedUNet:
    """A compiled ``sd-unet`` session run with classifier-free guidance, sparsely per step.

    ``cond`` (and ``uncond``): float32 text embeddings ``[1, 77, D]`` (``[77, D]`` is accepted) of the
    session's ``encoder_hidden_states`` shape. ``guidance`` ``g``: ``eps = eps_u + g * (eps_c - eps_u)``;
    without ``uncond``, or with ``g == 1``, only the conditional state is kept and ``eps = eps_c``.
    Raises ``SSICError`` when the session is not a UNet of that signature or an embedding does not fit.
    """

    def __init__(self, session, cond: np.ndarray, uncond: np.ndarray | None = None, guidance: float = 1.0) -> None:
        names = set(session.inputs)
        if not {SAMPLE, TIMESTEP, CONTEXT} <= names or EPS not in session.output_names:
            raise SSICError(f"the artefact is not a Stable Diffusion UNet (inputs {sorted(names)}; expected "
                            f"{SAMPLE}, {TIMESTEP}, {CONTEXT} -> {EPS}: ssic export sd-unet)")
        if not np.isfinite(guidance):
            raise SSICError(f"guidance must be a finite number, got {guidance}")
        self.session = session
        self.guidance = float(guidance)
        self.cond = self._embedding(cond, "embedding")
        self.uncond = None if uncond is None else self._embedding(uncond, "negative embedding")
        #: EditStats of the last ``edit`` per branch ("uncond", "cond")
        self.last: dict[str, object] = {}

    def _embedding(self, e: np.ndarray, what: str) -> np.ndarray:
        want = list(self.session.inputs[CONTEXT].shape)
        arr = np.asarray(e)
        if arr.ndim == len(want) - 1:
            arr = arr[None]
        if list(arr.shape) != want:
            raise SSICError(f"the {what} has shape {list(np.shape(e))}, the UNet takes {want} "
                            f"(or {want[1:]})")
        if not np.issubdtype(arr.dtype, np.floating):
            raise SSICError(f"the {what} must be floating-point numbers, not {arr.dtype}")
        if not np.isfinite(arr).all():
            raise SSICError(f"the {what} holds {int((~np.isfinite(arr)).sum())} NaN or infinite values")
        return np.ascontiguousarray(arr, dtype=np.float32)

    @property
    def guided(self) -> bool:
        """Whether two branches run (an unconditional embedding and guidance != 1)."""
        return self.uncond is not None and self.guidance != 1.0

    def branches(self) -> list[tuple[str, np.ndarray]]:
        """``[(name, embedding)]`` of the branches each step runs: uncond first, then cond."""
        return [(UNCOND, self.uncond), (COND, self.cond)] if self.guided else [(COND, self.cond)]

    def _combine(self, eps: dict[str, np.ndarray]) -> np.ndarray:
        if not self.guided:
            return eps[COND]
        return (eps[UNCOND] + self.guidance * (eps[COND] - eps[UNCOND])).astype(np.float32)

    def _inputs(self, sample: np.ndarray, timestep: float, context: np.ndarray) -> dict[str, np.ndarray]:
        return {SAMPLE: sample, TIMESTEP: np.array([timestep], np.float32), CONTEXT: context}

    def prime(self, sample: np.ndarray, timestep: float, step: int) -> np.ndarray:
        """Prime the step's cache states (see :func:`cfg_cache_ids`) on ``sample`` float32
        ``[1, 4, h, w]`` at DDPM step ``timestep``; returns the guided noise prediction ``[1, 4, h, w]``."""
        eps = {name: self.session.prime(self._inputs(sample, timestep, ctx), cache_id=(step, name))[EPS]
               for name, ctx in self.branches()}
        return self._combine(eps)

    def edit(self, sample: np.ndarray, timestep: float, step: int, mask=None, *, mode: str = "auto") -> np.ndarray:
        """The guided noise prediction for edited ``sample``, each branch recomputed sparsely against its
        primed state with the same ``mask`` (bool ``[h, w]`` at the latent's or the finest grid's
        resolution; default: where ``sample`` differs from the primed one). ``mode`` as in
        :meth:`ssic.session.Session.edit`; ``self.last`` holds each branch's ``EditStats``."""
        eps = {}
        for name, ctx in self.branches():
            eps[name] = self.session.edit(self._inputs(sample, timestep, ctx), mask=mask, cache_id=(step, name),
                                          mode=mode)[EPS]
            self.last[name] = self.session.last
        return self._combine(eps)

    def dense(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The guided noise prediction of the plain model (two batch-1 dense runs)."""
        return self._combine({name: self.session.dense(self._inputs(sample, timestep, ctx))[EPS]
                              for name, ctx in self.branches()})

    def forget(self, step: int) -> None:
        """Drop the cache states of ``step``."""
        for name in (UNCOND, COND):
            self.session.forget((step, name))


# ---------------------------------------------------------------------------------------- editing
def check_latent_parts(unet, encoder, decoder) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check that three manifests (or sessions) are an SD UNet, VAE encoder and VAE decoder of one
    latent size; returns ``((H, W) of the images, (h, w) of the latent)``. Raises ``SSICError`` (one
    line) naming the part that does not fit."""
    parts = [getattr(p, "manifest", p) for p in (unet, encoder, decoder)]
    u, e, d = ({i.name: list(i.shape) for i in m.inputs} for m in parts)
    outs = [{o.name: list(o.shape) for o in m.outputs} for m in parts]
    if set(u) != {SAMPLE, TIMESTEP, CONTEXT} or EPS not in outs[0]:
        raise SSICError(f"the UNet artefact takes {sorted(u)} -> {sorted(outs[0])}, not an SD UNet "
                        f"({SAMPLE}, {TIMESTEP}, {CONTEXT} -> {EPS}: ssic export sd-unet)")
    if list(e) != ["image"] or "latent" not in outs[1] or len(e["image"]) != 4 or e["image"][1] != 3:
        raise SSICError(f"the --vae-encoder artefact takes {e} -> {outs[1]}, not an SD VAE encoder "
                        "(image [1,3,H,W] -> latent: ssic export sd-vae-encoder)")
    if list(d) != ["latent"] or "image" not in outs[2]:
        raise SSICError(f"the --vae-decoder artefact takes {d} -> {outs[2]}, not an SD VAE decoder "
                        "(latent -> image: ssic export sd-vae-decoder)")
    latent = u[SAMPLE]
    for what, shape in (("--vae-encoder's latent", outs[1]["latent"]), ("--vae-decoder's latent", d["latent"])):
        if shape != latent:
            raise SSICError(f"the {what} is {shape} but the UNet's sample is {latent}: export the three "
                            "parts for one image size (ssic export ... --size)")
    if outs[2]["image"] != e["image"]:
        raise SSICError(f"the decoder writes images {outs[2]['image']} but the encoder reads {e['image']}")
    return (e["image"][2], e["image"][3]), (latent[2], latent[3])


def latent_edit(unet, encoder, decoder, original: np.ndarray, edited: np.ndarray, cond: np.ndarray, *,
                uncond: np.ndarray | None = None, guidance: float = 1.0, mask: np.ndarray | None = None,
                strength: float = 0.5, steps: int = 10, seed: int = 0, mode: str = "auto",
                compare: bool = False, log=None, inpaint: bool | None = None, keep: bool = True,
                progress=None) -> dict:
    """SDEdit / img2img (``mask`` None) or inpainting (``mask`` given) with Stable Diffusion, sparsely.

    ``unet``, ``encoder``, ``decoder``: sessions of ``ssic export sd-unet|sd-vae-encoder|sd-vae-decoder``
    artefacts of one latent size (:func:`check_latent_parts`). ``original``, ``edited``: float32
    ``[1, 3, H, W]`` images in ``[-1, 1]`` at the encoder's size. ``cond``/``uncond``/``guidance``: the
    text embeddings and classifier-free guidance scale (:class:`GuidedUNet`).

    The pixel mask is ``mask`` (bool ``[H, W]``, inpainting: the region to regenerate) or where the
    images differ by more than the encoder's ``mask.eps`` (SDEdit); it is computed once and mapped to
    the latent grid by max-pooling 8x8 (:func:`ssic.masks.resize_mask_any`). Then: the encoder is
    primed on ``original`` and edited sparsely to ``edited``; the original latent is noised to
    ``strength`` and denoised with DDIM over ``steps`` steps (SD's scaled-linear schedule,
    :func:`ssic.editing.sdedit_timesteps`) priming one UNet cache state per step and branch (the
    original trajectory, what an editor does once when an image is opened); the edited latent is noised
    inside the (dilated) latent mask, with the same noise (SDEdit) or fresh noise (inpainting: the region
    is regenerated), and denoised sparsely against those states,
    each step re-blended with the original trajectory outside the mask (so the unmasked latent is the
    original trajectory's); the decoder is primed on the original trajectory's last latent and edited
    sparsely to the edited one. ``mode`` is the sessions' edit mode ("auto", "sparse" or "dense");
    ``inpaint`` (default: whether ``mask`` is given) picks the noise inside the mask. ``keep`` (an
    editor's session, edited again later) primes the whole original first and keeps every primed state
    (the full SD 1.5 at 512x512, 35 guided steps: 11.2 GB of UNet caches and 1.8 GB of decoder caches);
    ``keep=False`` (a one-shot edit, ``ssic edit``) streams: each UNet step is primed right before its
    edit and its states freed right after, and each part's sessions are freed before the next part
    loads, so one step's states are resident at a time. Both give the same images.

    ``progress(done, total, what)``, if given, is called after each UNet step: ``what`` is "prime"
    then "edit" (``keep=True``) or "step" (streamed: primed and edited).

    Returns ``{"image": [1, 3, H, W] in [-1, 1], "original_image" (the original trajectory decoded),
    "latent" and "original_latent" ``[1, 4, h, w]``, "mask" (pixel), "latent_mask", "blend" (the dilated
    latent mask, bool ``[h, w]``), "prime_s", "edit_s", "active_fraction" (mean over the UNet steps)}``, with ``compare`` also ``"dense"`` (the same loop on the plain models), ``"dense_s"`` and
    ``"psnr"`` (sparse vs dense over the image, peak 2). Raises ``SSICError`` before any model runs
    for parts, images, embeddings or parameters that do not fit.
    """
    from ssic.editing import DDIMSchedule, sdedit_timesteps
    from ssic.masks import dilate, resize_mask_any

    (H, W), (h, w) = check_latent_parts(unet, encoder, decoder)
    if not 0 < strength <= 1:
        raise SSICError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise SSICError(f"steps must be >= 1, got {steps}")
    a, b = (np.ascontiguousarray(x, dtype=np.float32) for x in (original, edited))
    for what, x in (("original", a), ("edited", b)):
        if list(x.shape) != [1, 3, H, W]:
            raise SSICError(f"the {what} image has shape {list(x.shape)}, the encoder takes [1, 3, {H}, {W}]")
    guide = GuidedUNet(unet, cond, uncond, guidance)
    if mask is None:
        m_px = (np.abs(a - b) > float(encoder.manifest.mask.eps)).any(axis=1)[0]
    else:
        m_px = np.asarray(mask, bool)
        if m_px.shape != (H, W):
            raise SSICError(f"the mask is {list(m_px.shape)}, the images are {H}x{W} (HxW)")
    m_lat = resize_mask_any(m_px, (h, w))  # max-pooling 8x8
    # blend with the region the UNet's mask graph makes active at the latent (the mask dilated by its radius)
    blend = dilate(m_lat, int(unet.manifest.mask.radius))[None, None].astype(np.float32)
    sched = DDIMSchedule.stable_diffusion()
    seq = sdedit_timesteps(strength, steps)
    noise = np.random.default_rng(seed).standard_normal((1, 4, h, w)).astype(np.float32)
    fractions: list[float] = []

    # inpainting regenerates the masked region: fresh noise there (the same noise would retrace the
    # original trajectory where the images agree); SDEdit keeps the original's noise (SIGE's choice)
    inpaint = mask is not None if inpaint is None else bool(inpaint)
    noise_in = noise if not inpaint else np.random.default_rng([seed, 1]).standard_normal(noise.shape).astype(
        np.float32)
    traj: list[np.ndarray] = []  # the original trajectory's latents, traj[i] entering step i

    def denoise(z_b: np.ndarray, eps_of) -> np.ndarray:
        # eps_of(x, t, i) may append traj[i + 1] itself (keep=False primes each step just before its edit)
        x = (blend * sched.noise(z_b, noise_in, seq[0][0]) + (1 - blend) * traj[0]).astype(np.float32)
        for i, (t, tp) in enumerate(seq):
            x = sched.step(x, eps_of(x, float(t), i), t, tp)
            x = (blend * x + (1 - blend) * traj[i + 1]).astype(np.float32)
        return x

    def prime_step(i: int) -> None:
        t, tp = seq[i]
        traj.append(sched.step(traj[i], guide.prime(traj[i], float(t), i), t, tp))

    def report(i: int, what: str) -> None:
        if progress:
            progress(i + 1, len(seq), what)

    def sparse_eps(x, t, i):
        eps = guide.edit(x, t, i, mask=m_lat, mode=mode)
        fractions.append(float(np.mean([st.active_fraction for st in guide.last.values()])))
        if keep:
            report(i, "edit")
        return eps

    def prime_decoder() -> np.ndarray:
        image = decoder.prime({"latent": traj[-1]})["image"]
        decoder.release("prime")
        return image

    # Each ONNX Runtime session holds its own copy of the weights (SD's UNet: 3.4 GB) and the prime
    # session an arena for its intermediates, so no sparse session is held while a part primes and each
    # part's prime session is freed once that part is primed.
    for part in (encoder, unet, decoder):
        part.release("sparse")
    if keep:
        # an editor's session: the original (encoder, the trajectory with one cache state per step and
        # branch, decoder) is primed once, when the image is opened, then edited as often as wanted
        start = time.perf_counter()
        z_a = encoder.prime({"image": a})["latent"]
        encoder.release("prime")
        traj.append(sched.noise(z_a, noise, seq[0][0]))
        for i in range(len(seq)):
            prime_step(i)
            report(i, "prime")
        unet.release("prime")
        original_image = prime_decoder()
        prime_s = time.perf_counter() - start
        start = time.perf_counter()
        z_b = encoder.edit({"image": b}, mask=m_px, mode=mode)["latent"]
        latent = denoise(z_b, sparse_eps)
        image = decoder.edit({"latent": latent}, mask=m_lat, mode=mode)["image"]
        edit_s = time.perf_counter() - start
    else:
        # one edit (ssic edit), streamed: each part is primed and edited before the next one loads, and
        # each UNet step is primed right before its edit and forgotten right after, so one step's states
        # are resident at a time instead of the whole trajectory's (full SD 1.5 at 512x512, 35 guided
        # steps: 0.32 GB instead of 11.2 GB); the UNet's prime and sparse sessions are held together
        clock = {"prime": 0.0, "edit": 0.0}

        def timed(what, fn, *args):
            t0 = time.perf_counter()
            out = fn(*args)
            clock[what] += time.perf_counter() - t0
            return out

        z_a = timed("prime", lambda: encoder.prime({"image": a})["latent"])
        encoder.release("prime")
        z_b = timed("edit", lambda: encoder.edit({"image": b}, mask=m_px, mode=mode)["latent"])
        encoder.release("sparse", "dense")  # "dense": where the edit fell back to it
        encoder.forget(0)  # its state (SD 1.5 at 512x512: 1 GB of caches) is not read again
        traj.append(sched.noise(z_a, noise, seq[0][0]))

        def streamed_eps(x, t, i):
            timed("prime", prime_step, i)
            eps = timed("edit", sparse_eps, x, t, i)
            guide.forget(i)
            report(i, "step")
            return eps

        latent = denoise(z_b, streamed_eps)
        unet.release("prime", "sparse", "dense")
        original_image = timed("prime", prime_decoder)
        image = timed("edit", lambda: decoder.edit({"latent": latent}, mask=m_lat, mode=mode)["image"])
        prime_s, edit_s = clock["prime"], clock["edit"]
    out = {"image": image, "original_image": original_image, "latent": latent, "original_latent": traj[-1],
           "mask": m_px, "latent_mask": m_lat, "blend": blend[0, 0] > 0,
           "prime_s": prime_s, "edit_s": edit_s, "active_fraction": float(np.mean(fractions)) if fractions else 0.0}
    if compare:
        start = time.perf_counter()
        z_d = encoder.dense({"image": b})["latent"]
        dense = decoder.dense({"latent": denoise(z_d, lambda x, t, i: guide.dense(x, t))})["image"]
        out["dense_s"] = time.perf_counter() - start
        out["dense"] = dense
        mse = float(((image - dense) ** 2).mean())
        out["psnr"] = 10 * np.log10(4.0 / max(mse, 1e-30))
    if log:
        log(f"{'inpainting' if inpaint else 'SDEdit'} {steps} steps at strength {strength}"
            f"{f', guidance {guidance}' if guide.guided else ''}: primed in {prime_s:.2f} s, edit {edit_s:.2f} s "
            f"({100 * out['active_fraction']:.1f}% UNet tiles active)"
            + (f"; dense {out['dense_s']:.2f} s, PSNR vs dense {out['psnr']:.1f} dB" if compare else ""))
    return out


def latent_edit_files(unet, encoder, decoder, a: np.ndarray, b: np.ndarray, cond: np.ndarray, *,
                      uncond: np.ndarray | None = None, guidance: float = 1.0, mask: np.ndarray | None = None,
                      resize: str | None = None, **kwargs) -> dict:
    """:func:`latent_edit` on images as read from files: ``a``, ``b`` ``[H, W, 3|4]`` (uint8, or float
    in [0, 1]) of one size, placed on the encoder's size by ``resize`` (:class:`ssic.images.Placement`;
    None refuses another size); ``mask`` bool ``[H, W]`` at the images' size (inpainting) or None
    (SDEdit: where they differ by more than half an 8-bit level). Returns ``{"image": [1, 3, H, W] in
    [-1, 1] at the images' size, "summary": str, "result": latent_edit's dict}``. Raises ``SSICError``
    before any model runs when something does not fit."""
    from ssic.editing import check_same_size, image_to_model
    from ssic.images import Placement

    (H, W), _ = check_latent_parts(unet, encoder, decoder)
    check_same_size(a, b, (H, W))
    fa, fb = (image_to_model(x)[0].transpose(1, 2, 0) for x in (a, b))  # [H, W, 3] in [-1, 1]
    place = Placement.plan(fa.shape[:2], (H, W), resize)
    if mask is None:
        m = (np.abs(fa - fb) > 1.0 / 255).any(axis=2)
    else:
        m = np.asarray(mask)
        m = m.reshape(m.shape[-2:]) if m.ndim > 2 and m.size == np.prod(m.shape[-2:]) else m
        if m.shape != fa.shape[:2] or not (m.dtype == np.bool_ or np.issubdtype(m.dtype, np.number)):
            raise SSICError(f"the mask has shape {list(np.shape(mask))} and dtype {m.dtype}; the images are "
                            f"{fa.shape[0]}x{fa.shape[1]} (HxW): give a bool or number mask of that size")
        m = np.nan_to_num(m.astype(np.float64)) != 0
    m = place.mask_to_model(m)
    xa, xb = (place.to_model(x).transpose(2, 0, 1)[None].astype(np.float32).copy() for x in (fa, fb))
    kind = "inpainting" if mask is not None else "SDEdit"
    res = latent_edit(unet, encoder, decoder, xa, xb, cond, uncond=uncond, guidance=guidance, mask=m,
                      inpaint=mask is not None, **kwargs)
    y = place.from_model(res["image"][0].transpose(1, 2, 0), fb).transpose(2, 0, 1)[None]
    summary = (f"{kind}, {kwargs.get('steps', 10)} steps: edit {res['edit_s']:.2f} s after priming "
               f"{res['prime_s']:.2f} s, {100 * res['active_fraction']:.1f}% of the UNet tiles active")
    return {"image": y, "summary": summary, "result": res}


def edit_cache_bytes(unet, steps: int, *, guided: bool = True, encoder=None, decoder=None) -> dict[str, int]:
    """Resident cache bytes of a latent edit, from the artefacts' manifests (or sessions).

    ``unet``/``encoder``/``decoder``: manifests or sessions; ``steps``: denoising steps the edit runs
    (a 50-step schedule at strength 0.7 runs 35); ``guided``: two UNet cache states per step
    (classifier-free guidance) instead of one. Returns ``{"unet_state", "per_step", "unet_total",
    "encoder", "decoder", "total"}`` in bytes (one primed state of each VAE part; 0 when not given).
    """
    def nbytes(part) -> int:
        return 0 if part is None else int(getattr(part, "manifest", part).cache_bytes())

    state = nbytes(unet)
    per_step = state * (2 if guided else 1)
    out = {"unet_state": state, "per_step": per_step, "unet_total": per_step * int(steps),
           "encoder": nbytes(encoder), "decoder": nbytes(decoder)}
    out["total"] = out["unet_total"] + out["encoder"] + out["decoder"]
    return out
