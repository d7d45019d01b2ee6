"""Every documented compile option changes the artefact (or is refused): none can be dropped silently.

The table below has one row per field of :class:`ssic.options.CompileOptions`; a test fails when an
option is added without a row. Each row compiles a small GroupNorm model with a non-default value and
checks the effect in the artefact itself (graphs, grids, caches, the mask graph), not only the
manifest's record of the option.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import ssic
from ssic.artefact import read_manifest
from ssic.errors import SSICError
from ssic.options import FAMILY_DEFAULTS, CompileOptions, resolve_options


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = self.c0(x)
        d = self.c1(torch.relu(self.down(torch.nn.functional.silu(self.gn(h)))))
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return self.out(torch.cat([u, h], 1))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("opts") / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    return path


def _digest(art: Path, file: str) -> str:
    return hashlib.sha256((art / file).read_bytes()).hexdigest()


def _ops(art: Path, file: str) -> list[str]:
    return sorted(n.op_type for n in onnx.load(str(art / file)).graph.node)


def _ssic_ops(art: Path, file: str) -> set[str]:
    return {n.op_type for n in onnx.load(str(art / file)).graph.node if n.domain == "ssic"}


def _mask_attrs(art: Path) -> list:
    return [(n.op_type, [(a.name, list(a.ints)) for a in n.attribute]) for n in onnx.load(str(art / "mask.onnx")).graph.node]


# option -> (value, check(default artefact, new artefact) -> bool, what it must change)
ROWS = {
    "target": ("trt", None, "refused without TensorRT, else trt engines"),
    "lowering": ("standard", lambda a, b: _ssic_ops(a, "sparse.onnx") and not _ssic_ops(b, "sparse.onnx"),
                 "sparse graph without ssic ops"),
    "exact": (True, lambda a, b: read_manifest(b).mask.mode == "exact" and _mask_attrs(a) != _mask_attrs(b), "mask graph"),
    "sparse_min_res": (32, lambda a, b: {g.name for g in read_manifest(b).grids} == {"32x32"}
                       and len(read_manifest(a).grids) == 2, "grids"),
    "tile": (4, lambda a, b: {g.tile for g in read_manifest(b).grids} == {4}
             and _digest(a, "sparse.onnx") != _digest(b, "sparse.onnx"), "tile sizes"),
    "tiles": ({"16x16": 4}, lambda a, b: read_manifest(b).grid("16x16").tile == 4
              and read_manifest(b).grid("32x32").tile == read_manifest(a).grid("32x32").tile, "one grid's tile"),
    "mask_eps": (0.25, None, "the runtime's difference threshold"),
    "mask_radius": (4, lambda a, b: _mask_attrs(a) != _mask_attrs(b), "mask dilation"),
    "level_dilation": (3, lambda a, b: _mask_attrs(a) != _mask_attrs(b), "pyramid dilation"),
    "halo": (3, lambda a, b: {g.halo for g in read_manifest(b).grids} == {3} and _mask_attrs(a) != _mask_attrs(b),
             "halo"),
    "halos": ({"32x32": 3}, lambda a, b: read_manifest(b).grid("32x32").halo == 3 and _mask_attrs(a) != _mask_attrs(b),
              "one grid's halo"),
    "fallback_ratio": (0.01, None, "the runtime's dense fallback"),
    "radius_budget": (3, lambda a, b: read_manifest(b).mask.mode == "bounded-exact" and _mask_attrs(a) != _mask_attrs(b),
                      "bounded exact mask graph"),
    "calibrate": ("IMAGES", lambda a, b: read_manifest(b).calibration is not None
                  and read_manifest(b).calibration["samples"] == 2, "a calibrated radius budget"),
    "target_psnr": (30.0, None, "refused without --calibrate"),
    "gn_stats": ("cached", lambda a, b: {c.kind for c in read_manifest(b).caches} >= {"gn_scale", "gn_shift"}
                 and not {c.kind for c in read_manifest(b).caches} & {"gn_sum", "gn_sumsq"}
                 and _digest(a, "sparse.onnx") != _digest(b, "sparse.onnx"), "GroupNorm caches"),
    "cache_dtype": ("float32", lambda a, b: "float16" in {c.dtype for c in read_manifest(a).caches if c.kind == "activation"}
                    and {c.dtype for c in read_manifest(b).caches if c.kind == "activation"} == {"float32"}
                    and read_manifest(b).cache_bytes() > read_manifest(a).cache_bytes()
                    and _digest(a, "prime.onnx") != _digest(b, "prime.onnx"), "cache types and sizes"),
    "recompute_swish": (True, lambda a, b: read_manifest(b).cache_bytes() < read_manifest(a).cache_bytes()
                        and len(read_manifest(b).caches) < len(read_manifest(a).caches), "fewer caches"),
    "disabled_passes": (["cse"], lambda a, b: "preprocess/cse" in {p["name"] for p in read_manifest(a).passes}
                        and "preprocess/cse" not in {p["name"] for p in read_manifest(b).passes}, "passes run"),
    "input_shapes": ({"x": [1, 3, 32, 32]}, lambda a, b: read_manifest(b).options.input_shapes == {"x": [1, 3, 32, 32]},
                     "input shapes (a no-op on a static model; dynamic models: test_legacy)"),
}


def test_every_option_has_a_row():
    fields = set(CompileOptions.model_fields) - {"sources"}
    assert fields == set(ROWS), f"options without a test row: {sorted(fields - set(ROWS))}"


@pytest.fixture(scope="module")
def default_art(model, tmp_path_factory):
    return ssic.compile(model, output_dir=tmp_path_factory.mktemp("d") / "default.ssic")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_option_changes_the_artefact(name, model, default_art, tmp_path):
    value, check, what = ROWS[name]
    out = tmp_path / f"{name}.ssic"
    if value == "IMAGES":
        from PIL import Image

        Image.fromarray((np.random.default_rng(0).uniform(0, 255, (40, 40, 3))).astype(np.uint8)).save(tmp_path / "a.png")
        value = [str(tmp_path / "a.png")]
    kwargs = {name: value}
    if name in ("target", "lowering"):
        kwargs = {"target": value} if name == "target" else {"lowering": value}
    try:
        art = ssic.compile(model, output_dir=out, **kwargs)
    except SSICError as exc:
        assert not out.exists()
        if name == "target_psnr":
            assert "--calibrate" in str(exc)
            return
        assert name == "target", f"{name}={value!r} was refused: {exc}"
        assert "TensorRT" in str(exc) or "tensorrt" in str(exc).lower()
        return
    assert name != "target_psnr", "target_psnr without calibrate images must be refused"
    m = read_manifest(art)
    recorded = getattr(m.options, name)
    assert recorded == value, f"{name}: manifest records {recorded!r}, compiled with {value!r}"
    assert m.options.sources.get(name) == "given"
    if name == "target":
        assert m.target == "trt" and m.trt and m.trt["engines"]
        return
    if check is not None:
        assert check(default_art, art), f"{name}={value!r} did not change the {what}"
        return
    # runtime options: the loaded session behaves differently
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    edited = x.copy()
    edited[:, :, 4:8, 4:8] += 0.1
    base, new = ssic.load(default_art, threads=1), ssic.load(art, threads=1)
    for s in (base, new):
        s.prime({"x": x})
        s.edit({"x": edited})
    if name == "mask_eps":  # a 0.1 change is below eps 0.25: nothing to recompute
        assert base.last.mode == "sparse" and new.last.mode == "cached"
    elif name == "fallback_ratio":  # any sparse run costs more than 1% of dense
        assert base.last.mode == "sparse" and new.last.mode == "dense"


@pytest.mark.parametrize("bad", [{"tile": 0}, {"halo": -1}, {"fallback_ratio": 0}, {"gn_stats": "global"},
                                 {"mask_radius": -2}, {"nonsense": 1}])
def test_bad_values_are_refused_before_work(bad, model, tmp_path):
    with pytest.raises(SSICError):
        ssic.compile(model, output_dir=tmp_path / "x.ssic", **bad)
    assert not (tmp_path / "x.ssic").exists()


def test_required_pass_cannot_be_disabled(model, tmp_path):
    for name in ("sparsify", "build-prime", "lower-standard", "validate"):
        with pytest.raises(SSICError, match="required"):
            ssic.compile(model, output_dir=tmp_path / "x.ssic", lowering="standard", disabled_passes=[name])
    with pytest.raises(SSICError, match="unknown pass"):
        ssic.compile(model, output_dir=tmp_path / "x.ssic", disabled_passes=["no-such-pass"])
    assert not (tmp_path / "x.ssic").exists()


def test_precedence_given_over_metadata_over_family():
    meta = {"ssic.model": "ddim", "ssic.mask_radius": "3"}
    o = resolve_options({}, meta)
    assert (o.mask_radius, o.sources["mask_radius"]) == (3, "metadata")
    assert (o.sparse_min_res, o.sources["sparse_min_res"]) == (FAMILY_DEFAULTS["ddim"]["sparse_min_res"], "family:ddim")
    o = resolve_options({"mask_radius": 7}, meta)
    assert (o.mask_radius, o.sources["mask_radius"]) == (7, "given")
    assert resolve_options({"exact": True}, meta).mask_radius == 0


def test_cached_gn_stats_change_the_edit(model, default_art, tmp_path):
    """The bug this structure fixes: gn_stats='cached' used to be dropped (outputs equal the default's)."""
    art = ssic.compile(model, output_dir=tmp_path / "cached.ssic", gn_stats="cached")
    assert read_manifest(art).gn_stats == "cached"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    edited = x.copy()
    edited[:, :, 8:20, 8:20] += 3.0
    outs = []
    for a in (default_art, art):
        s = ssic.load(a, threads=1)
        s.prime({"x": x})
        outs.append(s.edit({"x": edited}, mode="sparse")["y"])
    assert np.abs(outs[0] - outs[1]).max() > 1e-4


def test_recompute_swish_keeps_the_output(model, default_art, tmp_path):
    """--recompute-swish reads GroupNorm's input with the swish in the gather: a sparse edit with every
    tile active equals dense (incremental statistics), and a small edit equals the cached-swish artefact."""
    art = ssic.compile(model, output_dir=tmp_path / "rs.ssic", recompute_swish=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    edited = x.copy()
    edited[:, :, 4:9, 20:26] += 1.0
    outs = []
    for a in (art, default_art):
        sess = ssic.load(a)
        sess.prime({"x": x})
        outs.append(sess.edit({"x": edited}, mode="sparse")["y"])
        full = sess.edit({"x": edited}, mask=np.ones((32, 32), bool), mode="sparse")["y"]
        np.testing.assert_allclose(full, sess.dense({"x": edited})["y"], atol=2e-3, rtol=0)
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-3, rtol=0)
