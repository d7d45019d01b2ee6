"""Structure the rest of the code relies on: no import cycles, no private names across modules, the
manifest's JSON Schema in docs/ up to date."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from ssic.artefact import json_schema

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ssic"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every ssic module -> the ssic modules it imports (module level and inside functions)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for t in ast.walk(tree) if isinstance(t, ast.If) and "TYPE_CHECKING" in ast.unparse(t.test)
                       for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: no import at run time
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and t != "ssic":
                    graph[mod].add(t)
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_runtime_and_targets_do_not_depend_on_the_compiler():
    graph = _imports()
    for mod in ("ssic.runtime", "ssic.session", "ssic.artefact", "ssic.targets.ort", "ssic.targets.trt_session"):
        assert "ssic.compiler" not in graph[mod], f"{mod} imports the compiler"


def test_no_private_names_imported_across_modules():
    bad = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssic"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{_module_name(path)} imports {node.module}.{a.name}")
    assert not bad, bad


def test_manifest_schema_doc_is_current():
    doc = json.loads((ROOT / "docs" / "manifest.schema.json").read_text())
    assert doc == json_schema(), "docs/manifest.schema.json is stale: python -m ssic.artefact --schema > docs/manifest.schema.json"


def test_artefact_records_the_compiler_that_built_it(tmp_path):
    """Caches of compiled artefacts (ssic demo, the benchmarks) reuse one only while this build of
    ssic compiled it: the manifest's compiler_digest, not ssic_version, which two builds share."""
    import ssic
    from ssic.artefact import compiler_digest, is_current, read_manifest
    from ssic.models import export_model

    art = ssic.compile(export_model("ddim", "tiny", tmp_path / "m.onnx", seed=0), output_dir=tmp_path / "m.ssic")
    assert read_manifest(art).compiler_digest == compiler_digest() and len(compiler_digest()) == 64
    assert is_current(art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["compiler_digest"] = "0" * 64  # as an earlier build would have written
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert not is_current(art)
    del manifest["compiler_digest"]  # an artefact from before the digest was recorded still reads
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(art).compiler_digest == "" and not is_current(art)
    assert not is_current(tmp_path / "absent.ssic")
