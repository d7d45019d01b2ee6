"""Helpers of the per-rule tests: build a small graph with onnx.helper, rewrite it, compile, compare to dense."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import ssic


def model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], outputs: dict[str, list[int]],
          inits: dict[str, np.ndarray], opset: int = 18) -> onnx.ModelProto:
    """A float32 model; no intermediate shapes are stored (value_info empty), as many exporters write them."""
    g = helper.make_graph(
        nodes, "rule_test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def conv_params(rng: np.random.Generator, prefix: str, cout: int, cin: int, k: int, group: int = 1) -> dict:
    return {f"{prefix}_w": (rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype(np.float32),
            f"{prefix}_b": (0.1 * rng.standard_normal(cout)).astype(np.float32)}


def rewrite(m: onnx.ModelProto, *, min_res: int, tile: int = 2):
    """The sparse rewrite alone (pre-processing, plan, SparsifyPass): ``(sparse ir.Model, SparsifyResult)``."""
    from ssic.passes.analysis import plan_sparse_resolutions
    from ssic.passes.preprocess import preprocess_passes
    from ssic.passes.sparsify import SparsifyPass

    model_ir = ir.serde.deserialize_model(m)
    for _, p in preprocess_passes(set()):
        p(model_ir)
    plan = plan_sparse_resolutions(model_ir, min_res=min_res, default_tile_size=tile)
    result = SparsifyPass(plan)(model_ir)
    return model_ir, result


def op_counts(m: ir.Model | onnx.ModelProto) -> Counter:
    nodes = m.graph.node if isinstance(m, onnx.ModelProto) else m.graph
    return Counter(n.op_type for n in nodes)


def compile_and_load(m: onnx.ModelProto, tmp_path: Path, name: str = "m", **options):
    """Save, compile (``options`` go to ``ssic.compile``) and load; returns ``(session, artefact dir)``."""
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, path)
    art = ssic.compile(path, output_dir=tmp_path / f"{name}.ssic", **options)
    return ssic.load(art, threads=1), art


def sparse_graph(art: Path) -> onnx.ModelProto:
    return onnx.load(str(art / "sparse.onnx"))


def assert_edits_match_dense(sess, x_name: str, shape: list[int], *, seeds=(0, 1, 2), atol: float = 1e-4,
                             all_tiles: bool = False) -> list[float]:
    """Prime on a random input, edit a random rectangle, compare the sparse edit to dense on the edited input.

    With ``all_tiles`` the edit passes an all-ones mask (every tile active). Returns the active fractions.
    """
    fractions = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(shape).astype(np.float32)
        sess.prime({x_name: x})
        h, w = shape[2], shape[3]
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        edited = x.copy()
        edited[:, :, y0:y0 + 5, x0:x0 + 3] += rng.standard_normal((shape[1], min(5, h - y0), min(3, w - x0))).astype(np.float32)
        mask = np.ones((h, w), bool) if all_tiles else None
        got = sess.edit({x_name: edited}, mask=mask, mode="sparse")
        want = sess.dense({x_name: edited})
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=f"output {k}, seed {seed}")
        fractions.append(sess.last.active_fraction)
    return fractions
