"""Multiply-accumulate (MAC) counting on an ONNX model.

``count_macs(model)`` runs ``onnx.shape_inference.infer_shapes`` (static shapes required) and
counts, per node:

- ``Conv``: ``numel(Y) * (C_in / group) * prod(kernel)``;
- ``ConvTranspose``: ``numel(X) * (C_out / group) * prod(kernel)``;
- ``MatMul`` (and ``MatMulInteger``/``QLinearMatMul``): ``numel(Y) * K`` (K = A's last dim;
  1-D operands follow numpy's rules);
- ``Gemm``: ``M * N * K``;
- ``Einsum``: the product of the sizes of all distinct subscripts (one MAC per term);
- ``Attention`` (opset 23) / ``com.microsoft`` ``MultiHeadAttention``: ``2 * B * H * Lq * Lk * D``
  from the Q/K/V shapes (Q.K^T plus P.V), projections excluded;
- element-wise and everything else: 0.

G = 1e9 MACs. The full presets measure DDIM 248.5G, PD-256 118.7G, GauGAN 281.3G (SIGE paper:
248G, 119G, 281G).

``count_torch_macs(module, *inputs)`` gives the same count for a torch module with forward hooks
(Conv2d, ConvTranspose2d, Linear, ``torch.bmm``/``torch.matmul`` inside ``forward``); it runs
on meta tensors too, which makes counting a full-size model take about a second.
"""

from __future__ import annotations

import math
from collections import defaultdict

import onnx

from ssic.errors import SSICError

__all__ = ["count_macs", "count_torch_macs", "load_model_for_analysis", "MAC_OP_TYPES"]

MAC_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention",
                "MultiHeadAttention", "MatMulInteger", "QLinearMatMul", "QLinearConv")


def _shape_table(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}

    def add(vi):
        t = vi.type
        if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return
        dims = []
        for d in t.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else None)
        shapes[vi.name] = dims

    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        add(vi)
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t is not None:
                    shapes[node.output[0]] = list(a.t.dims)
    return shapes


def _numel(shape) -> int:
    return math.prod(shape)


def _get_attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_macs(node: onnx.NodeProto, shapes) -> int:
    op = node.op_type

    def shp(i: int, out: bool = False):
        names = node.output if out else node.input
        if i >= len(names) or not names[i]:
            return None
        s = shapes.get(names[i])
        if s is None or any(d is None for d in s):
            raise SSICError(
                f"MAC count needs static shapes: {'output' if out else 'input'} {names[i]!r} of "
                f"node {node.name or op!r} has unknown shape"
            )
        return s

    if op in ("Conv", "QLinearConv"):
        w = shp(3 if op == "QLinearConv" else 1)
        y = shp(0, out=True)
        group = _get_attr(node, "group", 1)
        return _numel(y) * w[1] * _numel(w[2:]) if group else 0
    if op == "ConvTranspose":
        x, w = shp(0), shp(1)
        group = _get_attr(node, "group", 1)
        return _numel(x) * (w[1]) * _numel(w[2:]) if group else 0
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shp(0)
        y = shp(0, out=True)
        k = a[-1] if len(a) >= 1 else 1
        return _numel(y) * k
    if op == "Gemm":
        a, b = shp(0), shp(1)
        m, k = (a[1], a[0]) if _get_attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _get_attr(node, "transB", 0) else b[1]
        return m * n * k
    if op == "Einsum":
        eq = _get_attr(node, "equation")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        lhs = eq.replace(" ", "").split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for i, term in enumerate(lhs):
            s = shp(i)
            if "..." in term:
                raise SSICError(f"Einsum with ellipsis is not supported by the MAC counter: {eq}")
            for ch, d in zip(term, s, strict=True):
                sizes[ch] = max(sizes.get(ch, 1), d)
        return _numel(sizes.values()) if len(lhs) > 1 else 0
    if op in ("Attention", "MultiHeadAttention"):
        q, k = shp(0), shp(1)
        if len(q) == 4:  # [B, H, L, D]
            b, h, lq, d = q
            lk = k[2]
        else:  # [B, L, hidden]; heads do not change the count
            b, lq, d = q
            h = 1
            lk = k[1]
        return 2 * b * h * lq * lk * d
    return 0


def load_model_for_analysis(path) -> onnx.ModelProto:
    """Read an ONNX file for analysis (op counts, MACs, shapes) without its weights' bytes.

    Initializers stored as external data stay references (``load_external_data=False``), so a model
    of any size (SD's UNet: 3.4 GB in ``<file>.data``) loads in megabytes; the file is checked with
    ``onnx.checker`` *by path*, which works past protobuf's 2 GB limit and verifies that the external
    data files exist. Raises SSICError for a missing, unreadable or invalid file.
    """
    from pathlib import Path

    from ssic.passes.normalize import read_graph

    p = Path(path)
    proto = read_graph(p)
    try:
        onnx.checker.check_model(str(p))
    except Exception as exc:  # noqa: BLE001
        raise SSICError(f"{p} is not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    return proto


def _mac_kind(node: onnx.NodeProto, constants: set[str]) -> str:
    """``conv`` (Conv/ConvTranspose), ``linear`` (a MatMul/Gemm/Einsum with a constant operand: a
    projection, a feed-forward layer, a time embedding) or ``attention`` (one between two activations:
    Q.K^T and P.V of an attention, the ``Attention`` ops)."""
    if node.op_type in ("Conv", "ConvTranspose", "QLinearConv"):
        return "conv"
    if node.op_type in ("Attention", "MultiHeadAttention"):
        return "attention"
    return "linear" if any(i in constants for i in node.input if i) else "attention"


def count_macs(model: onnx.ModelProto) -> dict:
    """Count MACs of every node. Returns ``{"macs_total": int, "macs_by_op_type": {op: int},
    "macs_by_node": {node name: int}, "macs_by_kind": {"conv"|"linear"|"attention": int}}`` (nodes
    and op types with 0 MACs are left out; see :func:`_mac_kind` for the kinds). Weights need not be
    loaded: initializers held as external data count by their declared shapes."""
    if not isinstance(model, onnx.ModelProto):
        raise SSICError(f"count_macs expects an onnx.ModelProto, got {type(model).__name__}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # noqa: BLE001
        raise SSICError(f"shape inference failed: {e}".splitlines()[0]) from e
    shapes = _shape_table(inferred)
    by_type: dict[str, int] = defaultdict(int)
    by_node: dict[str, int] = {}
    by_kind: dict[str, int] = defaultdict(int)
    constants = {init.name for init in inferred.graph.initializer}
    constants |= {n.output[0] for n in inferred.graph.node if n.op_type == "Constant" and n.output}
    total = 0
    for i, node in enumerate(inferred.graph.node):
        macs = _node_macs(node, shapes)
        if macs:
            name = node.name or f"{node.op_type}_{i}"
            by_node[name] = by_node.get(name, 0) + macs
            by_type[node.op_type] += macs
            by_kind[_mac_kind(node, constants)] += macs
            total += macs
    return {"macs_total": int(total), "macs_by_op_type": dict(by_type), "macs_by_node": by_node,
            "macs_by_kind": dict(by_kind)}


def count_torch_macs(module, *inputs) -> int:
    """MACs of one forward of a torch module (hooks on Conv2d/ConvTranspose2d/Linear plus
    ``torch.bmm``/``torch.matmul`` calls). Works with meta tensors."""
    import torch
    from torch import nn

    total = [0]

    def conv_hook(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def convt_hook(m, i, o):
        total[0] += i[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)

    def lin_hook(m, i, o):
        total[0] += o.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(convt_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(lin_hook))
    orig_bmm, orig_matmul = torch.bmm, torch.matmul

    def bmm(a, b, *args, **kw):
        out = orig_bmm(a, b, *args, **kw)
        total[0] += out.numel() * a.shape[-1]
        return out

    def matmul(a, b, *args, **kw):
        out = orig_matmul(a, b, *args, **kw)
        total[0] += out.numel() * a.shape[-1]
        return out

    torch.bmm, torch.matmul = bmm, matmul
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        torch.bmm, torch.matmul = orig_bmm, orig_matmul
        for h in handles:
            h.remove()
    return int(total[0])
