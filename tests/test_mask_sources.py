"""Every changed input drives the edit, each at its own resolution (issue: any image model).

Smallest failing inputs from the bug reports: an inpainting model whose ``mask`` input alone changes,
a super-resolution model whose only input is 4x smaller than its output, and an NHWC export.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ssic
from ssic.artefact import read_manifest
from ssic.masks import resize_mask_any


class Inpaint(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, image, mask):
        h = torch.relu(self.c0(torch.cat([image * (1 - mask), mask], 1)))
        return self.out(torch.relu(self.c1(h))) * mask + image * (1 - mask)


class SuperRes(torch.nn.Module):
    """ESRGAN-like: convs at the input resolution, then nearest x2 + conv twice (x4 output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.body = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.last = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        f = self.first(x)
        f = f + self.body(torch.nn.functional.leaky_relu(f, 0.2))
        f = torch.nn.functional.leaky_relu(self.up1(torch.nn.functional.interpolate(f, scale_factor=2.0)), 0.2)
        f = torch.nn.functional.leaky_relu(self.up2(torch.nn.functional.interpolate(f, scale_factor=2.0)), 0.2)
        return self.last(f)


def _export(tmp, net, args, names, out="y"):
    path = tmp / "m.onnx"
    torch.onnx.export(net.eval(), args, str(path), input_names=names, output_names=[out], opset_version=18,
                      dynamo=False)
    return path


@pytest.mark.parametrize("exact", [True, False])
def test_inpainting_mask_input_alone_drives_the_edit(tmp_path, exact):
    path = _export(tmp_path, Inpaint(), (torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)), ["image", "mask"])
    art = ssic.compile(path, output_dir=tmp_path / "a.ssic", exact=exact)
    assert {s.input for s in read_manifest(art).mask.sources} == {"image", "mask"}
    sess = ssic.load(art, threads=1)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    hole = np.zeros((1, 1, 32, 32), np.float32)
    hole[..., 4:10, 4:10] = 1
    sess.prime({"image": image, "mask": hole})
    new_hole = hole.copy()
    new_hole[..., 20:26, 18:24] = 1  # the user paints a second hole; the image is unchanged
    out = sess.edit({"image": image, "mask": new_hole})["y"]
    ref = sess.dense({"image": image, "mask": new_hole})["y"]
    assert sess.last.mode == "sparse"
    changed = np.abs(ref - sess.dense({"image": image, "mask": hole})["y"]).max()
    assert changed > 0.05  # the dense output moved: a stale answer would fail below
    if exact:
        np.testing.assert_allclose(out, ref, atol=1e-4)
    else:
        assert np.abs(out - ref)[..., 20:26, 18:24].max() < 1e-4


@pytest.mark.parametrize("exact", [True, False])
def test_low_resolution_input_gets_an_automatic_mask(tmp_path, exact):
    path = _export(tmp_path, SuperRes(), (torch.zeros(1, 3, 16, 16),), ["x"])
    art = ssic.compile(path, output_dir=tmp_path / "sr.ssic", exact=exact, sparse_min_res=16)
    m = read_manifest(art)
    assert (m.mask.height, m.mask.width) == (64, 64)
    assert [(s.input, s.height, s.width) for s in m.mask.sources] == [("x", 16, 16)]
    sess = ssic.load(art, threads=1)
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)
    sess.prime({"x": x})
    edited = x.copy()
    edited[..., 6:8, 9:11] = 0.5
    out = sess.edit({"x": edited})["y"]
    ref = sess.dense({"x": edited})["y"]
    assert sess.last.mode == "sparse" and sess.last.active_fraction < 0.5
    if exact:
        np.testing.assert_allclose(out, ref, atol=1e-4)
    else:
        np.testing.assert_allclose(out[..., 24:32, 36:44], ref[..., 24:32, 36:44], atol=1e-4)
    # a mask given at the output's resolution is accepted too, and means the same region
    mask_hr = np.zeros((64, 64), bool)
    mask_hr[24:32, 36:44] = True
    out2 = sess.edit({"x": edited}, mask=mask_hr)["y"]
    np.testing.assert_allclose(out2[..., 24:32, 36:44], ref[..., 24:32, 36:44], atol=1e-4)


def test_nhwc_input_behind_a_transpose(tmp_path):
    """A tf2onnx-style graph: NHWC input -> Transpose -> Conv -> Relu -> Conv."""
    rng = np.random.default_rng(2)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 8, 3, 3)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["xt", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 24, 24, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 24, 24])], [w1, w2])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "nhwc.onnx"
    onnx.save(model, path)
    art = ssic.compile(path, output_dir=tmp_path / "n.ssic", exact=True)
    src = read_manifest(art).mask.sources[0]
    assert (src.input, src.height, src.width, src.channel_axis) == ("x", 24, 24, 3)
    sess = ssic.load(art, threads=1)
    x = rng.standard_normal((1, 24, 24, 3)).astype(np.float32)
    sess.prime({"x": x})
    e = x.copy()
    e[:, 3:6, 10:14, :] += 1
    out = sess.edit({"x": e})["y"]
    assert sess.last.mode == "sparse" and sess.last.active_fraction < 0.5
    np.testing.assert_allclose(out, sess.dense({"x": e})["y"], atol=1e-4)


def test_resize_mask_any_never_loses_a_pixel():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 40, 2)
        H, W = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < 0.05
        r = resize_mask_any(m, (H, W))
        for y, x in zip(*np.nonzero(m), strict=True):
            # the output pixels whose footprint covers input pixel (y, x)
            ys = [Y for Y in range(H) if (Y * h) // H <= y < -(-((Y + 1) * h) // H)]
            xs = [X for X in range(W) if (X * w) // W <= x < -(-((X + 1) * w) // W)]
            assert r[np.ix_(ys, xs)].all()
