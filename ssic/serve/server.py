"""Start and stop the Ray Serve application (``ssic serve``, the tests and the load benchmark)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from ssic.errors import SSICError

APP_NAME = "ssic"


def _require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SSICError("ssic serve needs Ray Serve: pip install 'ssic[serve]'") from None
    return ray, serve


def start(artefact: str, *, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
          cache_budget_mb: float = 1024, threads: int = 1, address: str | None = None,
          num_cpus: int | None = None, timeout_s: float = 180.0, log=None) -> dict:
    """Start Ray (a local instance, or join ``address``), deploy the app, wait for ``/v1/health``.

    Returns ``{"url", "session_bytes", "sessions_per_replica", "max_body_bytes"}``. Raises SSICError
    for a bad artefact, a budget that holds no session, or replicas that do not come up in ``timeout_s``.
    """
    ray, serve = _require_ray()
    from ssic.serve.deployments import build_app

    app, info = build_app(artefact, replicas=replicas, cache_budget_mb=cache_budget_mb, threads=threads)
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": False, "namespace": "ssic"}
        if address:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError) as exc:
            raise SSICError(f"cannot start or reach Ray ({address or 'local'}): {str(exc).splitlines()[0]}") from None
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_healthy(url, timeout_s)
    if log:
        log(f"serving {artefact} at {url} with {replicas} replica(s); {info['sessions_per_replica']} "
            f"session(s) of {info['session_bytes'] / (1 << 20):.1f} MB per replica")
    return {"url": url, "session_bytes": info["session_bytes"],
            "sessions_per_replica": info["sessions_per_replica"], "max_body_bytes": info["limits"].max_body_bytes}


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    """Poll ``GET /v1/health`` until it answers 200; raises SSICError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SSICError(f"the server at {url} did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.5)


def stop() -> None:
    """Shut down Serve and the local Ray instance started by :func:`start`."""
    ray, serve = _require_ray()
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def replica_actors(deployment: str = "Editor") -> list:
    """Handles of the running replica actors of ``deployment`` (for failure tests: ``ray.kill``)."""
    ray, _ = _require_ray()
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"] if isinstance(a, dict) else a
        if name.startswith("SERVE_REPLICA::") and f"#{deployment}#" in name:
            try:
                out.append(ray.get_actor(name, namespace=a.get("namespace", "serve") if isinstance(a, dict) else "serve"))
            except ValueError:
                pass  # died meanwhile
    return out


def serve_forever(artefact: str, **kwargs) -> None:
    """``ssic serve``: start, then block until Ctrl-C or SIGTERM, then shut down Serve and Ray."""
    import signal

    start(artefact, **kwargs)

    def stop_on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_signal)  # a service manager's stop
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
