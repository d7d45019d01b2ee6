"""Pre-processing passes run before the sparse rewrite.

They make the graph regular enough to analyse: constants become initializers, every value has a
unique name and an inferred static shape, same-size nearest resizes disappear, and repeated
sub-expressions (SPADE resizes the same label map once per normalisation layer) are computed once.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    LiftConstantsToInitializersPass,
    NameFixPass,
    RemoveUnusedNodesPass,
    TopologicalSortPass,
)

from ssic.errors import SSICError


class EliminateIdentityResizePass(ir.passes.InPlacePass):
    """Remove Resize nodes whose output has the input's shape (``F.interpolate`` to the same size)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type != "Resize" or node.domain != "":
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x.shape is None or y.shape is None or list(x.shape) != list(y.shape):
                continue
            if not all(isinstance(d, int) for d in y.shape):
                continue
            if y.is_graph_output():
                continue
            y.replace_all_uses_with(x)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)


class FoldStaticShapePass(ir.passes.InPlacePass):
    """Replace ``Shape`` of a statically shaped value by a constant (TorchScript's GroupNorm uses one)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import numpy as np

        modified = False
        for node in list(model.graph):
            if node.op_type != "Shape" or node.domain != "" or node.outputs[0].is_graph_output():
                continue
            shape = node.inputs[0].shape
            if shape is None or not all(isinstance(d, int) for d in shape):
                continue
            dims = list(shape)
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            array = np.array(dims[start:end], np.int64)
            name = node.outputs[0].name + "/folded"
            const = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.tensor(array, name=name))
            model.graph.register_initializer(const)
            node.outputs[0].replace_all_uses_with(const)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)


#: ops whose output 0 has the shape and type of input 0 (filled in where ONNX's inference leaves them
#: unknown: it infers nothing for opset-21 GroupNormalization, so everything after it lost its shape)
SHAPE_PRESERVING = {"GroupNormalization", "InstanceNormalization", "LayerNormalization", "BatchNormalization",
                    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus",
                    "Clip", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu", "Identity", "Reciprocal", "Mish",
                    "Dropout", "PRelu"}


class InferShapesPass(ir.passes.InPlacePass):
    """ONNX shape inference with data propagation; every value gets a static shape where one exists.

    Where ONNX's inference stops at an op it cannot infer although the op keeps its input's shape
    (:data:`SHAPE_PRESERVING`), that shape is filled in and inference runs again from there.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for _ in range(16):
            self._infer(model)
            filled = False
            for node in model.graph:
                if node.domain not in ("", "ai.onnx") or node.op_type not in SHAPE_PRESERVING or not node.inputs:
                    continue
                x, y = node.inputs[0], node.outputs[0]
                if x is not None and x.shape is not None and y.shape is None:
                    y.shape = ir.Shape(list(x.shape))
                    if y.type is None:
                        y.type = x.type
                    filled = True
            if not filled:
                break
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _infer(model: ir.Model) -> None:
        proto = ir.serde.serialize_model(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        except Exception as exc:  # onnx raises several types; the message is what matters
            raise SSICError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
        new = ir.serde.deserialize_model(inferred)
        shapes = {}
        for v in new.graph.inputs:
            shapes[v.name] = (v.shape, v.type)
        for node in new.graph:
            for out in node.outputs:
                shapes[out.name] = (out.shape, out.type)
        for node in model.graph:
            for out in node.outputs:
                if out.name in shapes:
                    shape, typ = shapes[out.name]
                    if shape is not None:
                        out.shape = shape
                    if typ is not None:
                        out.type = typ


def preprocess_passes(disabled: set[str]) -> list[tuple[str, ir.passes.PassBase]]:
    passes: list[tuple[str, ir.passes.PassBase]] = [
        ("lift-constants", LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)),
        ("name-fix", NameFixPass()),
        ("infer-shapes", InferShapesPass()),
        ("fold-static-shape", FoldStaticShapePass()),
        ("eliminate-identity-resize", EliminateIdentityResizePass()),
        ("cse", CommonSubexpressionEliminationPass()),
        ("remove-unused", RemoveUnusedNodesPass()),
        ("toposort", TopologicalSortPass()),
        ("infer-shapes-final", InferShapesPass()),
    ]
    return [(n, p) for n, p in passes if n not in disabled]
