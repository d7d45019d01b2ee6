"""Legacy and foreign exports compile into artefacts that load (issue 12, section 3).

Each failing input of the issue is one test, built here: torch's TorchScript exporter at opset 17
(GroupNorm decomposed into Reshape/InstanceNormalization/Reshape, ``F.pad`` computed in the graph),
an opset-18 ``GroupNormalization`` node, a dynamic batch fixed by ``input_shapes`` /
``--input-shape``, and a missing external-data file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import ssic
from ssic.errors import SSICError
from ssic.passes.normalize import MIN_OPSET, load_model, parse_input_shape

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

HW = 64


def _export(module, path: Path, *, opset: int = 17, dynamic_batch: bool = False) -> Path:
    torch.manual_seed(0)
    x = torch.randn(1, 3, HW, HW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), input_names=["x"], output_names=["y"],
                          opset_version=opset, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None)
    return path


class GroupNormNet(nn.Module):
    """Conv -> GroupNorm(2, 8) -> SiLU -> Conv (the issue's smallest failing input)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.gn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():  # non-trivial affine so a wrong scale/shift shows
            self.gn.weight.uniform_(0.5, 1.5)
            self.gn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.c2(F.silu(self.gn(self.c1(x))))


class PadNet(nn.Module):
    """conv -> F.pad(h, (0, 1, 0, 1)) -> 3x3 stride-2 conv -> nearest x2 -> conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = F.pad(self.c1(x), (0, 1, 0, 1))
        h = F.interpolate(self.c2(h), scale_factor=2.0, mode="nearest")
        return self.c3(h)


def _manifest(art: Path) -> dict:
    """The artefact's manifest.json as plain JSON (independent of the runtime's manifest type)."""
    return json.loads((Path(art) / "manifest.json").read_text())


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, HW, HW)).astype(np.float32)
    edited = x.copy()
    edited[:, :, 20:30, 24:36] += 1.0
    return x, edited


def _graphs_load_in_ort(art: Path, lowering: str = "fused") -> None:
    """The artefact's stock-ONNX graphs (dense and mask; prime and sparse too with the standard lowering:
    the fused one writes the prime's NHWC caches with ssic::CacheStore) pass the ONNX checker and load
    in a plain ONNX Runtime session, without ssic's op library."""
    for name in ("dense", "mask") + (("prime", "sparse") if lowering == "standard" else ()):
        proto = onnx.load(str(art / f"{name}.onnx"))
        onnx.checker.check_model(proto)
        ort.InferenceSession(str(art / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _check_edits(art: Path, *, exact: bool) -> dict[str, float]:
    sess = ssic.load(art, threads=1)
    x, edited = _inputs()
    base = sess.prime({"x": x})["y"]
    np.testing.assert_allclose(base, sess.dense({"x": x})["y"], atol=1e-5)
    want = sess.dense({"x": edited})["y"]
    rng = float(want.max() - want.min())
    got = sess.edit({"x": edited}, mode="sparse")["y"]
    assert sess.last.mode == "sparse"
    full = sess.edit({"x": edited}, mask=np.ones((HW, HW), bool), mode="sparse")["y"]
    errs = {"edit": float(np.abs(got - want).max()) / rng, "all_tiles": float(np.abs(full - want).max()) / rng}
    assert errs["all_tiles"] < 1e-5, errs  # every tile recomputed (incremental GroupNorm stats): dense
    if exact:
        assert errs["edit"] < 1e-5, errs
    return errs


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy")
    return {"gn17": _export(GroupNormNet(), d / "gn17.onnx"), "pad17": _export(PadNet(), d / "pad17.onnx"),
            "gn17_dyn": _export(GroupNormNet(), d / "gn17_dyn.onnx", dynamic_batch=True), "dir": d}


@pytest.mark.parametrize("lowering,exact", [("fused", False), ("fused", True), ("standard", False)])
def test_groupnorm_opset17_compiles_loads_and_matches_dense(legacy, tmp_path, lowering, exact):
    src = onnx.load(str(legacy["gn17"]))
    assert src.opset_import[0].version == 17 and "InstanceNormalization" in {n.op_type for n in src.graph.node}
    art = ssic.compile(legacy["gn17"], output_dir=tmp_path / "gn.ssic", lowering=lowering, exact=exact)
    _graphs_load_in_ort(art, lowering)
    manifest = _manifest(art)
    assert manifest["opsets"]["ai.onnx"] >= MIN_OPSET
    assert any(layer["sparse"] for layer in manifest["layers"])
    _check_edits(art, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
def test_pad_computed_in_graph_opset17_compiles(legacy, tmp_path, exact):
    ops = {n.op_type for n in onnx.load(str(legacy["pad17"])).graph.node}
    assert {"ConstantOfShape", "Concat", "Pad"} <= ops  # the pads really are computed in the graph
    folded = load_model(legacy["pad17"])
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Pad", "Conv", "Resize", "Conv"]
    art = ssic.compile(legacy["pad17"], output_dir=tmp_path / "pad.ssic", exact=exact)
    _graphs_load_in_ort(art)
    assert sum(layer["sparse"] for layer in _manifest(art)["layers"]) == 3
    _check_edits(art, exact=exact)


def _gn18_model(path: Path, *, scale_size: int = 2) -> Path:
    """Conv(3->8) -> GroupNormalization-18 (2 groups, per-group scale/bias) -> Relu -> Conv(8->3)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n) for n, s in
             [("w1", (8, 3, 3, 3)), ("w2", (3, 8, 3, 3))]]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, scale_size).astype(np.float32), "gamma"),
              numpy_helper.from_array(rng.uniform(-0.5, 0.5, scale_size).astype(np.float32), "beta")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["h", "gamma", "beta"], ["n"], num_groups=2, epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "gn18", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, HW, HW])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, HW, HW])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


def test_opset18_group_normalization_accepted(tmp_path):
    path = _gn18_model(tmp_path / "gn18.onnx")
    with pytest.raises(onnx.checker.ValidationError, match="deprecated"):
        onnx.checker.check_model(str(path))  # what refused it before
    art = ssic.compile(path, output_dir=tmp_path / "gn18.ssic")
    _check_edits(art, exact=False)
    # ONNX Runtime's own run of the original model is the reference
    x, _ = _inputs()
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ssic.load(art, threads=1).prime({"x": x})["y"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_opset18_group_normalization_with_per_channel_scale_refused(tmp_path):
    path = _gn18_model(tmp_path / "gn18bad.onnx", scale_size=8)
    with pytest.raises(SSICError, match=r"gamma has shape \[8\].*one value per group"):
        load_model(path)


def test_dynamic_batch_fixed_by_input_shapes(legacy, tmp_path):
    with pytest.raises(SSICError, match=r"dynamic.*--input-shape x:1x3x64x64"):
        ssic.compile(legacy["gn17_dyn"], output_dir=tmp_path / "no.ssic")
    assert not (tmp_path / "no.ssic").exists()
    art = ssic.compile(legacy["gn17_dyn"], output_dir=tmp_path / "dyn.ssic", input_shapes={"x": [1, 3, HW, HW]})
    assert _manifest(art)["inputs"][0]["shape"] == [1, 3, HW, HW]
    _check_edits(art, exact=False)
    for bad, match in [({"y": [1, 3, HW, HW]}, "not a model input"), ({"x": [1, 3, HW]}, "rank 3"),
                       ({"x": [1, 3, 32, 32]}, "fixed to 64")]:
        with pytest.raises(SSICError, match=match):
            load_model(legacy["gn17_dyn"], input_shapes=bad)


def test_dynamic_batch_and_size_fixed_to_another_resolution(tmp_path):
    """Exported with every dim dynamic (n, h, w) and F.pad's pads computed from the runtime shape;
    fixed to 96x80 by input_shapes, the pads fold and the artefact is exact at 96x80."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PadNet().eval(), (torch.randn(1, 3, HW, HW),), str(tmp_path / "dyn.onnx"), input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}})
    art = ssic.compile(tmp_path / "dyn.onnx", output_dir=tmp_path / "dyn.ssic", input_shapes={"x": [1, 3, 96, 80]},
                       exact=True)
    sess = ssic.load(art, threads=1)
    assert all(layer["sparse"] for layer in _manifest(art)["layers"])
    x = np.random.default_rng(2).standard_normal((1, 3, 96, 80)).astype(np.float32)
    sess.prime({"x": x})
    edited = x.copy()
    edited[:, :, 40:50, 30:40] += 1.0
    got = sess.edit({"x": edited}, mode="sparse")["y"]
    want = sess.dense({"x": edited})["y"]
    assert got.shape == (1, 3, 96, 80) and sess.last.mode == "sparse"
    assert np.abs(got - want).max() < 1e-5 * np.ptp(want)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssic.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_cli_input_shape_inspect_and_compile(legacy, tmp_path):
    proc = _cli("inspect", legacy["gn17_dyn"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["inputs"][0]["shape"] == ["batch", 3, HW, HW]  # symbolic shapes reported
    assert report["macs_total"] > 0 and "batch 1" in report["macs_note"]
    fixed = json.loads(_cli("inspect", legacy["gn17_dyn"], "--json", "--input-shape", f"x:1x3x{HW}x{HW}").stdout)
    assert fixed["inputs"][0]["shape"] == [1, 3, HW, HW] and fixed["macs_total"] == report["macs_total"]
    proc = _cli("compile", legacy["gn17_dyn"], "-o", tmp_path / "cli.ssic", "--input-shape", f"x:1x3x{HW}x{HW}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli.ssic" / "manifest.json").exists()
    proc = _cli("compile", legacy["gn17_dyn"], "-o", tmp_path / "bad.ssic", "--input-shape", "x:1x3x64")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "rank 3" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_parse_input_shape():
    assert parse_input_shape("x:1x3x256x256") == ("x", [1, 3, 256, 256])
    assert parse_input_shape("in:0:[1, 3, 8, 8]") == ("in:0", [1, 3, 8, 8])
    for bad in ("x", "x:", "x:1x3xHx4", ":1x3"):
        with pytest.raises(SSICError, match="NAME:1x3x256x256"):
            parse_input_shape(bad)


def test_external_data_missing_file_named_and_present_file_compiles(legacy, tmp_path):
    proto = onnx.load(str(legacy["gn17"]))
    d = tmp_path / "ext"
    d.mkdir()
    onnx.save(proto, str(d / "gn.onnx"), save_as_external_data=True, location="gn.weights", size_threshold=0)
    # opset-17 with external data: converted without loading the data, then compiled
    art = ssic.compile(d / "gn.onnx", output_dir=tmp_path / "ext.ssic")
    _check_edits(art, exact=False)
    (d / "gn.weights").rename(d / "elsewhere.weights")
    with pytest.raises(SSICError, match=r"external data file 'gn\.weights'.*not found") as info:
        ssic.compile(d / "gn.onnx", output_dir=tmp_path / "missing.ssic")
    assert "\n" not in str(info.value)
    proc = _cli("inspect", d / "gn.onnx")
    assert proc.returncode == 2 and "gn.weights" in proc.stderr and "Traceback" not in proc.stderr


def test_spectral_norm_weight_expression_folded(tmp_path):
    """A conv weight computed in the graph (spectral norm: ``Div(W, sigma)``, ``sigma = u . (W_flat v)``)
    is folded to an initializer, so the conv runs sparse and stays exact."""
    rng = np.random.default_rng(5)
    nodes, inits = [], []
    chans = [3, 8, 3]
    h = "x"
    for i, (cin, cout) in enumerate(zip(chans, chans[1:], strict=False)):
        inits += [numpy_helper.from_array(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), f"w{i}_orig"),
                  numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"u{i}"),
                  numpy_helper.from_array(rng.standard_normal(cin * 9).astype(np.float32), f"v{i}"),
                  numpy_helper.from_array(np.array([cout, -1], np.int64), f"flat{i}")]
        nodes += [helper.make_node("Reshape", [f"w{i}_orig", f"flat{i}"], [f"wf{i}"]),
                  helper.make_node("MatMul", [f"wf{i}", f"v{i}"], [f"wv{i}"]),
                  helper.make_node("Mul", [f"u{i}", f"wv{i}"], [f"uwv{i}"]),
                  helper.make_node("ReduceSum", [f"uwv{i}"], [f"sigma{i}"], keepdims=0),
                  helper.make_node("Div", [f"w{i}_orig", f"sigma{i}"], [f"w{i}"]),
                  helper.make_node("Conv", [h, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1])]
        h = f"c{i}"
        if i == 0:
            nodes.append(helper.make_node("LeakyRelu", [h], ["a0"], alpha=0.2))
            h = "a0"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "sn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, HW, HW])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, HW, HW])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "sn.onnx"))
    folded = load_model(tmp_path / "sn.onnx")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "LeakyRelu", "Conv"]
    art = ssic.compile(tmp_path / "sn.onnx", output_dir=tmp_path / "sn.ssic", exact=True)
    assert all(layer["sparse"] for layer in _manifest(art)["layers"])
    _check_edits(art, exact=True)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("size,k,stride", [(13, 3, 2), (12, 4, 2), (9, 3, 1), (10, 2, 3)])
def test_auto_pad_written_as_explicit_pads(tmp_path, mode, size, k, stride):
    """tf2onnx's ``auto_pad`` becomes explicit ``pads`` with the same result in ONNX Runtime."""
    rng = np.random.default_rng(size * k)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, k, k)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad=mode, strides=[stride, stride]),
             helper.make_node("MaxPool", ["c"], ["y"], auto_pad=mode, kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(nodes, "ap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, None, None])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, str(tmp_path / "ap.onnx"))
    folded = load_model(tmp_path / "ap.onnx")
    for node in folded.graph.node:
        names = {a.name for a in node.attribute}
        assert "auto_pad" not in names and "pads" in names, node
    onnx.save(folded, str(tmp_path / "explicit.onnx"))
    x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "ap.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "explicit.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
