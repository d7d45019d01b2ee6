"""Latent diffusion on compiled Stable Diffusion parts: classifier-free guidance with two cache states.

ssic compiles batch 1. Classifier-free guidance (Ho & Salimans, 2022: ``eps = eps_u + g * (eps_c -
eps_u)``) needs the UNet on two text embeddings per denoising step, the unconditional (an empty
prompt's or a negative prompt's embedding) and the conditional one. :class:`GuidedUNet` runs them as
two batch-1 cache states of one session per step, ``cache_id=(step, "uncond")`` and
``(step, "cond")``, edited with one mask: the same active tiles, twice the dispatch of a batch-2 run,
the same MACs.
"""

from __future__ import annotations

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
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise SSICError(f"the {what} must be finite floating-point numbers (dtype {arr.dtype})")
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
