"""Models whose weights live in external data (every model over 2 GB, e.g. SD 1.5's UNet) compile with
the weights left on disk, and the artefact's graphs share one linked copy of them."""

from __future__ import annotations

import numpy as np
import onnx
import torch


def test_external_data_model_compiles_and_edits(tmp_path, monkeypatch):
    import ssic.compiler

    # the lazy path is taken above 1.8 GB of weights; a small model takes it with the threshold at 0
    monkeypatch.setattr(ssic.compiler, "LAZY_WEIGHTS_BYTES", 0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 3, 3, padding=1)).eval()
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(plain), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(onnx.load(str(plain)), str(src / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    art = ssic.compile(src / "m.onnx", output_dir=tmp_path / "m.ssic", exact=True)
    assert (art / "weights.data").is_file()
    for g in ("dense.onnx", "prime.onnx"):
        proto = onnx.load(str(art / g), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.data"}  # relative, inside the artefact: it can be moved
    moved = tmp_path / "moved.ssic"
    art.rename(moved)
    sess = ssic.load(moved, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    sess.prime({"x": x})
    e = x.copy()
    e[..., 4:9, 4:9] += 1
    np.testing.assert_allclose(sess.edit({"x": e}, mode="sparse")["y"], sess.dense({"x": e})["y"], atol=1e-4)
