"""Run a compiled artefact: prime on the original, edit sparsely, keep caches resident.

Thread safety: a :class:`Session` may be shared by threads. ``edit`` and ``dense`` calls run
concurrently (ONNX Runtime sessions are thread-safe and caches are read-only while editing);
``prime`` and ``commit`` build a new cache state and swap it in atomically, so an ``edit`` running at
the same time on the same ``cache_id`` sees either the old caches or the new ones, never a mix.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssic.compiler import FORMAT_VERSION, sparse_macs
from ssic.errors import SSICError


@dataclass
class _CacheState:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    caches: dict[str, object]  # name -> OrtValue
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


def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not path.exists():
        raise SSICError(f"artefact not found: {path}")
    if not mf.exists():
        raise SSICError(f"{path} is not an ssic artefact (no manifest.json); compile one with `ssic compile`")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SSICError(f"{mf} is corrupt (not valid JSON); recompile the artefact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "ssic-artefact":
        raise SSICError(f"{mf} is not an ssic manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SSICError(f"{path} has artefact format version {manifest.get('format_version')}, this ssic reads "
                        f"version {FORMAT_VERSION}; recompile it with this ssic")
    for key in ("graphs", "inputs", "outputs", "grids", "caches", "mask", "macs"):
        if key not in manifest:
            raise SSICError(f"{mf} is missing '{key}'; recompile the artefact")
    return manifest


class Session:
    """A loaded artefact. Create with :func:`load`."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if self.manifest["target"] != "ort":
            raise SSICError(f"{self.path} was compiled for target '{self.manifest['target']}'; "
                            "load it with ssic.targets.trt.load (needs a GPU and TensorRT)")
        self.threads = threads
        fused = self.manifest.get("lowering") == "fused"
        if fused:
            from ssic.library import library_version, make_session_options

            want = self.manifest.get("custom_op_library", {}).get("version")
            have = library_version()
            if want and want != have:
                raise SSICError(f"{self.path} needs libssic_ort version {want}, the installed one is {have}; "
                                "recompile the artefact or reinstall ssic (`pip install -e .`)")
            self._options = lambda: make_session_options(threads)
        else:
            def plain():
                so = ort.SessionOptions()
                if threads:
                    so.intra_op_num_threads = threads
                    so.inter_op_num_threads = 1
                return so

            self._options = plain
        self._ort = ort
        self._sessions: dict[str, object] = {}
        self._lock = threading.RLock()
        self._states: dict[object, _CacheState] = {}
        self._last_edit: dict[object, dict] = {}
        self.inputs = {i["name"]: i for i in self.manifest["inputs"]}
        self.output_names = [o["name"] for o in self.manifest["outputs"]]
        self.grids = self.manifest["grids"]
        self.mask_spec = self.manifest["mask"]
        self.last = EditStats()
        for name in ("sparse", "mask"):
            self._session(name)

    # ------------------------------------------------------------------ sessions
    def _session(self, which: str):
        with self._lock:
            if which not in self._sessions:
                file = self.path / self.manifest["graphs"][which]
                if not file.exists():
                    raise SSICError(f"{self.path} is incomplete: {file.name} is missing; recompile the artefact")
                try:
                    self._sessions[which] = self._ort.InferenceSession(str(file), self._options(),
                                                                       providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise SSICError(f"cannot load {file.name}: {str(exc).splitlines()[0][:300]}") from None
            return self._sessions[which]

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, inputs: dict) -> dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise SSICError("inputs must be a dict of input name -> array")
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise SSICError(f"unknown input(s) {sorted(unknown)}; the model takes {sorted(self.inputs)}")
        out = {}
        for name, spec in self.inputs.items():
            if name not in inputs:
                raise SSICError(f"missing input '{name}' (shape {spec['shape']})")
            arr = np.asarray(inputs[name])
            if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
                raise SSICError(f"input '{name}' has dtype {arr.dtype}, expected {spec['dtype']}")
            arr = np.ascontiguousarray(arr, dtype=np.float32 if spec["dtype"] in ("float", "float32") else None)
            if list(arr.shape) != list(spec["shape"]):
                raise SSICError(f"input '{name}' has shape {list(arr.shape)}, expected {spec['shape']}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise SSICError(f"input '{name}' has {bad} non-finite value(s) (NaN or Inf)")
            out[name] = arr
        return out

    def _state(self, cache_id) -> _CacheState:
        state = self._states.get(cache_id)
        if state is None:
            if not self._states:
                raise SSICError("edit() before prime(): prime the session on the original input first")
            raise SSICError(f"unknown cache id {cache_id!r}; primed ids: {sorted(map(repr, self._states))}")
        return state

    # ------------------------------------------------------------------ public API
    def dense(self, inputs: dict) -> dict[str, np.ndarray]:
        """Run the plain model; returns ``{output name: array}``."""
        arrays = self._check_inputs(inputs)
        outs = self._session("dense").run(self.output_names, arrays)
        return dict(zip(self.output_names, outs, strict=True))

    def prime(self, inputs: dict, cache_id: object = 0) -> dict[str, np.ndarray]:
        """Run the prime graph on the original input, keep its caches under ``cache_id``; returns the outputs."""
        arrays = self._check_inputs(inputs)
        sess = self._session("prime")
        io = sess.io_binding()
        for name, arr in arrays.items():
            io.bind_cpu_input(name, arr)
        names = [o.name for o in sess.get_outputs()]
        for name in names:
            io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        values = dict(zip(names, io.get_outputs(), strict=True))
        outputs = {n: values[n].numpy() for n in self.output_names}
        caches = {c["name"]: values[c["name"]] for c in self.manifest["caches"]}
        nbytes = sum(int(np.prod(c["shape"])) * 4 for c in self.manifest["caches"])
        with self._lock:
            self._states[cache_id] = _CacheState({k: v.copy() for k, v in arrays.items()}, outputs, caches, nbytes)
        return {k: v.copy() for k, v in outputs.items()}

    def forget(self, cache_id: object = 0) -> None:
        """Drop the caches of ``cache_id``."""
        with self._lock:
            self._states.pop(cache_id, None)

    @property
    def cache_ids(self) -> list:
        return list(self._states)

    def cache_bytes(self) -> int:
        """Bytes held by all resident caches."""
        return sum(s.nbytes for s in self._states.values())

    def difference_mask(self, inputs: dict, cache_id: object = 0) -> np.ndarray:
        """Bool ``[H, W]`` mask of where the mask-source input differs from the primed one by more than eps."""
        state = self._state(cache_id)
        arrays = self._check_inputs(inputs)
        src = self.mask_spec.get("source_input")
        if src is None:
            raise SSICError("this model has no image input at the mask resolution: pass mask= explicitly")
        diff = np.abs(arrays[src] - state.inputs[src]) > float(self.mask_spec["eps"])
        return diff.any(axis=int(self.mask_spec.get("channel_axis", 1)))[0]

    def _mask_array(self, mask) -> np.ndarray:
        h, w = self.mask_spec["height"], self.mask_spec["width"]
        m = np.asarray(mask)
        if m.ndim == 4 and m.shape[:2] == (1, 1):
            m = m[0, 0]
        if m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        if m.shape != (h, w):
            raise SSICError(f"mask has shape {list(np.shape(mask))}, expected [{h}, {w}] (or [1, 1, {h}, {w}])")
        if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.number):
            raise SSICError(f"mask has dtype {m.dtype}; use bool or a number array")
        if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
            raise SSICError("mask has non-finite values")
        return m != 0

    def active_tiles(self, mask) -> dict[str, np.ndarray]:
        """Active tile corners per grid for a user mask (``[H, W]``): ``{"HxW": int64 [n, 2]}``."""
        m = self._mask_array(mask).astype(np.float32)[None, None]
        names = [g["tiles_input"] for g in self.grids]
        outs = self._session("mask").run(names, {self.mask_spec["input"]: m})
        return {g["name"]: o for g, o in zip(self.grids, outs, strict=True)}

    def edit(self, inputs: dict, mask=None, cache_id: object = 0, *, mode: str = "auto") -> dict[str, np.ndarray]:
        """Recompute the outputs for edited ``inputs``, sparsely where the mask is set; returns the outputs.

        ``mask`` (bool ``[H, W]``) defaults to where the mask-source input differs from the primed one.
        ``mode`` is "auto" (dense fallback when sparse would not pay), "sparse" or "dense".
        """
        t0 = time.perf_counter()
        if mode not in ("auto", "sparse", "dense"):
            raise SSICError(f"unknown mode '{mode}' (auto, sparse or dense)")
        state = self._state(cache_id)
        arrays = self._check_inputs(inputs)
        src = self.mask_spec.get("source_input")
        for name, arr in arrays.items():
            if name != src and arr.shape == state.inputs[name].shape and not np.array_equal(arr, state.inputs[name]):
                if len(arr.shape) != 4:
                    raise SSICError(f"input '{name}' differs from the value primed under cache id {cache_id!r}; "
                                    "prime that cache id with the same non-image inputs")
        m = self.difference_mask(arrays, cache_id) if mask is None else self._mask_array(mask)
        self._last_edit[cache_id] = arrays
        stats = EditStats(macs_dense=int(self.manifest["macs"]["dense"]))
        if not m.any():
            stats.mode, stats.seconds = "cached", time.perf_counter() - t0
            self.last = stats
            return {k: v.copy() for k, v in state.outputs.items()}
        tiles = self.active_tiles(m)
        stats.active_tiles = {g: int(v.shape[0]) for g, v in tiles.items()}
        cells = sum(g["num_cells"] for g in self.grids)
        stats.active_fraction = sum(stats.active_tiles.values()) / max(cells, 1)
        stats.macs = sparse_macs(self.manifest, stats.active_tiles)
        use_dense = mode == "dense" or (
            mode == "auto" and stats.macs > float(self.manifest.get("fallback_ratio", 0.6)) * stats.macs_dense)
        if use_dense:
            out = self.dense(arrays)
            stats.mode = "dense"
        else:
            out = self._run_sparse(arrays, tiles, state)
            stats.mode = "sparse"
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        return out

    def _run_sparse(self, arrays, tiles, state: _CacheState) -> dict[str, np.ndarray]:
        sess = self._session("sparse")
        io = sess.io_binding()
        wanted = {i.name for i in sess.get_inputs()}
        for name, arr in arrays.items():
            if name in wanted:
                io.bind_cpu_input(name, arr)
        for g in self.grids:
            if g["tiles_input"] in wanted:
                io.bind_cpu_input(g["tiles_input"], np.ascontiguousarray(tiles[g["name"]], dtype=np.int64))
        for name, value in state.caches.items():
            if name in wanted:
                io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        return {n: v.numpy() for n, v in zip(self.output_names, io.get_outputs(), strict=True)}

    def commit(self, inputs: dict | None = None, cache_id: object = 0) -> None:
        """Make the last edit of ``cache_id`` (or ``inputs``) its new original: sequential editing."""
        if inputs is None:
            inputs = self._last_edit.get(cache_id)
            if inputs is None:
                raise SSICError(f"commit() without inputs needs an edit() on cache id {cache_id!r} first")
        self.prime(inputs, cache_id)


def load(path: str | Path, *, threads: int | None = None):
    """Load a compiled artefact directory; returns a :class:`Session` (or a TensorRT session)."""
    manifest = _read_manifest(Path(path))
    if manifest.get("target") == "trt":
        from ssic.targets.trt import load as load_trt

        return load_trt(path)
    return Session(path, threads=threads)
