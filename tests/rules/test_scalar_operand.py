"""A per-tensor ``[1]`` operand (a timestep-scaled shift) folded into a gather is repeated per channel.

Smallest failing input (found by the files-and-arguments work): ``Add(conv, Mul(t, c[1]))`` was fused
into TileGather as a ``[1]`` shift and the sparse run failed with "shift must have shape [8]".
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import ssic


def test_scalar_shift_from_a_runtime_input(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal((3, 8, 3, 3)).astype(np.float32) * 0.3, "w2"),
             numpy_helper.from_array(np.array([0.5], np.float32), "c")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["t", "c"], ["tc"]),
             helper.make_node("Add", ["h", "tc"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32]),
                                            helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, tmp_path / "m.onnx")
    sess = ssic.load(ssic.compile(tmp_path / "m.onnx", output_dir=tmp_path / "a.ssic", exact=True), threads=1)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    t = np.array([2.0], np.float32)
    sess.prime({"x": x, "t": t})
    e = x.copy()
    e[..., 5:9, 5:9] += 1
    out = sess.edit({"x": e, "t": t}, mode="sparse")["y"]
    assert sess.last.mode == "sparse"
    np.testing.assert_allclose(out, sess.dense({"x": e, "t": t})["y"], atol=1e-4)
