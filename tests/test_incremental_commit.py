"""Incremental ``Session.commit``: the last edit's tiles are folded into the resident caches.

- exact mode: a chain of random edits, each committed, leaves the caches, the GroupNorm sums and the
  outputs equal to a fresh prime on the final input (both lowerings, tiles clipped at the border,
  with the edit's tiles kept or recomputed by the commit);
- the in-place scatter equals ``ssic.ops.tile_scatter_ref`` (both cache layouts, float16 caches);
- the fallbacks: dense edits and backends without host caches re-prime, empty and repeated commits do
  nothing, a user mask that misses part of the change is edited again before the fold;
- edits on the same cache id running while a commit writes see the old or the new caches, never a mix;
- commit cost against prime and edit on a larger net (printed; correctness asserted, not timing).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import ssic
from ssic import ops
from ssic.artefact import read_manifest
from ssic.session import Session, scatter_tiles
from ssic.targets.ort import OrtBackend

H = W = 30  # not a multiple of the tile (4): clipped tiles at the border


class Net(torch.nn.Module):
    """Conv, strided conv, nearest upsample, channel concat; optional GroupNorm + SiLU (incremental stats)."""

    def __init__(self, gn: bool, ch: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, ch, 3, padding=1)
        self.gn = torch.nn.GroupNorm(4, ch) if gn else None
        self.down = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.c1 = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.out = torch.nn.Conv2d(2 * ch, 3, 3, padding=1)

    def forward(self, x):
        h = torch.nn.functional.leaky_relu(self.c0(x), 0.2)
        if self.gn is not None:
            h = torch.nn.functional.silu(self.gn(h))
        d = self.c1(torch.relu(self.down(h)))
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return torch.tanh(self.out(torch.cat([u, h], 1)))


def _export(path, net, hw):
    torch.onnx.export(net.eval(), (torch.zeros(1, 3, *hw),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("commit")
    plain = _export(tmp / "net.onnx", Net(False), (H, W))
    gn = _export(tmp / "gn.onnx", Net(True), (32, 32))
    return {
        "fused": ssic.compile(plain, output_dir=tmp / "fused.ssic", exact=True, tile=4),
        "standard": ssic.compile(plain, output_dir=tmp / "standard.ssic", exact=True, tile=4, lowering="standard"),
        "groupnorm": ssic.compile(gn, output_dir=tmp / "gn.ssic", exact=True, tile=2, sparse_min_res=16),
        "default": ssic.compile(plain, output_dir=tmp / "default.ssic", tile=4),
    }


def _shape(sess: Session) -> list[int]:
    return list(sess.inputs["x"].shape)


def _caches(sess: Session, cache_id=0) -> dict[str, np.ndarray]:
    state = sess._states[cache_id]
    return {k: v.numpy().copy() for k, v in state.caches.items()}  # ONNX Runtime: OrtValues


def _random_edit(rng, x: np.ndarray) -> np.ndarray:
    h, w = x.shape[2:]
    bh, bw = (int(v) for v in rng.integers(1, 9, size=2))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    out = x.copy()
    out[:, :, y0:y0 + bh, x0:x0 + bw] += rng.standard_normal((3, bh, bw)).astype(np.float32)
    return out


def _assert_state_equals_fresh_prime(sess: Session, art, x: np.ndarray, cache_id=0) -> None:
    fresh = ssic.load(art, threads=1)
    want_out = fresh.prime({"x": x})
    want, got = _caches(fresh), _caches(sess, cache_id)
    assert set(got) == set(want)
    for name, ref in want.items():
        # 1e-4 relative to the tensor's magnitude (GroupNorm sums grow with the image)
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=tol, err_msg=name)
    for k, ref in want_out.items():
        np.testing.assert_allclose(sess._states[cache_id].outputs[k], ref, rtol=0, atol=1e-4, err_msg=k)
    np.testing.assert_array_equal(sess._states[cache_id].inputs["x"], x)


@pytest.mark.parametrize("keep", [False, True], ids=["recompute-tiles", "keep-tiles"])
@pytest.mark.parametrize("which", ["fused", "standard", "groupnorm"])
def test_chain_of_commits_equals_fresh_prime(arts, which, keep):
    art = arts[which]
    sess = ssic.load(art, threads=1)
    sess.keep_commit_tiles = keep
    if which == "groupnorm":
        assert {c.kind for c in sess.manifest.caches} >= {"gn_sum", "gn_sumsq"}
    assert all(c.commit for c in sess.manifest.caches)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(_shape(sess)).astype(np.float32)
    sess.prime({"x": x})
    for _ in range(5):
        x = _random_edit(rng, x)
        out = sess.edit({"x": x}, mode="sparse")
        assert sess.last.mode == "sparse"
        sess.commit()
        assert sess.last_commit.mode == "incremental"
        np.testing.assert_array_equal(sess._states[0].outputs["y"], out["y"])
    _assert_state_equals_fresh_prime(sess, art, x)
    # and the next edit, against the committed caches, is the dense result
    nxt = _random_edit(rng, x)
    np.testing.assert_allclose(sess.edit({"x": nxt}, mode="sparse")["y"], sess.dense({"x": nxt})["y"], atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hw,tile", [((12, 16), 4), ((13, 10), 4), ((7, 9), 2), ((6, 6), 3)])
def test_scatter_tiles_matches_the_reference(hw, tile, dtype):
    rng = np.random.default_rng(hw[0] * 31 + tile)
    h, w, c = *hw, 5
    cells = [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]
    pick = rng.choice(len(cells), size=max(1, len(cells) // 2), replace=False)
    idx = np.array([cells[i] for i in sorted(pick)], np.int64).reshape(-1, 2)
    tiles = rng.standard_normal((len(idx) * tile * tile, c)).astype(np.float32)
    nchw = rng.standard_normal((1, c, h, w)).astype(np.float32)
    want = ops.tile_scatter_ref(tiles, nchw, idx, tile=tile)
    got = nchw.astype(dtype)
    scatter_tiles(got, tiles, idx, tile, nchw=True)
    np.testing.assert_array_equal(got, want.astype(dtype))
    got = np.ascontiguousarray(nchw[0].transpose(1, 2, 0)).astype(dtype)  # [H, W, C]
    scatter_tiles(got, tiles, idx, tile, nchw=False)
    np.testing.assert_array_equal(got, want[0].transpose(1, 2, 0).astype(dtype))


def test_fallbacks_and_no_ops(arts):
    art = arts["fused"]
    sess = ssic.load(art, threads=1)
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal(_shape(sess)).astype(np.float32)
    sess.prime({"x": x0})
    with pytest.raises(ssic.SSICError, match="needs an edit"):
        sess.commit(cache_id="other")

    x1 = _random_edit(rng, x0)
    sess.edit({"x": x1}, mode="dense")  # a dense edit has no tiles to fold
    sess.commit()
    assert sess.last_commit.mode == "prime"
    _assert_state_equals_fresh_prime(sess, art, x1)
    sess.commit()  # twice: nothing left to do
    assert sess.last_commit.mode == "none"

    sess.edit({"x": x1.copy()})  # no change: the caches stay
    assert sess.last.mode == "cached"
    sess.commit()
    assert sess.last_commit.mode == "none"

    # a user mask away from the change: the commit edits the difference (sparse, as the user's edit ran)
    x2 = x1.copy()
    x2[:, :, 0:2, 0:2] += 1.0
    mask = np.zeros((H, W), bool)
    mask[-1, -1] = True
    sess.edit({"x": x2}, mask=mask, mode="sparse")
    sess.commit()
    assert sess.last_commit.mode == "incremental"
    _assert_state_equals_fresh_prime(sess, art, x2)

    # commit(inputs) of inputs never edited: edited (mode "auto") and folded, or re-primed where the
    # session's dense fallback takes that edit (a measured cost model may: this net is tiny)
    x3 = x2.copy()
    x3[:, :, -2:, -3:] -= 0.5
    sess.commit({"x": x3})
    assert sess.last_commit.mode in ("incremental", "prime")
    _assert_state_equals_fresh_prime(sess, art, x3)

    # an edit from before a prime of its cache id cannot be folded into the new caches
    x4 = _random_edit(rng, x3)
    sess.edit({"x": x4}, mode="sparse")
    sess.prime({"x": x0})
    sess.commit()
    assert sess.last_commit.mode == "prime"
    _assert_state_equals_fresh_prime(sess, art, x4)

    # asked for: a prime
    x5 = x4.copy()
    x5[:, :, 0:2, -2:] += 0.5
    sess.edit({"x": x5}, mode="sparse")
    sess.commit(incremental=False)
    assert sess.last_commit.mode == "prime"
    _assert_state_equals_fresh_prime(sess, art, x5)

    # a backend whose caches the host cannot write (TensorRT's device buffers) re-primes
    class DeviceCaches(OrtBackend):
        def host_view(self, cache):
            return None

    manifest = read_manifest(art)
    dev = Session(art, manifest, DeviceCaches(art, manifest, threads=1))
    dev.prime({"x": x0})
    dev.edit({"x": x1}, mode="sparse")
    dev.commit()
    assert dev.last_commit.mode == "prime"
    _assert_state_equals_fresh_prime(dev, art, x1)


def test_default_mode_commit_keeps_what_the_edit_computed(arts):
    """Without exact mode the commit is the edit's view of the new image (SIGE's approximation)."""
    sess = ssic.load(arts["default"], threads=1)
    rng = np.random.default_rng(9)
    x0 = rng.standard_normal(_shape(sess)).astype(np.float32)
    sess.prime({"x": x0})
    before = _caches(sess)
    x1 = x0.copy()
    x1[:, :, 10:16, 12:18] += 1.0
    out = sess.edit({"x": x1}, mode="sparse")
    sess.commit()
    assert sess.last_commit.mode == "incremental"
    after = _caches(sess)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    # the committed original is the edited input: editing it again changes nothing
    np.testing.assert_array_equal(sess.edit({"x": x1})["y"], out["y"])
    assert sess.last.mode == "cached"


def test_edits_during_a_commit_see_old_or_new_caches(arts):
    art = arts["fused"]
    sess = ssic.load(art, threads=1)
    rng = np.random.default_rng(11)
    x0 = rng.standard_normal(_shape(sess)).astype(np.float32)
    x1 = x0.copy()
    x1[:, :, 3:9, 4:10] += 1.0  # the committed edit
    e = x0.copy()
    e[:, :, 18:24, 16:22] -= 1.0  # edited under a mask that misses x1's box: old and new caches differ
    mask = np.zeros((H, W), bool)
    mask[18:24, 16:22] = True
    ref = ssic.load(art, threads=1)
    ref.prime({"x": x0})
    want_old = ref.edit({"x": e}, mask=mask, mode="sparse")["y"]
    ref.prime({"x": x1})
    want_new = ref.edit({"x": e}, mask=mask, mode="sparse")["y"]
    assert not np.allclose(want_old, want_new, atol=1e-3)

    sess.prime({"x": x0})
    sess.keep_commit_tiles = True
    sess.edit({"x": x1}, mode="sparse")
    results, errors = [], []
    start = threading.Barrier(4)

    def editor():
        start.wait()
        try:
            for _ in range(15):
                results.append(sess.edit({"x": e}, mask=mask, mode="sparse")["y"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def committer():
        start.wait()
        time.sleep(0.005)
        sess.commit({"x": x1})  # (the editors' edits are the last ones now: name the committed input)

    threads = [threading.Thread(target=editor) for _ in range(3)] + [threading.Thread(target=committer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # (commit(inputs) edits in mode "auto": a measured dense fallback may re-prime instead, which must
    # not mix either)
    assert sess.last_commit.mode in ("incremental", "prime")
    for out in results:
        assert np.allclose(out, want_old, atol=1e-5) or np.allclose(out, want_new, atol=1e-5)
    np.testing.assert_allclose(sess.edit({"x": e}, mask=mask, mode="sparse")["y"], want_new, atol=1e-5)


def test_commit_cost_against_prime(tmp_path):
    """A 128x128 net with 32 channels: commit vs prime vs edit (printed; timing is not asserted).

    Default mode: GroupNorm changes every pixel a little, which the default mode leaves stale outside
    the active tiles, so the committed state is not compared with a prime here (exact mode above)."""
    path = _export(tmp_path / "big.onnx", Net(True, ch=32), (128, 128))
    art = ssic.compile(path, output_dir=tmp_path / "big.ssic", tile=2)
    sess = ssic.load(art, threads=1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(_shape(sess)).astype(np.float32)
    sess.prime({"x": x})
    t0 = time.perf_counter()
    sess.prime({"x": x})
    prime_s = time.perf_counter() - t0
    costs = {}
    for keep in (False, True, False, True):  # the first round warms up
        sess.keep_commit_tiles = keep
        nxt = x.copy()
        nxt[:, :, 40:52, 60:70] += 1.0
        t0 = time.perf_counter()
        sess.edit({"x": nxt}, mode="sparse")
        edit_s = time.perf_counter() - t0
        sess.commit()
        assert sess.last_commit.mode == "incremental"
        costs[keep] = (edit_s, sess.last_commit.seconds)
        x = nxt
    print(f"\n128x128x32 net, {100 * sess.last.active_fraction:.1f}% tiles: prime {1e3 * prime_s:.1f} ms; "
          + "; ".join(f"keep_commit_tiles={k}: edit {1e3 * e:.1f} ms, commit {1e3 * c:.1f} ms"
                      for k, (e, c) in costs.items()))
