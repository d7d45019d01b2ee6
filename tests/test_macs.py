"""Tests of ssic.macs: the ONNX MAC counter against hand computations and the torch count,
and the full presets against the SIGE paper's figures."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ssic.errors import SSICError
from ssic.macs import count_macs, count_torch_macs

SLOW_ENV = os.environ.get("SSIC_SLOW", "") not in ("", "0")

#: SIGE paper (NeurIPS 2022), dense MACs of one step / one generator pass
ANCHOR_GMACS = {"ddim": 248.0, "pd": 119.0, "gaugan": 281.0}


def _require_slow(request) -> None:
    if not (SLOW_ENV or "slow" in (request.config.getoption("markexpr") or "")):
        pytest.skip("full-size test: run with -m slow or SSIC_SLOW=1")


def _init(name, shape):
    return numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name)


def _hand_graph() -> onnx.ModelProto:
    f = TensorProto.FLOAT
    nodes = [
        # 3x3 conv 3 -> 4 on 8x8, pad 1: 4*8*8 outputs * 3*3*3
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
        # grouped 3x3 stride-2 conv 4 -> 8, group 2, asymmetric pad: 8*4*4 outputs * 2*9
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="gconv", group=2, strides=[2, 2],
                         pads=[0, 0, 1, 1]),
        # ConvTranspose 8 -> 2, k 2, s 2: 8*4*4 inputs * 2*2*2
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], name="deconv", strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "r"], ["s"], name="add"),
        # [1,2,8,8] -> [2,8,8] MatMul [8,5]: 2*8*5 outputs * 8
        helper.make_node("Reshape", ["s", "shape"], ["s3"], name="reshape"),
        helper.make_node("MatMul", ["s3", "m"], ["mm"], name="matmul"),
        # batched attention-like MatMul [2,8,5] x [2,5,8]: 2*8*8 * 5
        helper.make_node("Transpose", ["mm"], ["mmT"], name="tr", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["mm", "mmT"], ["att"], name="bmm"),
        # Gemm transB: [3,6] x [4,6]^T: 3*4*6
        helper.make_node("Gemm", ["g", "gw", "gb"], ["gy"], name="gemm", transB=1),
        # Einsum bij,bjk->bik with [2,3,4] x [2,4,5]: 2*3*4*5
        helper.make_node("Einsum", ["e1", "e2"], ["ey"], name="einsum", equation="bij,bjk->bik"),
    ]
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", f, [1, 3, 8, 8]),
         helper.make_tensor_value_info("g", f, [3, 6]),
         helper.make_tensor_value_info("e1", f, [2, 3, 4]),
         helper.make_tensor_value_info("e2", f, [2, 4, 5])],
        [helper.make_tensor_value_info("att", f, [2, 8, 8]),
         helper.make_tensor_value_info("gy", f, [3, 4]),
         helper.make_tensor_value_info("ey", f, [2, 3, 5])],
        [_init("w1", (4, 3, 3, 3)), _init("b1", (4,)), _init("w2", (8, 2, 3, 3)),
         _init("w3", (8, 2, 2, 2)), _init("m", (8, 5)), _init("gw", (4, 6)), _init("gb", (4,)),
         numpy_helper.from_array(np.array([2, 8, 8], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_count_macs_hand_graph():
    r = count_macs(_hand_graph())
    expect = {
        "conv": 4 * 8 * 8 * 27,
        "gconv": 8 * 4 * 4 * 2 * 9,
        "deconv": 8 * 4 * 4 * 2 * 4,
        "matmul": 2 * 8 * 5 * 8,
        "bmm": 2 * 8 * 8 * 5,
        "gemm": 3 * 4 * 6,
        "einsum": 2 * 3 * 4 * 5,
    }
    assert r["macs_by_node"] == expect
    assert r["macs_total"] == sum(expect.values())
    assert r["macs_by_op_type"] == {
        "Conv": expect["conv"] + expect["gconv"], "ConvTranspose": expect["deconv"],
        "MatMul": expect["matmul"] + expect["bmm"], "Gemm": expect["gemm"],
        "Einsum": expect["einsum"],
    }


def test_count_macs_needs_static_shapes():
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "dyn",
        [helper.make_tensor_value_info("x", f, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", f, None)], [_init("w", (4, 3, 1, 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(SSICError, match="static shapes"):
        count_macs(model)
    with pytest.raises(SSICError, match="ModelProto"):
        count_macs("model.onnx")


def test_onnx_count_matches_torch_on_tiny_ddim(tmp_path):
    """The ONNX counter on an exported tiny model (Conv, Gemm, attention MatMuls) equals the
    torch hook count of the same model."""
    from ssic.models import build_model, example_inputs, export_model

    path = export_model("ddim", "tiny", tmp_path / "ddim.onnx")
    r = count_macs(onnx.load(str(path)))
    model = build_model("ddim", "tiny")
    ex = example_inputs("ddim", "tiny")
    expect = count_torch_macs(model, *(torch.from_numpy(v) for v in ex.values()))
    assert r["macs_total"] == expect
    assert set(r["macs_by_op_type"]) == {"Conv", "Gemm", "MatMul"}
    # attention MatMuls at 16x16 with one head: 2 * (256*256*C) per block, 6 blocks
    assert r["macs_by_op_type"]["MatMul"] > 0
    assert r["macs_by_node"]["conv_in/conv2d"] == 256 * 256 * 16 * 3 * 9


@pytest.mark.parametrize("name", ["ddim", "pd", "gaugan"])
def test_full_presets_match_anchor_macs_torch(name):
    """Fast: count the full-size models on meta tensors (no compute)."""
    from ssic.models.presets import build_architecture, model_config

    cfg = model_config(name, "full")
    with torch.device("meta"):
        model = build_architecture(name, "full").eval()
        if name == "gaugan":
            args = (torch.empty(1, cfg.semantic_nc, cfg.height, cfg.width),)
        else:
            args = (torch.empty(1, 3, 256, 256), torch.empty(1))
        macs = count_torch_macs(model, *args)
    g = macs / 1e9
    print(f"\n{name} full: {g:.2f} GMACs (anchor {ANCHOR_GMACS[name]:.0f}G)")
    assert abs(g - ANCHOR_GMACS[name]) <= 0.05 * ANCHOR_GMACS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim", "pd", "gaugan"])
def test_full_presets_match_anchor_macs_onnx(name, tmp_path, request):
    _require_slow(request)
    from ssic.models import export_model

    path = export_model(name, "full", tmp_path / f"{name}.onnx")
    r = count_macs(onnx.load(str(path)))
    g = r["macs_total"] / 1e9
    print(f"\n{name} full (ONNX): {g:.2f} GMACs (anchor {ANCHOR_GMACS[name]:.0f}G)")
    assert abs(g - ANCHOR_GMACS[name]) <= 0.05 * ANCHOR_GMACS[name]
