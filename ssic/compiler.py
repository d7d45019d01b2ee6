"""The compiler driver: ONNX model in, artefact directory out (see docs/architecture.md).

``compile_model`` resolves the options (:mod:`ssic.options`), then runs a named pipeline of phases
(:data:`PHASES`): ``preprocess`` (an onnx-ir ``PassManager`` of small passes), ``plan``, ``sparsify``,
``lower-standard`` (standard lowering only), ``fuse-tile-conv``, ``fuse-tile-moments``,
``fuse-group-norm`` and ``fuse-tile-affine`` (ONNX Runtime with the fused lowering only), ``build-prime``, ``fuse-cache-store`` (as the fuse phases),
``build-mask`` and ``validate``. Each
phase has a postcondition checked right after it; a failure names the phase. The artefact is written
atomically by :func:`ssic.artefact.write_artefact` after every graph was checked with the ONNX checker
and loaded once by ONNX Runtime (with the op library), so a failed compile leaves nothing behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ssic import __version__
from ssic.artefact import (
    CacheEntry,
    DenseOpSpec,
    GridSpec,
    LayerDecision,
    MacsSpec,
    Manifest,
    MaskSource,
    MaskSpec,
    ModelInfo,
    OpLibrary,
    TensorSpec,
    compiler_digest,
    write_artefact,
)
from ssic.errors import SSICError
from ssic.options import CompileOptions, resolve_options
from ssic.outputs import check_output_dir
from ssic.passes.analysis import (
    check_static_batch1,
    plan_sparse_resolutions,
    static_shape,
)

IR_VERSION = 10

#: Named pipelines (TVM's idiom): target and lowering. ``--pipeline`` picks one.
PIPELINES: dict[str, dict[str, str]] = {
    "ort-fused": {"target": "ort", "lowering": "fused"},
    "ort-standard": {"target": "ort", "lowering": "standard"},
    "trt-standard": {"target": "trt", "lowering": "standard"},
    "trt-fused": {"target": "trt", "lowering": "fused"},
}


# ---------------------------------------------------------------------------------------- context
@dataclass
class CompileState:
    """What the phases hand each other."""

    options: CompileOptions
    source: onnx.ModelProto  # the model as given (written as dense.onnx)
    model: ir.Model | None = None  # pre-processed
    plan: Any = None
    sparse: ir.Model | None = None
    result: Any = None  # SparsifyResult
    prime: ir.Model | None = None
    mask: onnx.ModelProto | None = None
    sources: list[MaskSource] = field(default_factory=list)
    mask_hw: tuple[int, int] = (0, 0)
    passes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Phase:
    """One named step of a pipeline: ``run(state)``, then ``ensure(state)`` (its postcondition)."""

    name: str
    run: Callable[[CompileState, Callable[[str], None]], bool]
    ensure: Callable[[CompileState], None] | None = None
    required: bool = True
    applies: Callable[[CompileOptions], bool] = lambda opts: True


def _fail(phase: str, what: str) -> SSICError:
    return SSICError(f"internal error after pass '{phase}': {what} (please report this with the model)")


# ---------------------------------------------------------------------------------------- phases
def _run_preprocess(state: CompileState, log) -> bool:
    from ssic.passes.preprocess import preprocess_passes

    modified = False
    for name, p in preprocess_passes(set(state.options.disabled_passes)):
        ts = time.perf_counter()
        result = p(state.model)
        modified |= bool(result.modified)
        ms = 1000 * (time.perf_counter() - ts)
        state.passes.append({"name": f"preprocess/{name}", "ms": round(ms, 1), "modified": bool(result.modified)})
        log(f"pass preprocess/{name}: {ms:.0f} ms, modified={result.modified}")
    return modified


def _run_plan(state: CompileState, log) -> bool:
    o = state.options
    state.plan = plan_sparse_resolutions(state.model, min_res=o.sparse_min_res, tiles=dict(o.tiles),
                                         default_tile_size=o.tile, halos=dict(o.halos), default_halo=o.halo)
    if not state.plan.grids:
        raise SSICError(f"no convolution at or above the sparse resolution {state.plan.min_res}; "
                        "lower --sparse-min-res")
    log("sparse grids: " + ", ".join(f"{g.name} (tile {g.tile}, halo {g.halo})" for g in state.plan.grids.values()))
    top = max(state.plan.grids.values(), key=lambda g: g.height * g.width)
    state.mask_hw = (top.height, top.width)
    state.sources = mask_sources(state.model, state.mask_hw)
    if o.exact and not any(s.input for s in state.sources):
        raise SSICError("--exact needs a spatial model input ([1, C, H, W] or NHWC) to derive the change from")
    return False


def _run_sparsify(state: CompileState, log) -> bool:
    from ssic.passes.sparsify import SparsifyPass

    state.sparse = ir.serde.deserialize_model(ir.serde.serialize_model(state.model))
    state.result = SparsifyPass(state.plan, gn_stats=state.options.gn_stats,
                                cache_dtype=state.options.cache_dtype,
                                recompute_swish=state.options.recompute_swish)(state.sparse)
    n_sparse = sum(d.sparse for d in state.result.decisions)
    log(f"  {n_sparse}/{len(state.result.decisions)} convs sparse, {len(state.result.caches)} caches")
    if n_sparse == 0:
        reasons = sorted({d.reason for d in state.result.decisions})
        raise SSICError("no convolution could run sparse: " + "; ".join(reasons[:3]))
    return True


def _ensure_sparsify(state: CompileState) -> None:
    inputs = {v.name for v in state.sparse.graph.inputs}
    declared = {c.name for c in state.result.caches}
    model_inputs = {v.name for v in state.model.graph.inputs}
    tiles = {g.tiles_input for g in state.plan.grids.values()}
    undeclared = inputs - declared - model_inputs - tiles
    if undeclared:
        raise _fail("sparsify", f"sparse graph inputs not declared as caches: {sorted(undeclared)[:3]}")
    missing = declared - inputs
    if missing:
        raise _fail("sparsify", f"caches declared but not read by the sparse graph: {sorted(missing)[:3]}")
    if state.options.gn_stats == "cached" and any(c.kind in ("gn_sum", "gn_sumsq") for c in state.result.caches):
        raise _fail("sparsify", "gn_stats='cached' but incremental GroupNorm statistics were emitted")


def _run_lower_standard(state: CompileState, log) -> bool:
    from ssic.passes.lower_standard import LowerToStandardPass

    LowerToStandardPass()(state.sparse)
    return True


def _ensure_standard(state: CompileState) -> None:
    left = sorted({n.op_type for n in state.sparse.graph.all_nodes() if n.domain == "ssic"})
    if left:
        raise _fail("lower-standard", f"ssic-domain nodes remain in the standard lowering: {left}")


def _run_fuse_tile_conv(state: CompileState, log) -> bool:
    from ssic.passes.fuse_tile_conv import FuseTileConvPass

    return FuseTileConvPass()(state.sparse).modified


def _run_fuse_tile_moments(state: CompileState, log) -> bool:
    from ssic.passes.fuse_tile_moments import FuseTileMomentsPass

    return FuseTileMomentsPass()(state.sparse).modified


def _run_fuse_group_norm(state: CompileState, log) -> bool:
    from ssic.passes.fuse_group_norm import FuseGroupNormPass

    return FuseGroupNormPass()(state.sparse).modified


def _run_fuse_tile_affine(state: CompileState, log) -> bool:
    from ssic.passes.fuse_tile_affine import FuseTileAffinePass

    return FuseTileAffinePass()(state.sparse).modified


def _ensure_fused(state: CompileState) -> None:
    for n in state.sparse.graph.all_nodes():
        if n.domain == "ssic" and n.op_type == "TileConv":
            w = n.inputs[4].const_value if len(n.inputs) > 4 and n.inputs[4] is not None else None
            cout = n.attributes.get_int("cout", 0)
            if w is None or len(w.shape) != 3 or w.shape[0] != -(-cout // 16) or w.shape[2] != 16:
                raise _fail("fuse-tile-conv", f"TileConv {n.name!r} has no packed [ceil(cout/16), K, 16] weight")


def _run_build_prime(state: CompileState, log) -> bool:
    from ssic.passes.build_prime import BuildPrimePass

    base = ir.serde.deserialize_model(ir.serde.serialize_model(state.model))
    state.prime = BuildPrimePass(state.result.caches, state.result.gn_stats)(base)
    return True


def _ensure_prime(state: CompileState) -> None:
    outputs = {v.name for v in state.prime.graph.outputs}
    missing = {c.name for c in state.result.caches} - outputs
    if missing:
        raise _fail("build-prime", f"caches the prime graph does not output: {sorted(missing)[:3]}")


def _run_fuse_cache_store(state: CompileState, log) -> bool:
    from ssic.passes.fuse_cache_store import FuseCacheStorePass

    return FuseCacheStorePass()(state.prime).modified


def _run_build_mask(state: CompileState, log) -> bool:
    from ssic.passes.build_mask import build_mask_graph

    grids = list(state.plan.grids.values())
    o = state.options
    if o.exact:
        state.mask = exact_mask_graph(state, o.radius_budget)
    else:
        state.mask = build_mask_graph(state.mask_hw, grids, radius=o.mask_radius, level_dilation=o.level_dilation,
                                      sources=state.sources)
    return True


def exact_mask_graph(state: CompileState, radius: int | None) -> onnx.ModelProto:
    """The exact-mode mask graph, bounded to ``radius`` pixels around the edit when given."""
    from ssic.passes.exact_masks import build_exact_mask_model

    return build_exact_mask_model(state.model, list(state.plan.grids.values()), state.mask_hw,
                                  sources={s.input: s.mask_input for s in state.sources if s.input}, radius=radius)


def _ensure_mask(state: CompileState) -> None:
    names = {i.name for i in state.mask.graph.input}
    want = {s.mask_input for s in state.sources}
    if names != want:
        raise _fail("build-mask", f"mask graph inputs {sorted(names)} differ from the mask sources {sorted(want)}")


#: Every phase in order. ``--disable-pass`` may name optional phases and the preprocess passes only.
PHASES: list[Phase] = [
    Phase("preprocess", _run_preprocess, required=False),
    Phase("plan", _run_plan),
    Phase("sparsify", _run_sparsify, _ensure_sparsify),
    Phase("lower-standard", _run_lower_standard, _ensure_standard,
          applies=lambda o: o.lowering == "standard"),
    Phase("fuse-tile-conv", _run_fuse_tile_conv, _ensure_fused, required=False,
          applies=lambda o: o.lowering == "fused" and o.target == "ort"),
    Phase("fuse-tile-moments", _run_fuse_tile_moments, required=False,
          applies=lambda o: o.lowering == "fused" and o.target == "ort"),
    Phase("fuse-group-norm", _run_fuse_group_norm, required=False,
          applies=lambda o: o.lowering == "fused" and o.target == "ort"),
    Phase("fuse-tile-affine", _run_fuse_tile_affine, required=False,
          applies=lambda o: o.lowering == "fused" and o.target == "ort"),
    Phase("build-prime", _run_build_prime, _ensure_prime),
    Phase("fuse-cache-store", _run_fuse_cache_store, _ensure_prime, required=False,
          applies=lambda o: o.lowering == "fused" and o.target == "ort"),
    Phase("build-mask", _run_build_mask, _ensure_mask),
]


def optional_pass_names() -> list[str]:
    """Names ``--disable-pass`` accepts: optional phases and the pre-processing passes."""
    from ssic.passes.preprocess import preprocess_passes

    return [p.name for p in PHASES if not p.required] + [n for n, _ in preprocess_passes(set())]


def _check_disabled(opts: CompileOptions) -> None:
    optional = set(optional_pass_names())
    required = {p.name for p in PHASES if p.required} | {"validate"}
    for name in opts.disabled_passes:
        if name in required:
            raise SSICError(f"pass '{name}' is required by every pipeline and cannot be disabled")
        if name not in optional:
            raise SSICError(f"unknown pass '{name}' for --disable-pass (optional passes: {', '.join(sorted(optional))})")


# ---------------------------------------------------------------------------------------- helpers
def mask_sources(model: ir.Model, mask_hw: tuple[int, int]) -> list[MaskSource]:
    """Every spatial model input, with its own resolution and channel axis.

    A 4-D input ``[1, C, H, W]`` is NCHW; one whose only consumers are ``Transpose(perm=[0, 3, 1, 2])``
    is NHWC (Keras/tf2onnx exports). When the model has no spatial input, one source without an input
    stands for the finest grid itself: the user gives the mask.
    """
    out = []
    for v in model.graph.inputs:
        shape = static_shape(v)
        if shape is None or len(shape) != 4 or shape[0] != 1:
            continue
        users = [u for u, _ in v.uses()]
        nhwc = bool(users) and all(u.op_type == "Transpose" and list(u.attributes.get_ints("perm", [])) == [0, 3, 1, 2]
                                   for u in users)
        h, w = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
        out.append(MaskSource(input=v.name, height=h, width=w, channel_axis=3 if nhwc else 1,
                              mask_input=f"ssic.mask.{v.name}"))
    if not out:
        out.append(MaskSource(input="", height=mask_hw[0], width=mask_hw[1], channel_axis=1, mask_input="ssic.mask"))
    return out


def load_model(model_path: str | os.PathLike, input_shapes: dict[str, list[int]] | None = None, *,
               require_static: bool = False) -> onnx.ModelProto:
    """Read, check and normalise an ONNX model (``ssic.passes.normalize.load_model``): opset >= 18,
    ``input_shapes`` fixing dynamic dimensions, constants folded, shapes inferred.

    Raises ``SSICError`` (one line) for a missing, unreadable or invalid model.
    """
    from ssic.passes.normalize import load_model as normalize_load

    if Path(model_path).is_file() and external_weight_bytes(Path(model_path)) > LAZY_WEIGHTS_BYTES:
        # weights in external data (models over 2 GB): keep them on disk, referenced by absolute path;
        # the artefact's graphs then share one linked copy (see _save)
        from ssic.external_data import load_lazily
        from ssic.passes.normalize import fix_input_shapes

        proto = load_lazily(model_path)
        return fix_input_shapes(proto, input_shapes) if input_shapes else proto
    return normalize_load(model_path, input_shapes=input_shapes, require_static=require_static)


#: Models with more external weight bytes than this (protobuf's 2 GB limit, with room for the graph)
#: are compiled with their weights left on disk: no opset conversion or constant folding (those
#: need the weights in memory), shapes inferred by path. Smaller ones take the full normalisation.
LAZY_WEIGHTS_BYTES = 1_800_000_000


def external_weight_bytes(path: Path) -> int:
    """Bytes of the external data files an ONNX file references (0 if none; no weight is read)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - the loader that follows reports unreadable files
        return 0
    files = {ExternalDataInfo(t).location for t in proto.graph.initializer if uses_external_data(t)}
    return sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def _unsupported_ops(proto: onnx.ModelProto) -> list[str]:
    return sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})


def _save(model: ir.Model | onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import uses_external_data

    from ssic.external_data import share_external_data

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    proto.ir_version = IR_VERSION
    if any(uses_external_data(t) for t in proto.graph.initializer):
        # weights still on disk (absolute references): one hard-linked weights.data per artefact
        share_external_data(proto, "/", path.parent)
        onnx.save(proto, str(path))
    elif proto.ByteSize() > 1_900_000_000:
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))


def _resolve_lowering(opts: CompileOptions, log) -> CompileOptions:
    if opts.lowering is not None:
        return opts
    lowering, why = "fused", "the ssic op library runs the fused ops"
    if opts.target == "trt":
        from ssic.targets.trt import find_plugin_library

        if find_plugin_library() is None:
            lowering, why = "standard", "the ssic TensorRT plugin library is not built here"
        else:
            why = "the ssic TensorRT plugin library is built"
    log(f"lowering: {lowering} ({why}; --lowering to choose)")
    return opts.model_copy(update={"lowering": lowering})


def _validate_graphs(tmp: Path, manifest: Manifest, log) -> None:
    """Every graph passes the ONNX checker (by path) and loads once in ONNX Runtime with the op library."""
    import onnxruntime as ort

    from ssic.passes.normalize import check_model_file

    t0 = time.perf_counter()
    for which, file in manifest.graphs.items():
        path = tmp / file
        try:
            check_model_file(path)  # the checker by path; accepts GroupNormalization-18 as ONNX Runtime does
        except SSICError as exc:
            raise _fail("validate", f"{file} fails the ONNX checker: {str(exc)[:300]}") from None
        if manifest.lowering == "fused" and which in ("sparse", "prime"):
            from ssic.library import make_session_options

            so = make_session_options(1)
        else:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise _fail("validate", f"ONNX Runtime cannot load {file}: {str(exc).splitlines()[0][:300]}") from None
        del sess
    log(f"pass validate: {1000 * (time.perf_counter() - t0):.0f} ms (checker + ONNX Runtime load of every graph)")


# ---------------------------------------------------------------------------------------- driver
def compile_model(
    model_path: str | os.PathLike,
    target: str | None = None,
    lowering: str | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    validate: bool = True,
    **options: Any,
) -> Path:
    """Compile ``model_path`` into an artefact directory and return its path.

    ``target`` is ``"ort"`` (ONNX Runtime CPU, default) or ``"trt"``; ``lowering`` ``"fused"`` (ssic
    custom ops) or ``"standard"`` (stock ONNX ops), default: the one that will run. Every other option
    is a keyword of :class:`ssic.options.CompileOptions` (``exact``, ``sparse_min_res``, ``tile``,
    ``tiles``, ``mask_eps``, ``mask_radius``, ``level_dilation``, ``halo``, ``halos``,
    ``fallback_ratio``, ``gn_stats``, ``cache_dtype``, ``disabled_passes``, ``input_shapes``); unset ones come from the
    model's metadata and family defaults. ``force`` replaces an existing *artefact* at ``output_dir``.
    ``log`` receives progress lines (pass timings, the lowering chosen and why).
    Raises ``SSICError`` (one line) for bad input; nothing is written then.
    """
    def _log(msg: str) -> None:
        if log is not None:
            log(msg)

    t0 = time.perf_counter()
    given = dict(options, target=target, lowering=lowering)
    # validate the options before touching any file
    resolve_options({k: v for k, v in given.items()})
    out = Path(output_dir) if output_dir is not None else Path(str(model_path)).with_name(
        Path(str(model_path)).stem + f".ssic-{target or 'ort'}")
    _check_output(out, force=force, model_path=Path(str(model_path)))

    proto = load_model(model_path, given.get("input_shapes"), require_static=True)
    bad = _unsupported_ops(proto)
    if bad:
        raise SSICError(f"unsupported custom-domain ops in the model: {', '.join(bad)}")
    metadata = {p.key: p.value for p in proto.metadata_props}
    opts = resolve_options(given, metadata)
    _check_disabled(opts)
    opts = _resolve_lowering(opts, _log)

    model = ir.serde.deserialize_model(proto)
    check_static_batch1(model)
    state = CompileState(options=opts, source=proto, model=model)
    for phase in PHASES:
        if not phase.applies(opts) or phase.name in opts.disabled_passes:
            continue
        ts = time.perf_counter()
        modified = phase.run(state, _log)
        ms = 1000 * (time.perf_counter() - ts)
        if phase.name != "preprocess":
            state.passes.append({"name": phase.name, "ms": round(ms, 1), "modified": bool(modified)})
            _log(f"pass {phase.name}: {ms:.0f} ms, modified={modified}")
        if phase.ensure is not None:
            phase.ensure(state)

    manifest = _manifest(state, metadata)

    def fill(tmp: Path) -> None:
        _save(proto, tmp / "dense.onnx")
        _save(state.prime, tmp / "prime.onnx")
        _save(state.sparse, tmp / "sparse.onnx")
        _save(state.mask, tmp / "mask.onnx")

    def finish(tmp: Path) -> Manifest:
        m = manifest
        if opts.target == "trt":
            from ssic.targets.trt import build_trt_artefact

            m = m.model_copy(update={"trt": build_trt_artefact(tmp, m, log=_log)})
        return m.model_copy(update={"compile_seconds": round(time.perf_counter() - t0, 2)})

    def check(tmp: Path, m: Manifest) -> None:
        if validate:
            _validate_graphs(tmp, m, _log)
        if opts.calibrate:
            _calibrate(tmp, m, state, _log)

    written = write_artefact(out, finish, fill, replace=force, validate=check)
    _log(f"wrote {written} in {time.perf_counter() - t0:.1f} s")
    return written


def _calibrate(tmp: Path, manifest: Manifest, state: CompileState, log) -> None:
    """Choose the radius budget on the user's images (:mod:`ssic.calibrate`); rewrites mask.onnx and
    the manifest in the temporary artefact directory."""
    from ssic.artefact import MANIFEST
    from ssic.calibrate import calibrate

    o = state.options
    images = [Path(p) for p in o.calibrate]
    for p in images:
        if not p.is_file():
            raise SSICError(f"calibration image not found: {p}")
    radius, record = calibrate(tmp, manifest, lambda r: exact_mask_graph(state, r), images,
                               float(o.target_psnr), log=log)
    mask = manifest.mask.model_copy(update={"radius_budget": radius,
                                            "mode": "bounded-exact" if radius else "exact"})
    updated = manifest.model_copy(update={"mask": mask, "calibration": record})
    (tmp / MANIFEST).write_text(updated.to_json())
    log(f"calibrate: radius budget {radius if radius else 'unbounded'} for {o.target_psnr} dB")


def _check_output(out: Path, *, force: bool, model_path: Path) -> None:
    """Refuse an output that exists unless ``force`` and it is an ssic artefact (never a user's folder)."""
    parent = out.resolve().parent
    shown = out.parent  # as the user wrote it, not absolute
    if not parent.exists():
        raise SSICError(f"cannot write {out}: directory {shown} does not exist")
    if not parent.is_dir():
        raise SSICError(f"cannot write {out}: {shown} is not a directory")
    if not os.access(parent, os.W_OK):
        raise SSICError(f"cannot write {out}: directory {shown} is not writable")
    check_output_dir(out, force=force, protected=[model_path])  # --force replaces only an artefact


def _manifest(state: CompileState, metadata: dict[str, str]) -> Manifest:
    from ssic.macs import count_macs

    opts, plan, result, proto, model = state.options, state.plan, state.result, state.source, state.model
    grids = list(plan.grids.values())
    macs = count_macs(proto)
    dense_total = int(macs["macs_total"])
    sparse_conv_dense = sum(d.macs_dense for d in result.decisions if d.sparse)
    per_tile: dict[str, int] = {g.name: 0 for g in grids}
    for d in result.decisions:
        if d.sparse:
            per_tile[d.grid] += d.macs_per_tile
    library = None
    if opts.lowering == "fused":
        from ssic.library import library_version

        library = OpLibrary(name="libssic_ort", domain="ssic", op_version=1, version=library_version())

    def spec(v: ir.Value) -> TensorSpec:
        return TensorSpec(name=v.name, shape=list(static_shape(v) or ()),
                          dtype=str(v.dtype.name).lower() if v.dtype else "float")

    return Manifest(
        ssic_version=__version__, compiler_digest=compiler_digest(), target=opts.target, lowering=opts.lowering, exact=opts.exact,
        gn_stats=opts.gn_stats, fallback_ratio=opts.fallback_ratio, sparse_min_res=plan.min_res,
        model=ModelInfo(family=metadata.get("ssic.model"), producer=proto.producer_name, metadata=metadata),
        opsets={(o.domain or "ai.onnx"): o.version for o in proto.opset_import} | (
            {"ssic": 1} if opts.lowering == "fused" else {}),
        graphs={"dense": "dense.onnx", "prime": "prime.onnx", "sparse": "sparse.onnx", "mask": "mask.onnx"},
        inputs=[spec(v) for v in model.graph.inputs],
        outputs=[spec(v) for v in model.graph.outputs],
        mask=MaskSpec(height=state.mask_hw[0], width=state.mask_hw[1], sources=state.sources,
                      eps=opts.mask_eps, radius=opts.mask_radius, level_dilation=opts.level_dilation,
                      halo=opts.halo, radius_budget=opts.radius_budget,
                      mode=("bounded-exact" if opts.radius_budget else "exact") if opts.exact else "sige-pyramid"),
        grids=[GridSpec(name=g.name, height=g.height, width=g.width, tile=g.tile, halo=g.halo, cells=list(g.cells),
                        num_cells=g.num_cells, tiles_input=g.tiles_input, macs_per_tile=per_tile[g.name])
               for g in grids],
        caches=[CacheEntry(**c.to_json()) for c in result.caches],
        macs=MacsSpec(dense=dense_total, sparse_fixed=dense_total - sparse_conv_dense,
                      sparse_convs_dense=sparse_conv_dense, per_tile=per_tile,
                      by_op_type=macs.get("macs_by_op_type", {})),
        layers=[LayerDecision(**d.to_json()) for d in result.decisions] + _other_mac_nodes(proto, macs, result),
        dense_ops=[DenseOpSpec(**d.to_json()) for d in result.dense_ops],
        options=opts, passes=state.passes, custom_op_library=library,
    )


def _other_mac_nodes(proto: onnx.ModelProto, macs: dict, result) -> list[LayerDecision]:
    """Every MAC-heavy node the sparse rewrite did not decide on (attention MatMuls, Gemm, ...), so that
    ``ssic inspect`` lists all of a model's MACs with where they run."""
    decided = {d.node for d in result.decisions}
    reads_sparse = {d.node for d in result.dense_ops}
    ops = {n.name or f"{n.op_type}_{i}": n.op_type for i, n in enumerate(proto.graph.node)}
    out = []
    for name, n in macs.get("macs_by_node", {}).items():
        if name in decided:
            continue
        op = ops.get(name, "?")
        if op == "Conv":  # named differently after pre-processing: already decided under its new name
            continue
        reason = (f"{op} runs dense on full-size maps of sparse values: no tile rule for {op} yet"
                  if name in reads_sparse else
                  f"{op} reads no sparse grid's pixels (e.g. a timestep embedding): computed in full")
        out.append(LayerDecision(node=name, kind=op, channels=[0, 0], sparse=False, macs_dense=int(n),
                                 reason=reason))
    return out
