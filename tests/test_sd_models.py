"""Stable Diffusion parts (tiny presets): export, ONNX Runtime == PyTorch, both checkpoint layouts,
external data, compile, and prime + edit against dense."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import ssic
from ssic.errors import SSICError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install ssic[test])")

from ssic.cli import main as cli_main  # noqa: E402
from ssic.models import sd_checkpoints as ckpt  # noqa: E402
from ssic.models.export import export_sd  # noqa: E402
from ssic.models.sd import (  # noqa: E402
    SCALING_FACTOR,
    build_sd_model,
    build_unet,
    build_vae,
    parse_size,
    sd_example_inputs,
    unet_config,
    vae_config,
    wrap,
)


def _torch(module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return module(*(torch.from_numpy(v) for v in inputs.values())).numpy()


def _ort(path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, inputs)[0]


def _close(out: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    assert out.shape == ref.shape
    err, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
    assert err <= rel * max(scale, 1e-6), f"max abs err {err} > {rel} * {scale}"


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray, peak: float) -> float:
    mse = float(((a - b) ** 2)[..., where].mean())
    return 10 * np.log10(peak**2 / max(mse, 1e-30))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sd")


@pytest.fixture(scope="module")
def unet_onnx(work):
    """The tiny UNet (seed 0) exported by the Python API at a 32x32 latent."""
    return export_sd("sd-unet", "tiny", work / "unet.onnx", seed=0, size=(256, 256))


@pytest.fixture(scope="module")
def vae_ckpt(work):
    """A CompVis-layout checkpoint (UNet + VAE, seed 3) written by the test."""
    path = work / "sd-tiny.ckpt"
    ckpt.save_compvis(path, unet=build_unet("tiny", 3), vae=build_vae("tiny", 3))
    return path


@pytest.fixture(scope="module")
def decoder_onnx(work, vae_ckpt):
    """The tiny VAE decoder exported by the command line from the CompVis checkpoint (16x16 latent)."""
    out = work / "decoder.onnx"
    cli_main(["-q", "export", "sd-vae-decoder", "--preset", "tiny", "--size", "128", "--weights", str(vae_ckpt),
              "-o", str(out)])  # exits (status 2) only on an error
    return out


# ---------------------------------------------------------------- export: ONNX Runtime == PyTorch


def test_unet_export_matches_torch(unet_onnx):
    model = onnx.load(str(unet_onnx))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ssic.model"] == "sd-unet" and meta["ssic.preset"] == "tiny"
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert [o.name for o in model.graph.output] == ["out_sample"]
    assert model.ir_version == 10
    inputs = sd_example_inputs("sd-unet", "tiny", seed=0)
    assert inputs["sample"].shape == (1, 4, 32, 32) and inputs["encoder_hidden_states"].shape == (1, 77, 32)
    assert inputs["timestep"].shape == (1,) and inputs["timestep"].dtype == np.float32
    ref = _torch(build_sd_model("sd-unet", "tiny", 0), inputs)
    assert 0.05 < float(ref.std()) < 20
    _close(_ort(unet_onnx, inputs), ref)


def test_unet_batch2_is_two_batch1_runs():
    """Classifier-free guidance runs both halves in one batch: each row equals its own batch-1 run."""
    model = build_sd_model("sd-unet", "tiny", 0)
    x2 = sd_example_inputs("sd-unet", "tiny", seed=1, size=(128, 128), batch=2)
    assert x2["sample"].shape == (2, 4, 16, 16) and x2["encoder_hidden_states"].shape == (2, 77, 32)
    out2 = _torch(model, x2)
    for b in range(2):
        one = {"sample": x2["sample"][b:b + 1], "timestep": x2["timestep"],
               "encoder_hidden_states": x2["encoder_hidden_states"][b:b + 1]}
        np.testing.assert_allclose(out2[b:b + 1], _torch(model, one), atol=1e-4)
    with pytest.raises(SSICError, match="sd-unet only"):
        sd_example_inputs("sd-vae-decoder", "tiny", batch=2)


def test_decoder_export_from_compvis_matches_torch(decoder_onnx):
    meta = {p.key: p.value for p in onnx.load(str(decoder_onnx)).metadata_props}
    assert meta["ssic.model"] == "sd-vae-decoder"
    x = sd_example_inputs("sd-vae-decoder", "tiny", seed=0)
    assert x["latent"].shape == (1, 4, 16, 16)
    ref = _torch(wrap("sd-vae-decoder", build_vae("tiny", 3)), x)  # the weights the checkpoint holds
    assert ref.shape == (1, 3, 128, 128) and ref.min() >= -1 and ref.max() <= 1
    _close(_ort(decoder_onnx, x), ref)


def test_encoder_export_is_scaled_posterior_mean(work):
    path = export_sd("sd-vae-encoder", "tiny", work / "encoder.onnx", seed=0, size=(64, 64))
    x = sd_example_inputs("sd-vae-encoder", "tiny", seed=0, size=(64, 64))
    vae = build_vae("tiny", 0)
    with torch.no_grad():
        want = (vae.encode(torch.from_numpy(x["image"])).latent_dist.mean * SCALING_FACTOR).numpy()
    assert want.shape == (1, 4, 8, 8)
    _close(_ort(path, x), want)


def test_parse_size():
    assert parse_size("512") == (512, 512) and parse_size("256x512") == (256, 512) and parse_size(None) is None
    for bad in ("500", "0", "axb", "8x8x8"):
        with pytest.raises(SSICError):
            parse_size(bad)


# ---------------------------------------------------------------- checkpoint layouts


def test_diffusers_layout_round_trip(work):
    src = build_unet("tiny", 5)
    folder = ckpt.save_diffusers(src, work / "pipe" / "unet")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    x = sd_example_inputs("sd-unet", "tiny", seed=2, size=(64, 64))
    want = _torch(wrap("sd-unet", src), x)
    src_sd = src.state_dict()
    for where in (folder, work / "pipe", folder / "diffusion_pytorch_model.safetensors"):
        loaded = build_sd_model("sd-unet", "tiny", weights=str(where))
        assert all(torch.equal(v, src_sd[k]) for k, v in loaded.unet.state_dict().items())
        # the same weights; the output may differ in the last float bits (memory alignment of the
        # loaded tensors picks other conv kernels)
        np.testing.assert_allclose(_torch(loaded, x), want, rtol=0, atol=1e-5)
    assert not np.array_equal(_torch(build_sd_model("sd-unet", "tiny", 0), x), want)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_layout_round_trip(work, suffix):
    unet, vae = build_unet("tiny", 4), build_vae("tiny", 4)
    path = ckpt.save_compvis(work / f"compvis{suffix}", unet=unet, vae=vae)
    keys = set(ckpt.read_compvis_state_dict(path))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert not any("down_blocks" in k or "resnets" in k for k in keys)
    loaded = {"sd-unet": build_sd_model("sd-unet", "tiny", weights=str(path))}
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in loaded["sd-unet"].unet.state_dict().items())
    for name in ("sd-vae-decoder", "sd-vae-encoder"):
        loaded[name] = build_sd_model(name, "tiny", weights=str(path))
        src = wrap(name, vae).state_dict()
        assert all(torch.equal(v, src[k]) for k, v in loaded[name].state_dict().items())
    for name, model in loaded.items():
        x = sd_example_inputs(name, "tiny", seed=1, size=(64, 64))
        np.testing.assert_allclose(_torch(model, x), _torch(wrap(name, unet if name == "sd-unet" else vae), x),
                                   rtol=0, atol=1e-5)


def test_compvis_keys_of_sd15():
    """The CompVis names of the full (SD 1.5) configuration are the ones SD 1.x checkpoints use."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config("full"))
        vae = diffusers.AutoencoderKL(**vae_config("full"))
    names = {ckpt.diffusers_to_compvis_unet(k, unet.config): tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(names) == len(unet.state_dict()) == 686
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    facts = {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
    }
    for k, shape in facts.items():
        assert names[k] == shape, k
    vnames = {ckpt.diffusers_to_compvis_vae(k, vae.config): tuple(v.shape) for k, v in vae.state_dict().items()}
    assert len(vnames) == 248
    for k, shape in {"decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
                     "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                     "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
                     "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
                     "decoder.norm_out.weight": (128,)}.items():
        assert vnames[k] == shape, k
    # every name maps back
    for k in unet.state_dict():
        assert ckpt.compvis_to_diffusers_unet(ckpt.diffusers_to_compvis_unet(k, unet.config), unet.config) == k


def test_compvis_layout_errors(work):
    path = ckpt.save_compvis(work / "unet-only.ckpt", unet=build_unet("tiny", 0))
    with pytest.raises(SSICError, match="first_stage_model"):
        build_sd_model("sd-vae-decoder", "tiny", weights=str(path))
    with pytest.raises(SSICError, match="wrong preset"):  # a tiny checkpoint is not SD 1.5
        ckpt.load_compvis("unet", path, "full")
    sd = ckpt.read_compvis_state_dict(path)
    del sd["model.diffusion_model.out.2.bias"]
    torch.save({"state_dict": sd}, work / "broken.ckpt")
    with pytest.raises(SSICError, match="missing key 'model.diffusion_model.out.2.bias'"):
        build_sd_model("sd-unet", "tiny", weights=str(work / "broken.ckpt"))


# ---------------------------------------------------------------- models over 2 GB: external data


def test_external_data_export_and_inspect(work, monkeypatch, capsys):
    """The >2 GB path (weights in FILE.data, checker and inspect by path) on a small model."""
    from ssic.macs import count_macs, load_model_for_analysis
    from ssic.models import export as export_mod

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    module = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)}
    path = export_mod.export_module_to_file(module, x, ["y"], work / "ext.onnx", metadata={"ssic.model": "test"})
    assert (work / "ext.onnx.data").stat().st_size >= 4 * 8 * 4 * 9  # ir.save keeps tensors < 256 B inline
    assert not any(p.name.startswith(".ext.onnx") for p in work.iterdir())  # no temporary left behind
    _close(_ort(path, x), _torch(module, x))
    proto = load_model_for_analysis(path)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert count_macs(proto)["macs_total"] == 16 * 16 * (8 * 4 * 9 + 4 * 8)
    cli_main(["inspect", "--json", str(path)])
    report = json.loads(capsys.readouterr().out)
    assert report["macs_total"] == 16 * 16 * (8 * 4 * 9 + 4 * 8) and report["metadata"]["ssic.model"] == "test"
    # an artefact's graphs share one linked copy of the weights, readable from another directory
    from ssic.external_data import external_locations, load_lazily, share_external_data

    lazy = load_lazily(path)
    assert [loc.startswith("/") for loc in external_locations(lazy)] == [True]
    target = work / "artefact"
    target.mkdir()
    for name in ("a.onnx", "b.onnx"):
        onnx.save(share_external_data(onnx.load(str(path), load_external_data=False), work, target),
                  str(target / name))
    assert sorted(p.name for p in target.iterdir()) == ["a.onnx", "b.onnx", "weights.data"]
    for name in ("a.onnx", "b.onnx"):
        np.testing.assert_array_equal(_ort(target / name, x), _ort(path, x))
    (work / "ext.onnx.data").unlink()
    with pytest.raises(SSICError, match="not a valid ONNX model"):
        load_model_for_analysis(path)
    with pytest.raises(SSICError, match="is missing"):
        share_external_data(onnx.load(str(path), load_external_data=False), work, target)


# ---------------------------------------------------------------- compile, prime, edit


def test_unet_compiles_and_edits(work, unet_onnx):
    art = ssic.compile(unet_onnx, output_dir=work / "unet.ssic")
    sess = ssic.load(art, threads=2)
    m = sess.manifest.model_dump()
    assert all(layer["reason"] for layer in m["layers"])
    # every conv at the sparse resolutions (32x32 and 16x16 latent) runs sparse, proj_in/proj_out too
    convs = [layer for layer in m["layers"] if layer["kind"][0].isdigit()]
    assert sum(layer["sparse"] for layer in convs) == len(convs) >= 30
    assert any("proj_in" in layer["node"] and layer["sparse"] for layer in convs)
    # the transformer blocks run on the active tiles too: projections, feed-forward, self- and
    # cross-attention; only the context's key/value projections (no image input) and the time
    # embedding stay dense
    matmuls = [layer for layer in m["layers"] if layer["kind"] in ("linear", "self-attn", "cross-attn")]
    assert sum(layer["kind"] == "self-attn" and layer["sparse"] for layer in matmuls) == 8  # q kᵀ and P v, 4 blocks
    assert sum(layer["kind"] == "cross-attn" and layer["sparse"] for layer in matmuls) == 8
    dense = [layer["node"] for layer in matmuls if not layer["sparse"]]
    assert len(dense) == 8 and all("attn2.to_k" in n or "attn2.to_v" in n for n in dense), dense
    gemms = [layer for layer in m["layers"] if layer["kind"] == "Gemm"]  # the time embedding: no pixels
    assert gemms and all(not g["sparse"] and "reads no sparse grid's pixels" in g["reason"] for g in gemms)
    from click.testing import CliRunner

    from ssic.cli import cli

    shown = CliRunner().invoke(cli, ["inspect", str(art)]).output  # the embedding's width, for a new user
    assert "input encoder_hidden_states: float [1, 77, 32]" in shown and "output out_sample: float" in shown
    by_op = m["macs"]["by_op_type"]
    assert by_op["MatMul"] > 0.3 * m["macs"]["dense"]
    assert m["macs"]["sparse_fixed"] < 0.01 * m["macs"]["dense"]
    assert sess.manifest.mask.primary.input == "sample"

    x = sd_example_inputs("sd-unet", "tiny", seed=0)
    base = sess.prime(x)["out_sample"]
    np.testing.assert_array_equal(base, sess.dense(x)["out_sample"])
    edited = dict(x, sample=x["sample"].copy())
    edited["sample"][:, :, 10:14, 12:16] += 1.0
    got = sess.edit(edited, mode="sparse")["out_sample"]
    assert sess.last.mode == "sparse" and sess.last.active_fraction < 0.3
    assert sess.last.macs < 0.4 * sess.last.macs_dense  # 1.5% edit: attention no longer a fixed cost
    want = sess.dense(edited)["out_sample"]
    inside = np.zeros((32, 32), bool)
    inside[10:14, 12:16] = True
    err, nothing = np.abs(got - want)[..., inside].mean(), np.abs(base - want)[..., inside].mean()
    assert err < 0.1 * nothing, (err, nothing)
    full = sess.edit(edited, mask=np.ones((32, 32), bool), mode="sparse")["out_sample"]
    np.testing.assert_allclose(full, want, atol=1e-4)


def test_decoder_exact_and_default_edit(work, decoder_onnx):
    x = sd_example_inputs("sd-vae-decoder", "tiny", seed=0)
    edited = {"latent": x["latent"].copy()}
    edited["latent"][:, :, 4:8, 6:10] += 1.0
    mask = np.zeros((128, 128), bool)  # the edited latent cells in pixel space
    mask[32:64, 48:80] = True

    exact = ssic.load(ssic.compile(decoder_onnx, output_dir=work / "dec-exact.ssic", exact=True), threads=2)
    exact.prime(x)
    want = exact.dense(edited)["image"]
    got = exact.edit(edited, mask=mask, mode="sparse")["image"]
    # GroupNorm statistics and the mid attention are global: exact mode activates every tile
    assert exact.last.mode == "sparse" and exact.last.active_fraction == 1.0
    np.testing.assert_allclose(got, want, atol=1e-4)

    sess = ssic.load(ssic.compile(decoder_onnx, output_dir=work / "dec.ssic"), threads=2)
    assert all(layer.sparse for layer in sess.manifest.layers if layer.kind[0].isdigit())  # every conv
    base = sess.prime(x)["image"]
    got = sess.edit(edited, mask=mask, mode="sparse")["image"]
    assert sess.last.mode == "sparse" and sess.last.macs < 0.3 * sess.last.macs_dense
    psnr_in, nothing_in = _psnr(got, want, mask, 2.0), _psnr(base, want, mask, 2.0)
    assert psnr_in > 35 and psnr_in > nothing_in + 20, (psnr_in, nothing_in)
    assert _psnr(got, want, ~mask, 2.0) >= _psnr(base, want, ~mask, 2.0) - 0.5
