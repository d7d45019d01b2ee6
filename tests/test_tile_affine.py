"""ssic::TileAffine and ssic::GroupNormAffine (a tile value's epilogue and a GroupNorm's scale/shift,
each one node) and the fuse-tile-affine and fuse-group-norm passes.

- The C++ kernels equal ``ssic.ops.tile_affine_ref`` / ``group_norm_affine_ref`` on random cases
  (every activation, narrow and wide channel counts, no rows); the GroupNorm reference equals
  ``torch.nn.functional.group_norm`` on a tensor whose sums it is given.
- On a model with GroupNorm + SiLU the default artefact has the fused ops in place of the stock forms,
  and its sparse output (and the edit after a commit) equals the artefact compiled with both passes
  disabled; a scalar Mul with no activation is left to ONNX Runtime.
- The pass on small graphs: each activation and a lone Add are fused, with ONNX Runtime's result;
  a value that is not ``[rows, C]`` and a scalar without activation are left alone.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from op_session import op_session

import ssic
from ssic import ops


@functools.cache
def _affine_session(activation: int, alpha: float) -> ort.InferenceSession:
    node = ops.make_node("TileAffine", ["x", "scale", "shift"], ["y"], activation=activation, alpha=alpha)
    return op_session(node, {"x": TensorProto.FLOAT, "scale": TensorProto.FLOAT, "shift": TensorProto.FLOAT},
                      {"y": TensorProto.FLOAT})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 3000), c=st.integers(1, 70), act=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_tile_affine_matches_reference(rows, c, act, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, c)) * 4).astype(np.float32)
    scale, shift = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    got = _affine_session(act, 0.2).run(None, {"x": x, "scale": scale, "shift": shift})[0]
    want = ops.tile_affine_ref(x, scale, shift, activation=act, alpha=0.2)
    assert got.shape == want.shape == (rows, c)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


def test_tile_affine_rejects_a_wrong_vector():
    with pytest.raises(Exception, match="scale and shift must be"):
        _affine_session(0, 0.01).run(None, {"x": np.zeros((4, 3), np.float32), "scale": np.ones(4, np.float32),
                                            "shift": np.zeros(4, np.float32)})


@functools.cache
def _gn_session(groups: int, count: int, eps: float) -> ort.InferenceSession:
    names = ["sum", "sumsq", "dsum", "dsumsq", "gamma", "beta"]
    node = ops.make_node("GroupNormAffine", names, ["new_sum", "new_sumsq", "scale", "shift"], groups=groups,
                         count=count, epsilon=eps)
    return op_session(node, dict.fromkeys(names, TensorProto.DOUBLE),
                      {"new_sum": TensorProto.DOUBLE, "new_sumsq": TensorProto.DOUBLE, "scale": TensorProto.FLOAT,
                       "shift": TensorProto.FLOAT})


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 4, 8]), per=st.integers(1, 6), hw=st.integers(2, 50), seed=st.integers(0, 2**31 - 1))
def test_group_norm_affine_is_group_norm(groups, per, hw, seed):
    """Given the sums of a tensor split into a primed part and a change, the op's scale and shift
    normalise the tensor as torch's GroupNorm does; the kernel equals the reference."""
    import torch

    rng = np.random.default_rng(seed)
    c = groups * per
    x = (rng.standard_normal((c, hw)) * 3 + rng.standard_normal((c, 1))).astype(np.float64)
    old = x + rng.standard_normal(x.shape)  # the primed tensor; the change brings it to x
    s1, s2 = old.sum(1), (old * old).sum(1)
    d1, d2 = x.sum(1) - s1, (x * x).sum(1) - s2
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    got = _gn_session(groups, per * hw, 1e-5).run(None, {"sum": s1, "sumsq": s2, "dsum": d1, "dsumsq": d2,
                                                         "gamma": gamma, "beta": beta})
    want = ops.group_norm_affine_ref(s1, s2, d1, d2, gamma, beta, groups=groups, count=per * hw, epsilon=1e-5)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-12 if g.dtype == np.float64 else 1e-6, atol=1e-9)
    torch_gn = torch.nn.functional.group_norm(torch.from_numpy(x)[None, :, :, None], groups,
                                              torch.from_numpy(gamma), torch.from_numpy(beta), 1e-5)[0, :, :, 0]
    np.testing.assert_allclose(x * got[2][:, None] + got[3][:, None], torch_gn.numpy(), rtol=1e-4, atol=1e-4)


def test_group_norm_affine_rejects_groups_that_do_not_divide():
    z = np.zeros(6)
    with pytest.raises(Exception, match="not a multiple of groups"):
        _gn_session(4, 10, 1e-5).run(None, dict.fromkeys(["sum", "sumsq", "dsum", "dsumsq", "gamma", "beta"], z))


def _model(path):
    import torch

    from ssic.models.export import export_module_to_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.norm = torch.nn.GroupNorm(4, 16)
            self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

        def forward(self, x):
            h = self.norm(self.a(x))
            h = torch.nn.functional.silu(h)
            # * 0.5 becomes a [C] factor of the output's tiles (fused); 0.1 * x stays a scalar Mul
            return self.out(h) * 0.5 + 0.1 * x

    torch.manual_seed(0)
    x = np.random.default_rng(0).random((1, 3, 32, 32), np.float32)
    return export_module_to_file(Net().eval(), {"x": x}, ["y"], path)


def test_fused_epilogues_equal_the_stock_form(tmp_path):
    from ssic.bench import edited_inputs, example_inputs
    from ssic.masks import brush_stroke_mask

    model = _model(tmp_path / "gn.onnx")
    opts = dict(tile=4, sparse_min_res=8)
    fused = ssic.compile(model, output_dir=tmp_path / "fused.ssic", **opts)
    plain = ssic.compile(model, output_dir=tmp_path / "plain.ssic",
                         disabled_passes=["fuse-tile-affine", "fuse-group-norm"], **opts)
    ops_fused = [n.op_type for n in onnx.load(str(fused / "sparse.onnx"), load_external_data=False).graph.node]
    ops_plain = [n.op_type for n in onnx.load(str(plain / "sparse.onnx"), load_external_data=False).graph.node]
    assert "TileAffine" not in ops_plain and "GroupNormAffine" not in ops_plain
    assert ops_fused.count("TileAffine") == 2
    assert ops_fused.count("Mul") == 1  # the scalar Mul without an activation: ONNX Runtime's fast path
    assert ops_fused.count("GroupNormAffine") == 1
    assert "Sigmoid" not in ops_fused and "Sqrt" not in ops_fused and "Sigmoid" in ops_plain
    assert len(ops_fused) < len(ops_plain)
    outs = []
    for art in (fused, plain):
        sess = ssic.load(art, threads=2)
        inputs = example_inputs(sess.manifest, seed=0)
        sess.prime(inputs)
        mask = brush_stroke_mask(32, 32, 0.1, seed=1)
        outs.append(sess.edit(edited_inputs(sess.manifest, inputs, mask), mask=mask, mode="sparse")["y"])
        sess.commit()  # the GroupNorm sums the fused node outputs are what a commit stores
        outs.append(sess.edit(inputs, mode="sparse")["y"])
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1], outs[3], rtol=1e-5, atol=1e-5)


def _chain(tail: str, x_shape, vec=(4,)):
    """A graph ``x -> Mul(x, s) -> Add(., b) -> tail`` (tail: relu, leaky, swish, none, add-only, scalar)."""
    from onnx import helper

    c = x_shape[-1]
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("s", TensorProto.FLOAT, vec, rng.standard_normal(vec).astype(np.float32).ravel()),
             helper.make_tensor("b", TensorProto.FLOAT, (c,), rng.standard_normal(c).astype(np.float32))]
    if tail == "add-only":
        nodes = [helper.make_node("Add", ["x", "b"], ["y"])]
    elif tail == "scalar":
        nodes = [helper.make_node("Mul", ["x", "s"], ["y"])]
    else:
        nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"])]
        nodes += {"relu": [helper.make_node("Relu", ["a"], ["y"])],
                  "leaky": [helper.make_node("LeakyRelu", ["a"], ["y"], alpha=0.3)],
                  "swish": [helper.make_node("Sigmoid", ["a"], ["g"]), helper.make_node("Mul", ["a", "g"], ["y"])],
                  "none": [helper.make_node("Identity", ["a"], ["y"])]}[tail]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=ops.opset_imports(), ir_version=10)


@pytest.mark.parametrize("tail,x_shape,vec,fused", [
    ("relu", [37, 4], (4,), True), ("leaky", [37, 4], (4,), True), ("swish", [37, 4], (4,), True),
    ("none", [37, 4], (4,), True), ("add-only", [37, 4], (4,), True), ("relu", [37, 4], (), True),
    ("scalar", [37, 4], (), False), ("relu", [1, 4, 6, 4], (4,), False)])
def test_fuse_tile_affine_pass(tail, x_shape, vec, fused):
    import onnx_ir as ir

    from ssic.library import get_library_path
    from ssic.passes.fuse_tile_affine import FuseTileAffinePass

    proto = _chain(tail, x_shape, vec)
    model = ir.serde.deserialize_model(proto)
    FuseTileAffinePass()(model)
    after = ir.serde.serialize_model(model)
    kinds = [n.op_type for n in after.graph.node]
    assert ("TileAffine" in kinds) == fused
    if fused:
        assert not {"Mul", "Add", "Relu", "LeakyRelu", "Sigmoid"} & set(kinds)
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32) * 3
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    got = ort.InferenceSession(after.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
