"""The TensorRT backend: the session's hooks run serialized engines on an NVIDIA GPU.

Caches stay resident on the device: the prime engine's cache outputs are device buffers bound
directly as the sparse engine's inputs (the engine bindings are the cache). The mask graph runs on
ONNX Runtime (CPU): the host needs the tile counts to set the sparse engine's input shapes anyway.

The backend talks to the GPU through two small interfaces, so its logic (binding shapes, tile-count
profiles, int64 -> int32 index bindings, device-resident caches) is the same code whether the engines
are real or not: :class:`Device` (allocate, upload, download) and :class:`Engine` (bindings, set an
input, query an output shape, execute). :class:`CudaDevice` and :class:`TrtEngine` wrap cuda-python
and TensorRT; the test suite drives the same backend with a host-memory device and engines that run
the artefact's ONNX graphs, so the TensorRT edit path runs in CI without a GPU.
Running real engines is verified only on a GPU host (docs/tensorrt.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ssic.artefact import Manifest
from ssic.errors import SSICError
from ssic.session import Backend, Session
from ssic.targets.trt import check_tile_count


class DeviceArray:
    """A device buffer with a NumPy ``shape`` and ``dtype``; ``handle`` is the device's own."""

    def __init__(self, device: Device, shape, dtype, handle) -> None:
        self.device, self.shape, self.dtype, self.handle = device, tuple(int(s) for s in shape), np.dtype(dtype), handle
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def download(self) -> np.ndarray:
        return self.device.download(self)


class Device(ABC):
    """Device memory: ``alloc``/``upload``/``download`` (copies are synchronous)."""

    @abstractmethod
    def alloc(self, shape, dtype) -> DeviceArray: ...

    @abstractmethod
    def upload(self, buf: DeviceArray, arr: np.ndarray) -> None: ...

    @abstractmethod
    def download(self, buf: DeviceArray) -> np.ndarray: ...

    def address(self, buf: DeviceArray) -> int:
        return int(buf.handle)


class Engine(ABC):
    """One engine's execution context."""

    #: ``[{"name", "mode": "input"|"output", "dtype", "onnx_dtype"?, "grid"?, "profile"?}]`` from the manifest
    bindings: list[dict]

    @abstractmethod
    def set_input(self, name: str, buf: DeviceArray) -> None: ...

    @abstractmethod
    def output_shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def set_output(self, name: str, buf: DeviceArray) -> None: ...

    @abstractmethod
    def execute(self) -> None: ...


# ------------------------------------------------------------------------------------- CUDA / TensorRT
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


class CudaDevice(Device):
    """cuda-python device memory on one stream."""

    def __init__(self) -> None:
        self.cudart = _cudart()
        self.stream = _check(self.cudart.cudaStreamCreate())

    def alloc(self, shape, dtype) -> DeviceArray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        ptr = _check(self.cudart.cudaMalloc(max(n, 1)))
        buf = DeviceArray(self, shape, dtype, ptr)
        return buf

    def upload(self, buf: DeviceArray, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=buf.dtype)
        c = self.cudart
        _check(c.cudaMemcpyAsync(buf.handle, arr.ctypes.data, buf.nbytes, c.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                 self.stream))
        _check(c.cudaStreamSynchronize(self.stream))

    def download(self, buf: DeviceArray) -> np.ndarray:
        out = np.empty(buf.shape, buf.dtype)
        c = self.cudart
        _check(c.cudaMemcpyAsync(out.ctypes.data, buf.handle, buf.nbytes, c.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                 self.stream))
        _check(c.cudaStreamSynchronize(self.stream))
        return out


class TrtEngine(Engine):
    """A deserialized TensorRT engine and its execution context."""

    def __init__(self, runtime, file: Path, bindings: list[dict], device: CudaDevice, what: str) -> None:
        engine = runtime.deserialize_cuda_engine(file.read_bytes())
        if engine is None:
            raise SSICError(f"{what} could not deserialize {file.name}; recompile it here")
        self.engine, self.context, self.bindings, self.device = engine, engine.create_execution_context(), bindings, device

    def set_input(self, name, buf):
        self.context.set_input_shape(name, buf.shape)
        self.context.set_tensor_address(name, self.device.address(buf))

    def output_shape(self, name):
        return tuple(self.context.get_tensor_shape(name))

    def set_output(self, name, buf):
        self.context.set_tensor_address(name, self.device.address(buf))

    def execute(self):
        if not self.context.execute_async_v3(self.device.stream):
            raise SSICError("TensorRT failed to run an engine")
        _check(self.device.cudart.cudaStreamSynchronize(self.device.stream))


# ------------------------------------------------------------------------------------- the backend
class TensorRTBackend(Backend):
    """Runs ``prime``/``sparse``/``dense`` engines; ``mask`` on ONNX Runtime."""

    name = "tensorrt"

    def __init__(self, path: Path, manifest: Manifest, engines: dict[str, Engine], device: Device,
                 mask_runner) -> None:
        self.path, self.manifest, self.engines, self.device = Path(path), manifest, engines, device
        self.mask_runner = mask_runner  # callable: {mask input: float32 [1,1,h,w]} -> {tiles input: [n, 2]}
        self.output_names = manifest.output_names
        self.cache_names = [c.name for c in manifest.caches]

    def _execute(self, graph: str, host: dict[str, np.ndarray], device: dict[str, DeviceArray]) -> dict:
        """Run one engine; ``host`` inputs are uploaded, ``device`` inputs bound as they are; returns outputs."""
        engine = self.engines[graph]
        outputs = {}
        for b in engine.bindings:
            name = b["name"]
            if b["mode"] != "input":
                continue
            if name in device:
                buf = device[name]
            elif name in host:
                arr = host[name]
                if b.get("onnx_dtype"):  # e.g. int64 tile indices bound as int32
                    arr = arr.astype(b["dtype"])
                buf = self.device.alloc(arr.shape, b["dtype"])
                self.device.upload(buf, arr)
            else:
                raise SSICError(f"no value for the {graph} engine's input '{name}'")
            engine.set_input(name, buf)
        for b in engine.bindings:
            if b["mode"] == "output":
                buf = self.device.alloc(engine.output_shape(b["name"]), b["dtype"])
                engine.set_output(b["name"], buf)
                outputs[b["name"]] = buf
        engine.execute()
        return outputs

    def run_dense(self, inputs):
        outs = self._execute("dense", inputs, {})
        return {n: outs[n].download() for n in self.output_names}

    def run_prime(self, inputs):
        outs = self._execute("prime", inputs, {})
        outputs = {n: outs[n].download() for n in self.output_names}
        caches = {n: outs[n] for n in self.cache_names}
        return outputs, caches, sum(b.nbytes for b in caches.values())

    def run_sparse(self, inputs, tiles, caches, *, commit=False):
        # caches are device buffers: a commit re-primes (Backend.host_view is None), so the engine's
        # commit outputs are never downloaded
        host = dict(inputs)
        for g in self.manifest.grids:
            idx = np.ascontiguousarray(tiles[g.tiles_input], dtype=np.int64).reshape(-1, 2)
            if idx.shape[0] == 0:
                # profiles start at 1 tile: recomputing an unchanged tile reproduces its cached value
                idx = np.zeros((1, 2), np.int64)
            check_tile_count(self.manifest, g.name, int(idx.shape[0]))
            host[g.tiles_input] = idx
        outs = self._execute("sparse", host, caches)
        return {n: outs[n].download() for n in self.output_names}

    def run_mask(self, masks):
        return self.mask_runner(masks)


def load_trt(path: Path, manifest: Manifest, *, threads: int | None = None) -> Session:
    """A :class:`ssic.session.Session` on TensorRT engines (needs an NVIDIA GPU and TensorRT)."""
    from ssic.targets.ort import OrtBackend
    from ssic.targets.trt import check_loadable

    trt = check_loadable(path, manifest)
    device = CudaDevice()
    logger = trt.module.Logger(trt.module.Logger.WARNING)
    runtime = trt.module.Runtime(logger)
    engines = {}
    for graph, entry in manifest.trt["engines"].items():
        file = Path(path) / entry["file"]
        if not file.exists():
            raise SSICError(f"{path} is incomplete: {file.name} is missing; recompile the artefact")
        engines[graph] = TrtEngine(runtime, file, entry["bindings"], device, f"{trt.flavour} {trt.version}")
    mask = OrtBackend.mask_only(path, manifest, threads=threads)
    backend = TensorRTBackend(path, manifest, engines, device, mask.run_mask)
    return Session(path, manifest, backend, threads=threads)
