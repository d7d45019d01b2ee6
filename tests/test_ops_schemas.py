"""ONNX schemas of the ssic ops: checker and shape inference on graphs containing them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ssic import ops


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=ops.opset_imports(), ir_version=10)


def _shape(model, name):
    for vi in list(model.graph.output) + list(model.graph.value_info):
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in vi.type.tensor_type.shape.dim]
    raise KeyError(name)


def test_schemas_registered_once():
    ops.register_schemas()  # idempotent
    for spec in ops.OPS.values():
        schema = onnx.defs.get_schema(spec.name, spec.version, ops.DOMAIN)
        assert schema.domain == ops.DOMAIN
        assert {a for a in schema.attributes} == {a.name for a in spec.attributes}


@pytest.mark.parametrize("layout", [ops.LAYOUT_NHWC, ops.LAYOUT_NCHW])
def test_gather_conv_scatter_graph(layout):
    c, cout, hs, ws, t = 8, 6, 10, 11, 4
    cache_shape = [hs, ws, c] if layout == ops.LAYOUT_NHWC else [1, c, hs, ws]
    nodes = [
        ops.make_node("TileGather", ["tiles", "cache", "src_idx", "dst_idx", "scale", "shift"], ["cols"],
                      src_tile=t, tile=t, kernel=3, pad_top=1, pad_left=1, activation=ops.ACT_SWISH,
                      src_layout=layout),
        helper.make_node("MatMul", ["cols", "w"], ["y"]),
        ops.make_node("TileScatter", ["y", "out_cache", "dst_idx"], ["out"], tile=t),
    ]
    w = helper.make_tensor("w", TensorProto.FLOAT, [9 * c, cout], np.zeros(9 * c * cout, np.float32))
    model = _model(
        nodes,
        [_vi("tiles", ["m_rows", c]), _vi("cache", cache_shape), _vi("src_idx", ["m", 2], TensorProto.INT64),
         _vi("dst_idx", [5, 2], TensorProto.INT64), _vi("scale", [c]), _vi("shift", [c]),
         _vi("out_cache", [1, cout, hs, ws])],
        [_vi("out", ["a", "b", "c", "d"])],
    )
    model.graph.initializer.append(w)
    onnx.checker.check_model(model, full_check=True)
    # Inference fills the output shape in when the graph declares none.
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert _shape(inferred, "cols") == [5 * t * t, 9 * c]
    assert _shape(inferred, "y") == [5 * t * t, cout]
    assert _shape(inferred, "out") == [1, cout, hs, ws]


def test_gather_channels_from_cache_when_tiles_unknown():
    node = ops.make_node("TileGather", ["tiles", "cache", "src_idx", "dst_idx"], ["cols"],
                         src_tile=2, tile=3, kernel=5, src_layout=ops.LAYOUT_NCHW)
    model = _model([node], [_vi("tiles", ["r", "c"]), _vi("cache", [1, 7, 9, 9]),
                            _vi("src_idx", ["m", 2], TensorProto.INT64), _vi("dst_idx", ["n", 2], TensorProto.INT64)],
                   [_vi("cols", None)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert _shape(inferred, "cols")[1] == 25 * 7


def test_checker_rejects_missing_required_attribute():
    node = helper.make_node("TileScatter", ["t", "c", "i"], ["o"], domain=ops.DOMAIN)
    model = _model([node], [_vi("t", [4, 2]), _vi("c", [1, 2, 4, 4]), _vi("i", [1, 2], TensorProto.INT64)],
                   [_vi("o", [1, 2, 4, 4])])
    with pytest.raises(onnx.checker.ValidationError, match="tile"):
        onnx.checker.check_model(model)


def test_make_node_fills_defaults_and_validates():
    node = ops.make_node("TileGather", ["a", "b", "c", "d"], ["o"], src_tile=4, tile=4, kernel=3)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["stride"] == 1 and attrs["upsample"] == 1 and attrs["src_layout"] == 0
    assert node.domain == ops.DOMAIN
    with pytest.raises(ValueError, match="unknown attribute"):
        ops.make_node("TileScatter", ["a", "b", "c"], ["o"], tile=4, tiles=3)
    with pytest.raises(ValueError, match="missing required"):
        ops.make_node("TileScatter", ["a", "b", "c"], ["o"])
    with pytest.raises(ValueError, match="must be an int"):
        ops.make_node("TileScatter", ["a", "b", "c"], ["o"], tile=4.0)
    with pytest.raises(ValueError, match="one of"):
        ops.make_node("TileScatter", ["a", "b", "c"], ["o"], tile=4, activation=7)
    with pytest.raises(ValueError, match="inputs"):
        ops.make_node("TileScatter", ["a", "b"], ["o"], tile=4)
    with pytest.raises(ValueError, match="required"):
        ops.make_node("TileScatter", ["a", "", "c"], ["o"], tile=4)
    with pytest.raises(ValueError, match="unknown ssic op"):
        ops.make_node("Nope", [], ["o"])


def test_reference_shapes_for_empty_inputs():
    cols = ops.tile_gather_ref(np.zeros((0, 3), np.float32), np.ones((5, 5, 3), np.float32),
                               np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64),
                               src_tile=2, tile=2, kernel=3)
    assert cols.shape == (0, 27)
    out = ops.tile_scatter_ref(np.zeros((0, 3), np.float32), np.ones((1, 3, 5, 5), np.float32),
                               np.zeros((0, 2), np.int64), tile=2)
    np.testing.assert_array_equal(out, np.ones((1, 3, 5, 5), np.float32))
