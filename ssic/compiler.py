"""The compiler driver: ONNX model in, artefact directory out (see docs/architecture.md).

``compile_model`` runs a named pipeline (``PIPELINES``): checks, pre-processing, the sparse plan,
the sparse rewrite, the prime graph, the mask graph, the lowering, and writes the artefact
atomically (a temporary directory renamed into place, so a failed compile leaves nothing behind).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir

from ssic import __version__
from ssic.errors import SSICError
from ssic.passes.analysis import (
    check_static_batch1,
    plan_sparse_resolutions,
    spatial_hw,
    static_shape,
)

FORMAT_VERSION = 1
IR_VERSION = 10

#: Named pipelines: which optional passes run. ``--disable-pass`` removes names from a pipeline.
PIPELINES: dict[str, dict] = {
    "ort-fused": {"target": "ort", "lowering": "fused"},
    "ort-standard": {"target": "ort", "lowering": "standard"},
    "trt-standard": {"target": "trt", "lowering": "standard"},
    "trt-fused": {"target": "trt", "lowering": "fused"},
}

#: Defaults per model family, keyed by the ``ssic.model`` metadata that ``ssic export`` writes.
MODEL_DEFAULTS: dict[str, dict] = {
    # DDIM/PD: the anchor makes >= 64 sparse; ssic also makes 32 sparse (measured: MAC ratio 7.2x -> 10.2x
    # at a 1.2% edit with the same quality), see BENCHMARKS.md. --sparse-min-res 64 gives the anchor split.
    "ddim": {"sparse_min_res": 32, "mask_eps": 0.01, "mask_radius": 5, "level_dilation": 1},
    "pd": {"sparse_min_res": 32, "mask_eps": 0.02, "mask_radius": 2, "level_dilation": 1},
    # GauGAN: the output inside the edit depends on the last three 3x3 convs at 256x512 and two at
    # 128x256; growing the active region there by that much makes it exact inside the edit (measured
    # 122 dB vs 30 dB with 1), at lower resolutions a halo of 1 is enough (BENCHMARKS.md).
    "gaugan": {"sparse_min_res": 16, "mask_eps": 0.5, "mask_radius": 1, "level_dilation": 2,
               "halos": {"256x512": 3, "128x256": 2}},
}
GENERIC_DEFAULTS = {"sparse_min_res": None, "mask_eps": 1e-6, "mask_radius": 1, "level_dilation": 1}


@dataclass
class CompileOptions:
    target: str = "ort"
    lowering: str = "fused"
    exact: bool = False
    sparse_min_res: int | None = None
    tiles: dict[str, int] = field(default_factory=dict)
    tile: int | None = None
    mask_eps: float | None = None
    mask_radius: int | None = None
    level_dilation: int | None = None
    halo: int = 1
    halos: dict[str, int] = field(default_factory=dict)
    fallback_ratio: float = 0.6
    gn_stats: str = "incremental"
    disabled_passes: set[str] = field(default_factory=set)


def _load_model(model_path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(model_path)
    if not path.exists():
        raise SSICError(f"model file not found: {path}")
    if path.is_dir():
        raise SSICError(f"expected an ONNX file, got a directory: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise SSICError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise SSICError(f"{path} is not a readable ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise SSICError(f"{path} is not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    return proto


def _model_defaults(proto: onnx.ModelProto) -> tuple[str | None, dict]:
    meta = {p.key: p.value for p in proto.metadata_props}
    name = meta.get("ssic.model")
    defaults = dict(MODEL_DEFAULTS.get(name, GENERIC_DEFAULTS))
    for key in defaults:
        if f"ssic.{key}" in meta:
            defaults[key] = type(defaults[key] or 0)(float(meta[f"ssic.{key}"])) if defaults[key] is not None \
                else int(meta[f"ssic.{key}"])
    return name, defaults


def _unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    bad = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.domain}::{node.op_type}")
    return sorted(set(bad))


def _save(model: ir.Model | onnx.ModelProto, path: Path) -> None:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    proto.ir_version = IR_VERSION
    size = proto.ByteSize()
    if size > 1_900_000_000:
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))


def compile_model(
    model_path: str | os.PathLike,
    target: str = "ort",
    lowering: str = "fused",
    output_dir: str | os.PathLike | None = None,
    *,
    exact: bool = False,
    sparse_min_res: int | None = None,
    tiles: dict[str, int] | None = None,
    tile: int | None = None,
    mask_eps: float | None = None,
    mask_radius: int | None = None,
    level_dilation: int | None = None,
    halo: int | None = None,
    halos: dict[str, int] | None = None,
    fallback_ratio: float = 0.6,
    gn_stats: str = "incremental",
    disabled_passes: set[str] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Compile ``model_path`` into an artefact directory and return its path.

    ``target`` is ``"ort"`` or ``"trt"``; ``lowering`` is ``"fused"`` (ssic custom ops, the default)
    or ``"standard"`` (stock ONNX ops only). ``exact=True`` propagates the mask through every
    receptive field instead of SIGE's per-resolution heuristic. Unset mask options take the model
    family's defaults (from the ``ssic.model`` metadata that ``ssic export`` writes).
    """
    log = log or (lambda msg: None)
    if target not in ("ort", "trt"):
        raise SSICError(f"unknown target '{target}' (choose ort or trt)")
    if gn_stats not in ("incremental", "cached"):
        raise SSICError(f"unknown gn_stats '{gn_stats}' (choose incremental or cached)")
    if lowering not in ("fused", "standard"):
        raise SSICError(f"unknown lowering '{lowering}' (choose fused or standard)")
    out = Path(output_dir) if output_dir is not None else Path(str(model_path)).with_suffix("").with_name(
        Path(str(model_path)).stem + f".ssic-{target}")
    if out.exists() and not force:
        raise SSICError(f"output directory {out} exists (use --force to replace it)")
    parent = out.resolve().parent
    if not parent.exists():
        raise SSICError(f"cannot write {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise SSICError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise SSICError(f"cannot write {out}: directory {parent} is not writable")

    t0 = time.perf_counter()
    from ssic.passes.normalize import load_model

    proto = load_model(model_path, input_shapes=input_shapes, require_static=True)
    bad = _unsupported_ops(proto)
    if bad:
        raise SSICError(f"unsupported custom-domain ops in the model: {', '.join(bad)}")
    family, defaults = _model_defaults(proto)
    opts = CompileOptions(
        target=target, lowering=lowering, exact=exact,
        sparse_min_res=sparse_min_res if sparse_min_res is not None else defaults["sparse_min_res"],
        tiles=dict(tiles or {}), tile=tile,
        mask_eps=mask_eps if mask_eps is not None else defaults["mask_eps"],
        mask_radius=mask_radius if mask_radius is not None else defaults["mask_radius"],
        level_dilation=level_dilation if level_dilation is not None else defaults["level_dilation"],
        halo=1 if halo is None else halo,
        halos=dict(halos) if halos is not None else (dict(defaults.get("halos", {})) if halo is None else {}),
        fallback_ratio=fallback_ratio, disabled_passes=set(disabled_passes or ()),
    )
    if opts.exact:
        opts.mask_radius, opts.halo, opts.halos = 0, 0, {}

    model = ir.serde.deserialize_model(proto)
    check_static_batch1(model)
    from ssic.passes.preprocess import preprocess_passes

    for name, p in preprocess_passes(opts.disabled_passes):
        ts = time.perf_counter()
        result = p(model)
        log(f"pass {name}: {1000 * (time.perf_counter() - ts):.0f} ms, modified={result.modified}")
    plan = plan_sparse_resolutions(model, min_res=opts.sparse_min_res, tiles=opts.tiles, default_tile_size=opts.tile,
                                   halos=opts.halos, default_halo=opts.halo)
    if not plan.grids:
        raise SSICError(f"no convolution at or above the sparse resolution {plan.min_res}; lower --sparse-min-res")
    log("sparse grids: " + ", ".join(f"{g.name} (tile {g.tile}, halo {g.halo})" for g in plan.grids.values()))
    base_proto = ir.serde.serialize_model(model)

    # the sparse graph
    from ssic.passes.sparsify import SparsifyPass

    ts = time.perf_counter()
    sparse = ir.serde.deserialize_model(base_proto)
    result = SparsifyPass(plan, gn_stats=opts.gn_stats)(sparse)
    n_sparse = sum(d.sparse for d in result.decisions)
    log(f"pass sparsify: {1000 * (time.perf_counter() - ts):.0f} ms, {n_sparse}/{len(result.decisions)} convs sparse, "
        f"{len(result.caches)} caches")
    if n_sparse == 0:
        reasons = sorted({d.reason for d in result.decisions})
        raise SSICError("no convolution could run sparse: " + "; ".join(reasons[:3]))
    if opts.lowering == "standard" and "lower-standard" not in opts.disabled_passes:
        from ssic.passes.lower_standard import LowerToStandardPass

        ts = time.perf_counter()
        LowerToStandardPass()(sparse)
        log(f"pass lower-standard: {1000 * (time.perf_counter() - ts):.0f} ms")

    # the prime graph
    from ssic.passes.build_prime import BuildPrimePass

    prime = BuildPrimePass(result.caches, result.gn_stats)(ir.serde.deserialize_model(base_proto))

    # the mask graph
    grids = list(plan.grids.values())
    top = max(grids, key=lambda g: g.height * g.width)
    mask_hw = (top.height, top.width)
    if opts.exact:
        from ssic.passes.exact_masks import build_exact_mask_model

        mask_model = build_exact_mask_model(model, grids, mask_hw)
    else:
        from ssic.passes.build_mask import build_mask_graph

        mask_model = build_mask_graph(mask_hw, grids, radius=int(opts.mask_radius),
                                      level_dilation=int(opts.level_dilation))

    manifest = _manifest(proto, model, family, opts, plan, grids, mask_hw, result)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        _save(proto, tmp / "dense.onnx")
        _save(prime, tmp / "prime.onnx")
        _save(sparse, tmp / "sparse.onnx")
        _save(mask_model, tmp / "mask.onnx")
        if opts.target == "trt":
            from ssic.targets.trt import build_trt_artefact

            manifest["trt"] = build_trt_artefact(tmp, manifest, log=log)
        manifest["compile_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


def _manifest(proto, model, family, opts: CompileOptions, plan, grids, mask_hw, result) -> dict:
    from ssic.macs import count_macs

    macs = count_macs(proto)
    dense_total = int(macs["macs_total"])
    sparse_conv_dense = sum(d.macs_dense for d in result.decisions if d.sparse)
    per_tile: dict[str, int] = {g.name: 0 for g in grids}
    for d in result.decisions:
        if d.sparse:
            per_tile[d.grid] += d.macs_per_tile
    source = None
    for v in model.graph.inputs:
        if spatial_hw(v) == mask_hw:
            source = v.name
            break
    manifest = {
        "format": "ssic-artefact",
        "format_version": FORMAT_VERSION,
        "ssic_version": __version__,
        "target": opts.target,
        "lowering": opts.lowering,
        "exact": opts.exact,
        "model": {"family": family, "producer": proto.producer_name,
                  "metadata": {p.key: p.value for p in proto.metadata_props}},
        "opsets": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import} | (
            {"ssic": 1} if opts.lowering == "fused" else {}),
        "graphs": {"dense": "dense.onnx", "prime": "prime.onnx", "sparse": "sparse.onnx", "mask": "mask.onnx"},
        "inputs": [{"name": v.name, "shape": list(static_shape(v) or ()), "dtype": str(v.dtype.name).lower()}
                   for v in model.graph.inputs],
        "outputs": [{"name": v.name, "shape": list(static_shape(v) or ()), "dtype": str(v.dtype.name).lower()
                     if v.dtype else "float"} for v in model.graph.outputs],
        "mask": {"input": "ssic.mask", "height": mask_hw[0], "width": mask_hw[1], "source_input": source,
                 "channel_axis": 1, "eps": opts.mask_eps, "radius": opts.mask_radius,
                 "level_dilation": opts.level_dilation, "halo": opts.halo,
                 "mode": "exact" if opts.exact else "sige-pyramid"},
        "grids": [{"name": g.name, "height": g.height, "width": g.width, "tile": g.tile, "halo": g.halo, "cells": list(g.cells),
                   "num_cells": g.num_cells, "tiles_input": g.tiles_input, "macs_per_tile": per_tile[g.name]}
                  for g in grids],
        "caches": [c.to_json() for c in result.caches],
        "macs": {"dense": dense_total, "sparse_fixed": dense_total - sparse_conv_dense,
                 "sparse_convs_dense": sparse_conv_dense, "per_tile": per_tile,
                 "by_op_type": macs.get("macs_by_op_type", {})},
        "layers": [d.to_json() for d in result.decisions],
        "sparse_min_res": plan.min_res,
        "fallback_ratio": opts.fallback_ratio,
        "gn_stats": opts.gn_stats,
    }
    if opts.lowering == "fused":
        from ssic.library import library_version

        manifest["custom_op_library"] = {"name": "libssic_ort", "domain": "ssic", "op_version": 1,
                                         "version": library_version()}
    return manifest


def sparse_macs(manifest: dict, tiles_per_grid: dict[str, int]) -> int:
    """MACs of one sparse run with the given number of active tiles per grid."""
    m = manifest["macs"]
    return int(m["sparse_fixed"] + sum(m["per_tile"][g] * n for g, n in tiles_per_grid.items()))
