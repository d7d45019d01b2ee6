"""The ONNX Runtime backend (CPU): runs an artefact's graphs with ``onnxruntime.InferenceSession``.

Caches stay resident as ``OrtValue``s returned by the prime graph and are bound, without a copy, as
inputs of the sparse graph (IOBinding). Fused artefacts register the ssic op library
(:mod:`ssic.library`) in every session that needs it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ssic.artefact import Manifest
from ssic.errors import SSICError
from ssic.session import Backend

#: manifest element type names (ONNX's, as onnx_ir spells them) -> NumPy
_NUMPY_TYPES = {"float": np.float32, "float32": np.float32, "float16": np.float16, "double": np.float64,
                "float64": np.float64, "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8,
                "bool": np.bool_}


#: the prime runs without ONNX Runtime's arena when its caches take more than this fraction of the
#: machine's memory (then every intermediate page-faults on first touch: a prime costs up to 2x a
#: dense run instead of ~1x, BENCHMARKS.md "Prime")
PRIME_ARENA_MAX_FRACTION = 0.25


def physical_memory() -> int:
    """The machine's physical memory in bytes (``os.sysconf``; 0 where unknown, as on Windows)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


class OrtBackend(Backend):
    """Runs ``dense``, ``prime``, ``sparse`` and ``mask`` graphs on ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, manifest: Manifest, *, threads: int | None = None,
                 preload: tuple[str, ...] = ("sparse", "mask")) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.path = Path(path)
        self.manifest = manifest
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self._ran: set[str] = set()  # graphs whose session has run since it was loaded
        self._lock = threading.RLock()
        self._fused = manifest.lowering == "fused" and "sparse" in preload
        if self._fused:
            from ssic.library import library_version

            want = manifest.custom_op_library.version if manifest.custom_op_library else None
            have = library_version()
            if want and want != have:
                raise SSICError(f"{self.path} needs libssic_ort version {want}, the installed one is {have}; "
                                "recompile the artefact or reinstall ssic (`pip install -e .`)")
        self.output_names = manifest.output_names
        # model outputs of a static shape and a known element type are written into NumPy buffers
        self._output_specs = {o.name: (list(o.shape), _NUMPY_TYPES[o.dtype]) for o in manifest.outputs
                              if o.dtype in _NUMPY_TYPES and o.shape and min(o.shape) > 0}
        # what a commit folds into the caches (docs/architecture.md, "Commit"): tiles the sparse graph
        # computes anyway
        self.commit_names = list(dict.fromkeys(c.commit for c in manifest.caches if c.commit))
        for which in preload:
            self.session(which)

    @classmethod
    def mask_only(cls, path: str | Path, manifest: Manifest, *, threads: int | None = None) -> OrtBackend:
        """A backend that runs only the mask graph (stock ONNX ops), for other targets' sessions."""
        return cls(path, manifest, threads=threads, preload=("mask",))

    def _options(self, which: str = ""):
        if self._fused and which != "mask":
            from ssic.library import make_session_options

            so = make_session_options(self.threads)
        else:
            so = self._ort.SessionOptions()
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
                so.inter_op_num_threads = 1
        if which == "prime":
            # the caches are written into buffers run_prime allocates (outside ONNX Runtime's arena, which
            # grows by doubling: Real-ESRGAN x4plus at 512x512 input, 7.9 GB of caches, peaked at 20.4 GB
            # with them in it); the intermediates use the arena as a dense run does. Without it every
            # intermediate was a fresh allocation whose pages fault on first touch: a prime cost 1.3x a
            # dense run on DDIM and 2x on OIDN at 1024x1024, 1.05x and 1.0x with it (BENCHMARKS.md).
            so.enable_mem_pattern = False
            memory = physical_memory()
            if memory and self.manifest.cache_bytes() > PRIME_ARENA_MAX_FRACTION * memory:
                # the arena grows by doubling: beside caches this large it does not fit (Real-ESRGAN x4plus
                # at 512x512 input, 8.3 GB of caches: killed at 24.3 GB with it, 18.2 GB peak without)
                so.enable_cpu_mem_arena = False
        # Each session has intra-op threads of its own, which keep spinning for work after a run: the mask
        # graph's and a dense run's spinners took a core from the sparse run after them, and the sparse
        # run's from the dense run after it. Stopped once each run ends (they still spin inside a run),
        # OIDN 512x512 with a 1.2% edit: sparse 12.6 ms warm / 20.6 ms right after a dense run -> 12.0 /
        # 12.3 ms, and its dense run 394 -> 363 ms right after a sparse one; PD's dense run alone
        # 1370 -> 1340 ms (BENCHMARKS.md, ninth session).
        so.add_session_config_entry("session.force_spinning_stop", "1")
        if which in ("sparse", "mask"):
            # every edit has other tile counts, so other shapes: ONNX Runtime would keep one memory
            # pattern per shape and grow for hours in a server (measured: +2.3 MB per 1,000 edits)
            so.enable_mem_pattern = False
        return so

    def session(self, which: str):
        """The ``InferenceSession`` of one graph, created on first use."""
        with self._lock:
            if which not in self._sessions:
                file = self.path / self.manifest.graphs[which]
                if not file.exists():
                    raise SSICError(f"{self.path} is incomplete: {file.name} is missing; recompile the artefact")
                try:
                    self._sessions[which] = self._ort.InferenceSession(str(file), self._options(which),
                                                                       providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise SSICError(f"cannot load {file.name}: {str(exc).splitlines()[0][:300]}") from None
            return self._sessions[which]

    def reload(self, which: str) -> None:
        """Forget one graph's session so that the next run loads the file again (calibration)."""
        with self._lock:
            self._sessions.pop(which, None)
            self._ran.discard(which)

    def warm(self, which: str) -> bool:
        with self._lock:
            return which in self._ran

    def _bind_outputs(self, io, names) -> dict[str, np.ndarray]:
        """Bind ``names`` as outputs of ``io``: the model outputs (static shapes, from the manifest) into
        NumPy buffers allocated here, the rest (commit outputs: one row per active tile) to ONNX
        Runtime's allocator, to be copied out by :meth:`_fetch`. Returns the NumPy buffers by name.

        An array that views memory ONNX Runtime allocated keeps that allocator alive, and with it the
        session's whole arena, after the session is released (the SD 1.5 VAE decoder's prime arena,
        4.7 GB, stayed resident for as long as the primed state held its output image): arrays
        returned from here own their memory."""
        owned = {}
        for name in names:
            spec = self._output_specs.get(name)
            if spec is not None:
                owned[name] = np.empty(*spec)
                io.bind_ortvalue_output(name, self._ort.OrtValue.ortvalue_from_numpy(owned[name]))
            else:
                io.bind_output(name, "cpu")
        return owned

    @staticmethod
    def _fetch(values, names, owned: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``names``' arrays from the bound output ``values`` (in binding order): the buffers of
        ``owned``, copies of the others."""
        return {n: owned[n] if n in owned else np.array(v.numpy(), copy=True)
                for n, v in zip(names, values, strict=True)}

    def run_dense(self, inputs):
        sess = self.session("dense")
        io = sess.io_binding()
        for name, arr in inputs.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr))
        owned = self._bind_outputs(io, self.output_names)
        sess.run_with_iobinding(io)
        self._ran.add("dense")
        return self._fetch(io.get_outputs(), self.output_names, owned)

    def run_prime(self, inputs):
        sess = self.session("prime")
        io = sess.io_binding()
        for name, arr in inputs.items():
            io.bind_cpu_input(name, arr)
        # each cache is written straight into a buffer of its own (numpy-owned, outside the arena), which
        # the sparse graph then binds; the model's outputs come from the arena
        caches = {}
        for c in self.manifest.caches:
            value = self._ort.OrtValue.ortvalue_from_numpy(np.empty(c.shape, np.dtype(c.dtype)))
            io.bind_ortvalue_output(c.name, value)
            caches[c.name] = value
        outputs = [n for n in self.output_names if n not in caches]
        owned = self._bind_outputs(io, outputs)
        sess.run_with_iobinding(io)
        self._ran.add("prime")
        # the caches were bound first: only the outputs after them are fetched (not a copy of every cache)
        fetched = self._fetch(io.get_outputs()[len(caches):], outputs, owned)
        # a model output that is also a cache is returned as a copy: the cache's buffer is the state's
        outputs = {n: fetched[n] if n in fetched else np.array(caches[n].numpy(), copy=True)
                   for n in self.output_names}
        nbytes = self.manifest.cache_bytes()
        return outputs, caches, nbytes

    def run_sparse(self, inputs, tiles, caches, *, commit=False):
        sess = self.session("sparse")
        io = sess.io_binding()
        wanted = {i.name for i in sess.get_inputs()}
        for name, arr in inputs.items():
            if name in wanted:
                io.bind_cpu_input(name, arr)
        for name, idx in tiles.items():
            if name in wanted:
                io.bind_cpu_input(name, np.ascontiguousarray(idx, dtype=np.int64))
        for name, value in caches.items():
            if name in wanted:
                io.bind_ortvalue_input(name, value)
        # commit outputs only when asked: unfetched, ONNX Runtime computes them as the intermediates they
        # are; fetched, the edit measured a few percent slower (DDIM tiny, docs/architecture.md "Commit")
        names = self.output_names + [n for n in self.commit_names if commit and n not in self.output_names]
        owned = self._bind_outputs(io, names)
        sess.run_with_iobinding(io)
        self._ran.add("sparse")
        return self._fetch(io.get_outputs(), names, owned)

    def host_view(self, cache):
        # a CPU OrtValue's numpy() shares its buffer: writing it updates what the sparse graph binds
        return cache.numpy()

    def run_mask(self, masks):
        sess = self.session("mask")
        names = [o.name for o in sess.get_outputs()]
        # copies: arrays that view ONNX Runtime's memory would keep the session's allocator alive
        return {n: np.array(v, copy=True) for n, v in zip(names, sess.run(names, masks), strict=True)}

    def close(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._ran.clear()

    def release(self, which: str) -> None:
        with self._lock:
            self._ran.discard(which)
            if self._sessions.pop(which, None) is not None:
                _return_free_memory()


def _return_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so that a released session's
    weights and arena leave the process's resident memory instead of waiting in malloc's free lists
    (a released 3.4 GB UNet prime session gave back 1.2 GB without it). A no-op elsewhere."""
    import ctypes
    import gc
    import sys

    if not sys.platform.startswith("linux"):
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
