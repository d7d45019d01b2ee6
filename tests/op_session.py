"""One ssic custom op as an ONNX Runtime session with the op library (shared by the op tests)."""

from __future__ import annotations

import onnxruntime as ort
from onnx import NodeProto, helper

from ssic import ops
from ssic.library import get_library_path


def op_session(node: NodeProto, inputs: dict[str, int], outputs: dict[str, int], threads: int = 2) -> ort.InferenceSession:
    """A session running ``node`` alone: ``inputs``/``outputs`` map names to ONNX element types (shapes
    left open)."""
    graph = helper.make_graph([node], "op", [helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()])
    model = helper.make_model(graph, opset_imports=ops.opset_imports(), ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
