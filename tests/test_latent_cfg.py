"""Classifier-free guidance with two cache states per step (ssic.latent.GuidedUNet) on the tiny SD UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ssic
from ssic.errors import SSICError
from ssic.latent import GuidedUNet, cfg_cache_ids

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install ssic[test])")

from ssic.models.export import export_sd  # noqa: E402

LATENT = 16


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    onnx_path = export_sd("sd-unet", "tiny", tmp / "unet.onnx", seed=0, size=(8 * LATENT, 8 * LATENT))
    return ssic.load(ssic.compile(onnx_path, output_dir=tmp / "unet.ssic"), threads=2)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    cond = rng.standard_normal((1, 77, 32)).astype(np.float32)
    uncond = rng.standard_normal((77, 32)).astype(np.float32)  # without the batch dim: accepted
    return x, cond, uncond


def test_two_states_all_tiles_equal_dense_cfg(unet):
    x, cond, uncond = _inputs()
    g = GuidedUNet(unet, cond, uncond, guidance=7.5)
    base = g.prime(x, 501.0, step=3)
    assert set(cfg_cache_ids(3)) <= set(unet.cache_ids)
    np.testing.assert_allclose(base, g.dense(x, 501.0), atol=1e-4)
    # guidance really mixes the branches: not the conditional prediction alone
    eps_c = unet.dense({"sample": x, "timestep": np.array([501.0], np.float32), "encoder_hidden_states": cond})
    assert np.abs(base - eps_c["out_sample"]).max() > 0.1

    edited = x.copy()
    edited[:, :, 4:8, 6:9] += 1.0
    want = g.dense(edited, 501.0)
    full = g.edit(edited, 501.0, step=3, mask=np.ones((LATENT, LATENT), bool), mode="sparse")
    assert all(st.mode == "sparse" and st.active_fraction == 1.0 for st in g.last.values())
    # float tolerance of float16 caches: the incremental GroupNorm sums subtract the cached (rounded)
    # values of the replaced tiles; the guidance multiplies the branches' difference by g
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(full, want, atol=5e-4 * scale)

    small = g.edit(edited, 501.0, step=3, mode="sparse")  # the difference mask, one for both branches
    assert [st.active_tiles for st in g.last.values()][0] == [st.active_tiles for st in g.last.values()][1]
    assert g.last["cond"].active_fraction < 0.7
    inside = np.zeros((LATENT, LATENT), bool)
    inside[4:8, 6:9] = True
    err, nothing = np.abs(small - want)[..., inside].mean(), np.abs(base - want)[..., inside].mean()
    # (tiny random-weight UNet at a 16x16 latent: one branch alone gives 0.10-0.15 here)
    assert err < 0.25 * nothing, (err, nothing)


def test_without_guidance_one_state(unet):
    x, cond, uncond = _inputs(1)
    for g in (GuidedUNet(unet, cond), GuidedUNet(unet, cond, uncond, guidance=1.0)):
        for cid in list(unet.cache_ids):
            unet.forget(cid)
        eps = g.prime(x, 10.0, step=0)
        assert unet.cache_ids == [(0, "cond")]
        ref = unet.dense({"sample": x, "timestep": np.array([10.0], np.float32), "encoder_hidden_states": cond})
        np.testing.assert_array_equal(eps, ref["out_sample"])
        g.forget(0)
        assert unet.cache_ids == []


def test_bad_embeddings_and_sessions_say_why(unet, tmp_path):
    x, cond, _ = _inputs()
    with pytest.raises(SSICError, match=r"embedding has shape \[1, 77, 16\], the UNet takes \[1, 77, 32\]"):
        GuidedUNet(unet, cond[..., :16])
    with pytest.raises(SSICError, match="negative embedding holds 2464 NaN or infinite values"):
        GuidedUNet(unet, cond, np.full_like(cond, np.nan), guidance=3.0)
    with pytest.raises(SSICError, match="guidance must be a finite"):
        GuidedUNet(unet, cond, guidance=float("inf"))


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.c(x)


def test_batch2_compile_error_points_to_two_cache_states(tmp_path):
    path = tmp_path / "b2.onnx"
    torch.onnx.export(_Conv().eval(), (torch.zeros(2, 4, 16, 16),), str(path), input_names=["sample"],
                      output_names=["y"], opset_version=18, dynamo=False)
    with pytest.raises(SSICError) as info:
        ssic.compile(path, output_dir=tmp_path / "b2.ssic")
    msg = str(info.value)
    assert "\n" not in msg and "has batch 2" in msg and "two cache states per step" in msg
