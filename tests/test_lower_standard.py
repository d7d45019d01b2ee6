"""The standard lowering: ssic ops expanded to stock ONNX ops equal the NumPy references.

Every model here runs on plain onnxruntime with no custom-op library registered.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ssic import ops
from ssic.passes.lower_standard import LowerToStandardPass

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _grid(h: int, w: int, t: int) -> np.ndarray:
    return np.array([(y, x) for y in range(0, h, t) for x in range(0, w, t)], np.int64).reshape(-1, 2)


def _pick(draw, grid: np.ndarray) -> np.ndarray:
    """A random subset of grid cells in row-major order; empty and full sets are drawn often."""
    mode = draw(st.sampled_from(["none", "all", "some", "some"]))
    if mode == "none":
        return grid[:0]
    if mode == "all":
        return grid
    keep = draw(st.lists(st.booleans(), min_size=len(grid), max_size=len(grid)))
    return grid[np.array(keep, bool)]


def _lower_and_run(nodes, inputs: dict[str, np.ndarray], in_shapes, outputs) -> list[np.ndarray]:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, FLOAT if inputs[n].dtype == np.float32 else INT64, shp)
         for n, shp in in_shapes.items()],
        [helper.make_tensor_value_info(n, FLOAT, shp) for n, shp in outputs.items()],
    )
    proto = helper.make_model(graph, opset_imports=ops.opset_imports(18))
    proto.ir_version = 10
    model = ir.serde.deserialize_model(proto)
    assert LowerToStandardPass()(model).modified
    lowered = ir.serde.serialize_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in lowered.graph.node)
    assert [o.domain for o in lowered.opset_import if o.domain not in ("", "ai.onnx")] == []
    assert [o.name for o in lowered.graph.output] == list(outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(lowered.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: inputs[k] for k in in_shapes})


@st.composite
def gather_case(draw):
    c = draw(st.integers(1, 5))
    hs, ws = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    ts, t = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    k, s, u = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    attrs = dict(
        src_tile=ts, tile=t, kernel=k, stride=s, upsample=u,
        pad_top=draw(st.integers(0, 2)), pad_left=draw(st.integers(0, 2)),
        activation=draw(st.sampled_from([0, 1, 2, 3])), alpha=draw(st.sampled_from([0.01, 0.2])),
        src_layout=draw(st.sampled_from([0, 1])), pad_mode=draw(st.sampled_from([0, 0, 1, 2])),
    )
    src_idx = _pick(draw, _grid(hs, ws, ts))
    ho, wo = -(-hs * u // s), -(-ws * u // s)  # output size of a "same" conv on the upsampled source
    dst_idx = _pick(draw, _grid(ho, wo, t))
    return c, hs, ws, attrs, src_idx, dst_idx, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=120, deadline=None)
@given(gather_case())
def test_tile_gather_matches_reference(case):
    c, hs, ws, attrs, src_idx, dst_idx, with_scale, with_shift, seed = case
    rng = np.random.default_rng(seed)
    ts, k = attrs["src_tile"], attrs["kernel"]
    cache = rng.standard_normal((hs, ws, c) if attrs["src_layout"] == 0 else (1, c, hs, ws)).astype(np.float32)
    inputs = {
        "tiles": rng.standard_normal((len(src_idx) * ts * ts, c)).astype(np.float32),
        "cache": cache, "src_idx": src_idx, "dst_idx": dst_idx,
        "scale": rng.standard_normal(c).astype(np.float32),
        "shift": rng.standard_normal(c).astype(np.float32),
    }
    names = ["tiles", "cache", "src_idx", "dst_idx",
             "scale" if with_scale else "", "shift" if with_shift else ""]
    shapes = {"tiles": ["m", c], "cache": list(cache.shape), "src_idx": ["ms", 2], "dst_idx": ["n", 2]}
    shapes.update({n: [c] for n in names[4:] if n})
    node = ops.make_node("TileGather", names, ["cols"], name="gather", **attrs)
    (out,) = _lower_and_run([node], inputs, shapes, {"cols": ["r", k * k * c]})
    ref = ops.tile_gather_ref(inputs["tiles"], cache, src_idx, dst_idx,
                              inputs["scale"] if with_scale else None,
                              inputs["shift"] if with_shift else None, **attrs)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@st.composite
def scatter_case(draw):
    c = draw(st.integers(1, 5))
    h, w, t = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 5))
    attrs = dict(tile=t, activation=draw(st.sampled_from([0, 1, 2, 3])), alpha=draw(st.sampled_from([0.01, 0.2])))
    return c, h, w, attrs, _pick(draw, _grid(h, w, t)), draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=80, deadline=None)
@given(scatter_case())
def test_tile_scatter_matches_reference(case):
    c, h, w, attrs, idx, with_residual, seed = case
    rng = np.random.default_rng(seed)
    rows = len(idx) * attrs["tile"] ** 2
    inputs = {
        "tiles": rng.standard_normal((rows, c)).astype(np.float32),
        "cache": rng.standard_normal((1, c, h, w)).astype(np.float32),
        "idx": idx,
        "residual": rng.standard_normal((rows, c)).astype(np.float32),
    }
    names = ["tiles", "cache", "idx"] + (["residual"] if with_residual else [])
    shapes = {"tiles": ["m", c], "cache": [1, c, h, w], "idx": ["n", 2]}
    if with_residual:
        shapes["residual"] = ["m", c]
    node = ops.make_node("TileScatter", names, ["out"], name="scatter", **attrs)
    (out,) = _lower_and_run([node], inputs, shapes, {"out": [1, c, h, w]})
    ref = ops.tile_scatter_ref(inputs["tiles"], inputs["cache"], idx,
                               inputs["residual"] if with_residual else None, **attrs)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def _chain_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """gather -> MatMul (a 3x3 conv on tiles) -> scatter with residual, at 10x10 with tile 4."""
    rng = np.random.default_rng(0)
    c, h, w, t = 3, 10, 10, 4
    idx = np.array([[0, 4], [4, 8], [8, 0]], np.int64)  # clipped tiles at the right and bottom border
    weight = rng.standard_normal((9 * c, c)).astype(np.float32)
    feeds = {
        "tiles": rng.standard_normal((len(idx) * t * t, c)).astype(np.float32),
        "cache": rng.standard_normal((h, w, c)).astype(np.float32),
        "out_cache": rng.standard_normal((1, c, h, w)).astype(np.float32),
        "idx": idx,
    }
    nodes = [
        ops.make_node("TileGather", ["tiles", "cache", "idx", "idx"], ["cols"], name="g",
                      src_tile=t, tile=t, kernel=3, pad_top=1, pad_left=1, activation=ops.ACT_SWISH),
        helper.make_node("MatMul", ["cols", "weight"], ["conv"]),
        ops.make_node("TileScatter", ["conv", "out_cache", "idx", "tiles"], ["y"], name="s", tile=t),
    ]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("tiles", FLOAT, ["m", c]),
         helper.make_tensor_value_info("cache", FLOAT, [h, w, c]),
         helper.make_tensor_value_info("out_cache", FLOAT, [1, c, h, w]),
         helper.make_tensor_value_info("idx", INT64, ["n", 2])],
        [helper.make_tensor_value_info("y", FLOAT, [1, c, h, w])],
        [onnx.numpy_helper.from_array(weight, "weight")],
    )
    proto = helper.make_model(graph, opset_imports=ops.opset_imports(18))
    proto.ir_version = 10
    return proto, feeds


def test_lowered_model_is_valid_and_free_of_ssic_ops():
    proto, feeds = _chain_model()
    model = ir.serde.deserialize_model(proto)
    result = LowerToStandardPass()(model)
    assert result.modified
    lowered = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(lowered, full_check=True)
    assert not any(n.domain == ops.DOMAIN for n in lowered.graph.node)
    assert ops.DOMAIN not in {o.domain for o in lowered.opset_import}
    types = {n.op_type for n in lowered.graph.node}
    assert {"Gather", "ScatterND", "MatMul"} <= types
    assert [o.name for o in lowered.graph.output] == ["y"]

    sess = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, feeds)
    cols = ops.tile_gather_ref(feeds["tiles"], feeds["cache"], feeds["idx"], feeds["idx"], src_tile=4,
                               tile=4, kernel=3, pad_top=1, pad_left=1, activation=ops.ACT_SWISH)
    weight = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    ref = ops.tile_scatter_ref(cols @ weight, feeds["out_cache"], feeds["idx"], feeds["tiles"], tile=4)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_model_without_ssic_ops_is_unchanged():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", FLOAT, [2])], [helper.make_tensor_value_info("y", FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert not LowerToStandardPass()(model).modified


def test_dynamic_cache_shape_is_a_clear_error():
    from ssic.errors import SSICError

    node = ops.make_node("TileScatter", ["tiles", "cache", "idx"], ["out"], tile=2)
    graph = helper.make_graph(
        [node], "dyn",
        [helper.make_tensor_value_info("tiles", FLOAT, ["m", 1]),
         helper.make_tensor_value_info("cache", FLOAT, [1, 1, "h", "w"]),
         helper.make_tensor_value_info("idx", INT64, ["n", 2])],
        [helper.make_tensor_value_info("out", FLOAT, [1, 1, "h", "w"])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=ops.opset_imports(18)))
    with pytest.raises(SSICError, match="static shape"):
        LowerToStandardPass()(model)
