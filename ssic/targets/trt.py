"""The TensorRT target: serialized engines for an artefact's graphs, and a session that runs them.

One adapter (:func:`import_tensorrt`) hides which TensorRT Python module is used: ``tensorrt`` where
it imports (a GPU host with TensorRT), else ``tensorrt_rtx`` (TensorRT for RTX, ``pip install
tensorrt-rtx-cu13``), whose builder and ONNX parser also work on machines without a GPU.

:func:`build_trt_artefact` is called by the compiler (``target="trt"``) after it wrote ``dense.onnx``,
``prime.onnx``, ``sparse.onnx`` and ``mask.onnx``; it builds one engine per graph it runs on the GPU
(prime, sparse, dense; the mask graph stays on ONNX Runtime because the host needs the tile count
anyway), with an optimisation profile over the number of active tiles of every grid, and returns
the dict the compiler records in the manifest under ``"trt"``. See ``docs/tensorrt.md``.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import onnx

from ssic.errors import SSICError

#: Python module -> flavour tag used in engine file names and the manifest.
FLAVOURS = {"tensorrt": "trt", "tensorrt_rtx": "trt-rtx"}
#: Fraction of a grid's cells the profile's ``opt`` point is tuned for (a typical edit).
DEFAULT_OPT_FRACTION = 0.05
#: Graphs that get an engine, in build order.
ENGINE_GRAPHS = ("prime", "sparse", "dense")
PLUGIN_LIBRARY_NAME = "libssic_trt_plugins.so"
PLUGIN_NAMESPACE = "ssic"
PLUGIN_VERSION = "1"
TRT_SPARSE_GRAPH = "sparse.trt.onnx"


@dataclass(frozen=True)
class TensorRT:
    """The imported TensorRT module: ``module``, its import ``name``, ``flavour`` and ``version``."""

    module: ModuleType
    name: str
    flavour: str
    version: str

    @property
    def short_version(self) -> str:
        return ".".join(self.version.split(".")[:3])

    @property
    def tag(self) -> str:
        """``trt-rtx-1.7.1``: what engine file names carry."""
        return f"{self.flavour}-{self.short_version}"


def import_tensorrt(prefer: str | None = None) -> TensorRT:
    """Import ``tensorrt`` if importable, else ``tensorrt_rtx``; returns a :class:`TensorRT`.

    ``prefer`` (a module name) tries that module only. Raises ``SSICError`` when none imports.
    """
    names = [prefer] if prefer else list(FLAVOURS)
    errors = []
    for name in names:
        try:
            module = __import__(name)
        except Exception as exc:  # ImportError, or a broken install raising OSError on its libs
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        return TensorRT(module, name, FLAVOURS[name], str(getattr(module, "__version__", "0")))
    raise SSICError("the TensorRT target needs the TensorRT Python module (tensorrt, or tensorrt_rtx on machines "
                    "without TensorRT): install it with `pip install ssic[trt]` (or `pip install tensorrt-rtx-cu13`)"
                    f" [{'; '.join(errors)}]")


# ------------------------------------------------------------------------------------------ building


def _make_logger(trt: TensorRT, log: Callable[[str], None]):
    """A TensorRT logger that keeps error messages (for SSICError texts) and forwards warnings to ``log``."""
    mod = trt.module

    class _Logger(mod.ILogger):
        def __init__(self) -> None:
            mod.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's method name
            if severity in (mod.ILogger.Severity.INTERNAL_ERROR, mod.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                log(f"{trt.flavour}: error: {msg}")
            elif severity == mod.ILogger.Severity.WARNING:
                log(f"{trt.flavour}: warning: {msg}")

    return _Logger()


_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
               "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8", "INT4": "int4"}


def trt_dtype_name(dtype) -> str:
    """NumPy-style name of a TensorRT ``DataType`` (``float32``, ``int64``, ...)."""
    name = str(getattr(dtype, "name", dtype)).split(".")[-1].upper()
    return _TRT_DTYPES.get(name, name.lower())


def onnx_dtype_name(elem_type: int) -> str:
    """NumPy-style name of an ONNX element type."""
    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _onnx_io(path: Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape"}}`` of the graph inputs and outputs of an ONNX file (no weights loaded)."""
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for v in [*proto.graph.input, *proto.graph.output]:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        out[v.name] = {"dtype": onnx_dtype_name(tt.elem_type), "shape": shape}
    return out


def _as_dict(manifest) -> dict:
    """The manifest as plain JSON data (the builders below read the artefact's JSON layout)."""
    return manifest.model_dump() if hasattr(manifest, "model_dump") else manifest


def opt_tiles(manifest) -> dict[str, int]:
    """The profile's ``opt`` tile count per grid name: ~``opt_fraction`` of the cells (default 5 %).

    Overrides, most specific first: ``manifest["trt_options"]["opt_tiles"][grid]``, then
    ``manifest["trt_options"]["opt_fraction"]``, then the environment variable ``SSIC_TRT_OPT_FRACTION``.
    Raises ``SSICError`` for a value the profile cannot cover (outside ``1 .. num_cells``).
    """
    manifest = _as_dict(manifest)
    options = manifest.get("trt_options") or {}
    fraction = options.get("opt_fraction", os.environ.get("SSIC_TRT_OPT_FRACTION", DEFAULT_OPT_FRACTION))
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise SSICError(f"TensorRT opt_fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < fraction <= 1.0:
        raise SSICError(f"TensorRT opt_fraction must be in (0, 1], got {fraction}")
    explicit = options.get("opt_tiles") or {}
    unknown = sorted(set(explicit) - {g["name"] for g in manifest["grids"]})
    if unknown:
        raise SSICError(f"TensorRT opt_tiles names unknown grid(s) {unknown}; grids: "
                        f"{[g['name'] for g in manifest['grids']]}")
    out = {}
    for g in manifest["grids"]:
        cells = int(g["num_cells"])
        if g["name"] in explicit:
            n = explicit[g["name"]]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cells:
                raise SSICError(f"TensorRT opt_tiles[{g['name']!r}] = {n!r} is outside the profile range "
                                f"1..{cells} (the grid's cells)")
        else:
            n = min(cells, max(1, round(fraction * cells)))
        out[g["name"]] = int(n)
    return out


def _tile_profiles(manifest) -> dict[str, dict]:
    """``{tiles input name: {"grid", "min", "opt", "max"}}`` for every grid's active-tile input."""
    manifest = _as_dict(manifest)
    opt = opt_tiles(manifest)
    return {g["tiles_input"]: {"grid": g["name"], "min": [1, 2], "opt": [opt[g["name"]], 2],
                               "max": [int(g["num_cells"]), 2]} for g in manifest["grids"]}


def _parse(trt: TensorRT, builder, logger, path: Path):
    """Parse an ONNX file (from its path, so external data works); returns ``(network, parser)``."""
    mod = trt.module
    flags = 0
    major = int(trt.version.split(".")[0] or 0)
    if trt.name == "tensorrt" and major < 10 and hasattr(mod, "NetworkDefinitionCreationFlag"):
        flags = 1 << int(mod.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = mod.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    if not ok or parser.num_errors:
        raise _parser_error(trt, parser, path, logger)
    return network, parser


class ParserError(SSICError):
    """TensorRT's ONNX parser rejected a graph; ``node_name``/``op_type`` say where."""

    def __init__(self, message: str, node_name: str = "", op_type: str = "") -> None:
        super().__init__(message)
        self.node_name = node_name
        self.op_type = op_type


def _parser_error(trt: TensorRT, parser, path: Path, logger) -> ParserError:
    if parser.num_errors == 0:
        detail = logger.errors[-1] if logger.errors else "no message"
        return ParserError(f"TensorRT's ONNX parser ({trt.flavour} {trt.version}) rejected {path.name}: {detail}")
    err = parser.get_error(0)
    node_name = str(err.node_name() or "")
    op = str(err.node_operator() or "")
    desc = str(err.desc()).strip().replace("\n", " ")
    where = f"node '{node_name}' ({op}, #{err.node()})" if node_name or op else "the graph"
    more = f" (+{parser.num_errors - 1} more error(s))" if parser.num_errors > 1 else ""
    return ParserError(f"TensorRT's ONNX parser ({trt.flavour} {trt.version}) rejected {path.name} at {where}: "
                       f"{desc}{more}", node_name, op)


def network_bindings(trt: TensorRT, network, onnx_io: dict[str, dict], profiles: dict[str, dict]) -> list[dict]:
    """The I/O bindings of a parsed network: name, mode, shape (-1 dynamic), dtype, profile ranges.

    ``onnx_dtype`` records the graph's dtype where TensorRT binds another one (then the session casts).
    Raises ``SSICError`` for a dynamic input no profile covers.
    """
    out = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            shape = [int(d) for d in t.shape]
            entry = {"name": t.name, "mode": mode, "shape": shape, "dtype": trt_dtype_name(t.dtype)}
            graph_dtype = onnx_io.get(t.name, {}).get("dtype")
            if graph_dtype and graph_dtype != entry["dtype"]:
                entry["onnx_dtype"] = graph_dtype
            if mode == "input" and -1 in shape:
                prof = profiles.get(t.name)
                if prof is None:
                    raise SSICError(f"input '{t.name}' has dynamic shape {shape} and is no active-tile input; "
                                    "the TensorRT target only makes the tile count dynamic")
                if len(prof["max"]) != len(shape) or any(s not in (-1, m) for s, m in zip(shape, prof["max"], strict=True)):
                    raise SSICError(f"input '{t.name}' has shape {shape}, which the tile profile "
                                    f"{prof['min']}..{prof['max']} does not match")
                entry["profile"] = {k: list(prof[k]) for k in ("min", "opt", "max")}
                entry["grid"] = prof["grid"]
            out.append(entry)
    return out


def build_engine(trt: TensorRT, onnx_path: Path, engine_path: Path, profiles: dict[str, dict],
                 log: Callable[[str], None], *, optimization_level: int | None = None) -> dict:
    """Parse ``onnx_path``, build and write a serialized engine; returns its manifest entry."""
    mod = trt.module
    logger = _make_logger(trt, log)
    builder = mod.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)
    # the sparse graph's commit outputs serve host-side commits (ONNX Runtime); TensorRT's caches are
    # device buffers and its commit re-primes, so an engine does not output them
    for i in reversed(range(network.num_outputs)):
        if network.get_output(i).name.startswith("ssic.commit."):
            network.unmark_output(network.get_output(i))
    bindings = network_bindings(trt, network, _onnx_io(onnx_path), profiles)
    config = builder.create_builder_config()
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    dynamic = [b for b in bindings if "profile" in b]
    if dynamic:
        profile = builder.create_optimization_profile()
        for b in dynamic:
            profile.set_shape(b["name"], tuple(b["profile"]["min"]), tuple(b["profile"]["opt"]),
                              tuple(b["profile"]["max"]))
        if config.add_optimization_profile(profile) < 0:
            raise SSICError(f"TensorRT rejected the optimisation profile of {onnx_path.name}: "
                            + (logger.errors[-1] if logger.errors else "no message"))
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if blob is None:
        detail = " | ".join(logger.errors[-3:]) or "no message"
        raise SSICError(f"TensorRT ({trt.flavour} {trt.version}) could not build an engine from "
                        f"{onnx_path.name}: {detail}")
    data = memoryview(blob)
    engine_path.write_bytes(data)
    log(f"{trt.flavour}: built {engine_path.name} ({data.nbytes / 1e6:.1f} MB) in {seconds:.2f} s")
    return {"file": engine_path.name, "onnx": onnx_path.name, "bytes": int(data.nbytes),
            "build_seconds": round(seconds, 3), "num_profiles": 1 if dynamic else 0, "bindings": bindings}


# ------------------------------------------------------------------------------------------ plugins


def plugin_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of a fused sparse graph with every ``ssic::TileGather``/``TileScatter`` as a plugin node.

    Plugin nodes keep ``op_type`` (= plugin name) and every op attribute (defaults written out), and
    add ``plugin_namespace="ssic"``, ``plugin_version="1"``. Absent optional inputs are dropped and
    recorded as ``has_scale``/``has_shift`` (TileGather) or ``has_residual`` (TileScatter) so the
    plugin sees only real tensors. Returns ``(model, [{"name", "op_type", "inputs"}])``.
    """
    from ssic import ops

    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.domain != ops.DOMAIN:
            continue
        spec = ops.OPS.get(node.op_type)
        if spec is None:
            raise SSICError(f"node '{node.name}' is {node.domain}::{node.op_type}, which has no TensorRT plugin")
        attrs = spec.resolve_attrs({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        inputs = list(node.input) + [""] * (spec.max_inputs - len(node.input))
        flags = {f"has_{s.name}": int(v != "") for s, v in zip(spec.inputs, inputs, strict=True) if s.optional}
        del node.attribute[:]
        for key, value in {**attrs, **flags}.items():
            node.attribute.append(onnx.helper.make_attribute(key, value))
        node.attribute.append(onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
        node.attribute.append(onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION))
        del node.input[:]
        node.input.extend([v for v in inputs if v != ""])
        nodes.append({"name": node.name, "op_type": node.op_type, "inputs": list(node.input)})
    return out, nodes


def find_plugin_library() -> Path | None:
    """Path of ``libssic_trt_plugins.so``: ``$SSIC_TRT_PLUGIN_LIBRARY``, else next to the package, else None."""
    env = os.environ.get("SSIC_TRT_PLUGIN_LIBRARY")
    if env:
        return Path(env)
    import ssic

    for entry in getattr(ssic, "__path__", []):
        for sub in ("_lib", "lib"):
            p = Path(entry) / sub / PLUGIN_LIBRARY_NAME
            if p.is_file():
                return p
    return None


def load_plugin_library(trt: TensorRT, registry) -> tuple[Path | None, str]:
    """Load the plugin library into ``registry``; returns ``(path or None, why not)``."""
    path = find_plugin_library()
    if path is None:
        return None, (f"{PLUGIN_LIBRARY_NAME} was not found (set SSIC_TRT_PLUGIN_LIBRARY, or build plugins/trt "
                      "with -DSSIC_BUILD_TRT_PLUGINS=ON -DTensorRT_ROOT=<TensorRT> where TensorRT and CUDA exist)")
    if not path.is_file():
        return None, f"SSIC_TRT_PLUGIN_LIBRARY={path} is not a file"
    try:
        handle = registry.load_library(str(path))
    except Exception as exc:
        return None, f"{trt.flavour} could not load {path}: {str(exc).splitlines()[0] if str(exc) else exc}"
    if handle is None:
        return None, f"{trt.flavour} could not load {path}"
    return path, ""


def _build_fused_sparse(trt: TensorRT, out_dir: Path, profiles: dict[str, dict], log, engine_path: Path,
                        optimization_level) -> tuple[dict, dict]:
    src = out_dir / "sparse.onnx"
    proto = onnx.load(str(src), load_external_data=False)
    rewritten, nodes = plugin_graph(proto)
    dst = out_dir / TRT_SPARSE_GRAPH
    # external data (if any) stays in sparse.onnx's data file, which lives in the same directory
    onnx.save(rewritten, str(dst))
    mod = trt.module
    logger = _make_logger(trt, log)
    builder = mod.Builder(logger)
    lib, why = load_plugin_library(trt, mod.get_plugin_registry())
    counts = ", ".join(f"{sum(n['op_type'] == op for n in nodes)} {op}" for op in sorted({n["op_type"] for n in nodes}))
    info = {"graph": TRT_SPARSE_GRAPH, "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
            "library": PLUGIN_LIBRARY_NAME, "nodes": len(nodes)}
    if lib is None:
        detail = ""
        try:
            _parse(trt, builder, logger, dst)
        except ParserError as exc:
            detail = f"; the parser says: {exc}"
        raise SSICError(f"the fused lowering on TensorRT needs the ssic plugins ({counts}) and the plugin library "
                        f"could not be loaded: {why}{detail}. Compile with --lowering standard to need no plugins")
    log(f"{trt.flavour}: loaded plugin library {lib}")
    if trt.flavour == "trt-rtx":
        # Measured with tensorrt-rtx 1.7.1: the library loads and its creators register, but the ONNX
        # parser then aborts the whole process (std::terminate) on the plugin nodes. Refuse cleanly.
        raise SSICError(f"the fused lowering on TensorRT needs the ssic plugins ({counts}); {lib} loads into "
                        f"{trt.flavour} {trt.version}, but its ONNX parser aborts on plugin nodes. Build on a host with "
                        "TensorRT (the tensorrt module), or compile with --lowering standard")
    entry = build_engine(trt, dst, engine_path, profiles, log, optimization_level=optimization_level)
    return entry, info


def build_trt_artefact(out_dir: Path, manifest, log: Callable[[str], None] | None = None) -> dict:
    """Build the TensorRT engines of an artefact directory; returns the manifest's ``"trt"`` entry.

    ``out_dir`` holds the compiler's ONNX graphs. Engines are written next to them as
    ``<graph>.<flavour>-<version>.engine``. The entry records the flavour, version, profile ``opt``
    choice and, per engine, its file, build time and bindings (name, mode, shape, dtype, profile).
    Raises ``SSICError`` (parser or builder errors, missing plugins); the caller removes ``out_dir``.
    """
    log = log or (lambda msg: None)
    out_dir = Path(out_dir)
    manifest = _as_dict(manifest)
    trt = import_tensorrt()
    options = manifest.get("trt_options") or {}
    level = options.get("builder_optimization_level")
    profiles = _tile_profiles(manifest)
    lowering = manifest.get("lowering", "standard")
    result = {"flavour": trt.flavour, "module": trt.name, "version": trt.version, "lowering": lowering,
              "opt_tiles": {p["grid"]: p["opt"][0] for p in profiles.values()},
              "mask_graph": "onnxruntime", "engines": {}}
    for graph in ENGINE_GRAPHS:
        src = out_dir / manifest["graphs"][graph]
        if not src.exists():
            raise SSICError(f"cannot build the TensorRT {graph} engine: {src.name} is missing")
        engine_path = out_dir / f"{graph}.{trt.tag}.engine"
        t0 = time.perf_counter()
        if graph == "sparse" and lowering == "fused":
            entry, result["plugins"] = _build_fused_sparse(trt, out_dir, profiles, log, engine_path, level)
        else:
            entry = build_engine(trt, src, engine_path, profiles, log, optimization_level=level)
        entry["total_seconds"] = round(time.perf_counter() - t0, 3)
        result["engines"][graph] = entry
    return result


# ------------------------------------------------------------------------------------------ running


def gpu_available() -> tuple[bool, str]:
    """Whether an NVIDIA GPU is usable (CUDA driver loads and reports a device); ``(ok, reason)``."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no CUDA driver (libcuda.so.1) is installed"
    if cuda.cuInit(0) != 0:
        return False, "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return False, "the CUDA driver reports no GPU"
    return True, ""


def check_tile_count(manifest, grid: str, n: int) -> None:
    """Raise ``SSICError`` unless ``n`` active tiles of ``grid`` lie in the engines' profile range."""
    for entry in _as_dict(manifest)["trt"]["engines"].values():
        for b in entry["bindings"]:
            if b.get("grid") == grid and "profile" in b:
                lo, hi = b["profile"]["min"][0], b["profile"]["max"][0]
                if not lo <= n <= hi:
                    raise SSICError(f"{n} active tiles of grid {grid} are outside the engine's optimisation "
                                    f"profile {lo}..{hi}; recompile the artefact")


def check_loadable(path: Path, manifest) -> TensorRT:
    """Raise ``SSICError`` unless this host can run the artefact's engines; returns the TensorRT module.

    Needs an NVIDIA GPU and the TensorRT flavour and version that built the engines.
    """
    rec = _as_dict(manifest).get("trt")
    if _as_dict(manifest).get("target") != "trt" or not rec:
        raise SSICError(f"{path} is not a TensorRT artefact; load it with ssic.load")
    ok, reason = gpu_available()
    if not ok:
        raise SSICError(f"{path} is a TensorRT artefact ({rec['flavour']} {rec['version']}); "
                        f"running it needs an NVIDIA GPU and TensorRT; none is available here ({reason}). "
                        "Compile with --target ort to run on the CPU")
    trt = import_tensorrt(rec["module"])
    if trt.version != rec["version"]:
        raise SSICError(f"{path} holds engines built by {trt.flavour} {rec['version']}, but "
                        f"{trt.version} is installed; recompile the artefact here")
    return trt
