"""Running TensorRT artefacts: the ``prime``/``edit``/``dense`` API of :mod:`ssic.runtime` on engines.

Verified only on a GPU host (see docs/tensorrt.md): this machine has no GPU, so only the refusal
path of :func:`ssic.targets.trt.load` runs in the tests here. Caches stay resident on the device:
the prime engine's cache outputs are device buffers bound directly as the sparse engine's inputs.
Device memory and copies use cuda-python (``pip install cuda-python``). The mask graph runs on
ONNX Runtime (CPU): the host needs the tile counts to set the sparse engine's input shapes anyway.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ssic.errors import SSICError
from ssic.runtime import EditStats, Session, _CacheState
from ssic.targets.trt import TensorRT, check_tile_count


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise SSICError("running TensorRT engines needs cuda-python: pip install cuda-python") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise SSICError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class _DeviceArray:
    """A device buffer with a NumPy shape and dtype."""

    def __init__(self, cudart, shape, dtype) -> None:
        self.cudart, self.shape, self.dtype = cudart, tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = _check(cudart.cudaMalloc(max(self.nbytes, 1)))

    def upload(self, arr: np.ndarray, stream) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        _check(self.cudart.cudaMemcpyAsync(self.ptr, arr.ctypes.data, self.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        _check(self.cudart.cudaStreamSynchronize(stream))

    def download(self, stream) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        _check(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _check(self.cudart.cudaStreamSynchronize(stream))
        return out

    def __del__(self) -> None:
        try:
            self.cudart.cudaFree(self.ptr)
        except Exception:
            pass


class TRTSession(Session):
    """A loaded TensorRT artefact; create with :func:`ssic.targets.trt.load`."""

    def __init__(self, path: Path, manifest: dict, trt: TensorRT, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path, self.manifest, self.trt, self.threads = Path(path), manifest, trt, threads
        self._ort = ort
        self._options = ort.SessionOptions
        self._sessions: dict[str, object] = {}
        self._lock = threading.RLock()
        self._states: dict[object, _CacheState] = {}
        self.inputs = {i["name"]: i for i in manifest["inputs"]}
        self.output_names = [o["name"] for o in manifest["outputs"]]
        self.grids = manifest["grids"]
        self.mask_spec = manifest["mask"]
        self.last = EditStats()
        self._cudart = _cudart()
        self._stream = _check(self._cudart.cudaStreamCreate())
        logger = trt.module.Logger(trt.module.Logger.WARNING)
        self._runtime = trt.module.Runtime(logger)
        self._engines, self._contexts, self._bindings = {}, {}, {}
        for graph, entry in manifest["trt"]["engines"].items():
            file = self.path / entry["file"]
            if not file.exists():
                raise SSICError(f"{self.path} is incomplete: {file.name} is missing; recompile the artefact")
            engine = self._runtime.deserialize_cuda_engine(file.read_bytes())
            if engine is None:
                raise SSICError(f"{trt.flavour} {trt.version} could not deserialize {file.name}; recompile it here")
            self._engines[graph] = engine
            self._contexts[graph] = engine.create_execution_context()
            self._bindings[graph] = {b["name"]: b for b in entry["bindings"]}
        self._session("mask")

    def _session(self, which: str):
        if which != "mask":
            raise SSICError(f"the TensorRT session runs {which} as an engine, not with ONNX Runtime")
        return super()._session(which)

    def _execute(self, graph: str, host: dict[str, np.ndarray], device: dict[str, _DeviceArray]) -> dict:
        """Run one engine; ``host`` inputs are uploaded, ``device`` inputs bound as they are; returns outputs."""
        ctx, keep = self._contexts[graph], []
        outputs = {}
        for name, b in self._bindings[graph].items():
            if b["mode"] == "input":
                if name in device:
                    buf = device[name]
                elif name in host:
                    arr = host[name]
                    if b.get("onnx_dtype"):  # e.g. int64 tile indices bound as int32
                        arr = arr.astype(b["dtype"])
                    buf = _DeviceArray(self._cudart, arr.shape, b["dtype"])
                    buf.upload(arr, self._stream)
                    keep.append(buf)
                else:
                    raise SSICError(f"no value for the {graph} engine's input '{name}'")
                ctx.set_input_shape(name, buf.shape)
                ctx.set_tensor_address(name, int(buf.ptr))
        for name, b in self._bindings[graph].items():
            if b["mode"] == "output":
                buf = _DeviceArray(self._cudart, tuple(ctx.get_tensor_shape(name)), b["dtype"])
                ctx.set_tensor_address(name, int(buf.ptr))
                outputs[name] = buf
        if not ctx.execute_async_v3(self._stream):
            raise SSICError(f"TensorRT failed to run the {graph} engine")
        _check(self._cudart.cudaStreamSynchronize(self._stream))
        return outputs

    def dense(self, inputs: dict) -> dict[str, np.ndarray]:
        """Run the plain model engine; returns ``{output name: array}``."""
        outs = self._execute("dense", self._check_inputs(inputs), {})
        return {n: outs[n].download(self._stream) for n in self.output_names}

    def prime(self, inputs: dict, cache_id: object = 0) -> dict[str, np.ndarray]:
        """Run the prime engine, keep its caches on the device under ``cache_id``; returns the outputs."""
        arrays = self._check_inputs(inputs)
        outs = self._execute("prime", arrays, {})
        outputs = {n: outs[n].download(self._stream) for n in self.output_names}
        caches = {c["name"]: outs[c["name"]] for c in self.manifest["caches"]}
        nbytes = sum(b.nbytes for b in caches.values())
        with self._lock:
            self._states[cache_id] = _CacheState({k: v.copy() for k, v in arrays.items()}, outputs, caches, nbytes)
        return {k: v.copy() for k, v in outputs.items()}

    def _run_sparse(self, arrays, tiles, state: _CacheState) -> dict[str, np.ndarray]:
        host = dict(arrays)
        for g in self.grids:
            idx = np.ascontiguousarray(tiles[g["name"]], dtype=np.int64).reshape(-1, 2)
            if idx.shape[0] == 0:
                # profiles start at 1 tile: recomputing an unchanged tile reproduces its cached value
                idx = np.zeros((1, 2), np.int64)
            check_tile_count(self.manifest, g["name"], int(idx.shape[0]))
            host[g["tiles_input"]] = idx
        outs = self._execute("sparse", host, state.caches)
        return {n: outs[n].download(self._stream) for n in self.output_names}
