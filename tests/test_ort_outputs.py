"""Arrays the ONNX Runtime backend returns own their memory.

An array that views memory ONNX Runtime allocated (``OrtValue.numpy()``, ``InferenceSession.run``)
keeps that allocator alive, and with it the session's whole arena, after the session is released:
the SD 1.5 VAE decoder's primed state held its output image, and so 4.7 GB of prime arena, for the
rest of a latent edit.
"""

from __future__ import annotations

import numpy as np
import pytest

import ssic
from tests.test_cost_model import export_two_convs


def _root(a: np.ndarray):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def _owned(a: np.ndarray) -> bool:
    """Whether ``a``'s memory belongs to NumPy (the root of its ``base`` chain is an ndarray that owns
    its data), not to an object such as ONNX Runtime's PyCapsule."""
    root = _root(a)
    return isinstance(root, np.ndarray) and root.flags.owndata


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    d = tmp_path_factory.mktemp("owned")
    return ssic.load(ssic.compile(export_two_convs(d / "n.onnx"), output_dir=d / "n.ssic", exact=True))


def test_onnx_runtime_arrays_view_its_memory():
    """The premise: without a copy, ONNX Runtime's outputs are views of its allocations."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not _owned(s.run(None, {"x": np.ones(4, np.float32)})[0])


def test_every_returned_array_owns_its_memory(session):
    backend = session.backend
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    outs = backend.run_dense({"x": x})
    assert outs and all(_owned(v) for v in outs.values())
    prime_out, caches, _ = backend.run_prime({"x": x})
    assert all(_owned(v) for v in prime_out.values())
    session.prime({"x": x})
    edited = x.copy()
    edited[..., 4:12, 4:12] += 1
    session.keep_commit_tiles = True
    out = session.edit({"x": edited}, mode="sparse")
    assert session.last.mode == "sparse"
    assert all(_owned(v) for v in out.values())
    record = session._last_edit[0]
    assert record.updates and all(_owned(v) for v in record.updates.values())  # the commit tiles
    state = session._states[0]
    assert all(_owned(v) for v in state.outputs.values())
    masks = backend.run_mask({n: np.ones((1, 1, 32, 32), np.float32) for n in
                              [i.name for i in backend.session("mask").get_inputs()]})
    assert all(_owned(v) for v in masks.values())
    # the results are those of the model: the dense output equals the prime's
    np.testing.assert_allclose(prime_out["y"], outs["y"], atol=1e-5)


def test_prime_runs_without_the_arena_when_its_caches_are_large(session, monkeypatch):
    """ONNX Runtime's arena grows by doubling: beside caches of over a quarter of the machine's memory
    it did not fit (Real-ESRGAN x4plus at 512x512 input, 8.3 GB of caches on 24 GB: killed)."""
    import ssic.targets.ort as ort_backend

    backend = session.backend
    assert backend._options("prime").enable_cpu_mem_arena  # small caches: the arena serves
    monkeypatch.setattr(ort_backend, "physical_memory", lambda: 3 * session.manifest.cache_bytes())
    assert not backend._options("prime").enable_cpu_mem_arena
    assert backend._options("sparse").enable_cpu_mem_arena  # only the prime gives it up
    monkeypatch.setattr(ort_backend, "physical_memory", lambda: 0)  # unknown: keep the arena
    assert backend._options("prime").enable_cpu_mem_arena


def test_every_session_stops_spinning_after_its_run(session):
    """ONNX Runtime's intra-op threads spin for work after a run; the mask graph's and a dense run's
    spinners took a core from the sparse run after them (OIDN 512x512, a 1.2% edit: 20.6 ms right after
    a dense run, 12.3 ms with the spinning stopped; BENCHMARKS.md, ninth session). Every session the
    backend creates stops them when its run ends."""
    for which in ("dense", "prime", "sparse", "mask"):
        so = session.backend._options(which)
        assert so.get_session_config_entry("session.force_spinning_stop") == "1", which
