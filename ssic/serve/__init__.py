"""Serving editing sessions over HTTP on Ray Serve (``ssic serve``; ``pip install 'ssic[serve]'``).

The HTTP API is documented in ``docs/serving.md``; :mod:`ssic.serve.deployments` holds the Ray Serve
application, :mod:`ssic.serve.codec` the request/response encoding, :mod:`ssic.serve.server` the
start/stop helpers, ``static/`` the browser editor.
"""

from __future__ import annotations

__all__ = ["start", "stop", "serve_forever"]


def __getattr__(name: str):
    # Ray is imported only when serving is used.
    if name in __all__:
        from ssic.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'ssic.serve' has no attribute {name!r}")
