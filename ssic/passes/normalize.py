"""Load any ONNX model a user brings and normalise it before planning.

``load_model(path, input_shapes=...)`` is the compiler's and ``ssic inspect``'s entry point. In order:

1. read the model proto without its external data and check that every external-data file it
   names exists (a missing file is named in one line, not reported as a bare ``ValidationError``);
2. ``onnx.checker.check_model`` **by path**, so models over 2 GB with external data are checked
   without loading them into one protobuf (the in-memory checker cannot serialise them);
3. convert a model whose default-domain opset is below 18 to opset 18 with ONNX's version
   converter (``onnx.version_converter.convert_version``);
4. fix dynamic input dimensions from ``input_shapes`` (``--input-shape NAME:1x3x256x256``, the
   Polygraphy/trtexec convention);
5. fold what is constant: onnxscript's constant folder (``FoldConstantsPass``, node-level shape
   inference on) evaluates constant sub-graphs (``Shape -> Gather -> ConstantOfShape -> Concat ->
   Pad`` from torch's TorchScript exporter; spectral norm's ``Div(W, sigma)``), then ONNX shape
   inference with data propagation gives every value its static shape;
6. write ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID, as tf2onnx exports) as explicit ``pads`` where
   the input's shape is static, so every later pass sees one form.

Why convert instead of emitting for the model's opset: every ssic pass builds opset-18 forms
(``ReduceSum``/``ReduceMean`` with ``axes`` as an input, ``Pad``/``Resize`` inputs), in five graph
builders; one upstream conversion keeps them single-form, ONNX maintains the adapters, and ONNX
Runtime runs opset 18 everywhere. Models at opset 18 or above are left at their opset (the
opset-18 forms stay valid up to the newest opset).

Why opset-18 ``GroupNormalization`` gets a checker exemption: ONNX 1.23 marks it deprecated
(opset 21 changed scale/bias from per-group to per-channel) and the checker refuses deprecated
ops, although ONNX Runtime implements it. ONNX's 20->21 adapter only relabels the node (scale/bias
stay per-group, which ONNX Runtime then rejects: measured), so converting is no way out. The rest of
the model is still checked: the deprecated nodes are checked for arity and scale/bias sizes, and
the model is checked with them replaced by ``Identity``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import external_data_helper

from ssic.errors import SSICError

__all__ = ["MIN_OPSET", "load_model", "check_model_file", "parse_input_shape", "fix_input_shapes", "dynamic_inputs",
           "fold_constants", "explicit_auto_pads"]

#: ssic's passes emit opset-18 forms; older models are converted to this opset.
MIN_OPSET = 18

#: Largest tensor (elements) the constant folder computes or writes: weight expressions such as
#: spectral norm's ``Div(W, sigma)`` over a 512x512x3x3 conv (2.4M) must fold.
FOLD_SIZE_LIMIT = 1 << 24

# Deprecated ops ONNX Runtime still implements: (op_type, since_version) -> checked how.
_DEPRECATED_ACCEPTED = {("GroupNormalization", 18)}


def read_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph of an ONNX file without its external weights' bytes; ``SSICError`` (one line) for a
    missing path, a directory, an unreadable file or a file without nodes."""
    p = Path(path)
    if not p.exists():
        raise SSICError(f"model file not found: {p}")
    if p.is_dir():
        raise SSICError(f"expected an ONNX file, got a directory: {p}")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error
        raise SSICError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise SSICError(f"{p} is not a readable ONNX model (no graph nodes)")
    return proto


def load_model(path: str | os.PathLike, *, input_shapes: dict[str, list[int]] | None = None,
               require_static: bool = False, fold: bool = True) -> onnx.ModelProto:
    """Read, check and normalise an ONNX model for planning.

    Args:
        path: the ``.onnx`` file; external-data files are read relative to its directory.
        input_shapes: graph input name -> full shape (ints) fixing its dynamic dimensions, e.g.
            ``{"x": [1, 3, 256, 256]}``; a static dimension must be given its own value.
        require_static: raise unless every graph input ends up with a static shape (the
            compiler's setting; ``ssic inspect`` leaves it off to show symbolic shapes).
        fold: run constant folding and shape inference with data propagation (off: only the
            checks, the opset conversion and the input shapes).

    Returns:
        The normalised ``onnx.ModelProto`` with external data loaded, default-domain opset
        ``>= MIN_OPSET``, inferred ``value_info``.

    Raises:
        SSICError: (one line) missing/unreadable file, a missing external-data file (named),
            an invalid model, an opset the converter cannot lift, a bad ``input_shapes`` entry,
            dynamic inputs left with ``require_static``, or failed shape inference.
    """
    p = Path(path)
    proto = read_graph(p)
    _check_external_files(proto, p)
    _check(proto, p)
    proto = _convert_opset(proto, p)
    try:
        external_data_helper.load_external_data_for_model(proto, str(p.parent))
    except Exception as exc:
        raise SSICError(f"cannot read the external data of {p}: {str(exc).splitlines()[0]}") from None
    if input_shapes:
        proto = fix_input_shapes(proto, input_shapes)
    if require_static:
        dyn = dynamic_inputs(proto)
        if dyn:
            name, dims = next(iter(dyn.items()))
            # suggest batch 1 and leave the other symbolic dims for the user to fill in
            hint = "x".join(str(d) if isinstance(d, int) else "1" if i == 0 else f"<{d}>" for i, d in enumerate(dims))
            raise SSICError(f"input '{name}' has dynamic dimensions {dims}; give its shape with "
                            f"--input-shape {name}:{hint} (or input_shapes=)")
    if fold:
        proto = fold_constants(proto)
    return proto


# ---------------------------------------------------------------------------------------- checks
def all_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""

    def graph_tensors(g: onnx.GraphProto):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from graph_tensors(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from graph_tensors(sub)

    yield from graph_tensors(proto.graph)


def _check_external_files(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for t in all_tensors(proto):
        if not external_data_helper.uses_external_data(t):
            continue
        location = external_data_helper.ExternalDataInfo(t).location
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(base):
            raise SSICError(f"{path}: tensor '{t.name}' names external data outside the model's "
                            f"directory ({location!r}); keep the data file next to the model")
        if not target.is_file():
            raise SSICError(f"{path}: external data file '{location}' (tensor '{t.name}') not found in "
                            f"{path.parent}; copy it next to the model")


def _first_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def check_model_file(path: str | os.PathLike) -> None:
    """``onnx.checker.check_model`` by path (any size), accepting the deprecated ops ONNX Runtime
    still runs (opset-18 ``GroupNormalization``, checked as described in the module docstring).

    For the compiler's validation of the graphs it writes. Raises SSICError (one line).
    """
    p = Path(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise SSICError(f"{p} is not a readable ONNX model ({type(exc).__name__})") from None
    _check(proto, p)


def _check(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
        return
    except Exception as exc:
        message = _first_line(exc)
    if "is deprecated" not in message or not _accepted_deprecated_nodes(proto):
        raise SSICError(f"{path} is not a valid ONNX model: {message}")
    # Check everything else: the accepted deprecated nodes become Identity in a data-less copy.
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for t in all_tensors(copy):
        if external_data_helper.uses_external_data(t):  # files checked above; no data needed here
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    for node in _accepted_deprecated_nodes(copy):
        _check_deprecated_node(node, copy, path)
        x = node.input[0]
        del node.input[:]
        del node.attribute[:]
        node.input.append(x)
        node.op_type = "Identity"
    try:
        onnx.checker.check_model(copy)
    except Exception as exc:
        raise SSICError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from None


def _default_opset(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _accepted_deprecated_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    opset = _default_opset(proto)
    nodes = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except Exception:
            continue
        if schema.deprecated and (node.op_type, schema.since_version) in _DEPRECATED_ACCEPTED:
            nodes.append(node)
    return nodes


def _check_deprecated_node(node: onnx.NodeProto, proto: onnx.ModelProto, path: Path) -> None:
    """GroupNormalization-18: three inputs, ``num_groups``, per-group scale and bias."""
    groups = next((a.i for a in node.attribute if a.name == "num_groups"), None)
    where = f"{path}: GroupNormalization node '{node.name}'"
    if len(node.input) != 3 or groups is None or groups <= 0:
        raise SSICError(f"{where} needs inputs (X, scale, bias) and a positive num_groups")
    inits = {t.name: t for t in proto.graph.initializer}
    for name in node.input[1:]:
        t = inits.get(name)
        if t is not None and list(t.dims) != [groups]:
            raise SSICError(f"{where}: {name} has shape {list(t.dims)}; opset-18 GroupNormalization takes "
                            f"one value per group ([{groups}])")


def _convert_opset(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    opset = _default_opset(proto)
    if opset >= MIN_OPSET:
        return proto
    from onnx import version_converter

    # Converted without its external data loaded: the converter keeps the tensors' external-data
    # references, so a model over 2 GB converts too.
    try:
        converted = version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        raise SSICError(f"{path}: cannot convert opset {opset} to {MIN_OPSET} "
                        f"({_first_line(exc)}); re-export the model at opset >= {MIN_OPSET}") from None
    converted.ir_version = max(converted.ir_version, proto.ir_version)
    return converted


# ----------------------------------------------------------------------------------- input shapes
_SHAPE_RE = re.compile(r"^\s*\[?\s*(\d+(?:\s*[x,]\s*\d+)*)\s*\]?\s*$")


def parse_input_shape(spec: str) -> tuple[str, list[int]]:
    """Parse ``NAME:1x3x256x256`` (trtexec) or ``NAME:[1,3,256,256]`` (Polygraphy).

    Returns ``(name, dims)``. Raises SSICError with the expected form when ``spec`` does not parse.
    """
    name, sep, dims = spec.rpartition(":")
    m = _SHAPE_RE.match(dims)
    if not sep or not name or not m:
        raise SSICError(f"bad --input-shape {spec!r}; expected NAME:1x3x256x256")
    return name, [int(d) for d in re.split(r"\s*[x,]\s*", m.group(1))]


def dynamic_inputs(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Graph inputs (initializers excluded) with a dynamic or unknown dimension -> their dims
    (ints, symbolic names, or ``"?"`` for an unnamed unknown dimension)."""
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for vi in proto.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = ["?"]
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if any(isinstance(d, str) for d in dims):
            out[vi.name] = dims
    return out


def fix_input_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """Set the given inputs' shapes (dynamic dims only may change) and forget every inferred shape
    that mentions a symbolic dimension, so shape inference recomputes it. Returns a new proto.

    Raises SSICError for an unknown input name, a wrong rank, a non-positive dim, or a value that
    contradicts a static dimension.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = {vi.name: vi for vi in g.input if vi.name not in inits}
    for name, dims in input_shapes.items():
        vi = inputs.get(name)
        if vi is None:
            raise SSICError(f"--input-shape names '{name}', which is not a model input "
                            f"(inputs: {', '.join(inputs) or 'none'})")
        dims = [int(d) for d in dims]
        if any(d <= 0 for d in dims):
            raise SSICError(f"--input-shape {name}: dimensions must be positive, got {dims}")
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            old = list(tt.shape.dim)
            if len(old) != len(dims):
                raise SSICError(f"--input-shape {name}: rank {len(dims)} given, the model's input has rank {len(old)}")
            for axis, (d, want) in enumerate(zip(old, dims, strict=True)):
                if d.HasField("dim_value") and d.dim_value != want:
                    raise SSICError(f"--input-shape {name}: axis {axis} is fixed to {d.dim_value} in the model, "
                                    f"got {want}")
        tt.ClearField("shape")
        for d in dims:
            tt.shape.dim.add().dim_value = d

    def symbolic(vi) -> bool:
        t = vi.type.tensor_type
        return t.HasField("shape") and any(not d.HasField("dim_value") for d in t.shape.dim)

    keep = [vi for vi in g.value_info if not symbolic(vi)]
    del g.value_info[:]
    g.value_info.extend(keep)
    for vi in g.output:
        if symbolic(vi):
            vi.type.tensor_type.ClearField("shape")
    return model


# ---------------------------------------------------------------------------------------- folding
#: ``ConstantOfShape`` results up to this many elements are folded (onnxscript keeps every
#: ``ConstantOfShape`` by default, which leaves TorchScript's ``F.pad`` pads uncomputed).
_SMALL_CONSTANT = 1 << 16


def _should_fold(node: ir.Node) -> bool | None:
    if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") and node.inputs:
        shape = node.inputs[0].const_value
        if shape is not None:
            import numpy as np

            return True if int(np.prod(shape.numpy())) <= _SMALL_CONSTANT else None
    return None


def fold_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every constant sub-graph and infer static shapes.

    onnxscript's ``FoldConstantsPass`` (with node-level shape inference, so ``Shape`` of a value
    with a static shape folds) replaces constant sub-graphs by initializers, then ONNX shape
    inference with data propagation fills ``value_info``. Returns a new proto; the graph's
    inputs, outputs and non-constant nodes are unchanged. Raises SSICError when shape inference
    fails.
    """
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants as onnxscript_fold

    model = ir.serde.deserialize_model(proto)
    onnxscript_fold(model, onnx_shape_inference=True, input_size_limit=FOLD_SIZE_LIMIT,
                    output_size_limit=FOLD_SIZE_LIMIT, should_fold=_should_fold)
    RemoveUnusedNodesPass()(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    out = ir.serde.serialize_model(model)
    out.ir_version = proto.ir_version
    inferred = _infer(out)
    if _shape_accepted_deprecated(inferred):
        inferred = _infer(inferred)
    explicit_auto_pads(inferred)
    return inferred


_AUTO_PAD_OPS = ("Conv", "AveragePool", "MaxPool", "LpPool")


def explicit_auto_pads(proto: onnx.ModelProto) -> int:
    """Rewrite ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID (tf2onnx writes them) as explicit
    ``pads`` on Conv and pooling nodes whose input has a static spatial shape, in place.

    ONNX's definition: output = ceil(in / stride) (SAME) or the unpadded size (VALID); the total
    pad ``max(0, (out - 1) * stride + (k - 1) * dilation + 1 - in)`` is split with the odd pixel at
    the end (SAME_UPPER) or the beginning (SAME_LOWER). Returns how many nodes changed; nodes whose
    shapes are unknown keep ``auto_pad``.
    """
    g = proto.graph
    shapes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    weights = {t.name: list(t.dims) for t in g.initializer}
    changed = 0
    for node in g.node:
        if node.op_type not in _AUTO_PAD_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode == "NOTSET":
            continue
        x = shapes.get(node.input[0])
        if x is None or len(x) < 3 or any(d is None for d in x[2:]):
            continue
        spatial = x[2:]
        if "kernel_shape" in attrs:
            kernel = list(attrs["kernel_shape"].ints)
        elif node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights:
            kernel = weights[node.input[1]][2:]
        else:
            continue
        n = len(spatial)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * n
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * n
        begins, ends = [], []
        for size, k, s, dil in zip(spatial, kernel, strides, dilations, strict=True):
            if mode == "VALID":
                total = 0
            else:
                out = -(-size // s)
                total = max(0, (out - 1) * s + (k - 1) * dil + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(large if mode == "SAME_LOWER" else small)
            ends.append(small if mode == "SAME_LOWER" else large)
        keep = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute("pads", begins + ends))
        changed += 1
    return changed


#: Above this many bytes of tensor data a proto cannot be serialised for ONNX's C++ shape
#: inference (protobuf's 2 GB limit); onnx-ir's shape-inference pass then infers without the data.
_PROTO_LIMIT = 1_800_000_000


def _tensor_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in all_tensors(proto))


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    if _tensor_bytes(proto) > _PROTO_LIMIT:
        from onnx_ir.passes.common import ShapeInferencePass

        model = ir.serde.deserialize_model(proto)
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        out = ir.serde.serialize_model(model)
        out.ir_version = proto.ir_version
        return out
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types; the first line says what failed
        raise SSICError(f"shape inference failed: {_first_line(exc)}") from None


def _shape_accepted_deprecated(proto: onnx.ModelProto) -> bool:
    """ONNX infers no shape for deprecated ops: give GroupNormalization-18's output its input's
    type and shape (a normalisation keeps both), so inference continues past it."""
    g = proto.graph
    known = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    added = False
    for node in _accepted_deprecated_nodes(proto):
        src, dst = known.get(node.input[0]), node.output[0]
        if src is None or dst in known:
            continue
        outputs = [vi for vi in g.output if vi.name == dst]
        vi = outputs[0] if outputs else g.value_info.add()
        vi.name = dst
        vi.type.CopyFrom(src.type)
        added = True
    return added
