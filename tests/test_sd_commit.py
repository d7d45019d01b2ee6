"""Self-attention key/value caches of the SD UNet (tiny preset): float16 where ``cache_dtype`` says so,
with commit outputs, so that ``Session.commit`` folds an edit into them instead of re-priming."""

from __future__ import annotations

import numpy as np
import pytest

import ssic
from ssic.session import scatter_rows_into

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install ssic[test])")

from ssic.models.export import export_sd  # noqa: E402
from ssic.models.sd import sd_example_inputs  # noqa: E402

SIZE = 128  # latent 16x16


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdcommit")
    return export_sd("sd-unet", "tiny", tmp / "unet.onnx", seed=0, size=(SIZE, SIZE))


def _caches(sess, cache_id=0) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in sess._states[cache_id].caches.items()}


def _box_edit(rng, x: np.ndarray) -> np.ndarray:
    out = x.copy()
    y0, x0 = (int(v) for v in rng.integers(0, 12, size=2))
    out[:, :, y0:y0 + 3, x0:x0 + 4] += rng.standard_normal((4, 3, 4)).astype(np.float32)
    return out


def test_kv_caches_float16_with_commits_and_fewer_bytes(onnx_path, tmp_path):
    half = ssic.load(ssic.compile(onnx_path, output_dir=tmp_path / "f16.ssic"), threads=2)
    full = ssic.load(ssic.compile(onnx_path, output_dir=tmp_path / "f32.ssic", cache_dtype="float32"), threads=2)
    rows = [c for c in half.manifest.caches if c.rows]
    assert len(rows) == 8  # keys and values of 4 self-attentions (2 transformer blocks, q kᵀ and P v each)
    assert all(c.dtype == "float16" and c.commit for c in rows)
    # every cache has a commit output: an incremental commit no longer re-primes an SD UNet
    assert all(c.commit for c in half.manifest.caches if c.kind not in ("gn_scale", "gn_shift"))
    rows32 = {c.name: c for c in full.manifest.caches if c.rows}
    assert all(rows32[c.name].dtype == "float32" for c in rows)
    x = sd_example_inputs("sd-unet", "tiny", seed=0, size=(SIZE, SIZE))
    half.prime(x)
    full.prime(x)
    kv16 = sum(c.nbytes for c in rows)
    assert kv16 * 2 == sum(c.nbytes for c in rows32.values())
    assert half.cache_bytes() == half.manifest.cache_bytes()
    # before: the key/value caches stayed float32 next to float16 activations
    assert half.cache_bytes() == sum(c.nbytes for c in half.manifest.caches if not c.rows) + kv16
    assert half.cache_bytes() < 0.6 * full.cache_bytes()
    # and the outputs of a small edit stay close to those with float32 caches
    e = dict(x, sample=x["sample"].copy())
    e["sample"][:, :, 4:7, 5:9] += 1.0
    a, b = half.edit(e, mode="sparse")["out_sample"], full.edit(e, mode="sparse")["out_sample"]
    np.testing.assert_allclose(a, b, atol=5e-3 * float(np.abs(b).max()))


def test_chain_of_commits_equals_fresh_prime(onnx_path, tmp_path):
    # exact mode (float16 caches asked for): every pixel an edit changes is recomputed, so the committed
    # caches are what a prime on the final input computes, up to float16 rounding
    art = ssic.compile(onnx_path, output_dir=tmp_path / "exact.ssic", exact=True, cache_dtype="float16")
    sess = ssic.load(art, threads=2)
    rng = np.random.default_rng(1)
    x = sd_example_inputs("sd-unet", "tiny", seed=0, size=(SIZE, SIZE))
    sess.prime(x)
    for _ in range(3):
        x = dict(x, sample=_box_edit(rng, x["sample"]))
        out = sess.edit(x, mode="sparse")
        assert sess.last.mode == "sparse"
        sess.commit()
        assert sess.last_commit.mode == "incremental"
        np.testing.assert_array_equal(sess._states[0].outputs["out_sample"], out["out_sample"])
    fresh = ssic.load(art, threads=2)
    want_out = fresh.prime(x)["out_sample"]
    want, got = _caches(fresh), _caches(sess)
    assert set(got) == set(want)
    for name, ref in want.items():
        ref = ref.astype(np.float64)
        tol = 1e-2 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name].astype(np.float64), ref, rtol=0, atol=tol, err_msg=name)
    np.testing.assert_allclose(sess._states[0].outputs["out_sample"], want_out, atol=1e-2)
    nxt = dict(x, sample=_box_edit(rng, x["sample"]))
    np.testing.assert_allclose(sess.edit(nxt, mode="sparse")["out_sample"], fresh.dense(nxt)["out_sample"],
                               atol=1e-2)


def test_default_mode_commit_writes_only_the_active_rows(onnx_path, tmp_path):
    sess = ssic.load(ssic.compile(onnx_path, output_dir=tmp_path / "default.ssic"), threads=2)
    rows = [c for c in sess.manifest.caches if c.rows]
    x = sd_example_inputs("sd-unet", "tiny", seed=0, size=(SIZE, SIZE))
    sess.prime(x)
    before = _caches(sess)
    e = dict(x, sample=x["sample"].copy())
    e["sample"][:, :, 4:7, 5:9] += 1.0
    sess.keep_commit_tiles = True
    sess.edit(e, mode="sparse")
    tiles = sess._last_edit[0].tiles
    sess.commit()
    assert sess.last_commit.mode == "incremental"
    after = _caches(sess)
    grids = {g.name: g for g in sess.manifest.grids}
    for c in rows:
        g = grids[c.resolution]
        active = np.zeros((g.height, g.width), bool)
        for y0, x0 in tiles[g.name]:
            active[y0:y0 + g.tile, x0:x0 + g.tile] = True
        flat = active.reshape(-1)
        r = c.rows[0]
        changed = np.moveaxis(after[c.name] != before[c.name], r, 0).reshape(flat.size, -1).any(axis=1)
        assert not changed[~flat].any(), c.name  # outside the active tiles: the primed rows
        assert changed[flat].mean() > 0.9, c.name  # inside: the edit's rows


@pytest.mark.parametrize("shape,axes,hw", [((1, 2, 5, 63), (3,), (7, 9)), ((1, 63, 6), (1,), (7, 9)),
                                            ((2, 7, 9, 3), (1, 2), (7, 9)), ((1, 3, 64, 2), (2,), (8, 8))])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_scatter_rows_into_matches_reference(shape, axes, hw, dtype):
    rng = np.random.default_rng(0)
    tile, (h, w) = 2, hw
    corners = np.array([(y, x) for y in range(0, h, tile) for x in range(0, w, tile)], np.int64)
    idx = corners[rng.random(len(corners)) < 0.4]
    cache = rng.standard_normal(shape).astype(dtype)
    r0, r1 = axes[0], axes[-1]
    m = len(idx) * tile * tile
    rows = rng.standard_normal((*shape[:r0], m, *shape[r1 + 1:])).astype(np.float32)
    want = cache.reshape(*shape[:r0], h * w, *shape[r1 + 1:]).copy()
    k = 0
    for y0, x0 in idx:
        for py in range(tile):
            for px in range(tile):
                y, x = y0 + py, x0 + px
                if y < h and x < w:
                    want[(slice(None),) * r0 + (y * w + x,)] = rows[(slice(None),) * r0 + (k,)]
                k += 1
    scatter_rows_into(cache, rows, idx, tile, hw, axes)
    np.testing.assert_array_equal(cache.reshape(want.shape), want)
