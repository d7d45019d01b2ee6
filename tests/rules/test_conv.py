"""Conv rules: a 3x3 / strided / 1x1 chain becomes gathers and MatMuls, exact mode equals dense."""

from __future__ import annotations

import numpy as np
import pytest
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


def conv_chain():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["b", "c_w", "c_b"], ["y"]),
    ]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 8, 8, 3) | conv_params(rng, "c", 4, 8, 1)
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 4, H // 2, W // 2]}, inits)


def test_conv_chain_structure():
    sparse, result = rewrite(conv_chain(), min_res=16)
    ops = op_counts(sparse)
    assert ops["Conv"] == 0 and ops["MatMul"] == 3
    assert ops["TileGather"] == 2  # the 1x1 conv on tiles of its own grid is a MatMul on the tiles
    assert ops["TileScatter"] == 1  # only the output
    assert ops["Relu"] == 0  # folded into the second gather
    assert [d.sparse for d in result.decisions] == [True, True, True]
    assert [d.kind for d in result.decisions] == ["3x3", "3x3/s2", "1x1"]


def test_conv_chain_exact_equals_dense(tmp_path):
    sess, _ = compile_and_load(conv_chain(), tmp_path, exact=True, sparse_min_res=16, tile=2)
    fractions = assert_edits_match_dense(sess, "x", [1, 3, H, W])
    assert max(fractions) < 0.5


def test_refused_conv_says_why():
    """A conv whose weight is computed at run time stays dense with a reason; the rest stays sparse."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Neg", ["b_w"], ["nw"]),
        helper.make_node("Conv", ["a", "nw", "b_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = conv_params(rng, "a", 8, 3, 3)
    m = model(nodes, {"x": [1, 3, H, W], "b_w": [4, 8, 3, 3]}, {"y": [1, 4, H, W]}, inits | {"b_b": np.zeros(4, np.float32)})
    _, result = rewrite(m, min_res=16)
    assert [d.sparse for d in result.decisions] == [True, False]
    assert result.decisions[1].reason == "weights are not a constant 2-D kernel"
    assert result.decisions[1].channels == (8, 4)


@pytest.mark.parametrize("variant", ["grouped", "depthwise", "dilated", "same_upper", "same_lower_s2"])
def test_conv_variants_sparse_and_exact(tmp_path, variant):
    """Grouped, depthwise, dilated and auto_pad SAME convs run on tiles; exact mode equals dense."""
    rng = np.random.default_rng(3)
    c = 8
    attrs, k, group, out_hw = {"pads": [1, 1, 1, 1]}, 3, 1, H
    if variant == "grouped":
        group = 2
    elif variant == "depthwise":
        group = c
    elif variant == "dilated":
        attrs = {"pads": [2, 2, 2, 2], "dilations": [2, 2]}
    elif variant == "same_upper":
        attrs, k = {"auto_pad": "SAME_UPPER"}, 4
    elif variant == "same_lower_s2":
        attrs, out_hw = {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, H // 2
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "b_w", "b_b"], ["b"], group=group, **attrs),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Conv", ["br", "c_w", "c_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", c, 3, 3) | conv_params(rng, "b", c, c, k, group) | conv_params(rng, "c", 3, c, 3)
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, out_hw, out_hw]}, inits)
    sparse, result = rewrite(m, min_res=16)
    assert all(d.sparse for d in result.decisions), [(d.node, d.reason) for d in result.decisions]
    ops = op_counts(sparse)
    assert ops["Conv"] == 0 and ops["TileScatter"] == 1
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W])) < 0.8


@pytest.mark.parametrize("k,s,p,op", [(4, 2, 1, 0), (2, 2, 0, 0), (3, 2, 1, 1)])
def test_conv_transpose_sparse_and_exact(tmp_path, k, s, p, op):
    """ConvTranspose (pix2pix's decoder) runs on tiles, one MatMul per output phase; exact == dense."""
    rng = np.random.default_rng(4)
    c, h = 8, H // 2
    out = (h - 1) * s + k - 2 * p + op
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("ConvTranspose", ["a", "t_w", "t_b"], ["t"], strides=[s, s], pads=[p, p, p, p],
                              output_padding=[op, op]),
             helper.make_node("Relu", ["t"], ["tr"]),
             helper.make_node("Conv", ["tr", "c_w", "c_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", c, 3, 3) | conv_params(rng, "c", 3, c, 3)
    inits |= {"t_w": (rng.standard_normal((c, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32),
              "t_b": (0.1 * rng.standard_normal(c)).astype(np.float32)}
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, out, out]}, inits)
    sparse, result = rewrite(m, min_res=16)
    kinds = {d.kind: d for d in result.decisions}
    assert kinds[f"T{k}x{k}/s{s}"].sparse, kinds
    ops = op_counts(sparse)
    assert ops["ConvTranspose"] == 0 and ops["TileScatter"] == 1
    assert ops["MatMul"] == 2 + s * s  # two convs, one MatMul per phase
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W])) < 0.8
