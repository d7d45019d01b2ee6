"""Latent editing workflows on the tiny Stable Diffusion presets: SDEdit/img2img and inpainting through
sparse VAE encoder, UNet (classifier-free guidance, per-step cache states) and decoder sessions, from
Python and from ``ssic edit``."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ssic
from ssic.cli import main as cli_main
from ssic.errors import SSICError
from ssic.latent import check_latent_parts, edit_cache_bytes, latent_edit

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install ssic[test])")

from ssic.models.export import export_sd  # noqa: E402

SIZE = 128  # the tiny VAE's default: latent 16x16


def _psnr(a, b, where) -> float:
    mse = float(((a - b) ** 2)[..., where].mean())
    return 10 * np.log10(4.0 / max(mse, 1e-30))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent")
    arts = {}
    for name in ("sd-unet", "sd-vae-encoder", "sd-vae-decoder"):
        onnx_path = export_sd(name, "tiny", tmp / f"{name}.onnx", seed=0, size=(SIZE, SIZE))
        arts[name] = ssic.compile(onnx_path, output_dir=tmp / f"{name}.ssic")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    a = np.stack([np.sin(6 * xx), np.cos(5 * yy), 2 * xx * yy - 1], -1) * 0.5 + 0.5
    b = a.copy()
    b[40:56, 60:80] = [0.9, 0.2, 0.1]
    files = {"a": tmp / "a.png", "b": tmp / "b.png", "emb": tmp / "emb.npy", "neg": tmp / "neg.npy",
             "mask": tmp / "mask.npy", "dir": tmp}
    Image.fromarray((a * 255).round().astype(np.uint8)).save(files["a"])
    Image.fromarray((b * 255).round().astype(np.uint8)).save(files["b"])
    rng = np.random.default_rng(0)
    np.save(files["emb"], rng.standard_normal((1, 77, 32)).astype(np.float32))
    np.save(files["neg"], rng.standard_normal((77, 32)).astype(np.float32))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[30:62, 50:90] = True
    np.save(files["mask"], mask)
    return arts, files


def _sessions(arts):
    return [ssic.load(arts[n], threads=2) for n in ("sd-unet", "sd-vae-encoder", "sd-vae-decoder")]


def _images(files):
    return [(np.asarray(Image.open(files[k]), np.float32) / 255 * 2 - 1).transpose(2, 0, 1)[None].copy()
            for k in ("a", "b")]


def test_sdedit_all_tiles_equals_dense_and_small_edit_close(parts):
    arts, files = parts
    unet, enc, dec = _sessions(arts)
    assert check_latent_parts(unet, enc, dec) == ((SIZE, SIZE), (SIZE // 8, SIZE // 8))
    a, b = _images(files)
    cond, uncond = np.load(files["emb"]), np.load(files["neg"])
    kw = dict(uncond=uncond, guidance=7.5, strength=0.7, steps=3, compare=True, mode="sparse")
    full = latent_edit(unet, enc, dec, a, b, cond, mask=np.ones((SIZE, SIZE), bool), **kw)
    assert full["active_fraction"] == 1.0 and full["image"].shape == (1, 3, SIZE, SIZE)
    # float tolerance of the float16 caches (incremental GroupNorm sums), through 3 guided steps
    np.testing.assert_allclose(full["image"], full["dense"], atol=2e-3)
    assert len(unet.cache_ids) == 6  # 3 steps x (uncond, cond)

    small = latent_edit(unet, enc, dec, a, b, cond, **kw)  # SDEdit: the mask is where the images differ
    m = small["mask"]
    assert m[40:56, 60:80].all() and m.mean() < 0.05
    # the pixel mask max-pooled 8x8 onto the latent grid
    assert small["latent_mask"].shape == (16, 16) and small["latent_mask"][5:7, 8:10].all()
    assert small["latent_mask"].sum() == 6
    assert 0 < small["active_fraction"] < 0.6
    img, dense = small["image"], small["dense"]
    assert img.min() >= -1 and img.max() <= 1
    psnr_in, nothing_in = _psnr(img, dense, m), _psnr(small["original_image"], dense, m)
    assert psnr_in > 35 and psnr_in > nothing_in + 5, (psnr_in, nothing_in)
    assert _psnr(img, dense, ~m) > 40


def test_one_shot_edit_frees_each_step_and_gives_the_same_image(parts):
    """keep=False (ssic edit) streams: each UNet step is primed right before its edit and freed right
    after, so one step's states are resident at a time; the images are those of keep=True."""
    arts, files = parts
    a, b = _images(files)
    cond, uncond = np.load(files["emb"]), np.load(files["neg"])
    kw = dict(uncond=uncond, guidance=7.5, strength=0.7, steps=3, mode="sparse")
    unet, enc, dec = _sessions(arts)
    kept = latent_edit(unet, enc, dec, a, b, cond, **kw)
    assert len(unet.cache_ids) == 6
    unet, enc, dec = _sessions(arts)
    resident = []  # the UNet states held when each edit starts
    edit = unet.edit
    unet.edit = lambda *args, **kwargs: resident.append(len(unet.cache_ids)) or edit(*args, **kwargs)
    once = latent_edit(unet, enc, dec, a, b, cond, keep=False, **kw)
    assert resident == [2] * 6, resident  # streamed: only the step's own two states (uncond, cond)
    assert unet.cache_ids == [] and enc.cache_ids == [] and dec.cache_ids == [0]
    for k in ("image", "original_image", "latent"):
        np.testing.assert_array_equal(once[k], kept[k])


def test_inpainting_keeps_the_original_trajectory_outside(parts):
    arts, files = parts
    unet, enc, dec = _sessions(arts)
    a, _ = _images(files)
    mask = np.load(files["mask"])
    res = latent_edit(unet, enc, dec, a, a, np.load(files["emb"]), mask=mask, strength=1.0, steps=2, mode="sparse")
    outside = ~res["blend"]
    assert outside.any() and res["blend"].any()
    np.testing.assert_array_equal(res["latent"][..., outside], res["original_latent"][..., outside])
    inside = res["latent_mask"]
    assert np.abs(res["latent"] - res["original_latent"])[..., inside].mean() > 1e-3  # regenerated


def test_cli_sdedit_and_inpainting(parts, capsys):
    arts, files = parts
    base = ["edit", str(arts["sd-unet"]), "--vae-encoder", str(arts["sd-vae-encoder"]),
            "--vae-decoder", str(arts["sd-vae-decoder"]), "--embedding", str(files["emb"]), "--threads", "2"]
    out = files["dir"] / "out.npy"
    cli_main([*base, "--original", str(files["a"]), "--edited", str(files["b"]), "--negative-embedding",
              str(files["neg"]), "--strength", "0.7", "--steps", "2", "-o", str(out)])
    y = np.load(out)
    assert y.shape == (1, 3, SIZE, SIZE) and y.min() >= -1 and y.max() <= 1
    err = capsys.readouterr().err
    assert "SDEdit, 2 steps" in err
    assert err.index("step 1/2 primed and edited") < err.index("step 2/2") < err.index("SDEdit")  # progress
    png = files["dir"] / "inpaint.png"
    cli_main([*base, "--original", str(files["a"]), "--edited", str(files["a"]), "--mask", str(files["mask"]),
              "--strength", "1", "--steps", "1", "-o", str(png)])
    assert np.asarray(Image.open(png)).shape == (SIZE, SIZE, 3)
    assert "inpainting" in capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    (lambda a: [x for x in a if x not in ("--vae-decoder", "DEC")], "needs --vae-decoder"),
    (lambda a: a + ["--guidance", "3"], "--guidance needs --negative-embedding"),
    (lambda a: [x if x != "EMB" else "MASK" for x in a], r"embedding has shape \[128, 128\]"),
    (lambda a: [x if x != "UNET" else "ENC" for x in a], "need an sd-unet artefact"),
    (lambda a: [x if x != "DEC" else "ENC" for x in a], "not an SD VAE decoder"),
    (lambda a: [x if x != "EMB" else "missing.npy" for x in a], "--embedding file not found"),
    (lambda a: a + ["--input", "x=EMB"], "--input does not apply"),
])
def test_cli_errors_one_line_before_running(parts, capsys, change, message):
    arts, files = parts
    args = ["edit", "UNET", "--vae-encoder", "ENC", "--vae-decoder", "DEC", "--embedding", "EMB",
            "--original", str(files["a"]), "--edited", str(files["b"]), "-o", str(files["dir"] / "o.png")]
    subst = {"UNET": str(arts["sd-unet"]), "ENC": str(arts["sd-vae-encoder"]), "DEC": str(arts["sd-vae-decoder"]),
             "EMB": str(files["emb"]), "MASK": str(files["mask"]), "missing.npy": str(files["dir"] / "missing.npy")}
    argv = [subst.get(x, x.replace("EMB", str(files["emb"]))) for x in change(args)]
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not (files["dir"] / "o.png").exists()


def test_parts_that_do_not_fit(parts, tmp_path):
    arts, _ = parts
    unet, enc, dec = _sessions(arts)
    with pytest.raises(SSICError, match="not an SD VAE encoder"):
        check_latent_parts(unet, dec, dec)
    a = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(SSICError, match=r"the original image has shape \[1, 3, 64, 64\]"):
        latent_edit(unet, enc, dec, a, a, np.zeros((1, 77, 32), np.float32))
    with pytest.raises(SSICError, match="strength must be in"):
        latent_edit(unet, enc, dec, a, a, np.zeros((1, 77, 32), np.float32), strength=0)


def test_edit_cache_bytes_from_manifests(parts):
    arts, _ = parts
    unet, enc, dec = _sessions(arts)
    got = edit_cache_bytes(unet, 35, encoder=enc.manifest, decoder=dec)
    state = unet.manifest.cache_bytes()
    assert got["unet_state"] == state > 0 and got["per_step"] == 2 * state and got["unet_total"] == 70 * state
    assert got["total"] == 70 * state + enc.manifest.cache_bytes() + dec.manifest.cache_bytes()
    assert edit_cache_bytes(unet, 10, guided=False)["total"] == 10 * state
    unet.prime({"sample": np.zeros((1, 4, 16, 16), np.float32), "timestep": np.zeros(1, np.float32),
                "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)})
    assert unet.cache_bytes() == state  # what one primed state holds


def test_release_frees_the_prime_session_and_it_comes_back(tmp_path):
    """Session.release drops the ONNX Runtime prime session (its copy of the weights) and keeps the
    caches; the next prime re-creates it with the same result."""
    from ssic.bench import example_inputs
    from ssic.models import export_model

    model = export_model("ddim", "tiny", tmp_path / "ddim.onnx", seed=0)
    sess = ssic.load(ssic.compile(model, output_dir=tmp_path / "d.ssic"))
    x = example_inputs(sess.manifest, 0)
    first = sess.prime(x)
    assert "prime" in sess.backend._sessions
    sess.release("prime")
    assert "prime" not in sess.backend._sessions and sess.cache_ids == [0]
    np.testing.assert_array_equal(sess.edit(x, mode="sparse")["eps"], first["eps"])  # caches kept
    np.testing.assert_array_equal(sess.prime(x)["eps"], first["eps"])
    edited = sess.edit(x | {"x": x["x"] + 0.1}, mode="sparse")["eps"]
    sess.release("sparse")  # what a latent edit does while it primes
    assert "sparse" not in sess.backend._sessions
    np.testing.assert_array_equal(sess.edit(x | {"x": x["x"] + 0.1}, mode="sparse")["eps"], edited)
    with pytest.raises(SSICError, match="unknown graph"):
        sess.release("mask")
