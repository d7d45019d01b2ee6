"""The Ray Serve application: an HTTP ingress and N editor replicas.

``Ingress`` (one replica) answers HTTP, checks and decodes requests, and owns the session table: for
each session id the current original (the last committed input, ``ray.put`` into the object store,
owned by the ingress so it outlives any editor replica), its version, the last edit, and a lock that
keeps one session's requests in order. ``Editor`` replicas hold the caches. A request is sent with
``multiplexed_model_id=session id``, so Ray Serve routes it to the replica that already holds the
session (model multiplexing); the replica's ``@serve.multiplexed`` loader primes a session it does
not hold from the stored original, and Ray's per-replica LRU, sized from ``--cache-budget-mb``,
evicts the least recently used session. A response says ``"reprimed": true`` when the replica had
to prime first (a new replica, an evicted session, a replica that died). Edits do not change the
caches, so the ingress retries an edit whose replica died on another replica and gets the same answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from ssic.errors import SSICError
from ssic.serve.codec import (
    IOSpec,
    cache_specs,
    decode_input,
    decode_mask,
    encode_array,
    mask_size,
    model_io,
)

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "editor.js": "text/javascript", "editor.css": "text/css"}
_SESSION_PATH = re.compile(r"^/v1/sessions/([A-Za-z0-9_-]{16,64})(/edit|/commit)?$")


@dataclass
class Limits:
    """Request guards: body bytes, sessions held by the ingress, seconds an editor call may take."""

    max_body_bytes: int
    max_sessions: int = 256
    call_timeout_s: float = 120.0
    retries: int = 6


@dataclass
class _Record:
    base: list  # [ObjectRef of {input name: array}]: the current original
    version: int = 0
    last_edit: list | None = None  # [ObjectRef] of the last edit's inputs
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    used: float = field(default_factory=time.monotonic)


class _Primed:
    """A session's caches on one replica; the multiplexing LRU calls ``__del__`` when it evicts it."""

    def __init__(self, editor, session_id: str, version: int) -> None:
        self.editor, self.session_id, self.version, self.closed = editor, session_id, version, False

    def __del__(self) -> None:
        if not self.closed:
            self.closed = True
            self.editor.sess.forget(self.session_id)
            self.editor._pending.pop(self.session_id, None)


def editor_deployment(max_sessions: int):
    """The ``Editor`` deployment class holding at most ``max_sessions`` primed sessions per replica."""

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=8)
    class Editor:
        """One replica: a loaded artefact whose cache ids are session ids."""

        def __init__(self, artefact: str, threads: int) -> None:
            import ssic

            self.sess = ssic.load(artefact, threads=threads)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self._pending: dict[str, tuple[list, int]] = {}
            self._specs = model_io(self.sess.manifest)[0]
            # one edit at a time per replica: Session.last (mode, seconds) belongs to the latest edit
            # of the whole session object, so concurrent edits would report each other's stats
            self._edit_lock = threading.Lock()

        def _decode(self, parts: dict[str, bytes]) -> dict[str, np.ndarray]:
            # parts were checked by the ingress; decoding here keeps requests and the store small
            return {s.name: decode_input(s, parts[s.name]) for s in self._specs}

        @serve.multiplexed(max_num_models_per_replica=max_sessions)
        async def _primed(self, session_id: str) -> _Primed:
            base, version = self._pending[session_id]
            parts = await base[0]
            await asyncio.to_thread(lambda: self.sess.prime(self._decode(parts), session_id))
            primed = _Primed(self, session_id, version)
            primed.fresh = True
            return primed

        async def _get(self, session_id: str, base: list, version: int) -> tuple[_Primed, bool]:
            """The session's caches at ``version``, primed here if missing or stale; (primed, reprimed)."""
            self._pending[session_id] = (base, version)
            primed = await self._primed(session_id)
            reprimed = getattr(primed, "fresh", False)
            primed.fresh = False
            if primed.version != version or primed.closed:
                parts = await base[0]
                await asyncio.to_thread(lambda: self.sess.prime(self._decode(parts), session_id))
                primed.version, primed.closed, reprimed = version, False, True
            return primed, reprimed

        async def open(self, session_id: str, base: list) -> dict:
            t0 = time.perf_counter()
            await self._get(session_id, base, 0)
            parts = await base[0]
            # an edit with an empty mask returns the primed outputs without running anything
            empty = np.zeros(mask_size(self.sess.manifest), dtype=bool)
            inputs = await asyncio.to_thread(self._decode, parts)

            def cached():
                with self._edit_lock:
                    return self.sess.edit(inputs, empty, session_id)

            out = await asyncio.to_thread(cached)
            return {"outputs": out, "mode": "prime", "ms": 1e3 * (time.perf_counter() - t0),
                    "active_fraction": 1.0, "reprimed": False, "replica": self.replica}

        async def edit(self, session_id: str, base: list, version: int, parts: dict, mask,
                       mode: str, compare_dense: bool) -> dict:
            for attempt in range(2):
                primed, reprimed = await self._get(session_id, base, version)
                try:
                    return await asyncio.to_thread(self._edit, session_id, parts, mask, mode, compare_dense,
                                                   reprimed)
                except SSICError as exc:
                    # evicted by a concurrent request between _get and the edit: prime again, once
                    if attempt == 0 and "unknown cache id" in str(exc):
                        primed.closed = True
                        continue
                    raise
            raise SSICError("session could not be kept primed on this replica (cache budget too small)")

        def _edit(self, session_id, parts, mask, mode, compare_dense, reprimed) -> dict:
            inputs = self._decode(parts)
            with self._edit_lock:
                out = self.sess.edit(inputs, mask=mask, cache_id=session_id, mode=mode)
                st = self.sess.last
            res = {"outputs": out, "mode": st.mode, "ms": 1e3 * st.seconds,
                   "active_fraction": float(st.active_fraction), "macs": int(st.macs),
                   "reprimed": reprimed, "replica": self.replica}
            if compare_dense:
                with self._edit_lock:
                    t0 = time.perf_counter()
                    self.sess.dense(inputs)
                    res["dense_ms"] = 1e3 * (time.perf_counter() - t0)
            return res

        async def commit(self, session_id: str, base: list, version: int) -> dict:
            t0 = time.perf_counter()
            # primes on the new original, not Session.commit's incremental fold: every replica must
            # rebuild the same caches from the stored original alone (after an eviction, on another replica)
            await self._get(session_id, base, version)
            return {"mode": "commit", "ms": 1e3 * (time.perf_counter() - t0), "replica": self.replica}

        def close(self, session_id: str) -> None:
            self.sess.forget(session_id)
            self._pending.pop(session_id, None)

        def stats(self) -> dict:
            return {"replica": self.replica, "sessions": len(self.sess.cache_ids),
                    "cache_bytes": int(self.sess.cache_bytes()), "pid": os.getpid()}

    return Editor


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Ingress:
    """HTTP front: routes, limits, decoding, the session table; calls the editors by session id."""

    def __init__(self, editor, manifest: dict, limits: Limits, replicas: int, session_bytes: int,
                 budget_bytes: int) -> None:
        self.editor = editor
        self.manifest = manifest
        self.inputs, self.outputs = model_io(manifest)
        self.mask_hw = mask_size(manifest)
        self.limits = limits
        self.replicas = replicas
        self.session_bytes, self.budget_bytes = session_bytes, budget_bytes
        self.sessions: dict[str, _Record] = {}

    # ------------------------------------------------------------------ HTTP
    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ray.exceptions.RayTaskError as exc:  # raised in a replica: its message, not its traceback
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SSICError):
                return _error(400, str(cause).splitlines()[0])
            return _error(500, f"internal error ({type(cause).__name__})")
        except SSICError as exc:
            return _error(400, str(exc))
        except asyncio.TimeoutError:
            return _error(504, "the editor did not answer in time")
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            return _error(500, f"internal error ({type(exc).__name__})")

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        if path == "/v1/health" and method == "GET":
            return await self._health()
        if path == "/v1/model" and method == "GET":
            return JSONResponse(self._model_info())
        if path == "/v1/sessions":
            if method != "POST":
                return _error(405, "use POST to open a session")
            return await self._open(request)
        m = _SESSION_PATH.match(path)
        if m:
            sid, action = m.group(1), m.group(2)
            rec = self.sessions.get(sid)
            if rec is None:
                return _error(404, "no such session (closed, never opened, or the server restarted)")
            if action == "/edit" and method == "POST":
                return await self._edit(request, sid, rec)
            if action == "/commit" and method == "POST":
                return await self._commit(sid, rec)
            if action is None and method == "DELETE":
                return await self._close(sid, rec)
            return _error(405, f"{method} is not allowed on {path}")
        if method == "GET" and (path == "/" or path.startswith("/static/")):
            name = "index.html" if path == "/" else path[len("/static/"):]
            if name in STATIC_FILES:
                return FileResponse(STATIC / name, media_type=STATIC_FILES[name])
        return _error(404, f"no route {method} {path}")

    def _model_info(self) -> dict:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs],
                "mask": {"height": self.mask_hw[0], "width": self.mask_hw[1]},
                "replicas": self.replicas, "session_bytes": self.session_bytes,
                "cache_budget_bytes": self.budget_bytes, "max_body_bytes": self.limits.max_body_bytes}

    async def _health(self) -> Response:
        st = serve.status().applications.get("ssic")
        running = 0
        if st is not None:
            for name, dep in st.deployments.items():
                if name == "Editor":
                    running = int(dep.replica_states.get("RUNNING", 0))
        ok = running >= self.replicas
        return JSONResponse({"status": "ok" if ok else "starting", "replicas": running,
                             "sessions": len(self.sessions)}, status_code=200 if ok else 503)

    async def _read_form(self, request: Request) -> dict[str, bytes]:
        limit = self.limits.max_body_bytes
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise _HTTPError(415, "send multipart/form-data with one file part per model input")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _HTTPError(413, f"request body over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _HTTPError(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        allowed = {s.name for s in self.inputs} | {"mask", "mode", "compare_dense"}
        try:
            form = await Request(request.scope, receive).form(max_files=len(allowed), max_fields=len(allowed))
        except Exception:  # noqa: BLE001 - malformed multipart is the client's error
            raise _HTTPError(400, "malformed multipart/form-data body") from None
        parts = {}
        for key, value in form.multi_items():
            if key not in allowed:
                raise _HTTPError(400, f"unknown part '{key}'; parts are the model inputs "
                                      f"{sorted(s.name for s in self.inputs)}, 'mask', 'mode', 'compare_dense'")
            if key in parts:
                raise _HTTPError(400, f"part '{key}' given twice")
            parts[key] = await value.read() if hasattr(value, "read") else str(value).encode()
        return parts

    def _check_inputs(self, parts: dict[str, bytes]) -> dict[str, bytes]:
        """Decode every input part once (raising SSICError for a bad one); returns the input parts."""
        missing = [s.name for s in self.inputs if s.name not in parts]
        if missing:
            raise _HTTPError(400, f"missing part(s) {missing}: one file part per model input")
        for s in self.inputs:
            decode_input(s, parts[s.name])
        return {s.name: parts[s.name] for s in self.inputs}

    async def _call(self, sid: str, method: str, *args):
        """Call an editor method routed by session id; retry on another replica if its replica died."""
        delay = 0.5
        for attempt in range(self.limits.retries + 1):
            handle = getattr(self.editor.options(multiplexed_model_id=sid), method)
            try:
                return await asyncio.wait_for(handle.remote(sid, *args), self.limits.call_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == self.limits.retries:
                    raise _HTTPError(503, "the editor replicas are unavailable; retry later") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _answer(self, sid: str, res: dict, **extra) -> JSONResponse:
        body = {"session": sid, **{k: v for k, v in res.items() if k != "outputs"}, **extra}
        if "outputs" in res:
            body["outputs"] = {k: encode_array(v) for k, v in res["outputs"].items()}
        return JSONResponse(body)

    async def _open(self, request: Request) -> Response:
        try:
            parts = await self._read_form(request)
            inputs = await asyncio.to_thread(self._check_inputs, parts)
        except _HTTPError as exc:
            return _error(exc.status, exc.message)
        if len(self.sessions) >= self.limits.max_sessions:
            self._drop_idle()
            if len(self.sessions) >= self.limits.max_sessions:
                return _error(429, f"{self.limits.max_sessions} sessions are open; close one (DELETE) first")
        sid = secrets.token_urlsafe(24)
        rec = _Record(base=[ray.put(inputs)])
        self.sessions[sid] = rec
        async with rec.lock:
            try:
                res = await self._call(sid, "open", rec.base)
            except BaseException:
                self.sessions.pop(sid, None)
                raise
        return self._answer(sid, res, version=rec.version)

    async def _edit(self, request: Request, sid: str, rec: _Record) -> Response:
        try:
            parts = await self._read_form(request)
            inputs = await asyncio.to_thread(self._check_inputs, parts)
            mask = decode_mask(parts["mask"], self.mask_hw) if "mask" in parts else None
            mode = parts.get("mode", b"auto").decode(errors="replace")
            if mode not in ("auto", "sparse", "dense"):
                raise _HTTPError(400, f"mode must be auto, sparse or dense, got '{mode[:20]}'")
            compare = parts.get("compare_dense", b"0").decode(errors="replace") in ("1", "true")
        except _HTTPError as exc:
            return _error(exc.status, exc.message)
        async with rec.lock:
            rec.used = time.monotonic()
            res = await self._call(sid, "edit", rec.base, rec.version, inputs, mask, mode, compare)
            rec.last_edit = [ray.put(inputs)]
        return self._answer(sid, res, version=rec.version)

    async def _commit(self, sid: str, rec: _Record) -> Response:
        async with rec.lock:
            if rec.last_edit is None:
                return _error(409, "nothing to commit: edit the session first")
            rec.used = time.monotonic()
            rec.base, rec.version, rec.last_edit = rec.last_edit, rec.version + 1, None
            res = await self._call(sid, "commit", rec.base, rec.version)
        return self._answer(sid, res, version=rec.version)

    async def _close(self, sid: str, rec: _Record) -> Response:
        async with rec.lock:
            self.sessions.pop(sid, None)
            try:
                await self._call(sid, "close")
            except _HTTPError:
                pass  # the replica is gone: so are its caches
        return JSONResponse({"session": sid, "closed": True})

    def _drop_idle(self, idle_s: float = 3600.0) -> None:
        now = time.monotonic()
        for sid in [s for s, r in self.sessions.items() if now - r.used > idle_s and not r.lock.locked()]:
            self.sessions.pop(sid, None)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def session_bytes(manifest) -> int:
    """Bytes one primed session holds on a replica: its caches (at their stored dtype: float16 caches
    take 2 bytes a value), the original and the last edited inputs (float32 after decoding), the
    primed outputs and the last edit's (kept for commit)."""
    itemsize = {"float16": 2, "bfloat16": 2, "float64": 8, "double": 8}

    def size(specs) -> int:
        return sum(int(np.prod(c.shape)) * itemsize.get(c.dtype, 4) for c in specs)

    inputs, outputs = model_io(manifest)
    return size(cache_specs(manifest)) + 2 * size(inputs) + 2 * size(outputs)


def max_body_bytes(inputs: list[IOSpec], mask_hw: tuple[int, int]) -> int:
    """Request size limit: twice the raw float32 size of every input and a mask, plus 1 MiB."""
    raw = sum(int(np.prod(s.shape)) * 4 for s in inputs) + mask_hw[0] * mask_hw[1] * 4
    return 2 * raw + (1 << 20)


def build_app(artefact: str, *, replicas: int = 2, cache_budget_mb: float = 1024, threads: int = 1,
              max_sessions: int = 256):
    """The Serve application for ``artefact``; returns ``(app, info)`` where ``info`` holds the sizes.

    Raises SSICError for a bad artefact or a budget too small for one session.
    """
    import ssic

    sess = ssic.load(artefact, threads=1)
    manifest = json.loads(json.dumps(sess.manifest)) if isinstance(sess.manifest, dict) else sess.manifest
    per = max(session_bytes(manifest), 1)
    budget = int(cache_budget_mb * (1 << 20))
    if budget < per:
        raise SSICError(f"--cache-budget-mb {cache_budget_mb} holds no session: one session's caches take "
                        f"{per / (1 << 20):.1f} MB")
    if replicas < 1:
        raise SSICError("--replicas must be >= 1")
    inputs, _ = model_io(manifest)
    limits = Limits(max_body_bytes=max_body_bytes(inputs, mask_size(manifest)), max_sessions=max_sessions)
    editor = editor_deployment(budget // per).options(num_replicas=replicas).bind(str(Path(artefact).resolve()),
                                                                                  threads)
    app = Ingress.bind(editor, manifest, limits, replicas, per, budget)
    return app, {"session_bytes": per, "sessions_per_replica": budget // per, "limits": limits}
