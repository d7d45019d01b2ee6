"""The compiler core on small hand-built graphs: exactness, prime == dense, graph structure, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ssic
from ssic.artefact import read_manifest
from ssic.errors import SSICError


class ConvNet(torch.nn.Module):
    """A residual conv generator: 3x3, 1x1 shortcut, stride-2 down, nearest-up, concat, leaky/swish/tanh."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.up = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.short = torch.nn.Conv2d(16, 8, 1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)
        self.gn = torch.nn.GroupNorm(4, 8) if norm else None
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.c0(x)
        a = self.gn(h) if self.gn is not None else self.bn(h)
        h1 = self.c1(torch.nn.functional.silu(a)) + h
        d = self.c3(torch.nn.functional.leaky_relu(self.down(h1), 0.2))
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        u = self.up(u) + self.short(u) + h1
        return torch.tanh(self.out(torch.cat([u, h1], 1)))


def export(tmp_path, net: torch.nn.Module, shape, name="net.onnx"):
    net = net.eval()
    path = tmp_path / name
    torch.onnx.export(net, (torch.zeros(shape),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    return path


class _Artefacts(dict):
    """Compiled ConvNet artefacts by (size, lowering), built on first use."""

    def __init__(self, tmp):
        super().__init__()
        self.tmp = tmp

    def __missing__(self, key):
        size, lowering = key
        onnx_path = self.tmp / f"net_{size[0]}x{size[1]}.onnx"
        if not onnx_path.exists():
            export(self.tmp, ConvNet(), (1, 3, *size), onnx_path.name)
        art = self.tmp / f"net_{size[0]}x{size[1]}_{lowering}.ssic"
        ssic.compile(onnx_path, lowering=lowering, output_dir=art, exact=True, sparse_min_res=16, tile=4)
        self[key] = art
        return art


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return _Artefacts(tmp_path_factory.mktemp("nets"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("lowering", ["fused", "standard"])
@pytest.mark.parametrize("size", [(64, 64), (50, 38)])
def test_exact_mode_equals_dense_on_random_masks(nets, lowering, size, data):
    """--exact on a graph without global ops: sparse == dense-on-edited within 1e-4, border masks included."""
    sess = ssic.load(nets[(size, lowering)], threads=1)
    h, w = size
    seed = data.draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
    sess.prime({"x": x})
    y0 = data.draw(st.integers(-3, h - 1))
    x0 = data.draw(st.integers(-3, w - 1))
    bh, bw = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    mask = np.zeros((h, w), bool)
    mask[max(y0, 0):max(y0 + bh, 0), max(x0, 0):max(x0 + bw, 0)] = True
    edited = x.copy()
    edited[:, :, mask] += rng.standard_normal((3, int(mask.sum()))).astype(np.float32)
    out = sess.edit({"x": edited}, mode="sparse")["y"]
    ref = sess.dense({"x": edited})["y"]
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    if not mask.any():
        assert sess.last.mode == "cached"


def test_prime_equals_dense(nets):
    sess = ssic.load(nets[((64, 64), "fused")])
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(sess.prime({"x": x})["y"], sess.dense({"x": x})["y"])


def test_graph_structure(nets):
    """Every conv is sparse; TileConv (gather fused with its MatMul; one per part of a concat) per
    non-1x1 conv, no unfused gather or Gemm chain, no full-res Conv left."""
    art = nets[((64, 64), "fused")]
    manifest = read_manifest(art).model_dump()
    assert all(layer["sparse"] for layer in manifest["layers"]), manifest["layers"]
    sparse = onnx.load(str(art / "sparse.onnx"))
    ops = [n.op_type for n in sparse.graph.node]
    assert ops.count("Conv") == 0
    assert ops.count("MatMul") + ops.count("TileConv") >= len(manifest["layers"])
    assert ops.count("Gemm") == 0
    assert ops.count("TileConv") >= sum(1 for layer in manifest["layers"] if not layer["kind"].startswith("1x1"))
    assert ops.count("TileGather") == 0
    assert ops.count("TileScatter") == 1  # only the output is materialised
    standard = onnx.load(str(nets[((64, 64), "standard")] / "sparse.onnx"))
    assert not any(n.domain == "ssic" for n in standard.graph.node)
    names = {i.name for i in sparse.graph.input}
    for cache in manifest["caches"]:
        assert cache["name"] in names
    prime = onnx.load(str(art / "prime.onnx"))
    assert {c["name"] for c in manifest["caches"]} <= {o.name for o in prime.graph.output}


def test_default_mode_with_groupnorm_runs_and_is_local(tmp_path):
    """GroupNorm uses cached statistics: close to dense inside the edit, untouched outside."""
    path = export(tmp_path, ConvNet(norm=True), (1, 3, 64, 64))
    art = ssic.compile(path, output_dir=tmp_path / "gn.ssic", sparse_min_res=16, tile=4, mask_radius=1)
    sess = ssic.load(art)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    base = sess.prime({"x": x})["y"]
    edited = x.copy()
    edited[:, :, 20:26, 30:36] += 1.0
    out = sess.edit({"x": edited}, mode="sparse")["y"]
    assert sess.last.mode == "sparse" and 0 < sess.last.active_fraction < 0.5
    changed = np.abs(out - base).max(axis=1)[0] > 0
    ys, xs = np.nonzero(changed)
    assert ys.min() >= 8 and ys.max() < 40 and xs.min() >= 16 and xs.max() < 52


def test_every_block_active_batchnorm_model_equals_dense(nets):
    """Forced sparse with an all-ones mask on a BatchNorm (exact affine) graph equals dense."""
    sess = ssic.load(nets[((64, 64), "fused")])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    sess.prime({"x": x})
    x2 = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    out = sess.edit({"x": x2}, mask=np.ones((64, 64), bool), mode="sparse")["y"]
    np.testing.assert_allclose(out, sess.dense({"x": x2})["y"], atol=1e-4)
    assert sess.last.active_fraction == 1.0


# ---------------------------------------------------------------------------- bad input


def test_model_without_convolutions(tmp_path):
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, tmp_path / "relu.onnx")
    with pytest.raises(SSICError, match="no 2-D convolution"):
        ssic.compile(tmp_path / "relu.onnx", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape,match", [((2, 3, 32, 32), "batch 2"), (("n", 3, 32, 32), "dynamic")])
def test_batch_and_dynamic_shapes_rejected(tmp_path, shape, match):
    w = onnx.numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    g = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                               [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [shape[0], 4, 32, 32])], [w])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(SSICError, match=match):
        ssic.compile(tmp_path / "m.onnx", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_not_onnx_and_missing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01")
    with pytest.raises(SSICError, match="not a readable ONNX model|not a valid ONNX"):
        ssic.compile(bad, output_dir=tmp_path / "o")
    with pytest.raises(SSICError, match="not found"):
        ssic.compile(tmp_path / "missing.onnx", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_session_errors_keep_caches(nets):
    sess = ssic.load(nets[((64, 64), "fused")])
    x = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(SSICError, match="before prime"):
        sess.edit({"x": x})
    base = sess.prime({"x": x})["y"]
    with pytest.raises(SSICError, match=r"shape \[1, 3, 32, 32\], expected \[1, 3, 64, 64\]"):
        sess.edit({"x": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(SSICError, match="mask has shape"):
        sess.edit({"x": x}, mask=np.ones((10, 10), bool))
    with pytest.raises(SSICError, match="non-finite"):
        sess.edit({"x": np.full((1, 3, 64, 64), np.nan, np.float32)})
    with pytest.raises(SSICError, match="unknown cache id"):
        sess.edit({"x": x}, cache_id=7)
    with pytest.raises(SSICError, match="missing input"):
        sess.edit({})
    # the session survived: an empty edit returns the primed output
    np.testing.assert_array_equal(sess.edit({"x": x})["y"], base)
    assert sess.last.mode == "cached"
