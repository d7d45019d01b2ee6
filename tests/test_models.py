"""Tests of ssic.models: builds, seeded init, ONNX export parity, checkpoint loaders."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
import pytest
import torch

from ssic.errors import SSICError
from ssic.models import MODEL_NAMES, build_model, example_inputs, export_model, output_names
from ssic.models.checkpoints import load_ddim_checkpoint, load_spade_checkpoint
from ssic.models.gaugan import instance_edges, make_gaugan_input

SLOW_ENV = os.environ.get("SSIC_SLOW", "") not in ("", "0")


def _require_slow(request) -> None:
    """Full-size tests run only with ``-m slow`` or ``SSIC_SLOW=1``."""
    if not (SLOW_ENV or "slow" in (request.config.getoption("markexpr") or "")):
        pytest.skip("full-size test: run with -m slow or SSIC_SLOW=1")


def _torch_forward(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(v) for v in inputs.values())).numpy()


def _ort_run(path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def _assert_close_rel(out: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    assert out.shape == ref.shape
    scale = float(np.abs(ref).max())
    err = float(np.abs(out - ref).max())
    assert err <= rel * max(scale, 1e-6), f"max abs err {err} > {rel} * {scale}"


# ---------------------------------------------------------------- building and init


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_output_std_and_time(name):
    model = build_model(name, "tiny", seed=0)
    assert not model.training
    inputs = example_inputs(name, "tiny", seed=0)
    _torch_forward(model, inputs)  # warm-up
    t0 = time.perf_counter()
    out = _torch_forward(model, inputs)
    dt = time.perf_counter() - t0
    std = float(out.std())
    print(f"\n{name} tiny: output {tuple(out.shape)} std {std:.4f} forward {dt * 1e3:.0f} ms")
    assert np.isfinite(out).all()
    assert 0.05 < std < 20.0
    # the output differs between pixels and channels: not a trivial constant
    assert float(np.abs(out - out.mean()).max()) > 1e-3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeded_init_is_deterministic(name):
    a = build_model(name, "tiny", seed=7).state_dict()
    b = build_model(name, "tiny", seed=7).state_dict()
    c = build_model(name, "tiny", seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_example_inputs_shapes():
    ex = example_inputs("ddim", "tiny", 0)
    assert ex["x"].shape == (1, 3, 256, 256) and ex["x"].dtype == np.float32
    assert ex["t"].shape == (1,) and ex["t"].dtype == np.float32 and 0 <= ex["t"][0] < 1000
    ex = example_inputs("pd", "full", 0)
    assert list(ex) == ["x", "t"] and 0 <= ex["t"][0] <= 1
    seg = example_inputs("gaugan", "tiny", 0)["seg"]
    assert seg.shape == (1, 36, 256, 512) and seg.dtype == np.float32
    np.testing.assert_array_equal(seg[0, :35].sum(0), 1.0)


def test_full_architecture_shapes_on_meta():
    from ssic.models.presets import build_architecture

    with torch.device("meta"):
        d = build_architecture("ddim", "full")
        assert d(torch.empty(1, 3, 256, 256), torch.empty(1)).shape == (1, 3, 256, 256)
        p = build_architecture("pd", "full")
        assert p(torch.empty(1, 3, 256, 256), torch.empty(1)).shape == (1, 6, 256, 256)
        g = build_architecture("gaugan", "full")
        assert g(torch.empty(1, 36, 256, 512)).shape == (1, 3, 256, 512)
    names = dict(d.named_modules())
    for key in ("conv_in", "down.0.block.0.norm1", "down.0.downsample.conv", "down.4.attn.1.q",
                "mid.block_1", "mid.attn_1.proj_out", "up.5.upsample.conv", "up.4.attn.2.v",
                "down.2.block.0.nin_shortcut", "norm_out", "conv_out", "temb.dense.1"):
        assert key in names, key
    gnames = dict(g.named_modules())
    for key in ("fc", "head_0.norm_0.mlp_shared.0", "up_0.conv_s", "up_0.norm_s.mlp_gamma",
                "G_middle_1.norm_1.param_free_norm", "up_3.conv_1", "conv_img"):
        assert key in gnames, key
    assert "head_0.conv_s" not in gnames


def test_unknown_model_or_preset():
    with pytest.raises(SSICError, match="unknown model 'sd15'"):
        build_model("sd15", "tiny")
    with pytest.raises(SSICError, match="unknown preset 'huge'"):
        example_inputs("ddim", "huge")


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp("onnx") / f"{name}_tiny.onnx"
            t0 = time.perf_counter()
            export_model(name, "tiny", path, seed=0)
            print(f"\nexport {name} tiny: {time.perf_counter() - t0:.1f} s")
            cache[name] = path
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_export_tiny_parity_and_patterns(name, exported):
    path = exported(name)
    model = onnx.load(str(path))
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= 21
    onnx.checker.check_model(model)
    inputs = example_inputs(name, "tiny", 0)
    assert [i.name for i in model.graph.input] == list(inputs)
    assert [o.name for o in model.graph.output] == output_names(name)
    ops = [n.op_type for n in model.graph.node]
    assert "InstanceNormalization" not in ops
    if name in ("ddim", "pd"):
        assert "GroupNormalization" in ops
        n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in build_model(name, "tiny").modules())
        assert ops.count("GroupNormalization") == n_gn
    else:
        assert "BatchNormalization" in ops and "GroupNormalization" not in ops
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resizes
    for n in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["mode"] == b"nearest"
        assert attrs["coordinate_transformation_mode"] == b"asymmetric"
        assert attrs["nearest_mode"] == b"floor"
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names)
    ref = _torch_forward(build_model(name, "tiny", 0), inputs)
    t0 = time.perf_counter()
    out = _ort_run(path, inputs)
    print(f"\n{name} tiny ORT forward {1e3 * (time.perf_counter() - t0):.0f} ms")
    _assert_close_rel(out, ref)


def test_export_bad_inputs(tmp_path):
    with pytest.raises(SSICError, match="unknown model"):
        export_model("nope", "tiny", tmp_path / "a.onnx")
    with pytest.raises(SSICError, match="unknown preset"):
        export_model("ddim", "medium", tmp_path / "a.onnx")
    with pytest.raises(SSICError, match="does not exist"):
        export_model("ddim", "tiny", tmp_path / "missing_dir" / "a.onnx")
    with pytest.raises(SSICError, match="is a directory"):
        export_model("ddim", "tiny", tmp_path)
    with pytest.raises(SSICError, match="weights file not found"):
        export_model("ddim", "tiny", tmp_path / "a.onnx", weights=tmp_path / "nope.pth")
    assert list(tmp_path.iterdir()) == []


def test_export_failure_leaves_nothing(tmp_path, monkeypatch):
    import ssic.models.export as ex

    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    m = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex.os, "replace", failing_replace)
    with pytest.raises(SSICError, match="cannot write .*No space left"):
        ex.save_atomic(m, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    monkeypatch.undo()
    ex.save_atomic(m, target)
    assert onnx.load(str(target)).graph.name == "g"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ---------------------------------------------------------------- checkpoints


def test_ddim_checkpoint_roundtrip(tmp_path):
    model = build_model("ddim", "tiny", seed=3)
    inputs = example_inputs("ddim", "tiny", 1)
    ref = _torch_forward(model, inputs)
    sd = model.state_dict()
    # plain state dict (the converted ema_lsun_church layout)
    torch.save(sd, tmp_path / "plain.ckpt")
    out = _torch_forward(load_ddim_checkpoint(tmp_path / "plain.ckpt", "tiny"), inputs)
    np.testing.assert_array_equal(out, ref)
    # ermongroup training checkpoint: [model, optimizer, epoch, step, ema], DataParallel prefix
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    junk = {f"module.{k}": torch.zeros_like(v) for k, v in sd.items()}
    torch.save([junk, {"state": {}}, 3, 1000, wrapped], tmp_path / "train.pth")
    out = _torch_forward(load_ddim_checkpoint(tmp_path / "train.pth", "tiny"), inputs)
    np.testing.assert_array_equal(out, ref)


def test_ddim_checkpoint_wrong_layout(tmp_path):
    sd = build_model("ddim", "tiny", seed=0).state_dict()
    bad = dict(sd)
    bad["down.0.block.0.norm_1.weight"] = bad.pop("down.0.block.0.norm1.weight")
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(SSICError, match=r"missing key 'down\.0\.block\.0\.norm1\.weight'"):
        load_ddim_checkpoint(tmp_path / "bad.ckpt", "tiny")
    extra = dict(sd)
    extra["mid.extra.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(SSICError, match=r"unexpected key 'mid\.extra\.weight'"):
        load_ddim_checkpoint(tmp_path / "extra.ckpt", "tiny")
    with pytest.raises(SSICError, match="shape"):
        load_ddim_checkpoint(_save(tmp_path, sd), "full")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SSICError, match="cannot read"):
        load_ddim_checkpoint(tmp_path / "garbage.ckpt", "tiny")


def _save(tmp_path, sd):
    p = tmp_path / "tiny_for_full.ckpt"
    torch.save(sd, p)
    return p


def _spectral_normed_gaugan(seed: int):
    """A tiny GauGAN whose block convs carry torch spectral norm, power-iterated a few steps, as
    in an official SPADE checkpoint."""
    model = build_model("gaugan", "tiny", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for mname, m in list(model.named_modules()):
        if mname.split(".")[-1] in ("conv_0", "conv_1", "conv_s"):
            with torch.no_grad():
                m.weight.mul_(3.0)  # a real sigma far from 1
            torch.nn.utils.spectral_norm(m)
            m.train()
            with torch.no_grad():
                for _ in range(3):
                    m(torch.randn(1, m.in_channels, 4, 4, generator=gen))
            m.eval()
    return model.eval()


def test_spade_checkpoint_folds_spectral_norm(tmp_path):
    model = _spectral_normed_gaugan(seed=2)
    sd = model.state_dict()
    assert "up_0.conv_s.weight_orig" in sd and "up_0.conv_s.weight_u" in sd
    assert "up_0.conv_s.weight_v" in sd and "up_0.conv_s.weight" not in sd
    inputs = example_inputs("gaugan", "tiny", 0)
    ref = _torch_forward(model, inputs)
    torch.save(sd, tmp_path / "latest_net_G.pth")
    loaded = load_spade_checkpoint(tmp_path / "latest_net_G.pth", "tiny")
    assert "up_0.conv_s.weight" in loaded.state_dict()
    out = _torch_forward(loaded, inputs)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_spade_checkpoint_wrong_layout(tmp_path):
    sd = _spectral_normed_gaugan(seed=0).state_dict()
    bad = {k: v for k, v in sd.items() if k != "G_middle_0.norm_1.mlp_beta.bias"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(SSICError, match=r"missing key 'G_middle_0\.norm_1\.mlp_beta\.bias'"):
        load_spade_checkpoint(tmp_path / "bad.pth", "tiny")
    bad = {k: v for k, v in sd.items() if k != "up_1.conv_0.weight_v"}
    torch.save(bad, tmp_path / "bad2.pth")
    with pytest.raises(SSICError, match=r"up_1\.conv_0\.weight_v"):
        load_spade_checkpoint(tmp_path / "bad2.pth", "tiny")


def test_export_with_weights(tmp_path, exported):
    # weights loaded from a checkpoint are what gets exported (re-use the ddim tiny model)
    model = build_model("gaugan", "tiny", seed=5)
    torch.save(model.state_dict(), tmp_path / "g.pth")
    with pytest.raises(SSICError, match="unexpected key|missing key"):
        export_model("ddim", "tiny", tmp_path / "x.onnx", weights=tmp_path / "g.pth")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- GauGAN input


def test_make_gaugan_input():
    label = np.array([[0, 0, 3], [0, 34, 3]])
    inst = np.array([[1, 1, 2], [1, 1, 2]])
    seg = make_gaugan_input(label, inst)
    assert seg.shape == (1, 36, 2, 3) and seg.dtype == np.float32
    assert seg[0, 0, 0, 0] == 1 and seg[0, 3, 0, 2] == 1 and seg[0, 34, 1, 1] == 1
    np.testing.assert_array_equal(seg[0, :35].sum(0), 1)
    np.testing.assert_array_equal(seg[0, 35], [[0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(instance_edges(np.array([[1, 2], [1, 1]])), [[1, 1], [0, 1]])
    with pytest.raises(SSICError, match="label ids"):
        make_gaugan_input(np.array([[35]]))


# ---------------------------------------------------------------- full size (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gaugan", "pd", "ddim"])
def test_export_full_parity(name, tmp_path, request):
    _require_slow(request)
    path = export_model(name, "full", tmp_path / f"{name}.onnx", seed=0)
    inputs = example_inputs(name, "full", 0)
    ref = _torch_forward(build_model(name, "full", 0), inputs)
    out = _ort_run(path, inputs)
    _assert_close_rel(out, ref)
    std = float(ref.std())
    print(f"\n{name} full: output std {std:.4f}")
    assert np.isfinite(ref).all() and 0.05 < std < 20
