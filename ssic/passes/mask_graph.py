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
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass, TopologicalSortPass

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
    def dilate(self, x: str, radius: int, *, slack: bool = False) -> str:
        """Grow a 0/1 mask ``[1, 1, H, W]`` by ``radius`` pixels (square window, clipped to the map).

        ``slack``: a superset that may reach up to ``radius // 8 - 1`` pixels further, computed on a map
        ``radius // 8`` times coarser (bounded exact mode's budget, where only "at least" matters: 32 px on
        Real-ESRGAN's 512x512 grid cost 31 ms as 16 full-size MaxPools, under 3 ms this way)."""
        if radius <= 0:
            return x
        if radius == 1:
            return self.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        s = radius // 8 if slack else 1
        if s > 1:
            # |p - q| <= r implies |p//s - q//s| <= ceil(r/s): dilate the s-pooled map, repeat, crop
            small = self.op("MaxPool", [x], kernel_shape=[s, s], strides=[s, s], ceil_mode=1)
            grown = self.dilate(small, -(-radius // s))
            up = self.op("Resize", [grown, "", self.const(np.array([1, 1, s, s], np.float32))], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            hw = self.op("Slice", [self.op("Shape", [x]), self.const(np.array([2], np.int64)),
                                   self.const(np.array([4], np.int64))])
            return self.op("Slice", [up, self.const(np.array([0, 0], np.int64)), hw,
                                     self.const(np.array([2, 3], np.int64))])
        # O(log r) ops of 3 reads per pixel: padded by r, then along each axis valid 3-tap MaxPools dilated
        # by steps 1, 2, 4, ... (reach 2^n - 1 after n) and the remainder (< 2^n, so the reach stays
        # contiguous), each shrinking the map by twice its step back to the original size. The pad is -1,
        # which no max picks (each window's centre is in the map); a zero pad would be folded into the
        # first MaxPool's pads by ONNX Runtime, which then refuses pads wider than the window.
        x = self.op("Pad", [x, self.const(np.array([0, 0, radius, radius, 0, 0, radius, radius], np.int64)),
                            self.const(np.array(-1.0, np.float32))])
        for axis in (0, 1):
            for d in _steps(radius):
                if axis == 0:
                    x = self.op("MaxPool", [x], kernel_shape=[3, 1], dilations=[d, 1])
                else:
                    x = self.op("MaxPool", [x], kernel_shape=[1, 3], dilations=[1, d])
        return x

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

    def model(self, outputs: list[tuple[str, list[int | str]]], *, simplify: bool = True) -> onnx.ModelProto:
        """The ModelProto (IR version 10) with the named int64 outputs of the given shapes; ``simplify``
        collapses chains of dilations (:func:`simplify_dilations`)."""
        for name, shape in outputs:
            v = self.values[name]
            v.shape = ir.Shape(shape)
            v.type = ir.TensorType(ir.DataType.INT64)
            self.graph.outputs.append(v)
        model = ir.Model(self.graph, ir_version=10, producer_name="ssic")
        if simplify:
            ShapeInferencePass()(model)  # the map sizes bound the dilations
            simplify_dilations(self)
        # constants of idioms whose result went unused (ONNX Runtime warns about each at load)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.serde.serialize_model(model)


def _window_radius(node: ir.Node) -> int | None:
    """r when ``node`` is a stride-1 MaxPool over a centred (2r+1)^2 window (a dilation of a 0/1 mask by r
    pixels, clipped to the image: ONNX's MaxPool ignores its padding), else None."""
    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    a = node.attributes
    kernel = list(a.get_ints("kernel_shape", []))
    if len(kernel) != 2 or kernel[0] != kernel[1] or kernel[0] % 2 == 0:
        return None
    r = (kernel[0] - 1) // 2
    if list(a.get_ints("strides", [1, 1])) != [1, 1] or list(a.get_ints("dilations", [1, 1])) != [1, 1] \
            or list(a.get_ints("pads", [0, 0, 0, 0])) != [r] * 4 or a.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    return r


def simplify_dilations(builder: MaskGraphBuilder) -> None:
    """Rewrite ``builder``'s mask graph so that chains of dilations cost O(log r) ops, not O(layers).

    Exact mode's change masks follow every layer: a network of n 3x3 convs builds n stride-1 MaxPools,
    each a dilation by one pixel of the last, and ``Max`` unions of masks that are dilations of one
    another (a residual's two branches; a grid's union of every layer). Clipped to the image, a
    dilation by r1 of a dilation by r2 is the dilation by r1 + r2, and the union of two dilations of
    one mask is the larger. So every value is tracked as (base mask, radius); a union keeps one operand
    per base; a dilation read by anything but the next dilation is recomputed from its base with
    :meth:`MaskGraphBuilder.dilate` (or as the map's maximum once r spans the map). The chains are then
    dead code.
    Measured on Real-ESRGAN x4plus at 128x128 (bounded exact mode, 363 MaxPools and 372 Max):
    see BENCHMARKS.md.
    """
    graph = builder.graph
    form: dict[ir.Value, tuple[ir.Value, int]] = {}
    chain: dict[ir.Value, int] = {}  # MaxPools on the longest path from the base

    def of(v: ir.Value) -> tuple[ir.Value, int]:
        return form.get(v, (v, 0))

    for node in list(graph):
        if node.op_type == "Identity" and len(node.inputs) == 1 and node.inputs[0] is not None:
            form[node.outputs[0]] = of(node.inputs[0])
            chain[node.outputs[0]] = chain.get(node.inputs[0], 0)
            continue
        r = _window_radius(node)
        if r is not None and node.inputs[0] is not None:
            base, r0 = of(node.inputs[0])
            form[node.outputs[0]] = (base, r0 + r)
            chain[node.outputs[0]] = chain.get(node.inputs[0], 0) + 1
            continue
        if node.op_type == "Max" and node.inputs and all(v is not None for v in node.inputs):
            best: dict[ir.Value, ir.Value] = {}
            for v in node.inputs:
                base, r = of(v)
                if base not in best or of(best[base])[1] < r:
                    best[base] = v
            keep = list(best.values())
            if len(keep) == 1:
                form[node.outputs[0]] = of(keep[0])
                chain[node.outputs[0]] = chain.get(keep[0], 0)
                if node.outputs[0].is_graph_output():
                    _keep_output(graph, node.outputs[0], keep[0])
                ir.convenience.replace_all_uses_with(node.outputs[0], keep[0])
                graph.remove(node, safe=True)  # now, so that its inputs' uses are only the live ones
            elif len(keep) < len(node.inputs):
                node.resize_inputs(len(keep))
                for i, v in enumerate(keep):
                    node.replace_input_with(i, v)
    # dilations read by other ops than the next dilation: recomputed from the base in O(log r) ops
    made: dict[tuple[ir.Value, int], ir.Value] = {}
    for v, (base, r) in list(form.items()):
        if r < 2 or v.producer() is None or _window_radius(v.producer()) is None \
                or chain.get(v, 0) <= 1 + 2 * len(_steps(r)):
            continue
        uses = [(n, i) for n, i in v.uses() if _window_radius(n) is None]
        if not uses and not v.is_graph_output():
            continue
        if (base, r) not in made:
            made[(base, r)] = builder.values[_grow(builder, base, r)]
        for n, i in uses:
            n.replace_input_with(i, made[(base, r)])
        if v.is_graph_output():
            _keep_output(graph, v, made[(base, r)])


def _keep_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Graph output ``old`` now computed as ``new``: an Identity keeps the output's name."""
    node = ir.Node("", "Identity", [new], name=f"{old.name}/keep")
    graph.append(node)
    i = list(graph.outputs).index(old)
    name = old.name
    old.name = f"{name}/replaced"
    node.outputs[0].name = name
    node.outputs[0].shape, node.outputs[0].type = old.shape, old.type
    graph.outputs[i] = node.outputs[0]


def _map_size(v: ir.Value) -> tuple[int, int] | None:
    shape = v.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return None
    return int(shape[2]), int(shape[3])


def _grow(builder: MaskGraphBuilder, base: ir.Value, r: int) -> str:
    """``base`` (a 0/1 mask ``[1, 1, H, W]`` of the builder's graph) dilated by ``r`` pixels, clipped to the
    map: the map's maximum everywhere once ``r`` reaches across it, else :meth:`MaskGraphBuilder.dilate`."""
    name = base.name
    assert builder.values.get(name) is base, f"{name} is not a value of the mask graph"
    hw = _map_size(base)
    if hw is not None and r >= max(hw) - 1:
        top = builder.op("ReduceMax", [name], keepdims=1)
        return builder.op("Expand", [top, builder.const(np.array([1, 1, *hw], np.int64))])
    return builder.dilate(name, r)


def _steps(r: int) -> list[int]:
    """Dilation steps 1, 2, 4, ... and the remainder, summing to ``r``."""
    steps, reach, d = [], 0, 1
    while reach + d <= r:
        steps.append(d)
        reach += d
        d *= 2
    if r > reach:
        steps.append(r - reach)
    return steps
