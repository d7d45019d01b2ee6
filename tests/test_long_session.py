"""Long editing sessions: 1,000 edits with random masks, resident memory, equality with fresh sessions.

- a small conv net (exact mode): 1,000 consecutive edits with random masks on one session; resident
  memory after a warm-up and at the end differ by less than ``RSS_BOUND_MB``; every 50th edit equals
  the same edit on a freshly loaded and primed session;
- the DDIM tiny preset (default mode): 100 edits with random brush masks, same checks;
- sequential editing: edit, ``commit()``, edit again == priming on the second original.
The RSS growth and timings are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest
import torch

import ssic

RSS_BOUND_MB = 50.0
H = W = 64


def rss_mb() -> float:
    """Resident set size of this process in MB (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class SmallNet(torch.nn.Module):
    """3x3 convs, a stride-2 level with nearest upsampling, a residual and a concat: several grids."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        h = torch.nn.functional.leaky_relu(self.c1(h), 0.2) + h
        d = torch.nn.functional.silu(self.mid(torch.relu(self.down(h))))
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return torch.tanh(self.out(torch.cat([u, h], 1)))


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    d = tmp_path_factory.mktemp("longnet")
    path = d / "small.onnx"
    torch.onnx.export(SmallNet().eval(), (torch.zeros(1, 3, H, W),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=18, dynamo=False)
    return ssic.compile(path, output_dir=d / "small.ssic", exact=True, sparse_min_res=16, tile=4)


def random_rect_mask(rng, h: int, w: int) -> np.ndarray:
    """1-3 random rectangles (sometimes empty, sometimes large) of a random size."""
    m = np.zeros((h, w), bool)
    kind = rng.random()
    if kind < 0.03:
        return m  # empty: the cached output
    for _ in range(int(rng.integers(1, 4))):
        bh, bw = int(rng.integers(1, h // 2 if kind < 0.9 else h)), int(rng.integers(1, w // 2 if kind < 0.9 else w))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        m[y:y + bh, x:x + bw] = True
    return m


def _long_session(art, n_edits: int, make_mask, inputs: dict, src: str, out_name: str, *, check_every: int = 50,
                  warmup: int = 50, threads: int = 2, seed: int = 0, mode: str = "auto"):
    """Run ``n_edits`` edits on one session (``mode`` as ``Session.edit``'s); returns (rss growth MB, seconds
    per edit, modes, number of fresh checks)."""
    rng = np.random.default_rng(seed)
    sess = ssic.load(art, threads=threads)
    sess.prime(inputs)
    modes: dict[str, int] = {}
    checks = 0
    saved = []  # (edit number, inputs, mask, output, mode) of every check_every-th edit
    rss0 = None
    t0 = time.perf_counter()
    for i in range(1, n_edits + 1):
        mask = make_mask(rng)
        edited = dict(inputs)
        x = inputs[src].copy()
        noise = rng.standard_normal(x.shape).astype(np.float32)
        x[..., mask] += noise[..., mask]
        edited[src] = x
        out = sess.edit(edited, mask=mask, mode=mode)[out_name]
        modes[sess.last.mode] = modes.get(sess.last.mode, 0) + 1
        if i == warmup:
            gc.collect()
            rss0 = rss_mb()
            t0 = time.perf_counter()
        if i % check_every == 0:
            saved.append((i, edited, mask, out, sess.last.mode))
    secs = (time.perf_counter() - t0) / max(n_edits - warmup, 1)
    gc.collect()
    growth = rss_mb() - rss0
    # every 50th edit against a fresh session (after the RSS measurement: loading sessions costs memory)
    for i, edited, mask, out, mode in saved:
        fresh = ssic.load(art, threads=threads)
        fresh.prime(inputs)
        # the same mode: "auto" depends on the session's measured run times (ssic/cost_model.py)
        want = fresh.edit(edited, mask=mask, mode=mode if mode in ("sparse", "dense") else "auto")[out_name]
        assert fresh.last.mode == mode
        np.testing.assert_allclose(out, want, atol=1e-6, rtol=0, err_msg=f"edit {i} differs from a fresh session")
        checks += 1
        del fresh
    # the primed caches are unchanged by all those edits: an empty edit still returns the primed output
    np.testing.assert_array_equal(sess.edit(inputs)[out_name], sess.prime(inputs)[out_name])
    return growth, secs, modes, checks


def test_1000_edits_small_net(small_net):
    rng = np.random.default_rng(42)
    x = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    # sparse forced: on a net this small the measured cost model sends most edits dense (ssic/cost_model.py)
    growth, secs, modes, checks = _long_session(small_net, 1000, lambda r: random_rect_mask(r, H, W), {"x": x},
                                                "x", "y", check_every=50, warmup=50, mode="sparse")
    print(f"\n1000 edits (small net {H}x{W}, exact): RSS growth {growth:+.1f} MB after warm-up, "
          f"{1000 * secs:.2f} ms/edit, modes {modes}, {checks} fresh-session checks")
    assert checks == 20
    assert modes.get("sparse", 0) > 500 and modes.get("cached", 0) > 0
    assert growth < RSS_BOUND_MB, f"RSS grew by {growth:.1f} MB over 950 edits"


def test_100_edits_tiny_ddim(tiny_artefact):
    """The DDIM tiny preset (default SIGE mode) with random brush-stroke masks."""
    from ssic.bench import example_inputs
    from ssic.masks import brush_stroke_mask

    art = tiny_artefact("ddim", "fused")
    sess = ssic.load(art)
    h, w = sess.manifest.mask.height, sess.manifest.mask.width
    inputs = example_inputs(sess.manifest, 0)
    del sess
    counter = iter(range(10**6))

    def make_mask(r):
        area = float(r.choice([0.005, 0.01, 0.03, 0.1]))
        return brush_stroke_mask(h, w, area, next(counter))

    growth, secs, modes, checks = _long_session(art, 100, make_mask, inputs, "x", "eps", check_every=50,
                                                warmup=20)
    print(f"\n100 edits (ddim tiny, default mode): RSS growth {growth:+.1f} MB after warm-up, "
          f"{1000 * secs:.1f} ms/edit, modes {modes}, {checks} fresh-session checks")
    assert checks == 2
    assert growth < RSS_BOUND_MB, f"RSS grew by {growth:.1f} MB over 80 edits"


def test_commit_sequential_editing(small_net):
    """edit(x1), commit(), edit(x2) == prime(x1), edit(x2); and == dense(x2) (exact mode)."""
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    x1 = x0.copy()
    x1[:, :, 5:20, 30:50] += 1.0
    x2 = x1.copy()
    x2[:, :, 40:52, 8:20] -= 1.0
    sess = ssic.load(small_net, threads=2)
    sess.prime({"x": x0})
    sess.edit({"x": x1})
    sess.commit()
    seq = sess.edit({"x": x2}, mode="sparse")["y"]
    # the second edit's mask is where x2 differs from x1 (the committed original), not from x0
    assert sess.last.mode == "sparse"
    np.testing.assert_array_equal(sess.difference_mask({"x": x2}), (x2 != x1).any(axis=1)[0])

    ref = ssic.load(small_net, threads=2)
    ref.prime({"x": x1})
    np.testing.assert_allclose(seq, ref.edit({"x": x2}, mode="sparse")["y"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(seq, ref.dense({"x": x2})["y"], atol=1e-4, rtol=0)

    # commit(inputs) explicitly, on another cache id, several times in a row
    sess.prime({"x": x0}, cache_id="b")
    cur = x0
    for k in range(5):
        nxt = cur.copy()
        nxt[:, :, 8 * k:8 * k + 6, 10:20] += 0.5
        out = sess.edit({"x": nxt}, cache_id="b", mode="sparse")["y"]
        np.testing.assert_allclose(out, ref.dense({"x": nxt})["y"], atol=1e-4, rtol=0)
        sess.commit({"x": nxt}, cache_id="b")
        cur = nxt
    # an incremental commit keeps the sparse edit's outputs: equal to dense within float rounding
    np.testing.assert_allclose(sess.edit({"x": cur}, cache_id="b")["y"], ref.dense({"x": cur})["y"], atol=1e-5, rtol=0)
    assert sess.last.mode == "cached"
    assert sorted(map(str, sess.cache_ids)) == ["0", "b"]
