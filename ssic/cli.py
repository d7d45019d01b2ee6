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
@click.argument("model", type=click.Choice(["ddim", "pd", "gaugan", "sd-unet", "sd-vae-decoder", "sd-vae-encoder"]))
@click.option("--preset", type=click.Choice(["full", "tiny"]), default="tiny", show_default=True,
              help="full = the paper's size; tiny = same topology, few channels (tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--weights", type=click.Path(), default=None,
              help="Official checkpoint (DDIM church state dict / SPADE generator; Stable Diffusion: a diffusers "
                   "folder or a CompVis .ckpt) instead of random weights.")
@click.option("--size", default=None, metavar="N|HxW",
              help="Stable Diffusion: image size in pixels, latent = 1/8 (default: full 512, tiny 256 UNet / 128 VAE).")
@click.option("--batch", type=click.Choice(["1", "2"]), default="1", show_default=True,
              help="sd-unet: 2 = classifier-free guidance (unconditional + conditional in one run).")
@click.option("-o", "--output", type=click.Path(), required=True, help="ONNX file to write.")
def export(model: str, preset: str, seed: int, weights: str | None, size: str | None, batch: str,
           output: str) -> None:
    """Export one of the SIGE paper's models or a Stable Diffusion part to ONNX (static shapes).

    Inputs: DDIM/PD `x` [1,3,256,256] and `t` [1]; GauGAN `seg` [1,36,256,512] (one-hot labels +
    instance edges); sd-unet `sample` [B,4,h,w], `timestep` [1], `encoder_hidden_states` [B,77,768];
    sd-vae-decoder `latent` [1,4,h,w]; sd-vae-encoder `image` [1,3,8h,8w]. The file records the model
    family so `ssic compile` picks its mask defaults. Models over 2 GB (the full UNet) are written with
    their weights in FILE.data beside FILE.
    """
    from ssic.models import SD_MODEL_NAMES, export_model

    if model in SD_MODEL_NAMES:
        from ssic.models import export_sd
        from ssic.models.sd import parse_size

        path = export_sd(model, preset, output, seed=seed, weights=weights, size=parse_size(size),
                         batch=int(batch), log=lambda m: _log(m, 1))
        _log(f"wrote {path}", 0)
        return
    if size is not None or batch != "1":
        raise SSICError(f"--size and --batch apply to the Stable Diffusion models, not {model}")
    path = export_model(model, preset, output, seed=seed, weights=weights)
    _tag_model(Path(path), model, preset)
    _log(f"wrote {path}", 0)


def _tag_model(path: Path, family: str, preset: str) -> None:
    import os
    import tempfile

    import onnx

    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update({"ssic.model": family, "ssic.preset": preset})
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a model file is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@cli.command(name="compile")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None, help="Artefact directory (default MODEL.ssic-TARGET).")
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="ort = ONNX Runtime CPU; trt = TensorRT engines.")
@click.option("--lowering", type=click.Choice(["fused", "standard"]), default=None,
              help="fused = ssic custom ops (fast, default); standard = stock ONNX ops only (portable).")
@click.option("--pipeline", type=click.Choice(["ort-fused", "ort-standard", "trt-standard", "trt-fused"]), default=None,
              help="A named pipeline (sets target and lowering).")
@click.option("--exact", is_flag=True, help="Propagate the mask through every receptive field: exact for graphs "
              "without global ops (no GroupNorm/attention).")
@click.option("--sparse-min-res", type=int, default=None,
              help="Convs whose output min(H, W) >= this run sparse (DDIM/PD 64, GauGAN 16; default: model's).")
@click.option("--tile", type=int, default=None, help="Tile size for every sparse resolution.")
@click.option("--tile-size", "tile_sizes", multiple=True, metavar="HxW=T", help="Tile size per resolution (repeatable).")
@click.option("--halo", type=int, default=None,
              help="Grow every grid's active region by this many pixels (default: the model's, else 1).")
@click.option("--halo-size", "halo_sizes", multiple=True, metavar="HxW=N", help="Halo per resolution (repeatable).")
@click.option("--mask-eps", type=float, default=None, help="Difference threshold of the edit mask.")
@click.option("--mask-radius", type=int, default=None, help="Dilation radius of the edit mask (pixels).")
@click.option("--level-dilation", type=int, default=None, help="Dilation of each lower-resolution mask.")
@click.option("--fallback-ratio", type=float, default=0.6, show_default=True,
              help="Run dense when sparse MACs exceed this fraction of dense MACs.")
@click.option("--gn-stats", type=click.Choice(["incremental", "cached"]), default="incremental", show_default=True,
              help="GroupNorm statistics in sparse runs: corrected with the edited tiles, or the original's (SIGE).")
@click.option("--disable-pass", "disabled", multiple=True, help="Skip an optional pass (repeatable; see -v output).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def compile_cmd(model, output, target, lowering, pipeline, exact, sparse_min_res, tile, tile_sizes, halo, halo_sizes,
                mask_eps,
                mask_radius, level_dilation, fallback_ratio, gn_stats, disabled, force, as_json) -> None:
    """Compile an ONNX MODEL into a sparse-inference artefact (prime, mask and sparse graphs + manifest)."""
    from ssic.compiler import PIPELINES, compile_model

    if pipeline:
        target = PIPELINES[pipeline]["target"]
        lowering = lowering or PIPELINES[pipeline]["lowering"]
    lowering = lowering or "fused"
    out = compile_model(model, target=target, lowering=lowering, output_dir=output, exact=exact,
                        sparse_min_res=sparse_min_res, tiles=_parse_tiles(tile_sizes), tile=tile,
                        halo=halo, halos=_parse_tiles(halo_sizes, "--halo-size") if halo_sizes else None,
                        mask_eps=mask_eps,
                        mask_radius=mask_radius, level_dilation=level_dilation, fallback_ratio=fallback_ratio,
                        gn_stats=gn_stats, disabled_passes=set(disabled), force=force, log=lambda m: _log(m, 1))
    manifest = json.loads((out / "manifest.json").read_text())
    sparse = sum(1 for layer in manifest["layers"] if layer["sparse"])
    summary = {"artefact": str(out), "target": target, "lowering": lowering, "sparse_convs": sparse,
               "convs": len(manifest["layers"]), "grids": {g["name"]: g["tile"] for g in manifest["grids"]},
               "caches": len(manifest["caches"]), "seconds": manifest.get("compile_seconds")}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _log(f"compiled {model} -> {out}: {sparse}/{len(manifest['layers'])} convs sparse, "
             f"grids {summary['grids']}, {len(manifest['caches'])} caches", 0)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, as_json: bool) -> None:
    """Describe an ONNX model (inputs, op counts, MACs) or an artefact (each conv: sparse or dense, and why)."""
    p = Path(path)
    if p.is_dir():
        from ssic.runtime import _read_manifest

        manifest = _read_manifest(p)
        if as_json:
            click.echo(json.dumps({k: manifest[k] for k in ("target", "lowering", "exact", "grids", "macs", "layers",
                                                             "inputs", "outputs", "mask")} |
                                  {"caches": len(manifest["caches"])}))
            return
        click.echo(f"artefact {p}: target {manifest['target']}, lowering {manifest['lowering']}, "
                   f"{'exact' if manifest['exact'] else 'SIGE-pyramid'} masks")
        for g in manifest["grids"]:
            click.echo(f"  grid {g['name']}: tile {g['tile']}, {g['num_cells']} cells, "
                       f"{g['macs_per_tile'] / 1e6:.1f} MMACs per active tile")
        click.echo(f"  dense MACs {manifest['macs']['dense'] / 1e9:.2f} G, fixed part in sparse runs "
                   f"{manifest['macs']['sparse_fixed'] / 1e9:.2f} G, {len(manifest['caches'])} caches")
        for layer in manifest["layers"]:
            flag = "sparse" if layer["sparse"] else "dense "
            click.echo(f"  {flag} {layer['node']:<40} {layer['kind']:<7} {layer['channels'][0]:>4}->"
                       f"{layer['channels'][1]:<4} {layer['reason']}")
        return
    import onnx

    from ssic.macs import count_macs, load_model_for_analysis

    proto = load_model_for_analysis(p)  # weights stay on disk: works for models over 2 GB
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    macs = count_macs(proto)

    def info(vi):
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()}

    report = {"inputs": [info(v) for v in proto.graph.input if v.name not in {i.name for i in proto.graph.initializer}],
              "outputs": [info(v) for v in proto.graph.output], "op_counts": counts,
              "macs_total": macs["macs_total"], "macs_by_op_type": macs["macs_by_op_type"],
              "macs_by_kind": macs["macs_by_kind"],
              "metadata": {m.key: m.value for m in proto.metadata_props}}
    if as_json:
        click.echo(json.dumps(report))
        return
    for kind in ("inputs", "outputs"):
        for v in report[kind]:
            click.echo(f"{kind[:-1]:<7} {v['name']:<12} {v['dtype']:<8} {v['shape']}")
    click.echo("ops:    " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    click.echo(f"MACs:   {macs['macs_total'] / 1e9:.2f} G total; " + ", ".join(
        f"{k} {v / 1e9:.2f} G" for k, v in sorted(macs["macs_by_op_type"].items(), key=lambda kv: -kv[1]) if v))
    if macs["macs_by_kind"].get("attention"):
        click.echo("        by kind: " + ", ".join(f"{k} {v / 1e9:.2f} G ({100 * v / macs['macs_total']:.0f}%)"
                                             for k, v in sorted(macs["macs_by_kind"].items(), key=lambda kv: -kv[1])))


def _load_array(spec: str, what: str) -> np.ndarray:
    path = Path(spec)
    if not path.exists():
        raise SSICError(f"{what} file not found: {path}")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            data = np.load(path, allow_pickle=False)
            return data[data.files[0]]
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except SSICError:
        raise
    except Exception as exc:
        raise SSICError(f"cannot read {what} {path}: {type(exc).__name__}") from None


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--original", required=True, help="Original input: PNG image, .npy label map or model input.")
@click.option("--edited", required=True, help="Edited input, same kind and size as --original.")
@click.option("--mask", "mask_file", default=None, help="Edit mask .npy/.png (default: where the inputs differ).")
@click.option("--input", "extra", multiple=True, metavar="NAME=FILE.npy", help="Other model inputs (repeatable).")
@click.option("--steps", type=int, default=10, show_default=True, help="Diffusion: denoising steps of the edit.")
@click.option("--strength", type=float, default=0.5, show_default=True, help="Diffusion: SDEdit noise strength (0..1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: ONNX Runtime's).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output .png or .npy.")
def edit(artefact, original, edited, mask_file, extra, steps, strength, seed, threads, output) -> None:
    """Apply an edit with an artefact: prime on --original, recompute sparsely for --edited.

    PNG images go through the model family's pre/post-processing (DDIM/PD: SDEdit over --steps with
    per-step caches; GauGAN: label maps .npy with optional instance maps); .npy model inputs are used
    as they are.
    """
    import ssic
    from ssic import editing

    sess = ssic.load(artefact, threads=threads)
    a, b = _load_array(original, "original"), _load_array(edited, "edited")
    mask = None
    if mask_file:
        mask = _load_array(mask_file, "mask")
        if mask.ndim == 3:
            mask = mask.any(axis=-1)
    extras = {}
    for spec in extra:
        if "=" not in spec:
            raise SSICError(f"--input takes NAME=FILE.npy, got '{spec}'")
        name, file = spec.split("=", 1)
        extras[name] = _load_array(file, f"input {name}")
    result = editing.edit_files(sess, a, b, mask=mask, extra=extras, steps=steps, strength=strength, seed=seed,
                                log=lambda m: _log(m, 0))
    editing.save_output(result["sparse"], output)
    _log(f"wrote {output}: {result['summary']}", 0)


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--mask", "mask_file", default=None, help="Edit mask .npy (bool [H, W]).")
@click.option("--area", type=float, default=None, help="Synthetic brush-stroke mask of this area fraction (e.g. 0.05).")
@click.option("--runs", type=int, default=5, show_default=True, help="Timed runs (median reported).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="Intra-op threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def bench(artefact, mask_file, area, runs, warmup, threads, seed, as_json) -> None:
    """Measure ONNX Runtime dense vs ssic sparse on one edit, alternately, and the output error."""
    import ssic
    from ssic.bench import benchmark, edited_inputs, example_inputs

    if runs < 1:
        raise SSICError("--runs must be >= 1")
    sess = ssic.load(artefact, threads=threads)
    h, w = sess.mask_spec["height"], sess.mask_spec["width"]
    if mask_file and area is not None:
        raise SSICError("give --mask or --area, not both")
    if mask_file:
        mask = _load_array(mask_file, "mask").astype(bool)
        if mask.shape != (h, w):
            raise SSICError(f"mask has shape {list(mask.shape)}, expected [{h}, {w}]")
    else:
        from ssic.masks import brush_stroke_mask

        if area is not None and not 0 < area <= 1:
            raise SSICError("--area must be in (0, 1]")
        mask = brush_stroke_mask(h, w, area if area is not None else 0.05, seed)
    original = example_inputs(sess.manifest, seed)
    edited = edited_inputs(sess.manifest, original, mask, seed + 1)
    result = benchmark(sess, original, edited, mask, runs=runs, warmup=warmup,
                       progress=lambda i, n: _log(f"run {i}/{n}", 1))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"dense {result['dense_ms']:.1f} ms, sparse {result['sparse_ms']:.1f} ms: {result['speedup']:.2f}x "
               f"(MAC ratio {result['mac_ratio']:.2f}x, efficiency {result['efficiency']:.2f}); "
               f"{100 * result['active_fraction']:.1f}% tiles active for a {100 * result['edited_fraction']:.1f}% edit; "
               f"PSNR vs dense {result['psnr']:.1f} dB (inside {result['psnr_in']:.1f}, outside {result['psnr_out']:.1f})")


@cli.command()
@click.argument("artefact", type=click.Path())
@click.option("--golden", required=True, type=click.Path(), help="Directory with inputs.npz, edited.npz, mask.npy, expected.npz.")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--psnr", "min_psnr", type=float, default=60.0, show_default=True, help="Minimum PSNR (dB) per output.")
@click.option("--update", is_flag=True, help="Write the golden outputs from this artefact instead of checking.")
@click.option("--json", "as_json", is_flag=True)
def verify(artefact, golden, atol, rtol, min_psnr, update, as_json) -> None:
    """Compare an artefact's prime/edit outputs on stored inputs with stored golden outputs (CI regression)."""
    import ssic
    from ssic.verify import check_golden, write_golden

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
        raise SSICError(f"verification failed for {sum(not r['ok'] for r in report['checks'])} output(s) against {golden}")


@cli.command()
@click.option("--preset", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--out", "out_dir", type=click.Path(), default="out/demo", show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--weights", type=click.Path(), default=None, help="The official DDIM church checkpoint (default: random weights).")
def demo(preset, steps, out_dir, threads, weights) -> None:
    """The editing demo: SDEdit with DDIM over the denoising steps, dense vs sparse, on the church edit."""
    from ssic.demo import run_demo

    run_demo(preset=preset, steps=steps, out_dir=Path(out_dir), threads=threads, log=lambda m: _log(m, 0),
             weights=weights)


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
