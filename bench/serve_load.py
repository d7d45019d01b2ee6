"""Load test of ``ssic serve`` on loopback: concurrent editing sessions, one replica killed mid-run.

    python bench/serve_load.py --artefact gaugan_tiny.ssic --sessions 16 --edits 20 --replicas 2

Starts a local Ray instance and the app on 127.0.0.1, opens ``--sessions`` sessions (GauGAN label
maps or DDIM images, seeded), and runs ``--edits`` brush-stroke edits per session from one client
thread per session, committing half way. Every output is checked bit for bit against a local
session (``ssic.load`` in this process) fed the same sequence. When ``--kill-at`` of the edits are
done, one editor replica is killed with ``ray.kill``: its sessions must re-prime on the other
replica and every later answer must still be right. Then the same edits run again with
``mode=dense`` (the plain model, same HTTP path) for the baseline. Bounded: ``--deadline-s`` stops
issuing requests. Prints a JSON report (and writes it to ``--json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from ssic.serve.codec import decode_array, npy_bytes


def _digest(outputs: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(outputs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(outputs[k], dtype=np.float32).tobytes())
    return h.hexdigest()


def make_inputs(specs: list, seed: int):
    """Seeded original inputs as HTTP parts and as arrays, and a function painting stroke ``j``."""
    from ssic.serve.codec import labels_to_input

    rng = np.random.default_rng(seed)
    img = next(s for s in specs if s.kind in ("image", "labels"))
    h, w = img.shape[2:]
    if img.kind == "labels":
        # Voronoi regions of random labels: a stand-in for a street scene
        pts = rng.uniform([0, 0], [h, w], size=(12, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        region = np.argmin((yy[None] - pts[:, :1, None]) ** 2 + (xx[None] - pts[:, 1:, None]) ** 2, axis=0)
        base = rng.integers(0, img.shape[1] - 1, size=12)[region].astype(np.uint8)
    else:
        base = rng.standard_normal(img.shape).astype(np.float32)
    others = {s.name: np.full(s.shape, 500.0, np.float32) for s in specs if s is not img}

    def to_parts_and_arrays(canvas):
        arrays = dict(others)
        arrays[img.name] = labels_to_input(canvas, img.shape[1], "bench") if img.kind == "labels" else canvas
        parts = {img.name: npy_bytes(canvas)}
        parts.update({k: npy_bytes(v) for k, v in others.items()})
        return parts, arrays

    def stroke(canvas, j):
        r = np.random.default_rng(seed * 1000 + j)
        cy, cx, rad = int(r.integers(10, h - 10)), int(r.integers(10, w - 10)), int(r.integers(3, 9))
        yy, xx = np.ogrid[0:h, 0:w]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
        out = canvas.copy()
        if img.kind == "labels":
            out[disc] = int(r.integers(0, img.shape[1] - 1))
        else:
            out[:, :, disc] = r.standard_normal((img.shape[1], 1)).astype(np.float32)
        return out

    return base, to_parts_and_arrays, stroke


def plan(art: str, sessions: int, edits: int, commit_at: int):
    """The edit sequences and the expected output digests from a local session (the reference)."""
    import ssic
    from ssic.serve.codec import model_io

    local = ssic.load(art, threads=1)
    inputs = model_io(local.manifest)[0]
    seqs, t0 = [], time.perf_counter()
    for s in range(sessions):
        base, conv, stroke = make_inputs(inputs, seed=s)
        parts, arrays = conv(base)
        local.prime(arrays, cache_id=s)
        steps, canvas = [], base
        for j in range(edits):
            canvas = stroke(canvas, j)
            p, a = conv(canvas)
            out = local.edit(a, cache_id=s)
            steps.append({"parts": p, "digest": _digest(out), "mode": local.last.mode,
                          "commit": j == commit_at})
            if j == commit_at:
                local.commit(cache_id=s)
        local.forget(s)
        seqs.append({"open": parts, "steps": steps})
    return seqs, time.perf_counter() - t0


def _files(parts: dict[str, bytes]) -> dict:
    return {k: (f"{k}.npy", v, "application/octet-stream") for k, v in parts.items()}


def run_phase(url: str, seqs: list, *, dense: bool, deadline: float, kill=None, kill_at: float = 0.5,
              check_dense=None) -> dict:
    """One client thread per session; returns latencies, counts of errors and wrong outputs."""
    total = sum(len(s["steps"]) for s in seqs)
    done = {"n": 0}
    lock = threading.Lock()
    killed = threading.Event()
    lat, model_ms, errors, wrong, reprimed, lost = [], [], [], 0, 0, set()
    per_replica: dict[str, int] = {}

    def one(i: int, seq: dict):
        nonlocal wrong, reprimed
        http = requests.Session()
        r = http.post(f"{url}/v1/sessions", files=_files(seq["open"]), timeout=300)
        if r.status_code != 200:
            with lock:
                errors.append(f"open {r.status_code} {r.text[:200]}")
                lost.add(i)
            return
        sid = r.json()["session"]
        for j, step in enumerate(seq["steps"]):
            if time.monotonic() > deadline:
                break
            t = time.perf_counter()
            r = http.post(f"{url}/v1/sessions/{sid}/edit", files=_files(step["parts"]),
                          data={"mode": "dense"} if dense else {}, timeout=300)
            dt = time.perf_counter() - t
            with lock:
                done["n"] += 1
                if kill is not None and not killed.is_set() and done["n"] >= kill_at * total:
                    killed.set()
                    threading.Thread(target=kill, daemon=True).start()
            if r.status_code != 200:
                with lock:
                    errors.append(f"edit {r.status_code} {r.text[:200]}")
                    lost.add(i)
                return
            body = r.json()
            out = {k: decode_array(v) for k, v in body["outputs"].items()}
            ok = check_dense(i, j, out) if dense else _digest(out) == step["digest"]
            with lock:
                lat.append(dt)
                model_ms.append(float(body["ms"]))
                wrong += ok is False
                reprimed += bool(body.get("reprimed"))
                per_replica[body.get("replica", "?")] = per_replica.get(body.get("replica", "?"), 0) + 1
            if step["commit"] and not dense:
                r = http.post(f"{url}/v1/sessions/{sid}/commit", timeout=300)
                if r.status_code != 200:
                    with lock:
                        errors.append(f"commit {r.status_code} {r.text[:200]}")
                        lost.add(i)
                    return
        http.delete(f"{url}/v1/sessions/{sid}", timeout=60)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(seqs)) as pool:
        list(pool.map(lambda a: one(*a), enumerate(seqs)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {"edits": len(lat), "planned": total, "wall_s": round(wall, 2),
            "throughput_edits_per_s": round(len(lat) / wall, 3) if wall else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
            "model_ms_p50": round(float(np.percentile(model_ms, 50)), 1) if model_ms else None,
            "wrong_outputs": int(wrong), "reprimed_responses": reprimed, "errors": errors[:10],
            "sessions_lost": len(lost), "edits_per_replica": per_replica, "replica_killed": killed.is_set()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artefact", help="compiled artefact (default: GauGAN tiny, built in a temp dir)")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    ap.add_argument("--cache-budget-mb", type=float, default=1024)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of edits after which a replica is killed (<0: never)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline phase")
    ap.add_argument("--deadline-s", type=float, default=1200, help="stop issuing requests after this long")
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args(argv)
    if not 1 <= a.sessions <= 64 or not 1 <= a.edits <= 100:
        ap.error("keep it bounded: 1..64 sessions, 1..100 edits")
    tmp = None
    art = a.artefact
    if art is None:
        import ssic
        from ssic.cli import _tag_model
        from ssic.models import export_model

        tmp = tempfile.TemporaryDirectory()
        onnx = Path(tmp.name) / "gaugan.onnx"
        export_model("gaugan", "tiny", onnx, seed=0)
        _tag_model(onnx, "gaugan", "tiny")
        art = str(Path(tmp.name) / "gaugan.ssic")
        ssic.compile(onnx, target="ort", lowering="fused", output_dir=art)

    seqs, ref_s = plan(art, a.sessions, a.edits, commit_at=a.edits // 2)
    print(f"reference: {a.sessions} x {a.edits} edits locally in {ref_s:.1f} s", file=sys.stderr)

    import ray

    from ssic.serve import server

    info = server.start(art, replicas=a.replicas, port=a.port, cache_budget_mb=a.cache_budget_mb,
                        threads=a.threads, log=lambda m: print(m, file=sys.stderr))
    deadline = time.monotonic() + a.deadline_s
    load_before = os.getloadavg()[0]
    killed_name = {}

    def kill():
        actors = server.replica_actors()
        if actors:
            killed_name["replicas_before"] = len(actors)
            ray.kill(actors[0], no_restart=True)

    try:
        sparse = run_phase(info["url"], seqs, dense=False, deadline=deadline,
                           kill=kill if a.kill_at >= 0 else None, kill_at=a.kill_at)
        report = {"artefact": str(art), "sessions": a.sessions, "edits_per_session": a.edits,
                  "replicas": a.replicas, "threads_per_replica": a.threads,
                  "session_mb": round(info["session_bytes"] / (1 << 20), 1),
                  "sessions_per_replica": info["sessions_per_replica"], "sparse": sparse}
        if not a.no_dense:
            server.wait_healthy(info["url"], 180)
            import ssic

            local = ssic.load(art, threads=1)

            def check_dense(i, j, out):
                if i != 0:  # the dense reference is costly: session 0's edits are checked
                    return None
                from ssic.serve.codec import decode_input, model_io

                p = seqs[i]["steps"][j]["parts"]
                arrays = {s.name: decode_input(s, p[s.name]) for s in model_io(local.manifest)[0]}
                return _digest(local.dense(arrays)) == _digest(out)

            report["dense"] = run_phase(info["url"], seqs, dense=True, deadline=deadline, check_dense=check_dense)
            if report["dense"]["p50_ms"] and sparse["p50_ms"]:
                report["speedup_p50"] = round(report["dense"]["p50_ms"] / sparse["p50_ms"], 2)
                report["speedup_throughput"] = round(sparse["throughput_edits_per_s"]
                                                     / report["dense"]["throughput_edits_per_s"], 2)
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()
    report["load_average_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    report["cpus"] = os.cpu_count()
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    ok = sparse["wrong_outputs"] == 0 and sparse["sessions_lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
