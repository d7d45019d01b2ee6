"""The one builder of ssic's mask graphs (default mode, exact mode, bounded exact mode), on onnx-ir.

Mask graphs are small, new graphs of stock ONNX ops (MaxPool, Resize, NonZero, ...) that turn edit
masks into active tiles. Their code names tensors by string (``op("MaxPool", [m], kernel_shape=...)``
returns the output's name), which keeps the receptive-field rules short; underneath every value and
node is an ``onnx_ir`` object and the model is written with ``ir.serde``, as every other pass does.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

#: Default-domain opset of the mask graphs (ReduceMax/Resize forms of opset 18).
MASK_OPSET = 18


class MaskGraphBuilder:
    """Builds a graph by tensor names: :meth:`add_input`, :meth:`const`, :meth:`op`, then :meth:`model`."""

    def __init__(self, name: str = "ssic_mask", prefix: str = "", opset: int = MASK_OPSET) -> None:
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": opset}, name=name)
        self.values: dict[str, ir.Value] = {}
        self.prefix = prefix
        self._counter = 0

    def name(self, hint: str) -> str:
        self._counter += 1
        return f"{self.prefix}{hint}_{self._counter}"

    def add_input(self, name: str, shape: list[int | str], dtype: ir.DataType = ir.DataType.FLOAT) -> str:
        """A graph input ``name`` (float32 ``[1, 1, H, W]`` for a mask); returns its name."""
        v = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
        self.graph.inputs.append(v)
        self.values[name] = v
        return name

    def const(self, array: np.ndarray) -> str:
        """An initializer holding ``array``; returns its name."""
        n = self.name("c")
        v = ir.Value(name=n, const_value=ir.tensor(np.asarray(array), name=n))
        self.graph.register_initializer(v)
        self.values[n] = v
        return n

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        """A node of the default domain; ``""`` in ``inputs`` is an omitted optional input. Returns the
        output's name (``output`` or a fresh one)."""
        out = output or self.name(op_type)
        node = ir.Node("", op_type, [self.values[i] if i else None for i in inputs],
                       attributes=ir.convenience.convert_attributes(attrs), outputs=[ir.Value(name=out)],
                       name=self.name(op_type))
        self.graph.append(node)
        self.values[out] = node.outputs[0]
        return out

    # ------------------------------------------------------------------ mask idioms
    def dilate(self, x: str, radius: int) -> str:
        """Grow a 0/1 mask by ``radius`` pixels (square window)."""
        if radius <= 0:
            return x
        k = 2 * radius + 1
        if radius == 1:
            return self.op("MaxPool", [x], kernel_shape=[k, k], pads=[radius] * 4)
        # separable: a (2r+1)^2 window costs (2r+1)^2 reads per pixel, two 1-D passes 2(2r+1)
        # (bounded exact mode's budget of 32 px on a 512x512 grid: 0.9 s -> a few ms)
        x = self.op("MaxPool", [x], kernel_shape=[k, 1], pads=[radius, 0, radius, 0])
        return self.op("MaxPool", [x], kernel_shape=[1, k], pads=[0, radius, 0, radius])

    def resize_any(self, m: str, hw: tuple[int, int], to: tuple[int, int]) -> str:
        """Resize a 0/1 mask ``[1, 1, *hw]`` to ``to`` conservatively (no set pixel is lost): max-pooling
        where it shrinks, nearest replication where it grows, one pixel of growth for a non-integer ratio."""
        h, w = hw
        H, W = to
        ky, kx = (-(-h // H) if h > H else 1), (-(-w // W) if w > W else 1)
        if ky > 1 or kx > 1:
            m = self.op("MaxPool", [m], kernel_shape=[ky, kx], strides=[ky, kx], ceil_mode=1)
            h, w = -(-h // ky), -(-w // kx)
        if (h, w) != (H, W):
            m = self.op("Resize", [m, "", "", self.const(np.array([1, 1, H, W], np.int64))], mode="nearest",
                        coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            if H % h or W % w:
                m = self.op("MaxPool", [m], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        return m

    def union(self, parts: list[str], output: str | None = None) -> str:
        """Element-wise maximum of masks of one size (``Identity`` for one part)."""
        if len(parts) == 1:
            return self.op("Identity", parts, output=output) if output else parts[0]
        return self.op("Max", parts, output=output)

    def model(self, outputs: list[tuple[str, list[int | str]]]) -> onnx.ModelProto:
        """The ModelProto (IR version 10) with the named int64 outputs of the given shapes."""
        for name, shape in outputs:
            v = self.values[name]
            v.shape = ir.Shape(shape)
            v.type = ir.TensorType(ir.DataType.INT64)
            self.graph.outputs.append(v)
        model = ir.Model(self.graph, ir_version=10, producer_name="ssic")
        # constants of idioms whose result went unused (ONNX Runtime warns about each at load)
        RemoveUnusedNodesPass()(model)
        return ir.serde.serialize_model(model)
