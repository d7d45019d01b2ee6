"""One session shared by threads, as ssic/runtime.py documents: outputs equal the single-threaded ones.

- edits on different cache ids concurrently;
- edits on the same cache id concurrently (and dense runs among them);
- a prime swapping a cache id's state while edits on that id run: each edit returns the result for
  the old caches or for the new ones, never a mix;
- commit from one thread while others edit other ids.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import ssic

H = W = 64
N_THREADS = 4


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c0 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        d = torch.nn.functional.leaky_relu(self.mid(torch.relu(self.down(h))), 0.2)
        u = torch.nn.functional.interpolate(d, scale_factor=2, mode="nearest")
        return torch.tanh(self.out(torch.cat([u, h], 1)))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    d = tmp_path_factory.mktemp("threads")
    path = d / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, H, W),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=18, dynamo=False)
    return ssic.compile(path, output_dir=d / "net.ssic", exact=True, sparse_min_res=16, tile=4)


def make_cases(seed: int, n: int, base: np.ndarray):
    """n (edited input, mask) pairs: random rectangles, some empty."""
    rng = np.random.default_rng(seed)
    cases = []
    for k in range(n):
        m = np.zeros((H, W), bool)
        if k % 7 != 3:
            bh, bw = rng.integers(2, 24, size=2)
            y, x = rng.integers(0, H - bh), rng.integers(0, W - bw)
            m[y:y + bh, x:x + bw] = True
        e = base.copy()
        e[:, :, m] += rng.standard_normal((3, int(m.sum()))).astype(np.float32)
        cases.append((e, m))
    return cases


def run_parallel(fns, workers=N_THREADS):
    """Run callables from several threads, all released at once; re-raises the first error."""
    barrier = threading.Barrier(min(workers, len(fns)))

    def wrap(fn):
        def go():
            try:
                barrier.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            return fn()
        return go

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(wrap(f)) for f in fns]
        return [f.result(timeout=300) for f in futures]


@pytest.fixture(scope="module")
def setup(art):
    rng = np.random.default_rng(0)
    originals = [rng.standard_normal((1, 3, H, W)).astype(np.float32) for _ in range(N_THREADS)]
    cases = [make_cases(100 + i, 12, originals[i]) for i in range(N_THREADS)]
    # single-threaded references, from one session used by one thread
    ref_sess = ssic.load(art, threads=1)
    refs = []
    for i in range(N_THREADS):
        ref_sess.prime({"x": originals[i]}, cache_id=i)
        refs.append([ref_sess.edit({"x": e}, mask=m, cache_id=i, mode="sparse")["y"] for e, m in cases[i]])
    dense = [[ref_sess.dense({"x": e})["y"] for e, _ in cases[i]] for i in range(N_THREADS)]
    return {"originals": originals, "cases": cases, "refs": refs, "dense": dense}


def test_edits_on_different_cache_ids(art, setup):
    sess = ssic.load(art, threads=1)
    for i, x in enumerate(setup["originals"]):
        sess.prime({"x": x}, cache_id=i)

    def worker(i):
        return lambda: [sess.edit({"x": e}, mask=m, cache_id=i, mode="sparse")["y"] for e, m in setup["cases"][i]]

    for _ in range(3):
        results = run_parallel([worker(i) for i in range(N_THREADS)])
        for i in range(N_THREADS):
            for k, out in enumerate(results[i]):
                np.testing.assert_allclose(out, setup["refs"][i][k], atol=1e-6, rtol=0,
                                           err_msg=f"cache id {i}, edit {k}")


def test_edits_and_dense_on_the_same_cache_id(art, setup):
    sess = ssic.load(art, threads=2)
    sess.prime({"x": setup["originals"][0]})
    cases, refs, dense = setup["cases"][0], setup["refs"][0], setup["dense"][0]

    def worker(t):
        def go():
            out = []
            for r in range(3):
                for k in range(len(cases))[t::N_THREADS] if r % 2 else range(len(cases)):
                    e, m = cases[k]
                    if (k + t) % 5 == 0:
                        out.append(("dense", k, sess.dense({"x": e})["y"]))
                    else:
                        out.append(("sparse", k, sess.edit({"x": e}, mask=m, mode="sparse")["y"]))
            return out
        return go

    for results in run_parallel([worker(t) for t in range(N_THREADS)]):
        for kind, k, out in results:
            want = dense[k] if kind == "dense" else refs[k]
            np.testing.assert_allclose(out, want, atol=1e-6, rtol=0, err_msg=f"{kind} edit {k}")


def test_prime_swaps_caches_while_edits_run(art, setup):
    """Edits on id 0 while another thread re-primes id 0 between originals A and B: every result is the
    single-threaded result for A or for B, and after the last prime edits give B's result."""
    a, b = setup["originals"][0], setup["originals"][1]
    e, m = setup["cases"][0][0]
    ref = ssic.load(art, threads=1)
    ref.prime({"x": a})
    want_a = ref.edit({"x": e}, mask=m, mode="sparse")["y"]
    ref.prime({"x": b})
    want_b = ref.edit({"x": e}, mask=m, mode="sparse")["y"]
    assert np.abs(want_a - want_b).max() > 1e-3  # the two cache states give distinguishable results

    sess = ssic.load(art, threads=1)
    sess.prime({"x": a})
    stop = threading.Event()
    primes = []

    def primer():
        for k in range(30):
            sess.prime({"x": b if k % 2 == 0 else a})
            primes.append(k)
        sess.prime({"x": b})
        stop.set()
        return []

    def editor():
        outs = []
        while not stop.is_set() or not outs:
            outs.append(sess.edit({"x": e}, mask=m, mode="sparse")["y"])
        return outs

    results = run_parallel([primer] + [editor] * (N_THREADS - 1))
    seen = {"a": 0, "b": 0}
    for outs in results[1:]:
        for out in outs:
            if np.allclose(out, want_a, atol=1e-6, rtol=0):
                seen["a"] += 1
            else:
                np.testing.assert_allclose(out, want_b, atol=1e-6, rtol=0, err_msg="a mix of old and new caches")
                seen["b"] += 1
    print(f"\nprime swapping while editing: {len(primes)} primes, results from A {seen['a']}, from B {seen['b']}")
    assert sum(seen.values()) >= N_THREADS - 1
    np.testing.assert_allclose(sess.edit({"x": e}, mask=m, mode="sparse")["y"], want_b, atol=1e-6, rtol=0)


def test_commit_and_forget_while_other_ids_edit(art, setup):
    sess = ssic.load(art, threads=1)
    for i, x in enumerate(setup["originals"]):
        sess.prime({"x": x}, cache_id=i)

    def committer():
        for k in range(10):
            e, m = setup["cases"][0][k]
            sess.edit({"x": e}, mask=m, cache_id=0)
            sess.commit(cache_id=0)
            sess.prime({"x": setup["originals"][0]}, cache_id="tmp")
            sess.forget("tmp")
        return []

    def editor(i):
        return lambda: [sess.edit({"x": e}, mask=m, cache_id=i, mode="sparse")["y"] for e, m in setup["cases"][i]]

    results = run_parallel([committer] + [editor(i) for i in range(1, N_THREADS)])
    for i in range(1, N_THREADS):
        for k, out in enumerate(results[i]):
            np.testing.assert_allclose(out, setup["refs"][i][k], atol=1e-6, rtol=0)
    # id 0 now holds the 10th edit as its original
    e9 = setup["cases"][0][9][0]
    # (an incremental commit keeps the sparse edit's outputs: equal to dense within float rounding)
    np.testing.assert_allclose(sess.edit({"x": e9}, cache_id=0)["y"], sess.dense({"x": e9})["y"], atol=1e-5, rtol=0)
    assert sess.last.mode == "cached"
    assert "tmp" not in sess.cache_ids
