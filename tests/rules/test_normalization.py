"""Normalisation rules: GroupNorm (also TorchScript's Reshape/InstanceNorm/Reshape form) and BatchNorm."""

from __future__ import annotations

import numpy as np
from onnx import helper

from tests.rules.harness import (
    assert_edits_match_dense,
    compile_and_load,
    conv_params,
    model,
    op_counts,
    rewrite,
)

H = W = 32
C = 8


def gn_net(opset: int = 21):
    """Conv -> GroupNormalization(2) -> swish -> Conv, without stored intermediate shapes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["a", "gs", "gb"], ["g"], num_groups=2, epsilon=1e-5),
             helper.make_node("Sigmoid", ["g"], ["sg"]),
             helper.make_node("Mul", ["g", "sg"], ["act"]),
             helper.make_node("Conv", ["act", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", C, 3, 3) | conv_params(rng, "b", 4, C, 3)
    inits |= {"gs": (1 + 0.2 * rng.standard_normal(C)).astype(np.float32),
              "gb": (0.2 * rng.standard_normal(C)).astype(np.float32)}
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 4, H, W]}, inits, opset=opset)


def test_group_norm_without_stored_shapes(tmp_path):
    m = gn_net()
    assert len(m.graph.value_info) == 0
    sparse, result = rewrite(m, min_res=16)
    assert all(d.sparse for d in result.decisions) and [d.channels for d in result.decisions] == [(3, C), (C, 4)]
    ops = op_counts(sparse)
    assert ops["GroupNormalization"] == 0 and ops["TileScatter"] == 1
    assert {c.kind for c in result.caches} >= {"gn_sum", "gn_sumsq"}
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=16, tile=2)
    # incremental statistics: with every tile active the sparse edit is the dense result
    assert assert_edits_match_dense(sess, "x", [1, 3, H, W], all_tiles=True, atol=2e-4) == [1.0, 1.0, 1.0]


def test_torchscript_group_norm_pattern(tmp_path):
    """Reshape([1, G, -1]) -> InstanceNormalization -> Reshape back -> scale/shift: one GroupNorm on tiles."""
    rng = np.random.default_rng(1)
    g = 2
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["a", "to_groups"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"], epsilon=1e-5),
             helper.make_node("Reshape", ["n", "back"], ["nb"]),
             helper.make_node("Mul", ["nb", "gamma"], ["m"]),
             helper.make_node("Add", ["m", "beta"], ["gn"]),
             helper.make_node("Conv", ["gn", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", C, 3, 3) | conv_params(rng, "b", 4, C, 3)
    inits |= {"to_groups": np.array([1, g, -1], np.int64), "back": np.array([1, C, H, W], np.int64),
              "ones": np.ones(g, np.float32), "zeros": np.zeros(g, np.float32),
              "gamma": rng.uniform(0.5, 1.5, (C, 1, 1)).astype(np.float32),
              "beta": rng.uniform(-0.2, 0.2, (C, 1, 1)).astype(np.float32)}
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 4, H, W]}, inits, opset=18)
    sparse, result = rewrite(m, min_res=16)
    ops = op_counts(sparse)
    assert ops["InstanceNormalization"] == 0 and ops["TileScatter"] == 1 and result.dense_ops == []
    assert len(result.gn_stats) == 1 and result.gn_stats[0].num_groups == g
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=16, tile=2)
    assert_edits_match_dense(sess, "x", [1, 3, H, W], all_tiles=True, atol=2e-4, seeds=(0,))


def test_instance_norm_on_tiles(tmp_path):
    """InstanceNormalization of a [1, C, H, W] tile value: incremental statistics, no full tensor."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("InstanceNormalization", ["a", "s", "b"], ["n"], epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Conv", ["r", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", C, 3, 3) | conv_params(rng, "b", 4, C, 3)
    inits |= {"s": rng.uniform(0.5, 1.5, C).astype(np.float32), "b": rng.uniform(-0.2, 0.2, C).astype(np.float32)}
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 4, H, W]}, inits)
    sparse, result = rewrite(m, min_res=16)
    ops = op_counts(sparse)
    assert ops["InstanceNormalization"] == 0 and ops["TileScatter"] == 1 and result.dense_ops == []
    assert result.gn_stats[0].num_groups == C
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=16, tile=2)
    assert_edits_match_dense(sess, "x", [1, 3, H, W], all_tiles=True, atol=2e-4, seeds=(0, 1))
