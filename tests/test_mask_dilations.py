"""Mask graphs: chains of dilations and unions of them are simplified to O(log r) ops, with equal results."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssic.masks import brush_stroke_mask
from ssic.passes.mask_graph import MaskGraphBuilder


def chain_graph(depth: int, hw: tuple[int, int], residual_every: int, wide_every: int):
    """An exact-mode-like mask graph: ``depth`` 3x3 dilations (a 5x5 one every ``wide_every``), a residual
    union every ``residual_every``, one strided pool; outputs: the union of every layer (as a grid's tiles
    would take it), the last layer, and the pooled map, all cast to int64."""
    b = MaskGraphBuilder()
    m = b.add_input("m", [1, 1, *hw])
    layers, x, block_in = [m], m, m
    for i in range(1, depth + 1):
        k = 5 if wide_every and i % wide_every == 0 else 3
        x = b.op("MaxPool", [x], kernel_shape=[k, k], pads=[k // 2] * 4)
        if residual_every and i % residual_every == 0:
            x = b.op("Max", [x, block_in])
            block_in = x
        layers.append(x)
    union = b.op("Max", layers)
    pooled = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    outs = []
    for name, v in (("union", union), ("last", x), ("pooled", pooled)):
        outs.append((b.op("Cast", [v], output=name, to=7), None))
    shapes = {"union": [1, 1, *hw], "last": [1, 1, *hw], "pooled": [1, 1, -(-hw[0] // 2), -(-hw[1] // 2)]}
    return b, [(n, shapes[n]) for n, _ in outs]


def run(model, mask):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"m": mask.astype(np.float32)[None, None]})


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(1, 40), seed=st.integers(0, 1000), residual=st.sampled_from([0, 2, 3]),
       wide=st.sampled_from([0, 4]), hw=st.sampled_from([(32, 32), (24, 40), (7, 50)]),
       area=st.sampled_from([0.0, 0.01, 0.05]))
def test_simplified_mask_graph_equals_the_chain(depth, seed, residual, wide, hw, area):
    mask = brush_stroke_mask(hw[0], hw[1], area, seed) if area else np.zeros(hw, bool)
    b, outs = chain_graph(depth, hw, residual, wide)
    simplified = b.model(outs)
    b2, outs2 = chain_graph(depth, hw, residual, wide)
    plain = b2.model(outs2, simplify=False)
    assert len(simplified.graph.node) <= len(plain.graph.node)
    for got, want in zip(run(simplified, mask), run(plain, mask), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_deep_chain_costs_log_ops():
    """350 one-pixel dilations with residual unions (Real-ESRGAN's shape): O(log) MaxPools remain."""
    b, outs = chain_graph(350, (64, 64), 3, 0)
    model = b.model(outs)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MaxPool") <= 2 * 2 * 10 + 1 and ops.count("Max") <= 2
    mask = np.zeros((64, 64), bool)
    mask[10, 20] = True
    union, last, _ = run(model, mask)
    assert union.all() and last.all()  # radius 350 covers the 64x64 map


@pytest.mark.parametrize("r", [2, 3, 5, 8, 13, 64])
def test_dilations_compose_by_adding_radii(r):
    """What simplify_dilations relies on: clipped to the map, a (2r+1)^2 window and a 3x3 window followed by
    a (2r-1)^2 one are both the dilation by r (ONNX MaxPool ignores its padding)."""
    b = MaskGraphBuilder()
    m = b.add_input("m", [1, 1, 40, 30])
    x = b.op("MaxPool", [m], kernel_shape=[2 * r + 1] * 2, pads=[r] * 4)
    y = b.op("MaxPool", [b.op("MaxPool", [m], kernel_shape=[3, 3], pads=[1] * 4)], kernel_shape=[2 * r - 1] * 2,
             pads=[r - 1] * 4)
    b.op("Cast", [x], output="x", to=7)
    b.op("Cast", [y], output="y", to=7)
    model = b.model([("x", [1, 1, 40, 30]), ("y", [1, 1, 40, 30])])
    mask = brush_stroke_mask(40, 30, 0.02, r)
    x, y = run(model, mask)
    from ssic.masks import dilate

    np.testing.assert_array_equal(x[0, 0], dilate(mask, r))
    np.testing.assert_array_equal(y[0, 0], dilate(mask, r))


@pytest.mark.parametrize("r,slack", [(1, False), (7, False), (16, True), (32, True), (40, True)])
def test_builder_dilation(r, slack):
    """MaskGraphBuilder.dilate: exact, or with ``slack`` a superset reaching at most r // 8 - 1 px further."""
    from ssic.masks import dilate

    b = MaskGraphBuilder()
    m = b.add_input("m", [1, 1, 100, 90])
    b.op("Cast", [b.dilate(m, r, slack=slack)], output="y", to=7)
    model = b.model([("y", [1, 1, 100, 90])])
    for seed in range(3):
        mask = brush_stroke_mask(100, 90, 0.01, seed)
        (y,) = run(model, mask)
        got = y[0, 0].astype(bool)
        assert (got >= dilate(mask, r)).all()
        assert (got <= dilate(mask, r + max(r // 8 - 1, 0))).all()
        if not slack:
            np.testing.assert_array_equal(got, dilate(mask, r))
