"""Token and attention rules (ssic/passes/sparsify/tokens.py, attention.py) on small transformer blocks
written as the exporters write them: Stable Diffusion's (heads split by Reshape/Transpose, keys
transposed through a 3-D view, scale on q and kᵀ, cross-attention on a context input, GEGLU with an
erf gelu), the VAE's single-head block (``[1, C, H*W]`` views, ``v·Aᵀ``) and a ViT-style block with a
positional embedding on a clipped grid."""

from __future__ import annotations

import numpy as np
import pytest
from harness import compile_and_load, conv_params, model, op_counts, rewrite
from onnx import helper

H = W = 8
C, HEADS, CTX_LEN, CTX_C, FF = 8, 2, 5, 6, 16


def _lin(rng, name: str, cin: int, cout: int, bias: bool = True) -> dict:
    out = {f"{name}_w": (rng.standard_normal((cin, cout)) / np.sqrt(cin)).astype(np.float32)}
    if bias:
        out[f"{name}_b"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    return out


def _ln(name: str, x: str, y: str, inits: dict) -> helper.NodeProto:
    inits[f"{name}_g"] = np.linspace(0.5, 1.5, C).astype(np.float32)
    inits[f"{name}_b"] = np.linspace(-0.1, 0.1, C).astype(np.float32)
    return helper.make_node("LayerNormalization", [x, f"{name}_g", f"{name}_b"], [y], axis=-1, epsilon=1e-5)


def _attention(p: str, q: str, k: str, v: str, n_kv: int, out: str, inits: dict) -> list:
    """diffusers' exported scaled-dot-product attention: q/k/v [1, N, C] -> out [1, N, C]."""
    d = C // HEADS
    inits[f"{p}_heads"] = np.array([1, -1, HEADS, d], np.int64)
    inits[f"{p}_k3"] = np.array([HEADS, n_kv, d], np.int64)
    inits[f"{p}_k4"] = np.array([1, HEADS, d, n_kv], np.int64)
    inits[f"{p}_tok"] = np.array([1, H * W, C], np.int64)
    inits[f"{p}_scale"] = np.array([d ** -0.25], np.float32)
    return [
        helper.make_node("Reshape", [q, f"{p}_heads"], [f"{p}_q4"]),
        helper.make_node("Transpose", [f"{p}_q4"], [f"{p}_qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [k, f"{p}_heads"], [f"{p}_k4a"]),
        helper.make_node("Transpose", [f"{p}_k4a"], [f"{p}_kh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [v, f"{p}_heads"], [f"{p}_v4"]),
        helper.make_node("Transpose", [f"{p}_v4"], [f"{p}_vh"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}_kh", f"{p}_k3"], [f"{p}_k3v"]),
        helper.make_node("Transpose", [f"{p}_k3v"], [f"{p}_kt3"], perm=[0, 2, 1]),
        helper.make_node("Reshape", [f"{p}_kt3", f"{p}_k4"], [f"{p}_kt"]),
        helper.make_node("Mul", [f"{p}_qh", f"{p}_scale"], [f"{p}_qs"]),
        helper.make_node("Mul", [f"{p}_kt", f"{p}_scale"], [f"{p}_kts"]),
        helper.make_node("MatMul", [f"{p}_qs", f"{p}_kts"], [f"{p}_s"]),
        helper.make_node("Softmax", [f"{p}_s"], [f"{p}_p"], axis=-1),
        helper.make_node("MatMul", [f"{p}_p", f"{p}_vh"], [f"{p}_o"]),
        helper.make_node("Transpose", [f"{p}_o"], [f"{p}_ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}_ot", f"{p}_tok"], [f"{p}_tokens"]),
        helper.make_node("MatMul", [f"{p}_tokens", f"{p}_out_w"], [f"{p}_om"]),
        helper.make_node("Add", [f"{p}_om", f"{p}_out_b"], [out]),
    ]


def sd_block(seed: int = 0, slices: bool = False):
    """conv -> GroupNorm-free proj_in -> tokens -> LN, self-attn, LN, cross-attn, LN, GEGLU (erf gelu;
    halves by Split, or by two Slices with ``slices``) -> back to [1, C, H, W] -> proj_out + residual
    -> conv. Inputs ``x`` [1, 4, H, W] and ``ctx``."""
    rng = np.random.default_rng(seed)
    inits = conv_params(rng, "a", C, 4, 3) | conv_params(rng, "pin", C, C, 1) | conv_params(rng, "pout", C, C, 1) \
        | conv_params(rng, "b", 4, C, 3)
    for name in ("s_q", "s_k", "s_v", "c_q"):
        inits |= _lin(rng, name, C, C, bias=False)
    inits |= _lin(rng, "c_k", CTX_C, C, bias=False) | _lin(rng, "c_v", CTX_C, C, bias=False)
    inits |= _lin(rng, "s_out", C, C) | _lin(rng, "c_out", C, C) | _lin(rng, "ff1", C, 2 * FF) | _lin(rng, "ff2", FF, C)
    inits |= {"tok_shape": np.array([1, H * W, C], np.int64), "map_shape": np.array([1, H, W, C], np.int64),
              "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
              "half": np.array(0.5, np.float32), "ff_split": np.array([FF, FF], np.int64),
              "s0": np.array([0], np.int64), "s1": np.array([FF], np.int64), "s2": np.array([2 * FF], np.int64),
              "ax2": np.array([2], np.int64), "ax_1": np.array([-1], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "pin_w", "pin_b"], ["pin"]),
        helper.make_node("Transpose", ["pin"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "tok_shape"], ["t0"]),
        _ln("ln1", "t0", "n1", inits),
        helper.make_node("MatMul", ["n1", "s_q_w"], ["sq"]),
        helper.make_node("MatMul", ["n1", "s_k_w"], ["sk"]),
        helper.make_node("MatMul", ["n1", "s_v_w"], ["sv"]),
        *_attention("s", "sq", "sk", "sv", H * W, "sa", inits),
        helper.make_node("Add", ["sa", "t0"], ["t1"]),
        _ln("ln2", "t1", "n2", inits),
        helper.make_node("MatMul", ["n2", "c_q_w"], ["cq"]),
        helper.make_node("MatMul", ["ctx", "c_k_w"], ["ck"]),
        helper.make_node("MatMul", ["ctx", "c_v_w"], ["cv"]),
        *_attention("c", "cq", "ck", "cv", CTX_LEN, "ca", inits),
        helper.make_node("Add", ["ca", "t1"], ["t2"]),
        _ln("ln3", "t2", "n3", inits),
        helper.make_node("MatMul", ["n3", "ff1_w"], ["f1m"]),
        helper.make_node("Add", ["f1m", "ff1_b"], ["f1"]),
        *([helper.make_node("Slice", ["f1", "s0", "s1", "ax2"], ["fa"]),
           helper.make_node("Slice", ["f1", "s1", "s2", "ax_1"], ["fg"])] if slices else
          [helper.make_node("Split", ["f1", "ff_split"], ["fa", "fg"], axis=2)]),
        helper.make_node("Div", ["fg", "sqrt2"], ["g1"]),
        helper.make_node("Erf", ["g1"], ["g2"]),
        helper.make_node("Add", ["g2", "one"], ["g3"]),
        helper.make_node("Mul", ["fg", "g3"], ["g4"]),
        helper.make_node("Mul", ["g4", "half"], ["gelu"]),
        helper.make_node("Mul", ["fa", "gelu"], ["geglu"]),
        helper.make_node("MatMul", ["geglu", "ff2_w"], ["f2m"]),
        helper.make_node("Add", ["f2m", "ff2_b"], ["f2"]),
        helper.make_node("Add", ["f2", "t2"], ["t3"]),
        helper.make_node("Reshape", ["t3", "map_shape"], ["back"]),
        helper.make_node("Transpose", ["back"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "pout_w", "pout_b"], ["pout"]),
        helper.make_node("Add", ["pout", "a"], ["res"]),
        helper.make_node("Conv", ["res", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return model(nodes, {"x": [1, 4, H, W], "ctx": [1, CTX_LEN, CTX_C]}, {"y": [1, 4, H, W]}, inits)


def _inputs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, 4, H, W)).astype(np.float32),
            "ctx": rng.standard_normal((1, CTX_LEN, CTX_C)).astype(np.float32)}


def test_sd_block_structure():
    """Nothing is materialised inside the block: the token views, LayerNorms, projections, both
    attentions and GEGLU run on the active rows; self-attention's kᵀ and v are scattered into their caches."""
    sparse, result = rewrite(sd_block(), min_res=H)
    ops = op_counts(sparse)
    assert result.dense_ops == [], result.dense_ops
    assert ops["TileScatter"] == 1  # the graph output only
    assert ops["ScatterElements"] == 2 and ops["ScatterND"] == 0  # kᵀ [1, h, d, N] and v [1, h, N, d]
    assert ops["LayerNormalization"] == 3 and ops["Softmax"] == 2 and ops["Erf"] == 1 and ops["Split"] == 1
    decisions = {d.node: d for d in result.decisions}
    matmuls = [d for d in result.decisions if d.kind in ("linear", "self-attn", "cross-attn")]
    assert len(matmuls) == 14
    dense = sorted(d.kind for d in matmuls if not d.sparse)
    assert dense == ["linear", "linear"]  # the context's key/value projections: no image input
    kinds = sorted(d.kind for d in matmuls if d.sparse)
    assert kinds.count("self-attn") == 2 and kinds.count("cross-attn") == 2
    assert all(d.macs_per_tile * (H * W // 4) == d.macs_dense for d in matmuls if d.sparse)
    assert "scattered in" in next(d.reason for d in decisions.values() if d.kind == "self-attn")
    caches = {c.source: c for c in result.caches}
    assert caches["s_kts"].shape == (1, HEADS, C // HEADS, H * W) and caches["s_vh"].shape == (1, HEADS, H * W, C // HEADS)
    assert not any(s.startswith("c_") for s in caches)  # cross-attention reads no cache


def test_geglu_halves_by_slices(tmp_path):
    """GEGLU's halves as two constant Slices on the channel axis run on the rows too."""
    m = sd_block(2, slices=True)
    sparse, result = rewrite(m, min_res=H)
    assert result.dense_ops == [] and op_counts(sparse)["TileScatter"] == 1
    dense = [d for d in result.decisions if not d.sparse]
    assert len(dense) == 2 and all("text context" in d.reason for d in dense)  # only the context's k/v
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=H, tile=2)
    x = _inputs(6)
    sess.prime(x)
    edited = dict(x, x=x["x"] + 1.0)
    got = sess.edit(edited, mask=np.ones((H, W), bool), mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense(edited)["y"], atol=1e-4, rtol=0)


def test_context_projections_say_why_they_run_in_full():
    _, result = rewrite(sd_block(), min_res=H)
    dense = [d for d in result.decisions if d.kind == "linear" and not d.sparse]
    assert len(dense) == 2 and all("text context" in d.reason for d in dense), [d.reason for d in dense]


@pytest.fixture(scope="module")
def sd_session(tmp_path_factory):
    return compile_and_load(sd_block(), tmp_path_factory.mktemp("attn"), sparse_min_res=H, tile=2)


def test_sd_block_all_tiles_equals_dense(sd_session):
    sess, _ = sd_session
    for seed in (0, 1):
        x = _inputs(seed)
        sess.prime(x)
        edited = dict(x, x=x["x"] + np.random.default_rng(9).standard_normal(x["x"].shape).astype(np.float32))
        got = sess.edit(edited, mask=np.ones((H, W), bool), mode="sparse")["y"]
        np.testing.assert_allclose(got, sess.dense(edited)["y"], atol=1e-4, rtol=0)


def test_inspect_says_where_attention_runs(sd_session):
    from click.testing import CliRunner

    from ssic.cli import cli

    _, art = sd_session
    res = CliRunner().invoke(cli, ["inspect", str(art)])
    assert res.exit_code == 0, res.output
    kinds = next(line for line in res.output.splitlines() if "by kind:" in line)
    for part in ("conv 4/4 sparse", "self-attn 2/2 sparse", "cross-attn 2/2 sparse", "linear 8/10 sparse"):
        assert part in kinds, kinds
    assert any("self-attn" in line and "scattered in" in line for line in res.output.splitlines())


def test_sd_block_small_edit_inside(sd_session):
    """Default mode: queries outside the active tiles keep their primed rows (stale keys), so the
    output is approximate; inside the edit it must be far closer to dense than the primed output."""
    sess, _ = sd_session
    x = _inputs(3)
    base = sess.prime(x)["y"]
    edited = dict(x, x=x["x"].copy())
    edited["x"][:, :, 2:4, 5:7] += 2.0
    got = sess.edit(edited, mode="sparse")["y"]
    assert sess.last.mode == "sparse" and sess.last.active_fraction < 0.8
    want = sess.dense(edited)["y"]
    inside = np.zeros((H, W), bool)
    inside[2:4, 5:7] = True
    err, nothing = np.abs(got - want)[..., inside].mean(), np.abs(base - want)[..., inside].mean()
    assert err < 0.1 * nothing, (err, nothing)


def test_sd_block_context_must_be_primed(sd_session):
    """Cross-attention keys/values come from the context input: a different context is refused
    like any non-spatial input that differs from the primed one."""
    from ssic.errors import SSICError

    sess, _ = sd_session
    x = _inputs(4)
    sess.prime(x)
    with pytest.raises(SSICError, match="ctx"):
        sess.edit(dict(x, ctx=x["ctx"] + 1), mode="sparse")


def test_sd_block_exact_mode_covers_everything(tmp_path):
    """Self-attention is global: in exact mode an edit reaches every pixel (every tile active), and
    the sparse run equals dense."""
    sess, _ = compile_and_load(sd_block(1), tmp_path, exact=True, sparse_min_res=H, tile=2)
    x = _inputs(5)
    sess.prime(x)
    edited = dict(x, x=x["x"].copy())
    edited["x"][:, :, 1, 1] += 1.0
    got = sess.edit(edited, mode="sparse")["y"]
    assert sess.last.active_fraction == 1.0
    np.testing.assert_allclose(got, sess.dense(edited)["y"], atol=1e-4, rtol=0)


def vae_block(hh: int, ww: int, seed: int = 2):
    """The VAE's attention: q = reshape(C, HW)ᵀ, k = reshape(C, HW), v = reshape(C, HW),
    A = softmax(q k / sqrt(C)), out = reshape(v Aᵀ) -> proj + residual, between two convs."""
    rng = np.random.default_rng(seed)
    inits = conv_params(rng, "a", C, 3, 3) | conv_params(rng, "b", 3, C, 3)
    for name in ("q", "k", "v", "proj"):
        inits |= conv_params(rng, name, C, C, 1)
    inits |= {"flat": np.array([1, C, hh * ww], np.int64), "map": np.array([1, C, hh, ww], np.int64),
              "scale": np.array(C ** -0.5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1])]
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("Conv", ["a", f"{name}_w", f"{name}_b"], [f"{name}c"]),
                  helper.make_node("Reshape", [f"{name}c", "flat"], [f"{name}f"])]
    nodes += [
        helper.make_node("Transpose", ["qf"], ["qt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["qt", "kf"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["vf", "pt"], ["o"]),
        helper.make_node("Reshape", ["o", "map"], ["om"]),
        helper.make_node("Conv", ["om", "proj_w", "proj_b"], ["pr"]),
        helper.make_node("Add", ["a", "pr"], ["r"]),
        helper.make_node("Conv", ["r", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return model(nodes, {"x": [1, 3, hh, ww]}, {"y": [1, 3, hh, ww]}, inits)


@pytest.mark.parametrize(("hh", "ww", "tile"), [(8, 8, 2), (10, 6, 4)])
def test_vae_attention_on_tiles(tmp_path, hh, ww, tile):
    """``v·Aᵀ`` contracts v's pixel rows (v is scattered into its cache) and takes its query rows from
    Aᵀ's columns; with clipped tiles (10x6, tile 4) the rows outside the image go to a spare row."""
    m = vae_block(hh, ww)
    sparse, result = rewrite(m, min_res=6, tile=tile)
    ops = op_counts(sparse)
    assert result.dense_ops == [] and ops["TileScatter"] == 1 and ops["ScatterElements"] == 2
    assert all(d.sparse for d in result.decisions)
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=6, tile=tile)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, hh, ww)).astype(np.float32)
    sess.prime({"x": x})
    edited = x + rng.standard_normal(x.shape).astype(np.float32)
    got = sess.edit({"x": edited}, mask=np.ones((hh, ww), bool), mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)


def vit_block(hh: int, ww: int, seed: int = 3, extra: list | None = None):
    """Single-head ViT-style block: tokens + a positional embedding [1, HW, C], LayerNorm, attention
    with ``Transpose(0, 2, 1)`` keys and [1, N, C] values (scattered with ScatterND), MLP; ``extra``
    nodes may replace the MLP input (``m0`` -> ``m1``)."""
    rng = np.random.default_rng(seed)
    n = hh * ww
    inits = conv_params(rng, "a", C, 3, 3) | conv_params(rng, "b", 3, C, 3)
    for name in ("q", "k", "v"):
        inits |= _lin(rng, name, C, C, bias=False)
    inits |= _lin(rng, "mlp", C, C) | {"tok": np.array([1, n, C], np.int64), "map": np.array([1, hh, ww, C], np.int64),
                                        "pos": (0.5 * rng.standard_normal((1, n, C))).astype(np.float32)}
    inits["ln_g"], inits["ln_b"] = np.ones(C, np.float32), np.zeros(C, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["a"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["nhwc", "tok"], ["t"]),
        helper.make_node("Add", ["t", "pos"], ["t0"]),
        helper.make_node("LayerNormalization", ["t0", "ln_g", "ln_b"], ["n0"], axis=-1),
        helper.make_node("MatMul", ["n0", "q_w"], ["q"]),
        helper.make_node("MatMul", ["n0", "k_w"], ["k"]),
        helper.make_node("MatMul", ["n0", "v_w"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=2),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
        helper.make_node("Add", ["o", "t0"], ["m0"]),
        *(extra or [helper.make_node("Identity", ["m0"], ["m1"])]),
        helper.make_node("MatMul", ["m1", "mlp_w"], ["mm"]),
        helper.make_node("Add", ["mm", "mlp_b"], ["mo"]),
        helper.make_node("Relu", ["mo"], ["t1"]),
        helper.make_node("Reshape", ["t1", "map"], ["back"]),
        helper.make_node("Transpose", ["back"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return model(nodes, {"x": [1, 3, hh, ww]}, {"y": [1, 3, hh, ww]}, inits)


def test_vit_block_clipped_grid_with_position_embedding(tmp_path):
    """A per-token constant is gathered at the active rows; v [1, N, C] is scattered with ScatterND
    (a spare row for the clipped tiles); all tiles active equals dense."""
    m = vit_block(10, 6)
    sparse, result = rewrite(m, min_res=6, tile=4)
    ops = op_counts(sparse)
    assert result.dense_ops == [] and ops["TileScatter"] == 1
    assert ops["ScatterND"] == 1 and ops["ScatterElements"] == 1 and ops["Gather"] >= 1
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=6, tile=4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 10, 6)).astype(np.float32)
    sess.prime({"x": x})
    edited = x + rng.standard_normal(x.shape).astype(np.float32)
    got = sess.edit({"x": edited}, mask=np.ones((10, 6), bool), mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)


def test_token_op_without_rule_materialises_rows(tmp_path):
    """An op on tokens without a rule (Hardmax) reads the full tokens: the rows scattered into the
    value's cache. It is reported, and the block still equals dense with every tile active."""
    m = vit_block(8, 8, extra=[helper.make_node("Hardmax", ["m0"], ["h"], axis=-1),
                               helper.make_node("Add", ["h", "m0"], ["m1"])])
    sparse, result = rewrite(m, min_res=8)
    assert [(d.op_type, d.reason) for d in result.dense_ops] == [("Hardmax", "Hardmax has no tile rule (runs dense)")]
    assert op_counts(sparse)["ScatterND"] == 2  # v, and m0 for the Hardmax
    assert any(c.source == "m0" and c.shape == (1, 64, C) for c in result.caches)
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=8, tile=2)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    sess.prime({"x": x})
    edited = x + rng.standard_normal(x.shape).astype(np.float32)
    got = sess.edit({"x": edited}, mask=np.ones((8, 8), bool), mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)


def test_group_norm_after_flattening(tmp_path):
    """diffusers' VAE attention normalises ``Reshape([1, C, H*W])`` of the map: the GroupNorm of the map
    (incremental statistics on the tiles), then tokens as usual."""
    rng = np.random.default_rng(6)
    groups = 4
    inits = conv_params(rng, "a", C, 3, 3) | conv_params(rng, "b", 3, C, 3) | _lin(rng, "p", C, C)
    inits |= {"flat": np.array([1, C, H * W], np.int64), "map": np.array([1, C, H, W], np.int64),
              "gn_s": rng.uniform(0.5, 1.5, C).astype(np.float32), "gn_b": rng.uniform(-0.2, 0.2, C).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["a", "flat"], ["f"]),
        helper.make_node("GroupNormalization", ["f", "gn_s", "gn_b"], ["g"], num_groups=groups, epsilon=1e-5),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "p_w"], ["pm"]),
        helper.make_node("Add", ["pm", "p_b"], ["pt"]),
        helper.make_node("Transpose", ["pt"], ["pf"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["pf", "map"], ["pmap"]),
        helper.make_node("Add", ["pmap", "a"], ["r"]),
        helper.make_node("Conv", ["r", "b_w", "b_b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, {"x": [1, 3, H, W]}, {"y": [1, 3, H, W]}, inits, opset=21)  # per-channel GroupNorm
    # ONNX infers no shape for opset-21 GroupNormalization; the MAC count of the model needs one
    m.graph.value_info.append(helper.make_tensor_value_info("g", 1, [1, C, H * W]))
    sparse, result = rewrite(m, min_res=H)
    assert result.dense_ops == [] and op_counts(sparse)["TileScatter"] == 1
    assert [s.input for s in result.gn_stats] == ["a"]  # the statistics of the NCHW map
    sess, _ = compile_and_load(m, tmp_path, sparse_min_res=H, tile=2)
    x = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    sess.prime({"x": x})
    edited = x + rng.standard_normal(x.shape).astype(np.float32)
    got = sess.edit({"x": edited}, mask=np.ones((H, W), bool), mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)
