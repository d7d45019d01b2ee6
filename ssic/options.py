"""Compile options, resolved in one place.

Every option of ``ssic compile`` / ``ssic.compile`` is one field of :class:`CompileOptions`. Its value
comes from, in order of precedence: the caller (CLI flag or Python keyword), the model's metadata
(``ssic.<option>`` entries, e.g. written by ``ssic export``), the model family's defaults
(:data:`FAMILY_DEFAULTS`, keyed by the ``ssic.model`` metadata), and the field's default.
:func:`resolve_options` returns one frozen object and records where each value came from; the whole
object lands in the artefact's manifest (``options``).

Adding an option is two edits: a field here (its ``json_schema_extra`` gives the CLI flag and help;
``ssic compile``'s flags are generated from this table) and the code that uses it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ssic.errors import SSICError


def _opt(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None,
         cli: bool = True, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    extra = {"help": help, "cli": cli}
    if flag:
        extra["flag"] = flag
    if metavar:
        extra["metavar"] = metavar
    kw = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return Field(default, json_schema_extra=extra, **kw)


class CompileOptions(BaseModel):
    """The resolved options of one compile (frozen). See ``ssic compile --help`` for each one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["ort", "trt"] = _opt("ort", "ort = ONNX Runtime CPU; trt = TensorRT engines.")
    lowering: Literal["fused", "standard"] | None = _opt(
        None, "fused = ssic custom ops (fast); standard = stock ONNX ops only (portable). Default: fused "
        "for ort; for trt fused where the ssic TensorRT plugins load, else standard.")
    exact: bool = _opt(False, "Propagate the mask through every receptive field: exact for graphs without "
                       "global ops (no GroupNorm/attention).")
    sparse_min_res: int | None = _opt(None, "Convs whose output min(H, W) >= this run sparse (default: the "
                                      "model family's, else every resolution with convs).", ge=1)
    tile: int | None = _opt(None, "Tile size for every sparse resolution (default 2).", ge=1, le=64)
    tiles: dict[str, int] = _opt({}, "Tile size per resolution (repeatable).", flag="--tile-size",
                                 metavar="HxW=T")
    mask_eps: float = _opt(1e-6, "Difference threshold of the edit mask (|edited - original| > eps).", ge=0)
    mask_radius: int = _opt(1, "Dilation radius of the edit mask (pixels).", ge=0, le=256)
    level_dilation: int = _opt(1, "Dilation of each lower-resolution mask of the pyramid.", ge=0, le=64)
    halo: int | None = _opt(None, "Grow every grid's active region by this many pixels (default: the "
                            "receptive field of the grid's conv chain, at most 4; family defaults may pin it).",
                            ge=0, le=256)
    halos: dict[str, int] = _opt({}, "Halo per resolution (repeatable).", flag="--halo-size", metavar="HxW=N")
    fallback_ratio: float = _opt(0.6, "Run dense when sparse MACs exceed this fraction of dense MACs.",
                                 gt=0, le=10)
    radius_budget: int | None = _opt(None, "Bounded exact mode: recompute what the edit can reach, but at most "
                                     "this many pixels (of the finest grid) around it; implies --exact.", ge=1)
    calibrate: list[str] = _opt([], "Images to calibrate the radius budget on (repeatable): the smallest budget "
                                "whose sample edits reach --target-psnr over the whole output.",
                                flag="--calibrate", metavar="IMAGE")
    target_psnr: float | None = _opt(None, "With --calibrate: the PSNR (dB) of sparse vs dense the budget must "
                                     "reach on every sample edit [default: 40].", gt=0, le=200)
    gn_stats: Literal["incremental", "cached"] = _opt(
        "incremental", "GroupNorm statistics in sparse runs: corrected with the edited tiles, or the "
        "original's (SIGE).")
    cache_dtype: Literal["float32", "float16"] = _opt(
        "float16", "Storage type of the cached activations: float16 halves the memory of a primed state "
        "(the prime run pays a cast, the sparse run converts on read; rounding is ~2^-11 relative, values "
        "beyond +-65504 overflow); float32 keeps the prime values exactly. GroupNorm statistics and the "
        "model outputs' caches stay as they are. Default: float16 (in-mask PSNR within 0.1 dB of float32 "
        "caches on Real-ESRGAN and the tiny presets); float32 with --exact (whose sparse output equals "
        "dense to float tolerance) and with --target trt.")
    recompute_swish: bool = _opt(
        False, "Trade speed for memory: do not cache the swish (SiLU) output a conv reads; the conv's gather "
        "applies the normalisation and swish to the normalisation's input instead (each output tile's "
        "window once). DDIM full: caches 598 -> 423 MB per step, a 1.2% edit ~25% slower.")
    disabled_passes: list[str] = _opt([], "Skip an optional pass (repeatable; `ssic compile -v` lists them).",
                                      flag="--disable-pass", metavar="NAME")
    input_shapes: dict[str, list[int]] = _opt({}, "Fix a dynamic input shape (repeatable; Polygraphy's "
                                              "convention).", flag="--input-shape", metavar="NAME:1x3x256x256")
    sources: dict[str, str] = Field(default_factory=dict, json_schema_extra={"cli": False, "help": ""})

    def record(self) -> dict[str, Any]:
        return self.model_dump()


#: Options documented on the command line, in order: name -> (flag, help, metavar).
def cli_table() -> list[tuple[str, dict[str, Any]]]:
    """The CLI's view of :class:`CompileOptions`: ``[(field name, extra)]`` for every CLI option."""
    out = []
    for name, f in CompileOptions.model_fields.items():
        extra = dict(f.json_schema_extra or {})
        if extra.get("cli", True) and name != "sources":
            out.append((name, extra))
    return out


#: Per-family defaults, keyed by the ``ssic.model`` metadata that ``ssic export`` writes. A graph
#: from elsewhere gets the generic defaults (the plan still comes from the graph).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # DDIM/PD: the anchor makes >= 64 sparse; ssic makes every level down to 8x8 sparse (measured at a
    # 1.2% brush edit, same PSNR: DDIM MAC ratio 10.2x -> 15.3x, 8.3x -> 11.0x faster; PD 6.3x -> 11.7x,
    # 5.2x -> 6.4x), see BENCHMARKS.md. --sparse-min-res 64 gives the anchor split.
    "ddim": {"sparse_min_res": 8, "mask_eps": 0.01, "mask_radius": 5, "level_dilation": 1, "halo": 1},
    "pd": {"sparse_min_res": 8, "mask_eps": 0.02, "mask_radius": 2, "level_dilation": 1, "halo": 1},
    # GauGAN: the output inside the edit depends on the last three 3x3 convs at 256x512 and two at
    # 128x256; growing the active region there by that much makes it exact inside the edit (measured
    # 122 dB vs 30 dB with 1), at lower resolutions a halo of 1 is enough (BENCHMARKS.md).
    # Stable Diffusion parts: DDIM-like UNet/VAE levels, SIGE's halo of 1 (export writes the split)
    "sd-unet": {"halo": 1},
    "sd-vae-decoder": {"halo": 1},
    # Real-ESRGAN (345 convs for x4plus): a fixed halo reads stale caches at every layer's border
    # (29 dB at a 5% edit); bounded exact mode with a budget of 32 px of the x4 output reached 43.7 dB
    # worst on the calibration edits of the church photo (BENCHMARKS.md, "Bounded exact mode").
    # Tiles of 4: the x4plus sparse runs 3.5-7% faster than with 2 at 512 input (1.2/5% square and
    # brush edits) and up to 19% at 256, with the same or higher PSNR (BENCHMARKS.md, "Eighth session").
    "realesrgan": {"radius_budget": 32, "tile": 4},
    # (G_middle_0 at 8x16 sparse too: MAC ratio 14.9x -> 16.1x at a 1.2% edit, same PSNR inside.)
    "gaugan": {"sparse_min_res": 8, "mask_eps": 0.5, "mask_radius": 1, "level_dilation": 2, "halo": 1,
               "halos": {"256x512": 3, "128x256": 2}},
}

#: Options that a model's metadata may set (``ssic.<name>``), parsed as the field's type.
_METADATA_OPTIONS = ("sparse_min_res", "mask_eps", "mask_radius", "level_dilation", "halo", "tile",
                     "fallback_ratio", "gn_stats", "cache_dtype")


def _metadata_value(name: str, text: str) -> Any:
    if name in ("mask_eps", "fallback_ratio"):
        return float(text)
    if name in ("gn_stats", "cache_dtype"):
        return text
    return int(float(text))


def resolve_options(given: dict[str, Any], metadata: dict[str, str] | None = None) -> CompileOptions:
    """Resolve ``given`` (caller's values; ``None`` means unset) against model metadata and family
    defaults into one :class:`CompileOptions`. Raises ``SSICError`` (one line) on a bad value."""
    metadata = metadata or {}
    unknown = set(given) - set(CompileOptions.model_fields)
    if unknown:
        raise SSICError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
    family = metadata.get("ssic.model")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, value in FAMILY_DEFAULTS.get(family or "", {}).items():
        values[name], sources[name] = value, f"family:{family}"
    for name in _METADATA_OPTIONS:
        key = f"ssic.{name}"
        if key in metadata:
            try:
                values[name] = _metadata_value(name, metadata[key])
            except ValueError:
                raise SSICError(f"model metadata {key}={metadata[key]!r} is not a valid value") from None
            sources[name] = "metadata"
    for name, value in given.items():
        if value is None or (isinstance(value, (dict, list, set, tuple)) and not value
                             and name not in ("disabled_passes",)):
            continue
        if name == "halo":
            values.pop("halos", None)  # an explicit halo replaces the family's per-grid halos
        values[name] = sorted(value) if isinstance(value, set) else value
        sources[name] = "given"
    if values.get("target_psnr") is not None and not values.get("calibrate"):
        raise SSICError("--target-psnr needs --calibrate IMAGE (the images to measure it on)")
    if values.get("radius_budget") or values.get("calibrate"):
        values["exact"] = True  # a budget bounds exact mode's propagation
        sources.setdefault("exact", "radius_budget" if values.get("radius_budget") else "calibrate")
    if values.get("calibrate") and values.get("target_psnr") is None:
        values["target_psnr"], sources["target_psnr"] = 40.0, "default"
    if values.get("exact"):
        # exact mode derives every region from receptive fields: no dilation, no halo
        values.update(mask_radius=0, halo=0, halos={})
        sources.update(mask_radius="exact", halo="exact", halos="exact")
    if values.get("exact") and not values.get("radius_budget") and not values.get("calibrate") \
            and sources.get("cache_dtype") != "given":
        # unbounded exact mode promises sparse == dense to float tolerance: float16 rounding would break it
        values["cache_dtype"], sources["cache_dtype"] = "float32", "exact"
    if values.get("target") == "trt":
        # the TensorRT plugins read float32 caches only
        if values.get("cache_dtype") == "float16" and sources.get("cache_dtype") == "given":
            raise SSICError("--cache-dtype float16 is not supported with --target trt (the TensorRT plugins "
                            "read float32 caches); use --cache-dtype float32")
        if sources.get("cache_dtype") != "given":
            values["cache_dtype"], sources["cache_dtype"] = "float32", "target:trt"
    values["sources"] = sources
    try:
        return CompileOptions(**values)
    except ValidationError as exc:
        raise SSICError(_describe(exc.errors()[0])) from None


def _describe(err: dict) -> str:
    """One line for a pydantic error on a compile option, in the CLI's words."""
    loc = [str(p) for p in err.get("loc", ())]
    name = loc[0].replace("_", "-") if loc else "option"
    value, kind, ctx = err.get("input"), err.get("type", ""), err.get("ctx") or {}
    if kind == "literal_error":
        return f"unknown {name} '{value}' (choose {ctx.get('expected', '').replace(chr(39), '')})"
    if kind == "extra_forbidden":
        return f"unknown compile option '{name}'"
    for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if k in ctx:
            return f"{name} must be {op} {ctx[k]}, got {value!r}"
    return f"invalid {name} {value!r}: {err.get('msg')}"
