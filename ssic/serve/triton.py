"""``ssic export-triton``: a Triton Inference Server model repository for an ssic artefact.

Triton keeps per-sequence tensors in the server with the sequence batcher's *implicit state*: a
state's ``input_name`` is fed, on every request of a sequence, with what the model wrote to its
``output_name`` on the previous request (zeros on the first). ssic's caches are exactly such
tensors, so the repository holds one ONNX model whose graph is::

    If(ssic.start OR ssic.prime)
      then: the prime graph (inputs -> outputs, caches)        # open a sequence, or commit
      else: the mask graph (one mask per spatial input, ``ssic.mask.<input>`` -> active tiles), then
            the sparse graph (inputs, tiles, caches -> outputs); caches passed through unchanged

with one implicit state per cache. ``ssic.start`` is the sequence batcher's START control; a client
sends ``ssic.prime = true`` to make the current input the new original (a commit). Every request
carries the model inputs and one mask per spatial input (``ssic.mask.<input>``, float ``[1, 1, h, w]`` at
that input's resolution, nonzero = edited); the sparse
branch always runs sparse (no dense fallback, no difference mask: the client sends the mask).

Checked here: the combined graph runs in ONNX Runtime and equals ``Session.prime`` / ``edit``, and
``config.pbtxt`` parses with Triton's own ``ModelConfig`` protobuf (``tritonclient``). Serving it in
Triton is verified only on a GPU host.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ssic.errors import SSICError

START, PRIME, NEXT = "ssic.start", "ssic.prime", ".next"
_TRITON_TYPES = {"float": "TYPE_FP32", "float32": "TYPE_FP32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL",
                 "int32": "TYPE_INT32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "double": "TYPE_FP64"}
_ONNX_TYPES = {"float": TensorProto.FLOAT, "float32": TensorProto.FLOAT, "int64": TensorProto.INT64,
               "bool": TensorProto.BOOL, "int32": TensorProto.INT32, "float16": TensorProto.FLOAT16,
               "float64": TensorProto.DOUBLE, "double": TensorProto.DOUBLE}


def _cache_type(c: dict) -> int:
    """The ONNX element type of a cache (float16 caches, float64 GroupNorm sums)."""
    return _ONNX_TYPES[c.get("dtype", "float32")]


def _manifest(path: Path) -> dict:
    """The artefact's manifest (validated by :func:`ssic.artefact.read_manifest`) as JSON data."""
    from ssic.artefact import read_manifest

    return read_manifest(path).model_dump()


def _inline(graph: onnx.GraphProto, prefix: str, outer: set[str], rename: dict[str, str],
            inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """Copy ``graph``'s nodes with every internal name prefixed; names in ``outer`` (values of the
    enclosing graph) and in ``rename`` (given new names) are kept/renamed; initializers go to ``inits``."""
    names = dict(rename)
    for init in graph.initializer:
        t = onnx.TensorProto()
        t.CopyFrom(init)
        t.name = names[init.name] = prefix + init.name
        inits.append(t)
    nodes = []
    for node in graph.node:
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise SSICError(f"node {node.name} has a subgraph; export-triton supports flat graphs only")
        n = onnx.NodeProto()
        n.CopyFrom(node)
        n.name = prefix + node.name
        del n.input[:]
        for i in node.input:
            if i and i not in names and i not in outer:
                raise SSICError(f"graph {graph.name}: value {i!r} is used before it is defined")
            n.input.append(names.get(i, i) if i else "")
        del n.output[:]
        for o in node.output:
            if o:
                names[o] = prefix + o
            n.output.append(names.get(o, ""))
        nodes.append(n)
    rename.update({k: v for k, v in names.items() if k in rename or k in {o.name for o in graph.output}})
    return nodes


def build_session_model(art: Path, manifest: dict) -> onnx.ModelProto:
    """The combined prime/edit ONNX model with caches as state inputs/outputs (see the module doc)."""
    graphs = {k: onnx.load(str(art / v)) for k, v in manifest["graphs"].items() if k in ("prime", "sparse", "mask")}
    inputs = manifest["inputs"]
    outputs = [o["name"] for o in manifest["outputs"]]
    caches = manifest["caches"]
    mask_ins = [(s["mask_input"], s["height"], s["width"]) for s in manifest["mask"]["sources"]]
    outer = {i["name"] for i in inputs} | {m[0] for m in mask_ins} | {START, PRIME} | {c["name"] for c in caches}
    inits: list[onnx.TensorProto] = []

    # then: prime
    prime = graphs["prime"].graph
    pmap: dict[str, str] = {}
    then_nodes = _inline(prime, "prime/", outer, pmap, inits)
    then_out = []
    for name in outputs:
        then_out.append(helper.make_tensor_value_info(pmap[name], TensorProto.FLOAT, None))
    for c in caches:
        then_out.append(helper.make_tensor_value_info(pmap[c["name"]], _cache_type(c), None))

    # else: mask graph -> tiles, sparse graph, caches passed through
    mmap: dict[str, str] = {}
    else_nodes = _inline(graphs["mask"].graph, "mask/", outer, mmap, inits)
    smap = {g["tiles_input"]: mmap[g["tiles_input"]] for g in manifest["grids"] if g["tiles_input"] in mmap}
    else_nodes += _inline(graphs["sparse"].graph, "sparse/", outer | set(smap.values()), smap, inits)
    else_out = [helper.make_tensor_value_info(smap[n], TensorProto.FLOAT, None) for n in outputs]
    for c in caches:
        else_nodes.append(helper.make_node("Identity", [c["name"]], [f"sparse/{c['name']}{NEXT}"]))
        else_out.append(helper.make_tensor_value_info(f"sparse/{c['name']}{NEXT}", _cache_type(c), None))

    then_g = helper.make_graph(then_nodes, "prime", [], then_out)
    else_g = helper.make_graph(else_nodes, "edit", [], else_out)
    top_nodes = [
        helper.make_node("Or", [START, PRIME], ["ssic.prime_now"]),
        helper.make_node("If", ["ssic.prime_now"], outputs + [c["name"] + NEXT for c in caches],
                         then_branch=then_g, else_branch=else_g, name="ssic.prime_or_edit"),
    ]
    g_inputs = [helper.make_tensor_value_info(i["name"], _ONNX_TYPES[i["dtype"]], i["shape"]) for i in inputs]
    g_inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, h, w]) for n, h, w in mask_ins]
    g_inputs += [helper.make_tensor_value_info(START, TensorProto.BOOL, [1]),
                 helper.make_tensor_value_info(PRIME, TensorProto.BOOL, [1])]
    g_inputs += [helper.make_tensor_value_info(c["name"], _cache_type(c), c["shape"]) for c in caches]
    g_outputs = [helper.make_tensor_value_info(o["name"], _ONNX_TYPES[o["dtype"]], o["shape"])
                 for o in manifest["outputs"]]
    g_outputs += [helper.make_tensor_value_info(c["name"] + NEXT, _cache_type(c), c["shape"]) for c in caches]
    top = helper.make_graph(top_nodes, "ssic_session", g_inputs, g_outputs, initializer=inits)
    opsets: dict[str, int] = {}
    for m in graphs.values():
        for op in m.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    model = helper.make_model(top, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="ssic export-triton")
    model.ir_version = max(m.ir_version for m in graphs.values())
    return model


def _dims(shape) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def config_text(name: str, manifest: dict, *, instance_kind: str, library: str | None,
                idle_s: int) -> str:
    """``config.pbtxt`` of the session model: sequence batcher with one implicit state per cache."""
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', "max_batch_size: 0", "input ["]
    ins = [(i["name"], _TRITON_TYPES[i["dtype"]], i["shape"]) for i in manifest["inputs"]]
    ins += [(s["mask_input"], "TYPE_FP32", [1, 1, s["height"], s["width"]]) for s in manifest["mask"]["sources"]]
    ins += [(PRIME, "TYPE_BOOL", [1])]
    lines.append(",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {_dims(s)} }}' for n, t, s in ins))
    lines += ["]", "output ["]
    lines.append(",\n".join(f'  {{ name: "{o["name"]}" data_type: {_TRITON_TYPES[o["dtype"]]} dims: {_dims(o["shape"])} }}'
                            for o in manifest["outputs"]))
    lines += ["]", "sequence_batching {", f"  max_sequence_idle_microseconds: {int(idle_s) * 1_000_000}",
              "  control_input [", f'    {{ name: "{START}" control [ {{ kind: CONTROL_SEQUENCE_START '
              "bool_false_true: [ false, true ] } ] }", "  ]", "  state ["]
    states = []
    for c in manifest["caches"]:
        t = _TRITON_TYPES[c.get("dtype", "float32")]
        states.append(f'    {{ input_name: "{c["name"]}" output_name: "{c["name"]}{NEXT}" data_type: {t} '
                      f'dims: {_dims(c["shape"])} initial_state: {{ name: "zeros" data_type: {t} '
                      f'dims: {_dims(c["shape"])} zero_data: true }} }}')
    lines += [",\n".join(states), "  ]", "}",
              f"instance_group [ {{ count: 1 kind: {instance_kind} }} ]"]
    if library:
        lines.append(f'model_operations {{ op_library_filename: "{library}" }}')
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """Parse ``config.pbtxt`` text with Triton's ``ModelConfig`` protobuf (needs ``tritonclient``)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise SSICError("validating the config needs tritonclient: pip install 'tritonclient[grpc]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise SSICError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from None


def export_triton(artefact: str | Path, repo: str | Path, *, name: str = "ssic_session",
                  instance_kind: str = "KIND_GPU", library_dir: str | None = None, idle_s: int = 600,
                  validate: bool = True) -> dict:
    """Write ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx`` (plus ``libssic_ort.so`` for
    fused artefacts); returns ``{"model_dir", "states", "library"}``.

    ``library_dir`` is where the custom-op library will be on the serving host (default: the model
    directory as written here). Raises SSICError for a TensorRT artefact (its engines cannot hold an
    If over two engines; compile the ONNX model with ``--target ort``) or a repository that exists.
    """
    art, repo = Path(artefact), Path(repo)
    manifest = _manifest(art)
    if manifest.get("target") != "ort":
        raise SSICError(f"{art} targets {manifest.get('target')}: export-triton needs an ONNX Runtime artefact "
                        "(ssic compile --target ort); Triton's ONNX Runtime backend runs it with its CUDA or "
                        "TensorRT execution provider")
    kind = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}.get(instance_kind.lower(), instance_kind)
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise SSICError(f"instance kind must be gpu or cpu, got {instance_kind}")
    model_dir = repo / name
    if model_dir.exists():
        raise SSICError(f"{model_dir} exists; remove it or choose another -o/--name")
    model = build_session_model(art, manifest)
    library = None
    (model_dir / "1").mkdir(parents=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    if manifest.get("lowering") == "fused":
        from ssic.library import get_library_path

        src = Path(get_library_path())
        shutil.copy2(src, model_dir / src.name)
        library = str(Path(library_dir) / src.name) if library_dir else str((model_dir / src.name).resolve())
    text = config_text(name, manifest, instance_kind=kind, library=library, idle_s=idle_s)
    if validate:
        cfg = parse_config(text)
        if len(cfg.sequence_batching.state) != len(manifest["caches"]):
            raise SSICError("config.pbtxt lost states on parsing")
    (model_dir / "config.pbtxt").write_text(text)
    return {"model_dir": str(model_dir), "states": len(manifest["caches"]), "library": library}
