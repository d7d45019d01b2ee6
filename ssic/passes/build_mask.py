"""The default-mode mask graph: edit mask -> dilation -> SIGE's per-resolution pyramid -> active tiles.

Mirrors :func:`ssic.masks.mask_pyramid` and :func:`ssic.masks.active_tiles` (the NumPy reference the
tests compare it with) in stock ONNX ops, so the runtime (and TensorRT) computes the tiles of an
edit without Python in the loop. Each grid has its own tile size and halo.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ssic.masks import PYRAMID_EPS, PYRAMID_THRESHOLD, nearest_source_level, pyramid_chain
from ssic.passes.analysis import Grid


class _Builder:
    """Nodes and initializers of a small mask graph; ``prefix`` keeps names apart when graphs are joined."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.prefix = prefix

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def resize_any(self, m: str, hw: tuple[int, int], to: tuple[int, int]) -> str:
        """Resize a 0/1 mask ``[1, 1, *hw]`` to ``to`` conservatively (no set pixel is lost)."""
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

    def const(self, array: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def dilate(self, x: str, radius: int) -> str:
        if radius <= 0:
            return x
        k = 2 * radius + 1
        return self.op("MaxPool", [x], kernel_shape=[k, k], pads=[radius] * 4)


def build_mask_graph(input_hw: tuple[int, int], grids: list[Grid], *, radius: int, level_dilation: int,
                     opset: int = 18) -> onnx.ModelProto:
    """Mask graph: input ``ssic.mask`` float32 ``[1, 1, H0, W0]`` -> ``ssic.tiles.<HxW>`` int64 ``[n, 2]`` per grid."""
    b = _Builder()
    full = b.dilate("ssic.mask", radius)
    sizes = [(g.height, g.width) for g in grids]
    chain = pyramid_chain(tuple(input_hw), sizes)
    levels = {chain[0]: full}
    cur = full
    zero = b.const(np.array(0.0, np.float32))
    cap = b.const(np.array(PYRAMID_THRESHOLD, np.float32))
    eps = b.const(np.array(PYRAMID_EPS, np.float32))
    for (h, w) in chain[1:]:
        # 2x2 averaging of the previous level (an odd last row/column is dropped, as the reference does)
        cropped = b.op("Slice", [cur, b.const(np.array([0, 0], np.int64)), b.const(np.array([2 * h, 2 * w], np.int64)),
                                 b.const(np.array([2, 3], np.int64))])
        halved = b.op("AveragePool", [cropped], kernel_shape=[2, 2], strides=[2, 2])
        top = b.op("ReduceMax", [halved], keepdims=0)
        thr = b.op("Max", [b.op("Min", [cap, b.op("Sub", [top, eps])]), zero])
        cur = b.op("Cast", [b.op("Greater", [halved, thr])], to=TensorProto.FLOAT)
        cur = b.dilate(cur, level_dilation)
        levels[(h, w)] = cur
    for grid in grids:
        size = (grid.height, grid.width)
        src = nearest_source_level(chain, size)
        m = levels[src]
        if src != size:
            m = b.op("Resize", [m, "", "", b.const(np.array([1, 1, *size], np.int64))], mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        t, halo = grid.tile, grid.halo
        gh, gw = grid.cells
        pads = [halo, halo, gh * t - grid.height + halo, gw * t - grid.width + halo]
        pooled = b.op("MaxPool", [m], kernel_shape=[t + 2 * halo, t + 2 * halo], strides=[t, t], pads=pads)
        active = b.op("Greater", [b.op("Squeeze", [pooled, b.const(np.array([0, 1], np.int64))]), zero])
        idx = b.op("Transpose", [b.op("NonZero", [active])], perm=[1, 0])
        b.op("Mul", [idx, b.const(np.array(t, np.int64))], output=grid.tiles_input)
    g = helper.make_graph(
        b.nodes, "ssic_mask",
        [helper.make_tensor_value_info("ssic.mask", TensorProto.FLOAT, [1, 1, *input_hw])],
        [helper.make_tensor_value_info(gr.tiles_input, TensorProto.INT64, [f"n_{gr.name}", 2]) for gr in grids],
        b.inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="ssic")
    model.ir_version = 10
    return model


def with_mask_sources(core: onnx.ModelProto, sources, mask_hw: tuple[int, int]) -> onnx.ModelProto:
    """Feed ``core`` (input ``ssic.mask`` at ``mask_hw``) from one mask per spatial model input.

    Each source ``s`` (``ssic.artefact.MaskSource``) becomes an input ``s.mask_input`` float32
    ``[1, 1, s.height, s.width]``, resized *conservatively* to ``mask_hw`` (a pixel is set when any
    source pixel it overlaps is set: max-pooling where the source is finer, nearest replication where
    it is coarser, one extra pixel of growth where the ratio is not an integer), and the union
    (``Max``) of all sources replaces ``ssic.mask``. With one source at ``mask_hw`` named
    ``ssic.mask`` the core graph is returned unchanged.
    """
    if len(sources) == 1 and sources[0].mask_input == "ssic.mask" and \
            (sources[0].height, sources[0].width) == tuple(mask_hw):
        return core
    b = _Builder("sources/")
    parts = [b.resize_any(s.mask_input, (s.height, s.width), tuple(mask_hw)) for s in sources]
    b.op("Max", parts, output="ssic.mask") if len(parts) > 1 else b.op("Identity", parts, output="ssic.mask")
    g = core.graph
    nodes = list(b.nodes) + list(g.node)
    inits = list(b.inits) + list(g.initializer)
    inputs = [helper.make_tensor_value_info(s.mask_input, TensorProto.FLOAT, [1, 1, s.height, s.width]) for s in sources]
    graph = helper.make_graph(nodes, g.name, inputs, list(g.output), inits)
    model = helper.make_model(graph, opset_imports=list(core.opset_import), producer_name="ssic")
    model.ir_version = core.ir_version
    return model


def bound_mask_graph(exact: onnx.ModelProto, sources, grids: list[Grid], mask_hw: tuple[int, int],
                     radius: int) -> onnx.ModelProto:
    """Bounded exact mode: limit the exact graph's active tiles to ``radius`` pixels around the edit.

    ``exact`` is the exact-mode mask graph (change masks propagated through every receptive field,
    one input per mask source). Its tiles per grid are intersected with the edit (the union of the
    sources, resized conservatively to the grid) dilated by ``radius`` pixels of the finest grid
    ``mask_hw`` (scaled to each grid's resolution, rounded up). Every value within that distance of
    the edit whose inputs can have changed is recomputed; beyond it the cache is read, so the error
    comes only from what the network carries further than ``radius`` (measured and calibrated by
    ``ssic compile --calibrate``). Returns a graph with the same inputs and outputs.
    """
    b = _Builder("bound/")
    g = exact.graph
    renamed = {gr.tiles_input: gr.tiles_input + ".unbounded" for gr in grids}
    nodes = []
    for node in g.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        for i, o in enumerate(node.output):
            if o in renamed:
                node.output[i] = renamed[o]
        nodes.append(node)
    one = b.const(np.array([1.0], np.float32))
    for gr in grids:
        H, W, t = gr.height, gr.width, gr.tile
        gh, gw = gr.cells
        parts = [b.resize_any(s.mask_input, (s.height, s.width), (H, W)) for s in sources]
        edit = parts[0] if len(parts) == 1 else b.op("Max", parts)
        r = -(-radius * max(H / mask_hw[0], W / mask_hw[1]) // 1)
        r = max(1, int(r))
        near = b.op("MaxPool", [edit], kernel_shape=[2 * r + 1, 2 * r + 1], pads=[r, r, r, r])
        budget = b.op("MaxPool", [near], kernel_shape=[t, t], strides=[t, t], ceil_mode=1)
        budget = b.op("Reshape", [budget, b.const(np.array([gh, gw], np.int64))])
        idx = renamed[gr.tiles_input]
        cells = b.op("Div", [idx, b.const(np.array(t, np.int64))])
        n = b.op("Slice", [b.op("Shape", [idx]), b.const(np.array([0], np.int64)), b.const(np.array([1], np.int64))])
        ones = b.op("Expand", [one, n])
        active = b.op("ScatterND", [b.const(np.zeros((gh, gw), np.float32)), cells, ones])
        both = b.op("Greater", [b.op("Mul", [active, budget]), b.const(np.array(0.0, np.float32))])
        nz = b.op("Transpose", [b.op("NonZero", [both])], perm=[1, 0])
        b.op("Mul", [nz, b.const(np.array(t, np.int64))], output=gr.tiles_input)
    graph = helper.make_graph(nodes + list(b.nodes), g.name, list(g.input), list(g.output),
                              list(g.initializer) + list(b.inits))
    model = helper.make_model(graph, opset_imports=list(exact.opset_import), producer_name="ssic")
    model.ir_version = exact.ir_version
    return model
