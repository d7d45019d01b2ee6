"""ssic on ONNX models that are not ours: a UNet from diffusers (GroupNorm, attention, timestep input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssic

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")


@pytest.fixture(scope="module")
def diffusers_unet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t):
            return self.m(x, t).sample

    path = tmp / "unet.onnx"
    x = torch.randn(1, 3, 64, 64)
    t = torch.tensor([10.0])
    torch.onnx.export(Wrapper(unet), (x, t), str(path), input_names=["x", "t"], output_names=["y"],
                      opset_version=18, dynamo=False)
    art = ssic.compile(path, output_dir=tmp / "unet.ssic", sparse_min_res=32, mask_radius=2)
    return art


def test_diffusers_unet_compiles_and_edits(diffusers_unet):
    sess = ssic.load(diffusers_unet, threads=2)
    layers = [layer.model_dump() for layer in sess.manifest.layers]
    sparse = [layer for layer in layers if layer["sparse"]]
    assert len(sparse) >= 6, layers
    assert all(layer["reason"] for layer in layers)  # every dense conv says why
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    t = np.array([10.0], np.float32)
    base = sess.prime({"x": x, "t": t})["y"]
    np.testing.assert_array_equal(base, sess.dense({"x": x, "t": t})["y"])
    edited = x.copy()
    edited[:, :, 20:28, 30:38] += 1.0
    got = sess.edit({"x": edited, "t": t}, mode="sparse")["y"]
    assert sess.last.mode == "sparse" and sess.last.active_fraction < 0.6
    want = sess.dense({"x": edited, "t": t})["y"]
    # inside the edit the sparse result is far closer to dense than the original output is
    inside = (slice(None), slice(None), slice(20, 28), slice(30, 38))
    err = np.abs(got - want)[inside].mean()
    nothing = np.abs(base - want)[inside].mean()
    assert err < 0.25 * nothing, (err, nothing)
    # incremental GroupNorm statistics: with every tile active the result is the dense one
    full = sess.edit({"x": edited, "t": t}, mask=np.ones((64, 64), bool), mode="sparse")["y"]
    np.testing.assert_allclose(full, want, atol=1e-3)
