"""Benchmark a compiled artefact: ONNX Runtime dense vs ssic sparse, measured alternately in one run."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from ssic.errors import SSICError
from ssic.masks import resize_mask_any
from ssic.quality import compare


def example_inputs(manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs for an artefact: the model family's own example inputs, else random ones."""
    family = manifest.model.family
    if family:
        try:
            from ssic.models import example_inputs as model_inputs

            preset = manifest.model.metadata.get("ssic.preset", "tiny")
            inputs = model_inputs(family, preset, seed=seed)
            if all(list(inputs[i.name].shape) == i.shape for i in manifest.inputs):
                return {k: np.asarray(v, np.float32) for k, v in inputs.items()}
        except Exception:  # noqa: BLE001 - fall back to random inputs of the right shape
            pass
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in manifest.inputs}


def edited_inputs(manifest, inputs: dict[str, np.ndarray], mask: np.ndarray, seed: int = 1) -> dict:
    """``inputs`` with the mask-source input changed inside ``mask`` (a label change for one-hot maps)."""
    source = manifest.mask.primary
    src = source.input
    if not src:
        raise SSICError("the artefact has no spatial image input; give the edited input explicitly")
    rng = np.random.default_rng(seed)
    x = inputs[src].copy()
    m = resize_mask_any(np.asarray(mask, bool), (source.height, source.width))
    if source.channel_axis == 3:
        noise = rng.standard_normal(x.shape).astype(np.float32) * 0.5
        x = np.where(m[None, :, :, None], np.clip(x + noise, -1, 1), x).astype(np.float32)
    elif manifest.model.family == "gaugan":
        labels = x[0, :-1].argmax(0)
        classes = x.shape[1] - 1
        new = (labels + 1 + rng.integers(0, classes - 1)) % classes
        onehot = np.eye(classes, dtype=np.float32)[np.where(m, new, labels)].transpose(2, 0, 1)
        x[0, :-1] = onehot
    else:
        noise = rng.standard_normal(x.shape).astype(np.float32) * 0.5
        x = np.where(m[None, None], np.clip(x + noise, -1, 1), x).astype(np.float32)
    out = dict(inputs)
    out[src] = x
    return out


def _median_ms(samples: list[float]) -> float:
    return 1000.0 * statistics.median(samples)


def benchmark(session, original: dict, edited: dict, mask: np.ndarray | None, *, runs: int = 5,
              warmup: int = 1, progress=None, prime_runs: int = 1) -> dict:
    """Median latency of dense and sparse (alternating), speedup, MACs, quality, the cost of priming
    (``prime_ms``: the median of ``prime_runs`` warm prime runs), of committing the sparse edit (``commit_ms``, on a second cache
    id primed for it and dropped after; ``commit_mode`` says whether it was incremental) and the cache
    memory of one primed state; returns a dict."""
    session.prime(original)
    prime_t = []
    for _ in range(max(1, prime_runs)):
        t0 = time.perf_counter()
        primed = session.prime(original)
        prime_t.append(time.perf_counter() - t0)
    prime_ms = _median_ms(prime_t)
    reference = session.dense(edited)
    sparse_out = session.edit(edited, mask=mask, mode="sparse")
    stats = session.last
    for _ in range(warmup):
        session.dense(edited)
        session.edit(edited, mask=mask, mode="sparse")
    dense_t, sparse_t = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        session.dense(edited)
        dense_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        session.edit(edited, mask=mask, mode="sparse")
        sparse_t.append(time.perf_counter() - t0)
        if progress:
            progress(i + 1, runs)
    commit_id = "ssic.bench.commit"
    session.prime(original, cache_id=commit_id)
    session.edit(edited, mask=mask, mode="sparse", cache_id=commit_id)
    session.commit(cache_id=commit_id)
    commit_ms, commit_mode = 1000.0 * session.last_commit.seconds, session.last_commit.mode
    session.forget(commit_id)
    name = session.output_names[0]
    m = session.difference_mask(edited) if mask is None else session.check_mask(mask)
    q = compare(sparse_out[name], reference[name], m, primed[name])
    dense_ms, sparse_ms = _median_ms(dense_t), _median_ms(sparse_t)
    mac_ratio = stats.macs_dense / max(stats.macs, 1)
    speedup = dense_ms / sparse_ms
    return {
        "dense_ms": round(dense_ms, 2), "sparse_ms": round(sparse_ms, 2), "speedup": round(speedup, 3),
        "macs_dense": stats.macs_dense, "macs_sparse": stats.macs, "mac_ratio": round(mac_ratio, 3),
        "efficiency": round(speedup / mac_ratio, 3), "active_fraction": round(stats.active_fraction, 4),
        "edited_fraction": round(float(m.mean()), 4), "active_tiles": stats.active_tiles,
        "psnr": q["psnr"], "max_abs_err": q["max_abs_err"],
        "psnr_in": q.get("psnr_in"), "psnr_out": q.get("psnr_out"),
        "psnr_nothing_in": q.get("psnr_nothing_in"), "psnr_nothing_out": q.get("psnr_nothing_out"),
        "cache_mb": round(session.cache_bytes() / 2**20, 1), "prime_ms": round(prime_ms, 2),
        "commit_ms": round(commit_ms, 2), "commit_mode": commit_mode,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": runs, "threads": session.threads,
    }
