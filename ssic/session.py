"""The editing session: the public ``prime / edit / dense / commit`` API and its invariants.

A :class:`Session` owns everything a user sees: input validation, the edit mask (the difference over
*every* spatial input, each at its own resolution, or a mask the user gives at any input's or the
finest grid's resolution), the dense fallback, cache states per ``cache_id`` and thread safety. A
:class:`Backend` runs graphs and nothing else (Polygraphy's runner idiom): ONNX Runtime
(:mod:`ssic.targets.ort`) and TensorRT (:mod:`ssic.targets.trt_session`) implement four small hooks.

Thread safety: a session may be shared by threads. ``edit`` and ``dense`` calls run concurrently
(backends must allow that; caches are read-only while editing); ``prime`` builds a new cache state and
swaps it in atomically, and an incremental ``commit`` writes into a cache state only while no edit
reads it (each state has a readers-writer lock), so an ``edit`` running at the same time on the same
``cache_id`` sees either the old caches or the new ones, never a mix.
"""

from __future__ import annotations

import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssic.artefact import Manifest, MaskSource
from ssic.cost_model import CostModel
from ssic.errors import SSICError
from ssic.masks import changed, resize_mask_any


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
                   caches: dict[str, object], *, commit: bool = False) -> dict[str, np.ndarray]:
        """Run the sparse graph; ``tiles`` maps each grid's tiles input name to int64 ``[n, 2]``.

        Returns every model output; with ``commit``, also the sparse graph's commit outputs (named by
        ``CacheEntry.commit``) where the backend can fold them into its caches (see :meth:`host_view`).
        """

    def host_view(self, cache: object) -> np.ndarray | None:
        """A writable host array sharing ``cache``'s memory (a commit writes the edited tiles into it),
        or None where the cache lives elsewhere (then ``commit`` re-primes)."""
        return None

    @abstractmethod
    def run_mask(self, masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the mask graph on float32 ``[1, 1, h, w]`` masks; returns ``{tiles input name: [n, 2]}``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (sessions, device memory)."""

    def release(self, which: str) -> None:  # noqa: B027 - optional hook
        """Free graph ``which``'s runtime objects until its next use (no-op where not supported)."""

    def warm(self, which: str) -> bool:
        """Whether graph ``which`` is loaded and has run once, so that its next run costs a run only (not
        also the load and the first run's allocations)."""
        return True


class _ReadWriteLock:
    """Many readers (edits) or one writer (a commit writing into the caches), writers waiting for readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class CacheState:
    """The primed state of one ``cache_id``: the inputs it was primed on, their outputs, the caches."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    caches: dict[str, object]
    nbytes: int = 0
    lock: _ReadWriteLock = field(default_factory=_ReadWriteLock, repr=False, compare=False)


@dataclass
class _LastEdit:
    """What ``commit`` needs of the last ``edit`` of a cache id (edit-sized: tiles, not full tensors)."""

    state_ref: weakref.ref  # the cache state the edit read (weak: a prime drops the old caches)
    inputs: dict[str, np.ndarray]
    mode: str  # EditStats.mode
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    tiles: dict[str, np.ndarray] = field(default_factory=dict)  # grid name -> int64 [n, 2]
    updates: dict[str, np.ndarray] = field(default_factory=dict)  # commit output name -> array
    auto_mask: bool = True  # the mask was the difference with the primed inputs (no user mask)
    committed: bool = False

    def read(self, state: CacheState | None) -> bool:
        """Whether this edit ran against ``state``."""
        return state is not None and self.state_ref() is state


@dataclass
class CommitStats:
    """What the last ``commit`` did: ``mode`` "incremental" (tiles folded into the caches), "prime"
    (re-primed: no sparse edit to fold, or the backend cannot write its caches) or "none" (nothing changed)."""

    mode: str = ""
    seconds: float = 0.0


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
        self._last_edit: dict[object, _LastEdit] = {}
        self.inputs = {i.name: i for i in manifest.inputs}
        self.output_names = manifest.output_names
        self.grids = manifest.grids
        self.sources: list[MaskSource] = list(manifest.mask.sources)
        self.last = EditStats()
        #: measured run times behind the dense fallback of ``edit(mode="auto")``
        self.cost = CostModel()
        self.last_commit = CommitStats()
        #: keep every sparse edit's new tiles for a following ``commit`` (which then costs only the
        #: scatter); off, ``commit`` runs the sparse graph once more to get them. The tiles cost a few
        #: percent of the edit's time and edit-sized memory per cache id: turn on when most edits are
        #: committed.
        self.keep_commit_tiles = False
        self._commit_lock = threading.Lock()

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
        return self._source_masks(self._check_inputs(inputs), self._state(cache_id))

    def _source_masks(self, arrays: dict[str, np.ndarray], state: CacheState) -> dict[str, np.ndarray]:
        eps = float(self.manifest.mask.eps)
        out = {}
        for s in self.sources:
            if not s.input:
                out[s.mask_input] = np.zeros((s.height, s.width), bool)
                continue
            diff = changed(arrays[s.input], state.inputs[s.input], eps)
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
        # a bool mask is copied, not compared: `!= 0` on bool took 0.39 ms for 1024x1024, a copy 0.03 ms
        return m.copy() if m.dtype == np.bool_ else m != 0

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

    def release(self, *graphs: str) -> None:
        """Free the runtime sessions of ``graphs`` (``"dense"``, ``"prime"``, ``"sparse"``; default dense
        and prime) until their next use, which re-creates them (seconds for a large model). Each ONNX
        Runtime session holds its own copy of the model's weights: a latent edit primes every step with
        no sparse session held, then releases ``"prime"`` (Stable Diffusion's UNet: 3.4 GB each) for the
        edits. Caches are kept."""
        for which in graphs or ("dense", "prime"):
            if which not in ("dense", "prime", "sparse"):
                raise SSICError(f"release: unknown graph {which!r} (dense, prime, sparse)")
            self.backend.release(which)

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
        with state.lock.read():
            record, out, stats = self._edit(state, arrays, mask, mode, cache_id)
        stats.seconds = time.perf_counter() - t0
        with self._lock:
            self._last_edit[cache_id] = record
        self.last = stats
        return out

    def _edit(self, state: CacheState, arrays: dict[str, np.ndarray], mask, mode: str, cache_id: object, *,
              keep: bool | None = None) -> tuple[_LastEdit, dict[str, np.ndarray], EditStats]:
        """The edit of ``arrays`` against ``state`` (held for reading): (record for commit, outputs, stats).

        ``keep``: fetch the commit outputs (default ``self.keep_commit_tiles``)."""
        spatial = {s.input for s in self.sources}
        for name, arr in arrays.items():
            if name not in spatial and not np.array_equal(arr, state.inputs[name]):
                raise SSICError(f"input '{name}' differs from the value primed under cache id {cache_id!r}; "
                                "prime that cache id with the same non-image inputs")
        masks = self._source_masks(arrays, state) if mask is None else self._user_masks(mask)
        stats = EditStats(macs_dense=int(self.manifest.macs.dense))
        record = _LastEdit(weakref.ref(state), arrays, "cached", auto_mask=mask is None)
        if not any(m.any() for m in masks.values()):
            stats.mode = "cached"
            return record, {k: v.copy() for k, v in state.outputs.items()}, stats
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
            stats.mode = record.mode = "dense"
            self.cost.record_dense(time.perf_counter() - run_start)
        else:
            feeds = {g.tiles_input: tiles[g.name] for g in self.grids}
            keep = self.keep_commit_tiles if keep is None else keep
            warm = self.backend.warm("sparse")
            result = self.backend.run_sparse(arrays, feeds, state.caches, commit=keep)
            stats.mode = record.mode = "sparse"
            if warm:  # a run that also loaded the graph (SD 1.5's UNet: 10-27 s) sent the next 16 edits dense
                self.cost.record_sparse(fraction, time.perf_counter() - run_start)
            out = {n: result[n] for n in self.output_names}
            record.updates = {k: v for k, v in result.items() if k not in out}
            record.tiles = tiles
        # the state's outputs after a commit: a copy, so that changing the returned arrays cannot reach it
        record.outputs = {k: v.copy() for k, v in out.items()}
        return record, out, stats

    def commit(self, inputs: dict | None = None, cache_id: object = 0, *, incremental: bool = True) -> None:
        """Make the last edit of ``cache_id`` (or ``inputs``) its new original: sequential editing.

        Incremental (``self.last_commit.mode == "incremental"``): the new tiles the last sparse edit
        computed for every cached activation are written into the caches at that edit's active tiles
        (an in-place scatter on the host: cost of the order of an edit, not of a prime), the
        incremental GroupNorm sums become the edited tensor's sums, and the edit's outputs become the
        primed outputs. The tiles come from the edit when ``self.keep_commit_tiles`` was on, else the
        commit runs the sparse graph once more on that edit's tiles. ``inputs`` given and different
        from the last edit's: they are edited first (difference mask). A last edit under a user
        ``mask`` whose tiles miss part of the difference with the original is edited again with the
        difference mask first, so the new original is always the edited input.

        Exactness: in exact mode (``exact=True``) every pixel the edit changes lies in an active tile,
        so a chain of edits and commits equals a fresh ``prime`` on the final input (up to float
        rounding, mostly of the incremental GroupNorm sums). In the default mode pixels outside the
        active tiles that the dense model would change keep their old values, as in the edit itself
        (SIGE's approximation): the committed caches are what the edit computed, so that error stays
        in the caches and adds up over a chain of commits (DDIM tiny, five 28x28 edits: 47.9 dB on the
        next edit vs 60.8 dB after a prime); ``incremental=False`` (or ``prime``) resets it. With
        ``gn_stats="cached"`` the GroupNorm scale/shift stay those of the first primed input.

        Re-primes on the edited input (``mode == "prime"``) with ``incremental=False``, when the last
        edit ran dense, when the cache state was primed again since that edit, or when the backend
        cannot write its caches in place (TensorRT: device buffers). Committing an edit that changed
        nothing beyond eps or committing twice is a no-op (``mode == "none"``). Raises ``SSICError``
        without an edit to commit or for bad inputs.
        """
        t0 = time.perf_counter()
        arrays = None if inputs is None else self._check_inputs(inputs)
        with self._commit_lock:  # one commit at a time: each folds into the state the previous one left
            mode = self._commit(arrays, cache_id, incremental)
        self.last_commit = CommitStats(mode, time.perf_counter() - t0)

    def _commit(self, arrays: dict[str, np.ndarray] | None, cache_id: object, incremental: bool) -> str:
        """The body of :meth:`commit` (under the commit lock); returns the CommitStats mode."""
        with self._lock:
            last = self._last_edit.get(cache_id)
            state = self._states.get(cache_id)
        if arrays is not None:
            spatial = {s.input for s in self.sources}
            same_other = state is not None and all(
                np.array_equal(a, state.inputs[n]) for n, a in arrays.items() if n not in spatial)
            if not same_other or not incremental:  # unprimed cache id or another timestep: nothing to fold into
                self.prime(arrays, cache_id)
                if last is not None:
                    last.committed = True
                return "prime"
            if last is None or not last.read(state) or last.committed or any(
                    not np.array_equal(a, last.inputs[n]) for n, a in arrays.items()):
                with state.lock.read():
                    last, _, _ = self._edit(state, arrays, None, "auto", cache_id, keep=True)
        elif last is None:
            raise SSICError(f"commit() without inputs needs an edit() on cache id {cache_id!r} first")
        if last.committed:
            return "none"
        if incremental:
            mode = self._fold(last, cache_id)
        else:
            self.prime(last.inputs, cache_id)
            mode = "prime"
        last.committed = True  # (also when _fold recomputed the edit: a second commit is a no-op)
        return mode

    def _fold(self, last: _LastEdit, cache_id: object) -> str:
        """Make ``last``'s inputs the original of ``cache_id`` (incrementally where possible); returns the mode."""
        with self._lock:
            state = self._states.get(cache_id)
        if last.read(state) and not last.auto_mask:
            # a user mask may miss part of the change (or select more): fold the edit only where
            # its tiles cover every tile the difference with the original activates
            masks = self._source_masks(last.inputs, state)
            covered = last.mode == "sparse" and _tiles_cover(last.tiles, self._tiles(masks))
            if not covered:
                # (sparse again where the user's edit ran sparse; else the session's dense fallback decides)
                mode = "sparse" if last.mode == "sparse" else "auto"
                with state.lock.read():
                    last, _, _ = self._edit(state, last.inputs, None, mode, cache_id, keep=True)
        if last.read(state) and last.mode == "cached":
            # nothing beyond eps changed: the caches (and the inputs the next mask is measured
            # against) stay those of the original
            return "none"
        views = self._commit_views(state) if last.read(state) and last.mode == "sparse" else None
        if views is None:
            self.prime(last.inputs, cache_id)
            return "prime"
        updates = last.updates
        if any(c.commit not in updates for c in self.manifest.caches if c.name in views):
            # the edit did not keep its tiles (keep_commit_tiles off): compute them again, once
            feeds = {g.tiles_input: last.tiles[g.name] for g in self.grids}
            with state.lock.read():
                updates = self.backend.run_sparse(last.inputs, feeds, state.caches, commit=True)
        grids = {g.name: g for g in self.grids}
        with state.lock.write():
            for c in self.manifest.caches:
                view = views.get(c.name)
                if view is None:
                    continue
                if c.layout == "C":
                    view[...] = updates[c.commit].reshape(view.shape)
                elif c.rows:
                    g = grids[c.resolution]
                    scatter_rows_into(view, updates[c.commit], last.tiles[g.name], g.tile, (g.height, g.width),
                                      tuple(c.rows))
                else:
                    g = grids[c.resolution]
                    scatter_tiles(view, updates[c.commit], last.tiles[g.name], g.tile, nchw=c.layout == "NCHW")
            state.inputs = last.inputs
            state.outputs = last.outputs
        last.updates = {}
        return "incremental"

    def _commit_views(self, state: CacheState) -> dict[str, np.ndarray] | None:
        """Writable host views of the caches a commit updates, or None when one cannot be updated in place."""
        grids = {g.name for g in self.grids}
        views = {}
        for c in self.manifest.caches:
            if c.commit is None:
                if c.kind in ("gn_scale", "gn_shift"):
                    continue  # gn_stats="cached": the first original's statistics by design
                return None
            if c.layout != "C" and c.resolution not in grids:
                return None
            view = self.backend.host_view(state.caches[c.name])
            if view is None or list(view.shape) != list(c.shape) or not view.flags.c_contiguous \
                    or not view.flags.writeable:
                return None
            views[c.name] = view
        return views

    def close(self) -> None:
        """Drop every cache state and release the backend."""
        with self._lock:
            self._states.clear()
            self._last_edit.clear()
        self.backend.close()


def _tiles_cover(have: dict[str, np.ndarray], need: dict[str, np.ndarray]) -> bool:
    """Whether every grid's tiles ``need`` (int64 ``[n, 2]`` corners) are among ``have``'s."""
    for grid, idx in need.items():
        got = {tuple(r) for r in np.asarray(have.get(grid, np.zeros((0, 2), np.int64))).tolist()}
        if any(tuple(r) not in got for r in np.asarray(idx).tolist()):
            return False
    return True


def scatter_tiles(cache: np.ndarray, tiles: np.ndarray, idx: np.ndarray, tile: int, *, nchw: bool) -> None:
    """Write tile tensor ``tiles`` (``[n*t*t, C]``, rows ``(tile, py, px)``) into ``cache`` in place.

    ``cache`` is ``[H, W, C]`` (``nchw`` False) or ``[1, C, H, W]``, any float dtype (values are cast);
    ``idx`` int64 ``[n, 2]`` are the tiles' top-left corners (multiples of ``tile``). Pixels of clipped
    tiles outside the image are dropped. Same result as ``ssic.ops.tile_scatter_ref`` without residual.
    """
    n, t = int(idx.shape[0]), int(tile)
    if n == 0:
        return
    if nchw:
        c, h, w = cache.shape[1:]
    else:
        h, w, c = cache.shape
    rows = tiles.reshape(n, t, t, c)
    if not nchw and h % t == 0 and w % t == 0:
        # whole tiles: the cache as a grid of cells (a view), one fancy assignment of t*C-long rows
        cache.reshape(h // t, t, w // t, t, c)[idx[:, 0] // t, :, idx[:, 1] // t] = rows
        return
    off = np.arange(t)
    y = (idx[:, 0, None, None] + off[None, :, None]).repeat(t, axis=2)  # [n, t, t]
    x = (idx[:, 1, None, None] + off[None, None, :]).repeat(t, axis=1)
    ok = (y < h) & (x < w)
    flat = (y * w + x)[ok]
    if nchw:
        # per channel, a scatter along the flattened pixels: measured 7x faster than indexing the
        # NCHW cache as a grid of cells (DDIM-sized 256x256x128, 3% of the tiles: 3 vs 22 ms)
        cache.reshape(c, h * w)[:, flat] = rows[ok].T
    else:
        cache.reshape(h * w, c)[flat] = rows[ok]


def scatter_rows_into(cache: np.ndarray, rows: np.ndarray, idx: np.ndarray, tile: int, hw: tuple[int, int],
                      axes: tuple[int, ...]) -> None:
    """Write the new rows of a token value (self-attention keys/values) into its cache in place.

    ``cache``: C-contiguous, any float dtype (values are cast), whose axes ``axes`` (one axis of
    ``H*W`` pixels in raster order, or two adjacent axes ``(H, W)``) run over the pixels of an
    ``hw`` grid. ``rows``: ``cache``'s shape with those axes collapsed into one of ``n*t*t`` rows in
    tile order (tile, py, px), ``idx`` int64 ``[n, 2]`` the tiles' top-left corners. Rows of clipped
    tiles outside the grid are dropped.
    """
    n, t = int(idx.shape[0]), int(tile)
    if n == 0:
        return
    h, w = hw
    r0, r1 = axes[0], axes[-1]
    shape = cache.shape
    view = cache.view()
    view.shape = (*shape[:r0], h * w, *shape[r1 + 1:])  # raises rather than copy: the cache must be contiguous
    off = np.arange(t)
    y = (idx[:, 0, None, None] + off[None, :, None]).repeat(t, axis=2).reshape(-1)  # [n*t*t], tile order
    x = (idx[:, 1, None, None] + off[None, None, :]).repeat(t, axis=1).reshape(-1)
    ok = (y < h) & (x < w)
    lead = (slice(None),) * r0
    upd = np.asarray(rows).reshape(*shape[:r0], n * t * t, *shape[r1 + 1:])
    view[lead + ((y * w + x)[ok],)] = upd[lead + (ok,)]
