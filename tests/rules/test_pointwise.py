"""Pointwise rules: BatchNorm/LeakyReLU/swish/affine fold into gathers, element-wise ops and Concat run on tiles."""

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


def pointwise_net():
    rng = np.random.default_rng(0)
    c = 8
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        helper.make_node("LeakyRelu", ["bn"], ["lr"], alpha=0.2),
        helper.make_node("Conv", ["lr", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["b"], ["sb"]),
        helper.make_node("Mul", ["b", "sb"], ["sw"]),                      # swish
        helper.make_node("Mul", ["sw", "gain"], ["g"]),                    # per-channel affine
        helper.make_node("Conv", ["g", "c_w", "c_b"], ["cc"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["cc", "a"], ["res"]),                     # residual on tiles
        helper.make_node("Tanh", ["res"], ["t"]),                          # element-wise on tiles
        helper.make_node("Concat", ["t", "a"], ["cat"], axis=1),           # channel concat on tiles
        helper.make_node("Conv", ["cat", "d_w", "d_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = (conv_params(rng, "a", c, 3, 3) | conv_params(rng, "b", c, c, 3) | conv_params(rng, "c", c, c, 3)
             | conv_params(rng, "d", 3, 2 * c, 3))
    inits |= {"bn_s": rng.uniform(0.5, 1.5, c), "bn_b": rng.uniform(-0.2, 0.2, c), "bn_m": rng.uniform(-0.5, 0.5, c),
              "bn_v": rng.uniform(0.5, 2, c), "gain": rng.uniform(0.5, 1.5, (1, c, 1, 1))}
    inits = {k: np.asarray(v, np.float32) for k, v in inits.items()}
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)


def test_pointwise_structure():
    sparse, result = rewrite(pointwise_net(), min_res=16)
    ops = op_counts(sparse)
    assert all(d.sparse for d in result.decisions) and len(result.decisions) == 4
    assert ops["TileScatter"] == 1  # no full tensor between the convs
    for folded in ("BatchNormalization", "LeakyRelu", "Conv"):
        assert ops[folded] == 0, (folded, ops)
    # the conv after the concat reads each part from its own cache: no Concat, no cache of "cat",
    # one partial product per part accumulated by Gemm
    assert ops["Tanh"] == 1 and ops["Concat"] == 0 and ops["Gemm"] == 1
    assert "cat" not in {c.source for c in result.caches}
    assert result.dense_ops == []


def test_pointwise_exact_equals_dense(tmp_path):
    sess, _ = compile_and_load(pointwise_net(), tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W])) < 0.6


def test_unsupported_pointwise_op_runs_dense_with_reason():
    """An op without a tile rule materialises its input once and is reported."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Hardmax", ["a"], ["s"], axis=1),
             helper.make_node("Conv", ["s", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 4, H, W]}, conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 4, 8, 3))
    sparse, result = rewrite(m, min_res=16)
    assert [(d.op_type, d.reason) for d in result.dense_ops] == [("Hardmax", "Hardmax has no tile rule (runs dense)")]
    assert op_counts(sparse)["TileScatter"] == 2


def _tail_net(middle: list, extra_inits: dict, c: int = 8):
    """conv -> <middle: 'a' -> 'm'> -> conv, for one pointwise pattern."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]), *middle,
             helper.make_node("Conv", ["m", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    cm = extra_inits.pop("_cm", c)
    inits = conv_params(rng, "a", c, 3, 3) | conv_params(rng, "b", 3, cm, 3) | extra_inits
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)


def _patterns():
    rng = np.random.default_rng(6)
    c = 8
    f32 = np.float32
    return {
        "prelu": ([helper.make_node("PRelu", ["a", "slope"], ["m"])],
                  {"slope": rng.uniform(0.05, 0.3, (c, 1, 1)).astype(f32)}),
        "clip": ([helper.make_node("Clip", ["a", "lo", "hi"], ["m"])],
                 {"lo": np.array(-0.5, f32), "hi": np.array(0.5, f32)}),
        "hardswish": ([helper.make_node("HardSwish", ["a"], ["m"])], {}),
        "gelu_erf": ([helper.make_node("Div", ["a", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                      helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["ae"]),
                      helper.make_node("Mul", ["ae", "half"], ["m"])],
                     {"sqrt2": np.array(np.sqrt(2), f32), "one": np.array(1, f32), "half": np.array(0.5, f32)}),
        "split_gate": ([helper.make_node("Split", ["a", "halves"], ["s1", "s2"], axis=1),
                        helper.make_node("Mul", ["s1", "s2"], ["m"])],
                       {"halves": np.array([c // 2, c // 2], np.int64), "_cm": c // 2}),
        "channel_layernorm": ([helper.make_node("ReduceMean", ["a", "ax1"], ["mu"], keepdims=1),
                               helper.make_node("Sub", ["a", "mu"], ["xc"]),
                               helper.make_node("Mul", ["xc", "xc"], ["sq"]),
                               helper.make_node("ReduceMean", ["sq", "ax1"], ["var"], keepdims=1),
                               helper.make_node("Add", ["var", "eps"], ["ve"]),
                               helper.make_node("Sqrt", ["ve"], ["sd"]),
                               helper.make_node("Div", ["xc", "sd"], ["n"]),
                               helper.make_node("Mul", ["n", "lw"], ["nw"]),
                               helper.make_node("Add", ["nw", "lb"], ["m"])],
                              {"ax1": np.array([1], np.int64), "eps": np.array(1e-6, f32),
                               "lw": rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(f32),
                               "lb": rng.uniform(-0.2, 0.2, (1, c, 1, 1)).astype(f32)}),
    }


@pytest.mark.parametrize("name", ["prelu", "clip", "hardswish", "gelu_erf", "split_gate", "channel_layernorm"])
def test_more_pointwise_ops_on_tiles(tmp_path, name):
    """PReLU, Clip, HardSwish, GELU (erf form), Split gates and channel LayerNorm run on tiles: no extra scatter."""
    middle, inits = _patterns()[name]
    m = _tail_net(middle, dict(inits))
    sparse, result = rewrite(m, min_res=16)
    assert result.dense_ops == [], result.dense_ops
    assert op_counts(sparse)["TileScatter"] == 1
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0, 1))) < 0.6


def transfer_net():
    """OIDN's input and output transfer functions around two convs: Clip, LessOrEqual, Pow, Where on the
    graph input (before any conv) and on the last conv's output."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Clip", ["x", "zero", "one"], ["xc"]),
             helper.make_node("LessOrEqual", ["xc", "knee"], ["low"]),
             helper.make_node("Mul", ["xc", "slope"], ["lin"]),
             helper.make_node("Pow", ["xc", "gamma"], ["curve"]),
             helper.make_node("Where", ["low", "lin", "curve"], ["xt"]),
             helper.make_node("Conv", ["xt", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Conv", ["ar", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Greater", ["b", "zero"], ["pos"]),
             helper.make_node("Neg", ["b"], ["nb"]),
             helper.make_node("Where", ["pos", "b", "nb"], ["y"])]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 3, 8, 3)
    inits |= {"zero": np.array(0, np.float32), "one": np.array(1, np.float32), "knee": np.array(0.1, np.float32),
              "slope": np.array([2.0, 3.0, 4.0], np.float32).reshape(1, 3, 1, 1), "gamma": np.array(0.5, np.float32)}
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)


def test_transfer_functions_run_on_tiles(tmp_path):
    """Element-wise ops on the graph input run on its active tiles (they ran on the whole image at every
    edit: OIDN at 1024x1024, a quarter of a 1.2% edit); comparisons feeding Where run on tiles too."""
    m = transfer_net()
    sparse, result = rewrite(m, min_res=16)
    ops = op_counts(sparse)
    assert result.dense_ops == [] and ops["TileScatter"] == 1 and ops["Where"] == 2
    assert all(n.op_type not in ("Pow", "Where", "LessOrEqual") or n.name.startswith("ssic/") for n in sparse.graph)
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    x_shape = [1, 3, H, W]
    fractions = assert_edits_match_dense(sess, "x", x_shape, seeds=(0, 1))
    assert max(fractions) < 0.7


def test_comparison_read_elsewhere_stays_dense(tmp_path):
    """A comparison whose boolean output is a graph output is never a boolean tile tensor: it runs dense."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Greater", ["a", "zero"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["y"], to=1)]
    inits = conv_params(rng, "a", 3, 3, 3) | {"zero": np.array(0, np.float32)}
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)
    _, result = rewrite(m, min_res=16)
    assert ("Greater", "a comparison read by other than Where's condition") in [(d.op_type, d.reason)
                                                                                for d in result.dense_ops]
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0,))


def test_where_on_a_dense_boolean_map_stays_dense(tmp_path):
    """Where(cond, sparse, sparse) with cond a full boolean map computed dense (here from a graph input
    through a Cast a rule does not take): a gather cannot read booleans, so the Where runs dense."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["x"], ["xi"], to=6),
             helper.make_node("Cast", ["xi"], ["cond"], to=9),
             helper.make_node("Neg", ["a"], ["na"]),
             helper.make_node("Where", ["cond", "a", "na"], ["w"]),
             helper.make_node("Conv", ["w", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", 3, 3, 3) | conv_params(rng, "b", 3, 3, 3)
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)
    _, result = rewrite(m, min_res=16)
    assert [d.op_type for d in result.dense_ops] == ["Where"]
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0,))
