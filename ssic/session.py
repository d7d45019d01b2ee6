"""The editing session: the public ``prime / edit / dense / commit`` API and its invariants.

A :class:`Session` owns everything a user sees: input validation, the edit mask (the difference over
*every* spatial input, each at its own resolution, or a mask the user gives at any input's or the
finest grid's resolution), the dense fallback, cache states per ``cache_id`` and thread safety. A
:class:`Backend` runs graphs and nothing else (Polygraphy's runner idiom): ONNX Runtime
(:mod:`ssic.targets.ort`) and TensorRT (:mod:`ssic.targets.trt_session`) implement four small hooks.

Thread safety: a session may be shared by threads. ``edit`` and ``dense`` calls run concurrently
(backends must allow that; caches are read-only while editing); ``prime`` and ``commit`` build a new
cache state and swap it in atomically, so an ``edit`` running at the same time on the same
``cache_id`` sees either the old caches or the new ones, never a mix.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssic.artefact import Manifest, MaskSource
from ssic.cost_model import CostModel
from ssic.errors import SSICError
from ssic.masks import resize_mask_any


class Backend(ABC):
    """What a runtime implements. Arrays are host NumPy arrays; caches are backend-owned handles."""

    #: short name shown in messages ("onnxruntime", "tensorrt")
    name: str = "backend"

    @abstractmethod
    def run_dense(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the plain model; returns every model output."""

    @abstractmethod
    def run_prime(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, object], int]:
        """Run the prime graph; returns ``(model outputs, {cache name: handle}, bytes the caches hold)``."""

    @abstractmethod
    def run_sparse(self, inputs: dict[str, np.ndarray], tiles: dict[str, np.ndarray],
                   caches: dict[str, object]) -> dict[str, np.ndarray]:
        """Run the sparse graph; ``tiles`` maps each grid's tiles input name to int64 ``[n, 2]``."""

    @abstractmethod
    def run_mask(self, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the mask graph on float32 ``[1, 1, h, w]`` masks; returns ``{tiles input name: [n, 2]}``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (sessions, device memory)."""


@dataclass
class CacheState:
    """The primed state of one ``cache_id``: the inputs it was primed on, their outputs, the caches."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    caches: dict[str, object]
    nbytes: int = 0


@dataclass
class EditStats:
    """What the last ``edit`` did: ``mode`` is "sparse", "dense" (fallback) or "cached" (empty mask)."""

    mode: str = ""
    active_tiles: dict[str, int] = field(default_factory=dict)
    active_fraction: float = 0.0
    macs: int = 0
    macs_dense: int = 0
    seconds: float = 0.0
    #: why "auto" chose the mode: "mac ratio" (over ``fallback_ratio``), "measured" (the session's
    #: :class:`ssic.cost_model.CostModel` predicts sparse slower than dense) or "" (sparse pays)
    reason: str = ""


class Session:
    """A loaded artefact. Create with :func:`ssic.load`."""

    def __init__(self, path: str | Path, manifest: Manifest, backend: Backend, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.backend = backend
        self.threads = threads
        self._lock = threading.RLock()
        self._states: dict[object, CacheState] = {}
        self._last_edit: dict[object, dict[str, np.ndarray]] = {}
        self.inputs = {i.name: i for i in manifest.inputs}
        self.output_names = manifest.output_names
        self.grids = manifest.grids
        self.sources: list[MaskSource] = list(manifest.mask.sources)
        self.last = EditStats()
        #: measured run times behind the dense fallback of ``edit(mode="auto")``
        self.cost = CostModel()

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, inputs: dict) -> dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise SSICError("inputs must be a dict of input name -> array")
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise SSICError(f"unknown input(s) {sorted(map(str, unknown))}; the model takes {sorted(self.inputs)}")
        out = {}
        for name, spec in self.inputs.items():
            if name not in inputs:
                raise SSICError(f"missing input '{name}' (shape {spec.shape})")
            arr = np.asarray(inputs[name])
            if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
                raise SSICError(f"input '{name}' has dtype {arr.dtype}, expected {spec.dtype}")
            want = {"float": np.float32, "float32": np.float32, "float16": np.float16, "double": np.float64,
                    "int64": np.int64, "int32": np.int32}.get(spec.dtype)
            arr = np.ascontiguousarray(arr, dtype=want)
            if list(arr.shape) != list(spec.shape):
                raise SSICError(f"input '{name}' has shape {list(arr.shape)}, expected {spec.shape}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise SSICError(f"input '{name}' has {bad} non-finite value(s) (NaN or Inf)")
            out[name] = arr
        return out

    def _state(self, cache_id) -> CacheState:
        state = self._states.get(cache_id)
        if state is None:
            if not self._states:
                raise SSICError("edit() before prime(): prime the session on the original input first")
            raise SSICError(f"unknown cache id {cache_id!r}; primed ids: {sorted(map(repr, self._states))}")
        return state

    # ------------------------------------------------------------------ masks
    def source_masks(self, inputs: dict, cache_id: object = 0) -> dict[str, np.ndarray]:
        """Where each spatial input differs from its primed value by more than the manifest's eps.

        Returns ``{mask input name: bool [h, w]}`` at each input's own resolution (any over channels).
        """
        state = self._state(cache_id)
        arrays = self._check_inputs(inputs)
        eps = float(self.manifest.mask.eps)
        out = {}
        for s in self.sources:
            if not s.input:
                out[s.mask_input] = np.zeros((s.height, s.width), bool)
                continue
            diff = np.abs(arrays[s.input].astype(np.float64) - state.inputs[s.input]) > eps
            out[s.mask_input] = diff.any(axis=s.channel_axis)[0]
        return out

    def difference_mask(self, inputs: dict, cache_id: object = 0) -> np.ndarray:
        """Bool ``[H, W]`` at the finest grid: the union of every input's change mask, resized."""
        hw = (self.manifest.mask.height, self.manifest.mask.width)
        out = np.zeros(hw, bool)
        for m in self.source_masks(inputs, cache_id).values():
            out |= resize_mask_any(m, hw)
        return out

    def check_mask(self, mask) -> np.ndarray:
        """Validate a user mask; returns it as bool ``[h, w]`` (at the finest grid's or an input's resolution).

        Raises ``SSICError`` for another shape, a non-numeric dtype or non-finite values.
        """
        sizes = {(self.manifest.mask.height, self.manifest.mask.width)} | {(s.height, s.width) for s in self.sources}
        m = np.asarray(mask)
        while m.ndim > 2 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 2 or tuple(m.shape) not in sizes:
            accepted = " or ".join(f"[{h}, {w}]" for h, w in sorted(sizes))
            raise SSICError(f"mask has shape {list(np.shape(mask))}, expected {accepted}")
        if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
            raise SSICError(f"mask has dtype {m.dtype}; use bool or a number array")
        if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
            raise SSICError("mask has non-finite values")
        return m != 0

    def _user_masks(self, mask) -> dict[str, np.ndarray]:
        """A user mask (at the finest grid's or any spatial input's resolution) for every source."""
        m = self.check_mask(mask)
        return {s.mask_input: resize_mask_any(m, (s.height, s.width)) for s in self.sources}

    def active_tiles(self, mask) -> dict[str, np.ndarray]:
        """Active tile corners per grid for a user mask: ``{"HxW": int64 [n, 2]}``."""
        return self._tiles(self._user_masks(mask))

    def _tiles(self, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v.astype(np.float32)[None, None] for k, v in masks.items()}
        outs = self.backend.run_mask(feeds)
        return {g.name: np.ascontiguousarray(outs[g.tiles_input], dtype=np.int64).reshape(-1, 2) for g in self.grids}

    # ------------------------------------------------------------------ public API
    def dense(self, inputs: dict) -> dict[str, np.ndarray]:
        """Run the plain model; returns ``{output name: array}``."""
        arrays = self._check_inputs(inputs)
        t0 = time.perf_counter()
        out = self.backend.run_dense(arrays)
        self.cost.record_dense(time.perf_counter() - t0)
        return out

    def prime(self, inputs: dict, cache_id: object = 0) -> dict[str, np.ndarray]:
        """Run the prime graph on the original input, keep its caches under ``cache_id``; returns the outputs."""
        arrays = self._check_inputs(inputs)
        t0 = time.perf_counter()
        outputs, caches, nbytes = self.backend.run_prime(arrays)
        self.cost.record_dense(time.perf_counter() - t0)  # a prime run bounds a dense run from above
        state = CacheState({k: v.copy() for k, v in arrays.items()}, outputs, caches, nbytes)
        with self._lock:
            self._states[cache_id] = state
        return {k: v.copy() for k, v in outputs.items()}

    def forget(self, cache_id: object = 0) -> None:
        """Drop the caches of ``cache_id``."""
        with self._lock:
            self._states.pop(cache_id, None)
            self._last_edit.pop(cache_id, None)

    @property
    def cache_ids(self) -> list:
        return list(self._states)

    def cache_bytes(self) -> int:
        """Bytes held by all resident caches."""
        return sum(s.nbytes for s in self._states.values())

    def edit(self, inputs: dict, mask=None, cache_id: object = 0, *, mode: str = "auto") -> dict[str, np.ndarray]:
        """Recompute the outputs for edited ``inputs``, sparsely where the mask is set; returns the outputs.

        ``mask`` (bool ``[H, W]`` at the finest grid's or any spatial input's resolution) defaults to
        where any spatial input differs from the primed one. Non-spatial inputs (a timestep) must
        equal the primed values. ``mode`` is "auto" (dense fallback when sparse would not pay: over
        the artefact's ``fallback_ratio`` of the dense MACs, or predicted slower by the session's
        measured :attr:`cost` model), "sparse" or "dense". Raises ``SSICError`` for bad inputs, masks or modes; ``self.last``
        (:class:`EditStats`) says what ran.
        """
        t0 = time.perf_counter()
        if mode not in ("auto", "sparse", "dense"):
            raise SSICError(f"unknown mode '{mode}' (auto, sparse or dense)")
        state = self._state(cache_id)
        arrays = self._check_inputs(inputs)
        spatial = {s.input for s in self.sources}
        for name, arr in arrays.items():
            if name not in spatial and not np.array_equal(arr, state.inputs[name]):
                raise SSICError(f"input '{name}' differs from the value primed under cache id {cache_id!r}; "
                                "prime that cache id with the same non-image inputs")
        masks = self.source_masks(arrays, cache_id) if mask is None else self._user_masks(mask)
        with self._lock:
            self._last_edit[cache_id] = arrays
        stats = EditStats(macs_dense=int(self.manifest.macs.dense))
        if not any(m.any() for m in masks.values()):
            stats.mode, stats.seconds = "cached", time.perf_counter() - t0
            self.last = stats
            return {k: v.copy() for k, v in state.outputs.items()}
        tiles = self._tiles(masks)
        stats.active_tiles = {g: int(v.shape[0]) for g, v in tiles.items()}
        stats.active_fraction = sum(stats.active_tiles.values()) / max(self.manifest.total_cells, 1)
        stats.macs = self.manifest.sparse_macs(stats.active_tiles)
        fraction = stats.macs / max(stats.macs_dense, 1)
        if mode == "auto" and fraction > float(self.manifest.fallback_ratio):
            stats.reason = "mac ratio"
        elif mode == "auto" and self.cost.prefers_dense(fraction):
            stats.reason = "measured"
        run_start = time.perf_counter()
        if mode == "dense" or stats.reason:
            out = self.backend.run_dense(arrays)
            stats.mode = "dense"
            self.cost.record_dense(time.perf_counter() - run_start)
        else:
            feeds = {g.tiles_input: tiles[g.name] for g in self.grids}
            out = self.backend.run_sparse(arrays, feeds, state.caches)
            stats.mode = "sparse"
            self.cost.record_sparse(fraction, time.perf_counter() - run_start)
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        return out

    def commit(self, inputs: dict | None = None, cache_id: object = 0) -> None:
        """Make the last edit of ``cache_id`` (or ``inputs``) its new original: sequential editing."""
        if inputs is None:
            inputs = self._last_edit.get(cache_id)
            if inputs is None:
                raise SSICError(f"commit() without inputs needs an edit() on cache id {cache_id!r} first")
        self.prime(inputs, cache_id)

    def close(self) -> None:
        """Drop every cache state and release the backend."""
        with self._lock:
            self._states.clear()
            self._last_edit.clear()
        self.backend.close()
