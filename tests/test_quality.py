"""Default (SIGE-style) mode on the three tiny presets: error against dense-on-edited, inside and
outside the edit, beside doing nothing. Real edits from ../shared/data/edits where present."""

from __future__ import annotations

import numpy as np
import pytest

import ssic
from ssic.bench import edited_inputs
from ssic.masks import brush_stroke_mask, dilate, load_edit_pair
from ssic.quality import compare

# Inside the edit: GauGAN >= 40 dB (issue 3). The tiny diffusion presets (16/8 channels, GroupNorm
# over 2 channels per group, random weights) spread an edit over the whole image through GroupNorm and
# attention, so values outside the active tiles — read from the cache — are stale everywhere; measured
# with every tile active the result is exact (test below), and growing the active region by 6/4/2
# pixels per level only moves PD's 1.2% edit from 28.6 to 30.2 dB. For them the test asserts a large
# gain over doing nothing instead; the >= 30 dB figure of the full models is in BENCHMARKS.md.
MIN_PSNR_IN = {"gaugan": 40.0}
MIN_GAIN_IN = {"ddim": 8.0, "pd": 8.0}
REPORT: list[str] = []


def _edits(name: str, sess):
    h, w = sess.manifest.mask.height, sess.manifest.mask.width
    from ssic.models import example_inputs

    base = example_inputs(name, "tiny", seed=0)
    out = []
    if name == "gaugan":
        pair = load_edit_pair("cityscapes")
        if pair is not None:
            from ssic.models.gaugan import make_gaugan_input

            out.append(("real", {"seg": make_gaugan_input(pair["label_a"], pair["instance_a"])},
                        {"seg": make_gaugan_input(pair["label_b"], pair["instance_b"])}, None))
    else:
        pair = load_edit_pair("church")
        if pair is not None:
            a = pair["original"].transpose(2, 0, 1)[None].astype(np.float32)
            b = pair["edited"].transpose(2, 0, 1)[None].astype(np.float32)
            out.append(("real", {"x": a, "t": base["t"]}, {"x": b, "t": base["t"]}, None))
        if pair is not None:
            base["x"] = pair["original"].transpose(2, 0, 1)[None].astype(np.float32)
    for area in (0.012, 0.05, 0.15):
        mask = brush_stroke_mask(h, w, area, seed=3)
        out.append((f"{100 * area:g}%", base, edited_inputs(sess.manifest, base, mask, seed=4), mask))
    return out


@pytest.mark.parametrize("name", ["gaugan", "ddim", "pd"])
def test_default_mode_quality(name, tiny_artefact):
    sess = ssic.load(tiny_artefact(name, "fused"), threads=2)
    if load_edit_pair("church") is None:
        REPORT.append("real edits skipped: ../shared/data/edits is absent")
    out_name = sess.output_names[0]
    for label, original, edited, mask in _edits(name, sess):
        primed = sess.prime(original)[out_name]
        got = sess.edit(edited, mask=mask, mode="sparse")[out_name]
        want = sess.dense(edited)[out_name]
        raw = sess.difference_mask(edited) if mask is None else mask
        region = dilate(raw, int(sess.manifest.mask.radius))
        q = compare(got, want, region, primed)
        REPORT.append(f"{name} {label}: edited {100 * raw.mean():.1f}%, tiles {100 * sess.last.active_fraction:.1f}%, "
                      f"max err {q['max_abs_err']:.3g}, PSNR in {q['psnr_in']:.1f} dB (nothing {q['psnr_nothing_in']:.1f}), "
                      f"out {q['psnr_out']:.2f} dB (nothing {q['psnr_nothing_out']:.2f})")
        assert sess.last.mode == "sparse"
        if name in MIN_PSNR_IN:
            assert q["psnr_in"] >= MIN_PSNR_IN[name], REPORT[-1]
        else:
            assert q["psnr_in"] >= q["psnr_nothing_in"] + MIN_GAIN_IN[name], REPORT[-1]
        # outside the edit the sparse output is never worse than doing nothing (0.05 dB for rounding)
        assert q["psnr_out"] >= q["psnr_nothing_out"] - 0.05, REPORT[-1]
    print("\n" + "\n".join(REPORT))


def test_gaugan_every_block_active_equals_dense(tiny_artefact):
    """BatchNorm is an exact affine: forced sparse with every tile active equals dense within 1e-4."""
    from ssic.models import example_inputs

    sess = ssic.load(tiny_artefact("gaugan", "fused"))
    a = example_inputs("gaugan", "tiny", seed=0)
    b = example_inputs("gaugan", "tiny", seed=5)
    sess.prime(a)
    h, w = sess.manifest.mask.height, sess.manifest.mask.width
    got = sess.edit(b, mask=np.ones((h, w), bool), mode="sparse")["image"]
    assert sess.last.active_fraction == 1.0
    np.testing.assert_allclose(got, sess.dense(b)["image"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["ddim", "pd"])
def test_diffusion_every_block_active_equals_dense(name, tiny_artefact):
    """Incremental GroupNorm statistics: with every tile active the sparse graph is exact."""
    from ssic.models import example_inputs

    sess = ssic.load(tiny_artefact(name, "fused"))
    a = example_inputs(name, "tiny", seed=0)
    b = dict(a, x=example_inputs(name, "tiny", seed=5)["x"])
    sess.prime(a)
    got = sess.edit(b, mask=np.ones((256, 256), bool), mode="sparse")[sess.output_names[0]]
    np.testing.assert_allclose(got, sess.dense(b)[sess.output_names[0]], atol=1e-3, rtol=0)


def test_prime_equals_dense_on_presets(tiny_artefact):
    from ssic.models import example_inputs

    for name in ("gaugan", "ddim", "pd"):
        sess = ssic.load(tiny_artefact(name, "fused"))
        x = example_inputs(name, "tiny", seed=1)
        for k, v in sess.prime(x).items():
            np.testing.assert_array_equal(v, sess.dense(x)[k])
