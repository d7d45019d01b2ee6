"""Bad input through the command line and the Python API: one clear message, nothing broken afterwards.

Command line: ``python -m ssic.cli ...`` in a subprocess must exit non-zero with exactly one line on
stderr (``error: ...``) and no traceback. Python: ``ssic.SSICError``. After every error the artefact
still loads and a primed session still edits to the same result (its caches survive). A failed
compile leaves no output directory and no temporary directory next to it.

Real bugs found here are marked ``xfail(strict=True)`` with the reason, so they stay visible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ssic
from ssic.errors import SSICError

REPO = Path(__file__).resolve().parent.parent
H = W = 32


# ---------------------------------------------------------------------------- helpers


def conv_net(path: Path, shape=(1, 3, H, W), *, domain_op: tuple[str, str] | None = None, seed: int = 0) -> Path:
    """A small 3-conv generator built with onnx.helper: conv3x3-relu-conv3x3-leaky-conv3x3-tanh."""
    rng = np.random.default_rng(seed)
    c_in = shape[1] if isinstance(shape[1], int) else 3
    chans = [c_in, 8, 8, 3]
    inits, nodes = [], []
    cur = "x"
    acts = ["Relu", "LeakyRelu", "Tanh"]
    for i in range(3):
        w = (rng.standard_normal((chans[i + 1], chans[i], 3, 3)) * 0.3).astype(np.float32)
        b = (rng.standard_normal(chans[i + 1]) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1],
                                      kernel_shape=[3, 3]))
        out = "y" if i == 2 and domain_op is None else f"a{i}"
        kw = {"alpha": 0.2} if acts[i] == "LeakyRelu" else {}
        nodes.append(helper.make_node(acts[i], [f"c{i}"], [out], **kw))
        cur = out
    opsets = [helper.make_opsetid("", 18)]
    if domain_op is not None:
        nodes.append(helper.make_node(domain_op[1], [cur], ["y"], domain=domain_op[0]))
        opsets.append(helper.make_opsetid(domain_op[0], 1))
    out_shape = [shape[0], 3, shape[2], shape[3]]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def run_cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "ssic.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=120)


def run_many(cases: dict[str, list], workers: int = 4) -> dict[str, subprocess.CompletedProcess]:
    """Run several independent command lines concurrently (each still its own process)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        key, spec = item
        args, env = (spec[0], spec[1]) if isinstance(spec, tuple) else (spec, None)
        return key, run_cli(*args, env=env)

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, cases.items()))


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str | None = None, code: int | None = 2) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback; returns that line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, f"exit 0 for a bad input; stdout={proc.stdout!r} stderr={proc.stderr!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "internal error" not in line, line
    if code is not None:
        assert proc.returncode == code, (proc.returncode, line)
    if match is not None:
        import re

        assert re.search(match, line), f"{match!r} not in {line!r}"
    return line


def no_leftovers(parent: Path, out_name: str) -> None:
    """No output directory and no temporary directory of a compile (``.<name>.*``) left in ``parent``."""
    assert not (parent / out_name).exists(), f"{parent / out_name} was left behind"
    temps = [p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.") or p.suffix == ".tmp"]
    assert not temps, f"temporary files left behind: {temps}"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A compiled small conv net artefact (exact, tile 4) and its ONNX file."""
    d = tmp_path_factory.mktemp("clierr")
    onnx_path = conv_net(d / "net.onnx")
    art = ssic.compile(onnx_path, output_dir=d / "net.ssic", exact=True, sparse_min_res=8, tile=4)
    return {"dir": d, "onnx": onnx_path, "art": art}


@pytest.fixture(scope="module")
def primed(net):
    """A session primed on a fixed input, with a reference edit computed before any error."""
    sess = ssic.load(net["art"], threads=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    edited = x.copy()
    edited[:, :, 10:15, 12:20] += 1.0
    base = sess.prime({"x": x})["y"]
    ref = sess.edit({"x": edited}, mode="sparse")["y"]
    return {"sess": sess, "x": x, "edited": edited, "base": base, "ref": ref}


def assert_session_usable(p: dict) -> None:
    """The primed session still returns the primed output on an empty edit and the same sparse edit."""
    sess = p["sess"]
    np.testing.assert_array_equal(sess.edit({"x": p["x"]})["y"], p["base"])
    assert sess.last.mode == "cached"
    np.testing.assert_array_equal(sess.edit({"x": p["edited"]}, mode="sparse")["y"], p["ref"])


def copy_artefact(net, tmp_path: Path, name: str = "copy.ssic") -> Path:
    dst = tmp_path / name
    shutil.copytree(net["art"], dst)
    return dst


def patch_manifest(art: Path, fn) -> None:
    mf = art / "manifest.json"
    manifest = json.loads(mf.read_text())
    fn(manifest)
    mf.write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------- --help


COMMANDS = ["export", "compile", "inspect", "edit", "bench", "verify", "demo", "serve", "export-triton"]


@pytest.fixture(scope="module")
def helps():
    return run_many({c: [c, "--help"] for c in COMMANDS} | {"": ["--help"], "-h": ["compile", "-h"]})


@pytest.mark.parametrize("cmd", ["", "-h", *COMMANDS])
def test_help_of_every_command_exits_0(helps, cmd):
    proc = helps[cmd]
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and proc.stderr.strip() == ""


def test_every_command_is_covered_by_the_help_test():
    from ssic.cli import cli

    assert set(cli.commands) <= set(COMMANDS), cli.commands


# ---------------------------------------------------------------------------- compile: bad model files


def _bad_models(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model path, expected message regex)."""
    out = {}
    good = conv_net(d / "good.onnx")
    data = good.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    out["truncated"] = (d / "truncated.onnx", "not a (readable|valid) ONNX model")
    (d / "text.onnx").write_text("hello, this is not an ONNX model\n")
    out["not-onnx"] = (d / "text.onnx", "not a (readable|valid) ONNX model")
    (d / "empty.onnx").write_bytes(b"")
    out["empty-file"] = (d / "empty.onnx", "not a (readable|valid) ONNX model")
    out["custom-domain-op"] = (conv_net(d / "custom.onnx", domain_op=("com.example", "Sharpen")),
                               r"unsupported custom-domain ops.*com\.example::Sharpen")
    out["unknown-standard-op"] = (conv_net(d / "unknownop.onnx", domain_op=("", "NoSuchOp")), "NoSuchOp")
    out["dynamic-batch"] = (conv_net(d / "dyn.onnx", shape=("n", 3, H, W)), "dynamic")
    out["dynamic-hw"] = (conv_net(d / "dynhw.onnx", shape=(1, 3, "h", "w")), "dynamic")
    out["batch-2"] = (conv_net(d / "batch.onnx", shape=(2, 3, H, W)), "batch 2")
    out["zero-sized"] = (conv_net(d / "zero.onnx", shape=(1, 3, 0, 0)), "")
    out["directory"] = (d, "directory")
    out["missing"] = (d / "missing.onnx", "not found")
    return out


BAD_MODELS = ["truncated", "not-onnx", "empty-file", "custom-domain-op", "unknown-standard-op", "dynamic-batch",
              "dynamic-hw", "batch-2", "zero-sized", "directory", "missing"]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    return _bad_models(tmp_path_factory.mktemp("badmodels"))


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_compile_bad_model_python(bad_models, kind, tmp_path):
    path, match = bad_models[kind]
    with pytest.raises(SSICError, match=match or None) as info:
        ssic.compile(path, output_dir=tmp_path / "out.ssic", exact=True, sparse_min_res=8, tile=4)
    assert "\n" not in str(info.value)
    no_leftovers(tmp_path, "out.ssic")


INSPECTED = ["truncated", "not-onnx", "custom-domain-op", "dynamic-batch", "missing"]


@pytest.fixture(scope="module")
def bad_model_cli(bad_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("badcompile")
    cases = {}
    for kind in BAD_MODELS:
        (d / kind).mkdir()
        cases[f"compile/{kind}"] = ["compile", bad_models[kind][0], "-o", d / kind / "out.ssic", "--exact",
                                    "--sparse-min-res", 8, "--tile", 4]
    for kind in INSPECTED:
        cases[f"inspect/{kind}"] = ["inspect", bad_models[kind][0]]
    return d, run_many(cases)


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_compile_bad_model_cli(bad_model_cli, bad_models, kind):
    d, results = bad_model_cli
    assert_one_line_error(results[f"compile/{kind}"], bad_models[kind][1] or None)
    no_leftovers(d / kind, "out.ssic")


@pytest.mark.parametrize("kind", INSPECTED)
def test_inspect_bad_model_cli(bad_model_cli, kind):
    proc = bad_model_cli[1][f"inspect/{kind}"]
    if kind == "custom-domain-op":
        # inspect describes any valid ONNX model, even one ssic cannot compile
        assert proc.returncode == 0, proc.stderr
    elif kind == "dynamic-batch" and proc.returncode == 0:
        pass  # describing it is fine; so is one line saying MACs need static shapes
    else:
        assert_one_line_error(proc)


# ---------------------------------------------------------------------------- compile: image sizes vs tiles


@pytest.mark.parametrize("hw", [(50, 38), (30, 18)])
def test_sizes_not_multiple_of_tile_compile_and_are_exact(tmp_path, hw):
    """A size that is not a multiple of the tile gets clipped border tiles: compiles and edits exactly."""
    path = conv_net(tmp_path / "odd.onnx", shape=(1, 3, *hw))
    art = ssic.compile(path, output_dir=tmp_path / "odd.ssic", exact=True, sparse_min_res=8, tile=4)
    sess = ssic.load(art, threads=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, *hw)).astype(np.float32)
    sess.prime({"x": x})
    edited = x.copy()
    edited[:, :, hw[0] - 3:, hw[1] - 2:] += 1.0  # the clipped bottom-right corner tile
    out = sess.edit({"x": edited}, mode="sparse")["y"]
    assert sess.last.mode == "sparse"
    np.testing.assert_allclose(out, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw,tile", [((3, 3), 4), ((2, 5), 8), ((1, 1), 2)])
def test_image_smaller_than_a_tile(tmp_path, hw, tile):
    """Smaller than one tile: either one clear SSICError or a correct artefact (one clipped tile)."""
    path = conv_net(tmp_path / "tiny.onnx", shape=(1, 3, *hw))
    out = tmp_path / "tiny.ssic"
    try:
        art = ssic.compile(path, output_dir=out, exact=True, sparse_min_res=1, tile=tile)
    except SSICError as exc:
        assert "\n" not in str(exc)
        no_leftovers(tmp_path, "tiny.ssic")
        return
    sess = ssic.load(art, threads=1)
    x = np.random.default_rng(2).standard_normal((1, 3, *hw)).astype(np.float32)
    sess.prime({"x": x})
    edited = x + 0.5
    got = sess.edit({"x": edited}, mode="sparse")["y"]
    np.testing.assert_allclose(got, sess.dense({"x": edited})["y"], atol=1e-4, rtol=0)


def test_bad_compile_options(net, tmp_path):
    with pytest.raises(SSICError, match="unknown target"):
        ssic.compile(net["onnx"], target="gpu", output_dir=tmp_path / "o")
    with pytest.raises(SSICError, match="unknown lowering"):
        ssic.compile(net["onnx"], lowering="magic", output_dir=tmp_path / "o")
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", tmp_path / "o", "--tile-size", "32x32"),
                          "HxW=N")
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", tmp_path / "o", "--tile-size", "32x32=x"),
                          "not an integer")
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", tmp_path / "o", "--target", "gpu"))
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", tmp_path / "o", "--sparse-min-res", 1000),
                          "sparse resolution|--sparse-min-res")
    no_leftovers(tmp_path, "o")


def test_negative_tile_rejected(net, tmp_path):
    with pytest.raises(SSICError, match="must be >= 1"):
        ssic.compile(net["onnx"], output_dir=tmp_path / "o", exact=True, tile=-2)
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", tmp_path / "o", "--exact", "--tile", "-2"),
                          "must be >= 1")
    no_leftovers(tmp_path, "o")


def test_zero_tile_rejected(net, tmp_path):
    with pytest.raises(SSICError, match="must be >= 1"):
        ssic.compile(net["onnx"], output_dir=tmp_path / "o", exact=True, tile=0)


# ---------------------------------------------------------------------------- compile: output directory


def test_output_dir_exists_without_force(net, tmp_path):
    out = tmp_path / "exists.ssic"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SSICError, match="exists.*--force"):
        ssic.compile(net["onnx"], output_dir=out, exact=True, sparse_min_res=8, tile=4)
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", out, "--exact", "--sparse-min-res", 8, "--tile", 4),
                          "exists.*--force")
    assert (out / "keep.txt").read_text() == "mine"  # untouched
    # --force refuses an ordinary folder (issue 16: it deleted the user's files) ...
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", out, "--exact", "--sparse-min-res", 8, "--tile", 4,
                                  "--force"), "not an ssic artefact")
    assert (out / "keep.txt").read_text() == "mine"
    shutil.copy(Path(net["art"]) / "manifest.json", out / "manifest.json")  # ... and replaces an artefact
    # --force replaces it atomically with a working artefact
    proc = run_cli("compile", net["onnx"], "-o", out, "--exact", "--sparse-min-res", 8, "--tile", 4, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists()
    ssic.load(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exists.ssic.")]


def test_output_dir_parent_missing(net, tmp_path):
    out = tmp_path / "no" / "such" / "dir.ssic"
    with pytest.raises(SSICError, match="does not exist"):
        ssic.compile(net["onnx"], output_dir=out, exact=True)
    assert_one_line_error(run_cli("compile", net["onnx"], "-o", out, "--exact"), "does not exist")
    assert not (tmp_path / "no").exists()
    # a relative -o is reported as written, not as an absolute path of this machine
    proc = run_cli("compile", net["onnx"], "-o", "no/such/dir.ssic", "--exact", cwd=tmp_path)
    assert_one_line_error(proc, "cannot write no/such/dir.ssic: directory no/such does not exist")
    assert str(tmp_path) not in proc.stderr


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_read_only(net, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(SSICError, match="not writable"):
            ssic.compile(net["onnx"], output_dir=ro / "o.ssic", exact=True)
        assert_one_line_error(run_cli("compile", net["onnx"], "-o", ro / "o.ssic", "--exact"), "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_dir_under_a_regular_file_cli(net, tmp_path):
    """A path under a regular file cannot be written (also for root): one line, nothing left."""
    f = tmp_path / "plain.txt"
    f.write_text("x")
    proc = run_cli("compile", net["onnx"], "-o", f / "o.ssic", "--exact", "--sparse-min-res", 8, "--tile", 4)
    assert_one_line_error(proc)
    assert f.read_text() == "x"
    no_leftovers(tmp_path, "plain.txt/o.ssic")


def test_output_dir_under_a_regular_file_python(net, tmp_path):
    f = tmp_path / "plain.txt"
    f.write_text("x")
    with pytest.raises(SSICError):
        ssic.compile(net["onnx"], output_dir=f / "o.ssic", exact=True, sparse_min_res=8, tile=4)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_and_keeps_the_old_artefact(net, tmp_path, monkeypatch, exc):
    """A compile failing while writing (disk full, Ctrl-C) removes its temp dir; --force keeps the old one."""
    import ssic.compiler as compiler

    real_save = compiler._save
    written = []

    def failing_save(model, path):
        written.append(Path(path).name)
        if Path(path).name == "sparse.onnx":
            raise exc
        real_save(model, path)

    monkeypatch.setattr(compiler, "_save", failing_save)
    with pytest.raises(type(exc)):
        ssic.compile(net["onnx"], output_dir=tmp_path / "new.ssic", exact=True, sparse_min_res=8, tile=4)
    assert "sparse.onnx" in written
    no_leftovers(tmp_path, "new.ssic")

    old = tmp_path / "old.ssic"
    shutil.copytree(net["art"], old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(type(exc)):
        ssic.compile(net["onnx"], output_dir=old, exact=True, sparse_min_res=8, tile=4, force=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".old.ssic.")]
    ssic.load(old)


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("args,match", [
    (["export", "resnet", "-o", "x.onnx"], "resnet"),
    (["export", "ddim", "--preset", "huge", "-o", "x.onnx"], "huge"),
    (["export", "ddim"], "--output"),
    (["export", "ddim", "--weights", "/no/such/checkpoint.pt", "-o", "x.onnx"], "checkpoint|not found|weights"),
])
def test_export_bad_arguments(args, match, tmp_path):
    proc = run_cli(*args, cwd=tmp_path)
    assert_one_line_error(proc, match)
    assert not (tmp_path / "x.onnx").exists()


def test_export_bad_arguments_python(tmp_path):
    from ssic.models import export_model

    with pytest.raises(SSICError, match="resnet"):
        export_model("resnet", "tiny", tmp_path / "x.onnx")
    with pytest.raises(SSICError, match="huge"):
        export_model("ddim", "huge", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------- broken artefacts


BROKEN = {
    "format_version": "format version 99.*recompile",
    "corrupt_manifest": "corrupt",
    "no_manifest": "not an ssic artefact",
    "not_a_manifest": "not an ssic manifest",
    "missing_key": "missing 'caches'",
    "missing_sparse": "sparse.onnx is missing",
    "missing_mask": "mask.onnx is missing",
    "truncated_sparse": "cannot load sparse.onnx",
    "library_version": "needs libssic_ort version 0.0.0-other",
    "missing_artefact": "not found",
}
MANIFEST_ONLY = ("missing_sparse", "missing_mask", "truncated_sparse", "library_version")


def _damage(art: Path, damage: str) -> None:
    if damage == "format_version":
        patch_manifest(art, lambda m: m.update(format_version=99))
    elif damage == "corrupt_manifest":
        (art / "manifest.json").write_text('{"format": "ssic-artefact", "format_version": 1, ')
    elif damage == "no_manifest":
        (art / "manifest.json").unlink()
    elif damage == "not_a_manifest":
        (art / "manifest.json").write_text("[1, 2, 3]")
    elif damage == "missing_key":
        patch_manifest(art, lambda m: m.pop("caches"))
    elif damage == "missing_sparse":
        (art / "sparse.onnx").unlink()
    elif damage == "missing_mask":
        (art / "mask.onnx").unlink()
    elif damage == "truncated_sparse":
        data = (art / "sparse.onnx").read_bytes()
        (art / "sparse.onnx").write_bytes(data[: len(data) // 3])
    elif damage == "library_version":
        patch_manifest(art, lambda m: m["custom_op_library"].update(version="0.0.0-other"))
    elif damage == "missing_artefact":
        shutil.rmtree(art)


@pytest.fixture(scope="module")
def broken(net, tmp_path_factory):
    """Damaged copies of the artefact, and the command lines run on each (concurrently)."""
    d = tmp_path_factory.mktemp("broken")
    np.save(d / "a.npy", np.zeros((1, 3, H, W), np.float32))
    arts, cases = {}, {}
    for damage in BROKEN:
        art = copy_artefact(net, d, f"{damage}.ssic")
        _damage(art, damage)
        arts[damage] = art
        cases[f"edit/{damage}"] = ["edit", art, "--original", d / "a.npy", "--edited", d / "a.npy",
                                   "-o", d / f"{damage}.npy"]
        if damage not in MANIFEST_ONLY:  # inspect reads only the manifest
            cases[f"inspect/{damage}"] = ["inspect", art]
    cases["bench/format_version"] = ["bench", arts["format_version"], "--runs", 1]
    cases["verify/format_version"] = ["verify", arts["format_version"], "--golden", d]
    return d, arts, run_many(cases)


@pytest.mark.parametrize("damage", list(BROKEN))
def test_broken_artefact(net, broken, damage):
    d, arts, results = broken
    match = BROKEN[damage]
    with pytest.raises(SSICError, match=match) as info:
        ssic.load(arts[damage])
    assert "\n" not in str(info.value)
    for key, proc in results.items():
        if key.endswith("/" + damage):
            assert_one_line_error(proc, match)
    assert not (d / f"{damage}.npy").exists()
    ssic.load(net["art"])  # the original artefact is unaffected


def test_missing_dense_and_prime_graphs_keep_the_session(net, tmp_path, primed):
    """A graph file loaded lazily (prime, dense) is reported when needed; the session stays usable."""
    art = copy_artefact(net, tmp_path)
    sess = ssic.load(art, threads=1)
    x, edited = primed["x"], primed["edited"]
    (art / "dense.onnx").unlink()
    sess.prime({"x": x})
    with pytest.raises(SSICError, match="dense.onnx is missing"):
        sess.dense({"x": x})
    with pytest.raises(SSICError, match="dense.onnx is missing"):
        sess.edit({"x": edited}, mode="dense")
    np.testing.assert_array_equal(sess.edit({"x": edited}, mode="sparse")["y"], primed["ref"])
    art2 = copy_artefact(net, tmp_path, "noprime.ssic")
    (art2 / "prime.onnx").unlink()
    sess2 = ssic.load(art2)
    with pytest.raises(SSICError, match="prime.onnx is missing"):
        sess2.prime({"x": x})
    assert sess2.cache_ids == []


def test_missing_op_library(net, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "libssic_ort.so"
    monkeypatch.setenv("SSIC_ORT_LIBRARY", str(missing))
    with pytest.raises(SSICError, match="SSIC_ORT_LIBRARY.*does not exist"):
        ssic.load(net["art"])
    with pytest.raises(SSICError, match="SSIC_ORT_LIBRARY.*does not exist"):
        ssic.compile(net["onnx"], output_dir=tmp_path / "o.ssic", exact=True, sparse_min_res=8, tile=4)
    no_leftovers(tmp_path, "o.ssic")
    env = {"SSIC_ORT_LIBRARY": str(missing)}
    results = run_many({"bench": (["bench", net["art"], "--runs", 1], env),
                        "compile": (["compile", net["onnx"], "-o", tmp_path / "o.ssic", "--exact"], env)})
    for proc in results.values():
        assert_one_line_error(proc, "SSIC_ORT_LIBRARY.*does not exist")
    no_leftovers(tmp_path, "o.ssic")
    monkeypatch.delenv("SSIC_ORT_LIBRARY")
    ssic.load(net["art"])


def test_op_library_that_is_not_the_library_cli(net, tmp_path):
    """SSIC_ORT_LIBRARY pointing at a file that is not a shared library: one clear line."""
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"\x7fELF not really")
    assert_one_line_error(run_cli("bench", net["art"], "--runs", 1, env={"SSIC_ORT_LIBRARY": str(fake)}))


def test_op_library_that_is_not_the_library_python(net, tmp_path, monkeypatch):
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"\x7fELF not really")
    monkeypatch.setenv("SSIC_ORT_LIBRARY", str(fake))
    with pytest.raises(SSICError):
        ssic.load(net["art"])


# ---------------------------------------------------------------------------- session (Python API)


def test_edit_before_prime_and_unknown_cache_id(net, primed):
    sess = ssic.load(net["art"], threads=1)
    with pytest.raises(SSICError, match="before prime"):
        sess.edit({"x": primed["x"]})
    with pytest.raises(SSICError, match="before prime|unknown cache id"):
        sess.difference_mask({"x": primed["x"]})
    with pytest.raises(SSICError, match="commit"):
        sess.commit()
    sess.prime({"x": primed["x"]}, cache_id="a")
    with pytest.raises(SSICError, match="unknown cache id 7"):
        sess.edit({"x": primed["edited"]}, cache_id=7)
    with pytest.raises(SSICError, match="unknown cache id"):
        sess.edit({"x": primed["edited"]})  # default id 0 was never primed
    np.testing.assert_array_equal(sess.edit({"x": primed["edited"]}, cache_id="a", mode="sparse")["y"],
                                  primed["ref"])
    sess.forget("a")
    with pytest.raises(SSICError):
        sess.edit({"x": primed["edited"]}, cache_id="a")


BAD_INPUTS = {
    "wrong-shape": ({"x": np.zeros((1, 3, 16, 16), np.float32)}, r"shape \[1, 3, 16, 16\], expected"),
    "batch-2": ({"x": np.zeros((2, 3, H, W), np.float32)}, "shape"),
    "channels": ({"x": np.zeros((1, 4, H, W), np.float32)}, "shape"),
    "zero-sized": ({"x": np.zeros((1, 3, 0, 0), np.float32)}, "shape"),
    "nan": ({"x": np.full((1, 3, H, W), np.nan, np.float32)}, "non-finite"),
    "inf": ({"x": np.where(np.eye(W, dtype=bool), np.inf, np.zeros((1, 3, H, W), np.float32))}, "non-finite"),
    "neg-inf-float64": ({"x": np.full((1, 3, H, W), -np.inf)}, "non-finite"),
    "inf-and-neg-inf": ({"x": np.where(np.eye(W, dtype=bool), np.inf, -np.inf).astype(np.float32)[None, None]
                         .repeat(3, 1)}, "non-finite"),
    "one-nan": ({"x": np.where(np.arange(3 * H * W).reshape(1, 3, H, W) == 3 * H * W // 2, np.nan, 0)
                 .astype(np.float32)}, "non-finite"),
    "strings": ({"x": np.full((1, 3, H, W), "a")}, "dtype"),
    "objects": ({"x": np.empty((1, 3, H, W), object)}, "dtype"),
    "unknown-name": ({"x": np.zeros((1, 3, H, W), np.float32), "z": np.zeros(3)}, "unknown input"),
    "missing": ({}, "missing input 'x'"),
    "not-a-dict": ([np.zeros((1, 3, H, W), np.float32)], "dict"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
@pytest.mark.parametrize("call", ["prime", "edit", "dense"])
def test_bad_inputs_keep_the_session(primed, kind, call):
    inputs, match = BAD_INPUTS[kind]
    sess = primed["sess"]
    with pytest.raises(SSICError, match=match) as info:
        getattr(sess, call)(inputs)
    assert "\n" not in str(info.value)
    assert sess.cache_ids == [0]
    assert_session_usable(primed)


def test_large_finite_inputs_are_accepted(primed):
    """Values whose sum overflows float32 are finite: the input check must not refuse them."""
    x = np.full((1, 3, H, W), 3e38, np.float32)
    primed["sess"].dense({"x": x})


BAD_MASKS = {
    "wrong-shape": (np.ones((16, 16), bool), "mask has shape"),
    "transposed": (np.ones((W + 1, H), bool), "mask has shape"),
    "3-channels": (np.ones((3, H, W), bool), "mask has shape"),
    "batch-2": (np.ones((2, 1, H, W), bool), "mask has shape"),
    "empty": (np.ones((0,), bool), "mask has shape"),
    "strings": (np.full((H, W), "x"), "dtype"),
    "objects": (np.full((H, W), None, object), "dtype"),
    "nan": (np.full((H, W), np.nan, np.float32), "non-finite"),
    "scalar": (np.float32(1.0), "mask has shape"),
}


@pytest.mark.parametrize("kind", list(BAD_MASKS))
def test_bad_masks_keep_the_session(primed, kind):
    mask, match = BAD_MASKS[kind]
    sess = primed["sess"]
    with pytest.raises(SSICError, match=match):
        sess.edit({"x": primed["edited"]}, mask=mask)
    with pytest.raises(SSICError, match=match):
        sess.active_tiles(mask)
    assert_session_usable(primed)


def test_good_mask_variants_accepted(primed):
    """[H, W] bool, [1, 1, H, W] float, uint8 0/255 masks are the same mask."""
    sess = primed["sess"]
    m = np.zeros((H, W), bool)
    m[10:15, 12:20] = True
    a = sess.edit({"x": primed["edited"]}, mask=m, mode="sparse")["y"]
    b = sess.edit({"x": primed["edited"]}, mask=m[None, None].astype(np.float32), mode="sparse")["y"]
    c = sess.edit({"x": primed["edited"]}, mask=m.astype(np.uint8) * 255, mode="sparse")["y"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_bad_mode_keeps_the_session(primed):
    with pytest.raises(SSICError, match="unknown mode"):
        primed["sess"].edit({"x": primed["edited"]}, mode="fast")
    assert_session_usable(primed)


def test_bad_mode_with_empty_mask_rejected(primed):
    with pytest.raises(SSICError, match="unknown mode"):
        primed["sess"].edit({"x": primed["x"]}, mode="fast")


# ---------------------------------------------------------------------------- ssic edit (command line)


@pytest.fixture(scope="module")
def files(net, tmp_path_factory, primed):
    d = tmp_path_factory.mktemp("editfiles")
    np.save(d / "a.npy", primed["x"])
    np.save(d / "b.npy", primed["edited"])
    np.save(d / "small.npy", np.zeros((1, 3, 16, 16), np.float32))
    np.save(d / "tiny.npy", np.zeros((1, 3, 1, 1), np.float32))
    np.save(d / "zero.npy", np.zeros((1, 3, 0, 0), np.float32))
    np.save(d / "nan.npy", np.where(primed["edited"] > 1, np.nan, primed["edited"]).astype(np.float32))
    np.save(d / "inf.npy", np.where(primed["edited"] > 1, np.inf, primed["edited"]).astype(np.float32))
    np.save(d / "mask_bad_shape.npy", np.ones((7, 9), bool))
    np.save(d / "mask_strings.npy", np.full((H, W), "x"))
    np.save(d / "mask_nan.npy", np.full((H, W), np.nan, np.float32))
    m = np.zeros((H, W), bool)
    m[10:15, 12:20] = True
    np.save(d / "mask.npy", m)
    np.save(d / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "img.png")
    return d


def test_cli_edit_good(net, files, primed, tmp_path):
    proc = run_cli("edit", net["art"], "--original", files / "a.npy", "--edited", files / "b.npy",
                   "--mask", files / "mask.npy", "-o", tmp_path / "out.npy")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), primed["ref"], atol=1e-6)


EDIT_CASES = [
    ("a.npy", "small.npy", [], "differ in shape"),
    ("small.npy", "small.npy", [], r"shape \[1, 3, 16, 16\], expected"),
    ("tiny.npy", "tiny.npy", [], "shape"),
    ("zero.npy", "zero.npy", [], "shape"),
    ("a.npy", "nan.npy", [], "non-finite"),
    ("a.npy", "inf.npy", [], "non-finite"),
    ("nan.npy", "b.npy", [], "non-finite"),
    ("a.npy", "b.npy", ["--mask", "mask_bad_shape.npy"], "mask has shape"),
    ("a.npy", "b.npy", ["--mask", "mask_strings.npy"], "dtype"),
    ("a.npy", "b.npy", ["--mask", "mask_nan.npy"], "non-finite"),
    ("a.npy", "b.npy", ["--mask", "missing.npy"], "mask file not found"),
    ("missing.npy", "b.npy", [], "original file not found"),
    ("pickled.npy", "b.npy", [], "cannot read original"),
    ("garbage.npy", "b.npy", [], "cannot read original"),
    ("img.png", "b.npy", [], "differ in (shape|size)"),
    ("a.npy", "b.npy", ["--input", "noequals"], "NAME=FILE"),
    ("a.npy", "b.npy", ["--input", "z=FILES/a.npy"], "unknown input"),
]


def _edit_id(case) -> str:
    values = case.values if hasattr(case, "values") else case
    return "-".join([values[0], values[1], *[str(e).split("/")[-1] for e in values[2]]])


@pytest.fixture(scope="module")
def edit_results(net, files, tmp_path_factory):
    d = tmp_path_factory.mktemp("editout")
    cases = {}
    for case in EDIT_CASES:
        orig, edited, extra, _ = case.values if hasattr(case, "values") else case
        key = _edit_id(case)
        extra = [str(files / e) if e.endswith(".npy") and "=" not in e else e.replace("FILES", str(files))
                 for e in extra]
        (d / key).mkdir()
        cases[key] = ["edit", net["art"], "--original", files / orig, "--edited", files / edited, *extra,
                      "-o", d / key / "out.npy"]
    return d, run_many(cases)


@pytest.mark.parametrize("orig,edited,extra,match", EDIT_CASES, ids=[_edit_id(c) for c in EDIT_CASES])
def test_cli_edit_bad_inputs(edit_results, orig, edited, extra, match):
    d, results = edit_results
    key = _edit_id((orig, edited, extra))
    assert_one_line_error(results[key], match)
    assert not (d / key / "out.npy").exists()


@pytest.mark.parametrize("output,match", [("out.txt", r"\.png or \.npy"), ("no/such/dir/out.npy", "does not exist")])
def test_cli_edit_bad_output(net, files, tmp_path, output, match):
    proc = run_cli("edit", net["art"], "--original", files / "a.npy", "--edited", files / "b.npy",
                   "-o", tmp_path / output)
    assert_one_line_error(proc, match)


def test_cli_edit_missing_artefact(files, tmp_path):
    proc = run_cli("edit", tmp_path / "nothing.ssic", "--original", files / "a.npy", "--edited", files / "b.npy",
                   "-o", tmp_path / "out.npy")
    assert_one_line_error(proc, "artefact not found")
    proc = run_cli("edit", files / "a.npy", "--original", files / "a.npy", "--edited", files / "b.npy",
                   "-o", tmp_path / "out.npy")
    assert_one_line_error(proc, "not an ssic artefact")


@pytest.mark.parametrize("args,match", [
    (["--runs", "0"], "--runs"),
    (["--area", "0"], "--area"),
    (["--area", "1.5"], "--area"),
    (["--area", "0.1", "--mask", "MASK"], "not both"),
    (["--mask", "BADMASK"], "mask has shape"),
    (["--threads", "abc"], "abc"),
])
def test_cli_bench_bad_arguments(net, files, args, match):
    args = [str(files / "mask.npy") if a == "MASK" else str(files / "mask_bad_shape.npy") if a == "BADMASK" else a
            for a in args]
    assert_one_line_error(run_cli("bench", net["art"], *args), match)


def test_cli_verify_bad_golden(net, tmp_path):
    assert_one_line_error(run_cli("verify", net["art"], "--golden", tmp_path / "nope"), "golden directory not found")
    (tmp_path / "g").mkdir()
    assert_one_line_error(run_cli("verify", net["art"], "--golden", tmp_path / "g"), "golden file missing")
    (tmp_path / "g" / "original.npz").write_bytes(b"PK garbage")
    assert_one_line_error(run_cli("verify", net["art"], "--golden", tmp_path / "g"), "cannot read golden file")


def test_unknown_command_and_option():
    assert_one_line_error(run_cli("frobnicate"), "frobnicate")
    assert_one_line_error(run_cli("inspect", "--no-such-option"), "no-such-option")


def test_artefact_still_usable_after_all_errors(net, primed):
    """After everything above the shared artefact loads, and the shared session edits as before."""
    ssic.load(net["art"])
    assert_session_usable(primed)
