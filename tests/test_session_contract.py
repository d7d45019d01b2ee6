"""The session contract, run against every backend: ONNX Runtime, and the TensorRT backend on a fake
GPU (host-memory device, engines that run the artefact's ONNX graphs).

The fake replaces only what needs a GPU: device memory and engine execution. Everything else of the
TensorRT backend runs as on a GPU host: bindings from the manifest, int64 tile indices bound as int32,
the one-tile minimum of the optimisation profiles, the tile-count check, and caches kept as device
buffers bound directly as the sparse engine's inputs.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import ssic
from ssic.artefact import read_manifest
from ssic.errors import SSICError
from ssic.session import Session
from ssic.targets.ort import OrtBackend
from ssic.targets.trt_session import Device, DeviceArray, Engine, TensorRTBackend

H = W = 32


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.nn.functional.leaky_relu(self.c0(x), 0.2)
        d = self.c1(torch.relu(self.down(h)))
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return torch.tanh(self.out(torch.cat([u, h], 1)))


# ------------------------------------------------------------------ the fake GPU
class HostDevice(Device):
    def __init__(self) -> None:
        self.allocated = 0

    def alloc(self, shape, dtype):
        self.allocated += 1
        return DeviceArray(self, shape, dtype, np.zeros(shape, dtype))

    def upload(self, buf, arr):
        buf.handle[...] = np.asarray(arr, buf.dtype)

    def download(self, buf):
        return buf.handle.copy()

    def address(self, buf):
        return id(buf.handle)


class OnnxEngine(Engine):
    """An 'engine' that runs an ONNX graph with ONNX Runtime on the values bound to it."""

    def __init__(self, path, bindings, fused: bool) -> None:
        from ssic.library import make_session_options

        so = make_session_options(1) if fused else ort.SessionOptions()
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.onnx_types = {i.name: i.type for i in self.sess.get_inputs()}
        self.bindings = bindings
        self.inputs: dict[str, DeviceArray] = {}
        self.outputs: dict[str, DeviceArray] = {}
        self.results: dict[str, np.ndarray] | None = None
        self.bound_ids: set[int] = set()

    def set_input(self, name, buf):
        self.inputs[name] = buf
        self.bound_ids.add(id(buf))
        self.results = None

    def _run(self):
        if self.results is None:
            feeds = {}
            for n, b in self.inputs.items():
                v = b.handle
                if self.onnx_types[n] == "tensor(int64)":
                    v = v.astype(np.int64)
                feeds[n] = v
            names = [o.name for o in self.sess.get_outputs()]
            self.results = dict(zip(names, self.sess.run(names, feeds), strict=True))
        return self.results

    def output_shape(self, name):
        return self._run()[name].shape

    def set_output(self, name, buf):
        self.outputs[name] = buf

    def execute(self):
        for name, buf in self.outputs.items():
            buf.handle[...] = self._run()[name]
        self.results = None


def fake_trt_session(art) -> Session:
    """The artefact loaded through the TensorRT backend on the fake GPU (a 'trt' manifest as the
    TensorRT build records it: tile inputs bound as int32, profiles over the tile count)."""
    manifest = read_manifest(art)
    grids = {g.tiles_input: g for g in manifest.grids}
    engines_rec, engines = {}, {}
    device = HostDevice()
    for graph in ("prime", "sparse", "dense"):
        sess = ort.InferenceSession(str(art / manifest.graphs[graph]),
                                    __import__("ssic.library").library.make_session_options(1)
                                    if graph != "dense" and manifest.lowering == "fused" else ort.SessionOptions(),
                                    providers=["CPUExecutionProvider"])
        bindings = []
        for v in sess.get_inputs():
            b = {"name": v.name, "mode": "input", "dtype": "float32"}
            if v.name in grids:
                g = grids[v.name]
                b.update(dtype="int32", onnx_dtype="int64", grid=g.name,
                         profile={"min": [1, 2], "opt": [1, 2], "max": [g.num_cells, 2]})
            elif v.type == "tensor(double)":
                b["dtype"] = "float64"
            bindings.append(b)
        for v in sess.get_outputs():
            bindings.append({"name": v.name, "mode": "output",
                             "dtype": "float64" if v.type == "tensor(double)" else "float32"})
        engines_rec[graph] = {"file": f"{graph}.fake.engine", "bindings": bindings}
        engines[graph] = OnnxEngine(art / manifest.graphs[graph], bindings,
                                    fused=graph != "dense" and manifest.lowering == "fused")
    manifest = manifest.model_copy(update={"target": "trt", "trt": {"flavour": "fake", "version": "0",
                                                                    "engines": engines_rec}})
    mask = OrtBackend.mask_only(art, manifest, threads=1)
    return Session(art, manifest, TensorRTBackend(art, manifest, engines, device, mask.run_mask))


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    path = tmp / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, H, W),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    return {lowering: ssic.compile(path, lowering=lowering, output_dir=tmp / f"{lowering}.ssic", exact=True, tile=2)
            for lowering in ("fused", "standard")}


BACKENDS = {"onnxruntime": lambda art: ssic.load(art, threads=1), "tensorrt-fake": fake_trt_session}


@pytest.fixture(params=[(b, lw) for b in BACKENDS for lw in ("fused", "standard")], ids=lambda p: f"{p[0]}-{p[1]}")
def session(request, artefacts):
    backend, lowering = request.param
    return BACKENDS[backend](artefacts[lowering])


def _inputs(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 3, H, W)).astype(np.float32)


def test_prime_equals_dense(session):
    x = _inputs()
    np.testing.assert_allclose(session.prime({"x": x})["y"], session.dense({"x": x})["y"], atol=1e-6)
    assert session.cache_bytes() > 0


@pytest.mark.parametrize("box", [(0, 0, 3, 3), (10, 12, 6, 4), (28, 27, 4, 5), (0, 0, H, W)])
def test_exact_edit_equals_dense(session, box):
    x = _inputs()
    session.prime({"x": x})
    y0, x0, bh, bw = box
    edited = x.copy()
    edited[:, :, y0:y0 + bh, x0:x0 + bw] += 1.5
    out = session.edit({"x": edited}, mode="sparse")["y"]
    assert session.last.mode == "sparse"
    np.testing.assert_allclose(out, session.dense({"x": edited})["y"], atol=1e-4)


def test_empty_edit_returns_the_cached_output(session):
    x = _inputs()
    primed = session.prime({"x": x})["y"]
    out = session.edit({"x": x.copy()})
    assert session.last.mode == "cached"
    np.testing.assert_array_equal(out["y"], primed)


def test_commit_chain_equals_fresh_prime(session):
    x = _inputs()
    session.prime({"x": x})
    cur = x
    for i in range(3):
        nxt = cur.copy()
        nxt[:, :, 4 * i:4 * i + 5, 6:12] -= 0.7
        session.edit({"x": nxt}, mode="sparse")
        session.commit()
        cur = nxt
    final = cur.copy()
    final[:, :, 20:24, 20:24] += 1.0
    out = session.edit({"x": final}, mode="sparse")["y"]
    np.testing.assert_allclose(out, session.dense({"x": final})["y"], atol=1e-4)


def test_user_errors_are_one_line(session):
    with pytest.raises(SSICError, match="before prime"):
        session.edit({"x": _inputs()})
    session.prime({"x": _inputs()}, cache_id="a")
    with pytest.raises(SSICError, match="unknown cache id"):
        session.edit({"x": _inputs()}, cache_id="b")
    with pytest.raises(SSICError, match="shape"):
        session.edit({"x": np.zeros((1, 3, 8, 8), np.float32)}, cache_id="a")
    with pytest.raises(SSICError, match="mask has shape"):
        session.edit({"x": _inputs()}, mask=np.ones((5, 5), bool), cache_id="a")
    with pytest.raises(SSICError, match="unknown mode"):
        session.edit({"x": _inputs()}, cache_id="a", mode="fast")


def test_trt_caches_stay_on_the_device_and_are_bound_directly(artefacts):
    sess = fake_trt_session(artefacts["fused"])
    x = _inputs()
    sess.prime({"x": x})
    caches = sess._states[0].caches
    assert caches and all(isinstance(v, DeviceArray) for v in caches.values())
    engine = sess.backend.engines["sparse"]
    engine.bound_ids.clear()
    edited = x.copy()
    edited[:, :, 5:9, 5:9] = 0
    sess.edit({"x": edited}, mode="sparse")
    assert {id(v) for v in caches.values()} <= engine.bound_ids  # no copy of any cache
    tiles = [b for b in engine.bindings if b.get("grid")]
    assert tiles and all(engine.inputs[b["name"]].dtype == np.int32 for b in tiles)
