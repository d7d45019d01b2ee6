"""Resampling rules: nearest upsample and zero pad fold into the next gather; AveragePool on tiles."""

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


def resample_net():
    """conv -> avgpool 2 -> conv -> nearest x2 -> conv -> zero pad (0,1,0,1) -> 3x3/s2 conv (pad 0) -> nearest x2 -> conv."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["b", "", "scales"], ["u"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["u", "c_w", "c_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["c", "pads"], ["cp"]),
        helper.make_node("Conv", ["cp", "d_w", "d_b"], ["d"], strides=[2, 2]),
        helper.make_node("Resize", ["d", "", "scales"], ["du"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Conv", ["du", "e_w", "e_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = (conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 8, 8, 3) | conv_params(rng, "c", 8, 8, 3)
             | conv_params(rng, "d", 8, 8, 3) | conv_params(rng, "e", 3, 8, 3))
    inits |= {"scales": np.array([1, 1, 2, 2], np.float32), "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)}
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)


def test_resampling_structure():
    sparse, result = rewrite(resample_net(), min_res=16)
    ops = op_counts(sparse)
    assert all(d.sparse for d in result.decisions) and len(result.decisions) == 5
    assert ops["Resize"] == 0 and ops["Pad"] == 0 and ops["AveragePool"] == 0
    assert ops["TileScatter"] == 1 and ops["ReduceMean"] == 1
    gathers = [n for n in sparse.graph if n.op_type == "TileGather"]
    assert sorted(n.attributes["upsample"].value for n in gathers) == [1, 1, 1, 1, 2, 2]


def test_resampling_exact_equals_dense(tmp_path):
    sess, _ = compile_and_load(resample_net(), tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W])) < 0.7


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_depth_to_space_folds_into_the_next_conv(tmp_path, mode):
    """conv/s2 -> conv -> DepthToSpace(2) -> conv: the shuffle is read by the next gather (no full tensor),
    and its receptive field keeps exact mode sparse and exact."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["a", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["b"], ["d"], blocksize=2, mode=mode),
             helper.make_node("Conv", ["d", "c_w", "c_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 16, 8, 3) | conv_params(rng, "c", 3, 4, 3)
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)
    sparse, result = rewrite(m, min_res=16)
    ops = op_counts(sparse)
    assert all(d.sparse for d in result.decisions) and "DepthToSpace x2 folded" in result.decisions[2].reason
    assert ops["DepthToSpace"] == 0 and ops["TileScatter"] == 1 and result.dense_ops == []
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W])) < 0.5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    sess.prime({"x": x})
    edited = x.copy()
    edited[:, :, 10:13, 18:21] += 1.0
    got = sess.edit({"x": edited}, mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)
    assert sess.last.active_fraction < 0.2


def test_depth_to_space_with_other_consumers_is_materialised(tmp_path):
    """DepthToSpace read by an activation and by the graph output: computed once, dense, still exact."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["a", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("DepthToSpace", ["b"], ["d"], blocksize=2, mode="CRD"),
             helper.make_node("LeakyRelu", ["d"], ["dl"], alpha=0.2),
             helper.make_node("Conv", ["dl", "c_w", "c_b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "d"], ["y"])]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 16, 8, 3) | conv_params(rng, "c", 4, 4, 3)
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 4, H, W]}, inits)
    sparse, result = rewrite(m, min_res=16)
    assert all(d.sparse for d in result.decisions)
    assert op_counts(sparse)["DepthToSpace"] == 1
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0, 1))


@pytest.mark.parametrize("mode,lowering", [("reflect", "fused"), ("edge", "fused"), ("reflect", "standard")])
def test_reflect_and_edge_pad_fold_into_the_gather(tmp_path, mode, lowering):
    """conv -> Pad(reflect|edge, 1) -> conv (pad 0) -> ReLU -> Pad -> conv: no full tensor, exact == dense."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Pad", ["a", "pads"], ["ap"], mode=mode),
             helper.make_node("Conv", ["ap", "b_w", "b_b"], ["b"]),
             helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Pad", ["br", "pads"], ["bp"], mode=mode),
             helper.make_node("Conv", ["bp", "c_w", "c_b"], ["y"])]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 8, 8, 3) | conv_params(rng, "c", 3, 8, 3)
    inits["pads"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)
    sparse, result = rewrite(m, min_res=16)
    ops = op_counts(sparse)
    assert ops["Pad"] == 0 and ops["TileScatter"] == 1 and result.dense_ops == []
    modes = sorted(n.attributes["pad_mode"].value for n in sparse.graph
                   if n.op_type == "TileGather" and "pad_mode" in n.attributes)
    assert modes == [1 if mode == "reflect" else 2] * 2
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2, lowering=lowering)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0, 1))) < 0.7
    # an edit at the border: the reflected pixels change too
    x = np.random.default_rng(9).standard_normal((1, 3, H, W)).astype(np.float32)
    sess.prime({"x": x})
    edited = x.copy()
    edited[:, :, 0:2, 10:13] += 1.0
    np.testing.assert_allclose(sess.edit({"x": edited}, mode="sparse")["y"], sess.dense({"x": edited})["y"],
                               atol=1e-4, rtol=0)


def test_graph_halo_follows_the_receptive_field_through_explicit_pads():
    """Reflect pad + valid 3x3 conv, twice (CycleGAN/LaMa blocks): the grid's halo is the chain's
    radius 2, as for two 'same' convs; it stopped at the Pad (halo 1) and CycleGAN lost 17 dB."""
    import onnx
    import onnx_ir as ir

    from ssic.passes.analysis import chain_halos

    rng = np.random.default_rng(0)
    c = 4
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"], mode="reflect"),
             helper.make_node("Conv", ["xp", "a_w", "a_b"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Pad", ["r", "p"], ["rp"], mode="reflect"),
             helper.make_node("Conv", ["rp", "b_w", "b_b"], ["y"])]
    inits = conv_params(rng, "a", c, 3, 3) | conv_params(rng, "b", 3, c, 3) | {"p": pads}
    m = model(nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 3, 16, 16]}, inits)
    m = onnx.shape_inference.infer_shapes(m)
    assert chain_halos(ir.serde.deserialize_model(m))[(16, 16)] == 2


def unet_pool_net(pool: str, opset: int):
    """OIDN-like: conv -> ReLU -> 2x2/s2 pool -> conv -> nearest x2 -> concat with the skip -> conv."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node(pool, ["ar"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "b_w", "b_b"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["b", "", "scales"], ["u"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("Concat", ["u", "ar"], ["cat"], axis=1),
             helper.make_node("Conv", ["cat", "c_w", "c_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 8, 8, 3) | conv_params(rng, "c", 3, 16, 3)
    inits["scales"] = np.array([1, 1, 2, 2], np.float32)
    return model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits, opset=opset)


@pytest.mark.parametrize("pool,opset", [("MaxPool", 18), ("MaxPool", 17), ("AveragePool", 13)])
def test_pools_run_on_tiles(tmp_path, pool, opset):
    """A 2x2/s2 pool is a gather + ReduceMax/ReduceMean on tiles (it ran dense behind a full-size
    TileScatter: OIDN at 1024x1024 spent a third of a 1.2% edit there), in the opset's Reduce form."""
    m = unet_pool_net(pool, opset)
    sparse, result = rewrite(m, min_res=16)
    ops = op_counts(sparse)
    reduce = "ReduceMax" if pool == "MaxPool" else "ReduceMean"
    assert ops[pool] == 0 and ops[reduce] == 1 and result.dense_ops == []
    assert ops["TileScatter"] == 1  # the output only
    sess, _ = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert max(assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0, 1))) < 0.7


def test_padded_max_pool_stays_dense_and_exact(tmp_path):
    """A padded MaxPool (its padding is -inf, not the gather's zeros) is refused with a reason, runs dense, stays exact."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1])]
    inits = conv_params(rng, "a", 8, 3, 3) | conv_params(rng, "b", 3, 8, 3)
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits)
    _, result = rewrite(m, min_res=16)
    assert [(d.op_type, d.reason) for d in result.dense_ops] == [("MaxPool", "only square, unpadded pools")]
    sess, art = compile_and_load(m, tmp_path, exact=True, sparse_min_res=16, tile=2)
    assert_edits_match_dense(sess, "x", [1, 3, H, W], seeds=(0,))
    from click.testing import CliRunner

    from ssic.cli import cli

    out = CliRunner().invoke(cli, ["inspect", str(art)]).output
    assert "1 other node(s) read sparse values but run dense" in out and "only square, unpadded pools" in out
