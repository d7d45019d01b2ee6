"""One op contract: the C++ (ONNX Runtime) and CUDA (TensorRT) sides agree with ``ssic/ops.py``.

``ssic/ops.py`` is the single source of the ``ssic`` ops' attribute names, defaults and activation
codes. The kernels are C++ and read their attributes by name; this test parses their sources and
fails on any disagreement (a renamed attribute, a changed default, a new activation code that one
side does not handle), so the three sides cannot drift apart silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssic import ops

ROOT = Path(__file__).resolve().parents[1]
ORT = ROOT / "plugins" / "ort" / "ssic_ort.cpp"
ORT_KERNELS_H = ROOT / "plugins" / "ort" / "kernels.h"
TRT_INDEX_H = ROOT / "plugins" / "trt" / "common" / "tile_index.h"
TRT_PLUGINS = {"TileGather": ROOT / "plugins/trt/tileGatherPlugin/tileGatherPlugin.cpp",
               "TileScatter": ROOT / "plugins/trt/tileScatterPlugin/tileScatterPlugin.cpp"}
# attributes the TensorRT plugins add for optional inputs that TensorRT nodes cannot leave empty
TRT_EXTRA = {"has_scale", "has_shift", "has_residual"}


def _spec(op: str) -> dict[str, ops.AttrSpec]:
    return {a.name: a for a in ops.OPS[op].attributes}


def _ort_attrs(op: str) -> dict[str, float | None]:
    """``{name: default or None (required)}`` read from the op's kernel constructor in ssic_ort.cpp."""
    text = ORT.read_text()
    start = text.index(f"struct {op}Kernel")
    end = text.index("\n};", start)
    body = text[start:end]
    if "read_gather_params(" in body:  # the gather attributes shared by TileGather and TileConv
        shared = text.index("std::string read_gather_params(")
        body += text[shared:text.index("\n}\n", shared)]
    out: dict[str, float | None] = {}
    for _kind, name, default in re.findall(r'get_(int|float)\("(\w+)",\s*([^)]+)\)', body):
        out[name] = None if "nullopt" in default else float(default.rstrip("f"))
    return out


def _trt_attrs(op: str) -> dict[str, tuple[float, bool]]:
    text = TRT_PLUGINS[op].read_text()
    return {name: (float(default), required == "true")
            for name, _is_float, default, required in
            re.findall(r'\{"(\w+)",\s*(true|false),\s*([-\d.]+),\s*(true|false)\}', text)}


def _enum(path: Path) -> dict[str, int]:
    m = re.search(r"enum Activation\s*:\s*\w+\s*\{([^}]*)\}", path.read_text())
    assert m, f"no Activation enum in {path}"
    return {k.strip(): int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", m.group(1))}


@pytest.mark.parametrize("op", ["TileGather", "TileScatter", "TileConv"])
def test_ort_kernel_reads_every_attribute_with_the_table_default(op):
    spec, cpp = _spec(op), _ort_attrs(op)
    assert set(cpp) == set(spec), f"{op}: C++ reads {sorted(cpp)}, ops.py declares {sorted(spec)}"
    for name, a in spec.items():
        if a.default is None:
            assert cpp[name] is None, f"{op}.{name} is required in ops.py but has a default in C++"
        else:
            assert cpp[name] == pytest.approx(float(a.default)), f"{op}.{name}: C++ default {cpp[name]} != {a.default}"


@pytest.mark.parametrize("op", ["TileGather", "TileScatter"])
def test_trt_plugin_declares_every_attribute_with_the_table_default(op):
    spec, trt = _spec(op), _trt_attrs(op)
    assert set(trt) - TRT_EXTRA == set(spec), f"{op}: plugin declares {sorted(trt)}, ops.py {sorted(spec)}"
    for name, a in spec.items():
        default, required = trt[name]
        assert required == (a.default is None), f"{op}.{name}: required differs"
        if a.default is not None:
            assert default == pytest.approx(float(a.default)), f"{op}.{name}: plugin default {default} != {a.default}"


def test_activation_codes_agree_everywhere():
    table = {"identity": ops.ACT_IDENTITY, "relu": ops.ACT_RELU, "leaky_relu": ops.ACT_LEAKY_RELU,
             "swish": ops.ACT_SWISH}
    names = {"kIdentity": "identity", "kRelu": "relu", "kLeakyRelu": "leaky_relu", "kSwish": "swish"}
    for path in (ORT_KERNELS_H, TRT_INDEX_H):
        enum = _enum(path)
        assert {names[k]: v for k, v in enum.items()} == table, f"{path.name} activation codes differ from ops.py"
    # every op that takes an activation accepts exactly the table's codes, and the kernels check that range
    for op in ("TileGather", "TileScatter", "TileConv"):
        assert set(_spec(op)["activation"].choices) == set(table.values())
    top = max(table.values())
    assert f"activation must be 0..{top}" in ORT.read_text()
    for path in TRT_PLUGINS.values():
        assert f"activation 0..{top}" in path.read_text() or f"activation must be 0..{top}" in path.read_text()


def test_passes_use_the_table_codes():
    """The passes take activation codes from ssic.ops, not their own copies."""
    for path in (ROOT / "ssic" / "passes").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^ACT_\w+(,\s*ACT_\w+)*\s*=\s*\d", text, re.M), f"{path.name} redeclares activation codes"
