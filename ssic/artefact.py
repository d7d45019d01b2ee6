"""The compiled artefact: its typed manifest, reading with format checks, and atomic writing.

This module owns the artefact format. The compiler writes artefacts through :func:`write_artefact`;
the runtime and the targets read them through :func:`read_manifest` and never import the compiler.
The manifest is a pydantic model (validation on read, a JSON Schema for free); its schema is kept in
``docs/manifest.schema.json`` (``python -m ssic.artefact --schema`` regenerates it, a test checks it).

An artefact directory holds ``manifest.json`` and the ONNX graphs it names (``dense``, ``prime``,
``sparse``, ``mask``; see docs/architecture.md), plus TensorRT engines for ``target == "trt"``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ssic.errors import SSICError
from ssic.options import CompileOptions
from ssic.outputs import apply_umask_modes

FORMAT = "ssic-artefact"
#: Bumped whenever a reader of the previous version would misread an artefact of this one.
#: 2: typed manifest with the compile options and one mask source per spatial model input.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
GRAPHS = ("dense", "prime", "sparse", "mask")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """A model input or output: ``name``, static ``shape`` and ONNX element type name (``float``, ...)."""

    name: str
    shape: list[int]
    dtype: str


class MaskSource(_Strict):
    """A spatial model input whose changes drive the edit mask.

    The runtime compares the edited value with the primed one at the input's own resolution
    (``|edited - primed| > eps``, any over ``channel_axis``) and feeds the result to the mask graph as
    ``mask_input`` (float32 ``[1, 1, height, width]``).
    """

    input: str
    height: int
    width: int
    channel_axis: int = 1  # 1 for NCHW inputs, 3 for NHWC inputs (a Transpose in the graph)
    mask_input: str


class MaskSpec(_Strict):
    """How edit masks become active tiles. ``height``/``width`` is the finest sparse grid's resolution."""

    height: int
    width: int
    sources: list[MaskSource]
    eps: float
    radius: int
    level_dilation: int
    halo: int | None  # None: per grid, from the graph (see ``grids``)
    mode: Literal["exact", "sige-pyramid", "bounded-exact"]
    radius_budget: int | None = None  # bounded exact mode: pixels of this resolution around the edit

    @property
    def primary(self) -> MaskSource:
        """The main image input: the spatial input at the mask's resolution, else the largest one."""
        real = [s for s in self.sources if s.input] or self.sources
        for s in real:
            if (s.height, s.width) == (self.height, self.width):
                return s
        return max(real, key=lambda s: s.height * s.width)


class GridSpec(_Strict):
    """One sparse resolution's tile grid (docs/architecture.md, "The tile domain")."""

    name: str
    height: int
    width: int
    tile: int
    halo: int
    cells: list[int]
    num_cells: int
    tiles_input: str
    macs_per_tile: int


class CacheEntry(_Strict):
    """A cached activation: an output of the prime graph and an input of the sparse graph."""

    name: str
    source: str
    layout: Literal["NCHW", "NHWC", "C"]
    shape: list[int]
    dtype: str
    kind: str
    resolution: str | None = None
    layer: str | None = None
    #: the sparse graph output ``Session.commit`` folds into this cache: new tiles ``[n*t*t, C]`` on
    #: the grid ``resolution`` (NCHW/NHWC activations) or the new ``[C]`` statistic; None: commit re-primes
    commit: str | None = None
    #: a token value's cache (self-attention keys/values): the axes of ``shape`` over the pixels of
    #: ``resolution``; its ``commit`` output is ``shape`` with them collapsed into the active rows
    rows: list[int] | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * (8 if self.dtype == "float64" else 2 if self.dtype in ("float16", "bfloat16") else 4)


class LayerDecision(_Strict):
    """One MAC-heavy node: where it runs and why (a row of ``ssic inspect``)."""

    node: str
    kind: str
    out_hw: list[int] | None = None
    channels: list[int]
    sparse: bool
    reason: str
    macs_dense: int = 0
    macs_per_tile: int = 0
    grid: str | None = None


class DenseOpSpec(_Strict):
    """A node without a tile rule that reads a sparse value: its inputs are scattered into full maps
    (``ssic::TileScatter``) and it runs on them at every edit (a row of ``ssic inspect``)."""

    node: str
    op_type: str
    reason: str


class MacsSpec(_Strict):
    """Multiply-accumulates: ``dense`` of the whole model; a sparse run costs ``sparse_fixed`` plus
    ``per_tile[grid]`` for every active tile of that grid (see :meth:`Manifest.sparse_macs`)."""

    dense: int
    sparse_fixed: int
    sparse_convs_dense: int
    per_tile: dict[str, int]
    by_op_type: dict[str, int] = Field(default_factory=dict)


class ModelInfo(_Strict):
    family: str | None = None
    producer: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)


class OpLibrary(_Strict):
    name: str
    domain: str
    op_version: int
    version: str


class Manifest(_Strict):
    """The typed ``manifest.json`` of an artefact (format version :data:`FORMAT_VERSION`)."""

    format: Literal["ssic-artefact"] = FORMAT
    format_version: int = FORMAT_VERSION
    ssic_version: str
    compiler_digest: str = ""  # compiler_digest() of the ssic that compiled it ("" before it was recorded)
    target: Literal["ort", "trt"]
    lowering: Literal["fused", "standard"]
    exact: bool
    gn_stats: Literal["incremental", "cached"]
    fallback_ratio: float
    sparse_min_res: int
    model: ModelInfo
    opsets: dict[str, int]
    graphs: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    mask: MaskSpec
    grids: list[GridSpec]
    caches: list[CacheEntry]
    macs: MacsSpec
    layers: list[LayerDecision]
    dense_ops: list[DenseOpSpec] = Field(default_factory=list)
    options: CompileOptions
    passes: list[dict[str, Any]] = Field(default_factory=list)  # name, milliseconds, modified
    custom_op_library: OpLibrary | None = None
    trt: dict[str, Any] | None = None  # ssic.targets.trt.build_trt_artefact's record (engines, bindings)
    calibration: dict[str, Any] | None = None  # ssic.calibrate's record: target, samples, PSNR curve
    compile_seconds: float = 0.0

    # ------------------------------------------------------------------ derived values
    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def grid(self, name: str) -> GridSpec:
        for g in self.grids:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def total_cells(self) -> int:
        return sum(g.num_cells for g in self.grids)

    def sparse_macs(self, tiles_per_grid: dict[str, int]) -> int:
        """MACs of one sparse run with ``tiles_per_grid[grid name]`` active tiles per grid."""
        m = self.macs
        return int(m.sparse_fixed + sum(m.per_tile.get(g, 0) * n for g, n in tiles_per_grid.items()))

    def cache_bytes(self) -> int:
        """Bytes one primed cache state holds (every cache tensor, at its stored dtype)."""
        return sum(c.nbytes for c in self.caches)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def json_schema() -> dict:
    """The JSON Schema of ``manifest.json`` (draft 2020-12, as pydantic writes it)."""
    schema = Manifest.model_json_schema()
    schema["$id"] = "https://ssic.invalid/manifest.schema.json"
    schema["title"] = f"ssic artefact manifest, format version {FORMAT_VERSION}"
    return schema


@functools.cache
def compiler_digest() -> str:
    """sha256 (hex) of this ssic package's Python sources: the compiler that writes an artefact.

    ``ssic_version`` names a release; two builds of one release (a checkout between two commits, an
    edited install) compile differently, so caches of compiled artefacts (``ssic demo``, the
    benchmarks) compare this digest, not the version."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def is_current(path: str | os.PathLike) -> bool:
    """Whether the artefact at ``path`` exists, reads, and was compiled by this ssic (its manifest's
    ``compiler_digest`` is :func:`compiler_digest`); False otherwise, never raises."""
    try:
        return read_manifest(path).compiler_digest == compiler_digest()
    except (SSICError, OSError):
        return False


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate ``path/manifest.json``.

    Raises ``SSICError`` (one line) when the directory or manifest is missing, unreadable, of another
    format version, or does not validate. Graph files are checked by the backend that loads them.
    """
    path = Path(path)
    mf = path / MANIFEST
    if not path.exists():
        raise SSICError(f"artefact not found: {path}")
    if not path.is_dir():
        raise SSICError(f"{path} is not an ssic artefact (not a directory); compile one with `ssic compile`")
    if not mf.exists():
        raise SSICError(f"{path} is not an ssic artefact (no {MANIFEST}); compile one with `ssic compile`")
    try:
        data = json.loads(mf.read_text())
    except PermissionError:
        raise SSICError(f"cannot read {mf}: permission denied") from None
    except OSError as exc:
        raise SSICError(f"cannot read {mf}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SSICError(f"{mf} is corrupt (not valid JSON); recompile the artefact") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SSICError(f"{mf} is not an ssic manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise SSICError(f"{path} has artefact format version {data.get('format_version')}, this ssic reads "
                        f"version {FORMAT_VERSION}; recompile it with this ssic")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "missing":
            raise SSICError(f"{mf} is missing '{where}'; recompile the artefact") from None
        raise SSICError(f"{mf} is invalid at '{where}': {err.get('msg')}; recompile the artefact") from None
    return manifest


def write_artefact(out: Path, manifest_fn: Callable[[Path], Manifest],
                   fill: Callable[[Path], None], *, validate: Callable[[Path, Manifest], None] | None = None,
                   replace: bool = False) -> Path:
    """Write an artefact directory atomically and return ``out``.

    ``fill(tmp)`` writes the graphs into a temporary directory beside ``out``; ``manifest_fn(tmp)``
    returns the manifest (it may read what ``fill`` wrote, e.g. engines); ``validate(tmp, manifest)``
    may check the result (load every graph). Only then is the directory given the umask's usual modes
    (0755 for directories, 0644 for files, not mkdtemp's 0700) and renamed into place, replacing an
    existing artefact when ``replace``. On any error the temporary directory is removed and ``out``
    is left as it was.
    """
    out = Path(out)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        fill(tmp)
        manifest = manifest_fn(tmp)
        (tmp / MANIFEST).write_text(manifest.to_json())
        if validate is not None:
            validate(tmp, manifest)
        apply_umask_modes(tmp)
        if out.exists():
            if not replace:
                raise SSICError(f"output directory {out} exists (use --force to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    import sys

    if sys.argv[1:] == ["--schema"]:
        print(json.dumps(json_schema(), indent=1))
    else:
        print("usage: python -m ssic.artefact --schema")
