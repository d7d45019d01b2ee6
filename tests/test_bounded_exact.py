"""Bounded exact mode and its calibration (trained deep networks carry an edit far; see ssic.calibrate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ssic
from ssic.artefact import read_manifest
from ssic.errors import SSICError


class Deep(torch.nn.Module):
    """A stack of 3x3 convs whose receptive field covers the whole 32x32 image (like a deep SR trunk)."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.body = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(depth))
        self.last = torch.nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for c in self.body:
                c.weight.mul_(0.5)

    def forward(self, x):
        h = self.first(x)
        for c in self.body:
            h = h + 0.5 * torch.nn.functional.leaky_relu(c(h), 0.2)
        return self.last(h)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("deep") / "deep.onnx"
    torch.onnx.export(Deep().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=18, dynamo=False)
    return path


def _run(art, x, edited):
    sess = ssic.load(art, threads=1)
    sess.prime({"x": x})
    out = sess.edit({"x": edited}, mode="sparse")["y"]
    return out, sess.dense({"x": edited})["y"], sess.last.active_fraction


def test_budget_bounds_the_region_and_the_error(model, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    edited = x.copy()
    edited[..., 14:17, 14:17] = 1.0
    exact = ssic.compile(model, output_dir=tmp_path / "exact.ssic", exact=True)
    out_e, ref, frac_e = _run(exact, x, edited)
    np.testing.assert_allclose(out_e, ref, atol=1e-4)
    assert frac_e > 0.9  # 14 convs reach the whole 32x32 image
    errs, fracs = [], []
    for r in (2, 6, 10):
        art = ssic.compile(model, output_dir=tmp_path / f"r{r}.ssic", radius_budget=r)
        m = read_manifest(art)
        assert m.exact and m.mask.mode == "bounded-exact" and m.mask.radius_budget == r
        out, ref, frac = _run(art, x, edited)
        errs.append(float(np.abs(out - ref).max()))
        fracs.append(frac)
    assert fracs[0] < fracs[1] < fracs[2] <= frac_e
    assert errs[0] > errs[2]  # a larger budget, a smaller error


def test_calibration_picks_the_smallest_budget_reaching_the_target(model, tmp_path):
    rng = np.random.default_rng(1)
    imgs = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        a = (rng.uniform(0, 1, (8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).resize((48, 48), Image.Resampling.BILINEAR).save(p)
        imgs.append(str(p))
    art = ssic.compile(model, output_dir=tmp_path / "cal.ssic", calibrate=imgs, target_psnr=45)
    m = read_manifest(art)
    rec = m.calibration
    assert rec and rec["target_psnr"] == 45 and rec["samples"] == 4
    curve = rec["curve"]
    assert curve[-1]["psnr_min"] >= 45 or curve[-1]["radius"] is None
    assert all(row["psnr_min"] < 45 for row in curve[:-1])  # every smaller budget missed the target
    assert m.mask.radius_budget == rec["radius"]
    # the artefact's mask graph is the chosen one: an edit reaches the recorded quality
    fr = [row["active_fraction"] for row in curve]
    assert fr == sorted(fr)
    # ssic inspect shows the budget and its calibration; --json carries the whole curve
    from click.testing import CliRunner

    from ssic.cli import cli

    text = CliRunner().invoke(cli, ["inspect", str(art)])
    assert text.exit_code == 0 and "calibrated for 45" in text.output and "4 sample edits" in text.output
    data = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(art)]).output)
    assert data["calibration"]["curve"] == curve


def test_target_psnr_needs_images(model, tmp_path):
    with pytest.raises(SSICError, match="needs --calibrate"):
        ssic.compile(model, output_dir=tmp_path / "x.ssic", target_psnr=40)
    with pytest.raises(SSICError, match="not found"):
        ssic.compile(model, output_dir=tmp_path / "x.ssic", calibrate=[str(tmp_path / "none.png")])
    assert not (tmp_path / "x.ssic").exists()
