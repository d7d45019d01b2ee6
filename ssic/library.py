"""Locating and loading ``libssic_ort.so``, the ONNX Runtime custom-op library of the ssic ops."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from ssic.errors import SSICError

LIBRARY_NAME = "libssic_ort.so"
ENV_VAR = "SSIC_ORT_LIBRARY"
_SUBDIR = "_lib"


def _candidates() -> list[Path]:
    """Places the library may be installed in, most specific first."""
    out: list[Path] = []
    # Regular installs, and editable installs through importlib.resources: scikit-build-core's
    # "redirect" mode gives the package a reader spanning the source tree and the install tree.
    try:
        from importlib.resources import files

        res = files("ssic").joinpath(f"{_SUBDIR}/{LIBRARY_NAME}")
        if hasattr(res, "__fspath__"):
            out.append(Path(os.fspath(res)))
    except Exception:  # noqa: BLE001 - a broken resource reader must not hide the other places
        pass
    # Every search location of the package (source tree and install tree in editable installs).
    import ssic

    for entry in getattr(ssic, "__path__", []):
        out.append(Path(entry) / _SUBDIR / LIBRARY_NAME)
    return out


def get_library_path() -> str:
    """Return the path of ``libssic_ort.so``.

    ``$SSIC_ORT_LIBRARY`` wins when set; otherwise the copy installed in the ``ssic`` package.
    Raises ``SSICError`` when the library cannot be found.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        if not os.path.isfile(env):
            raise SSICError(f"{ENV_VAR}={env} does not exist; unset it or point it at {LIBRARY_NAME}")
        return os.path.abspath(env)
    for path in _candidates():
        if path.is_file():
            return str(path)
    raise SSICError(
        f"{LIBRARY_NAME} (the ssic ONNX Runtime op library) is not built; "
        "build it with `pip install -e .` or `make plugins`"
    )


@functools.cache
def _version_of(path: str) -> str:
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise SSICError(f"{path} is not a loadable op library ({exc}); rebuild it with `pip install -e .`") from None
    fn = lib.SSIC_OrtLibraryVersion
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return fn().decode()


def library_version() -> str:
    """Return the version string compiled into ``libssic_ort.so`` (e.g. ``"0.1.0"``)."""
    return _version_of(get_library_path())


def make_session_options(threads: int | None = None):
    """Return ``onnxruntime.SessionOptions`` with the ssic op library registered.

    ``threads`` sets the intra-op thread count (the ops parallelise on that pool); ``None`` keeps
    ONNX Runtime's default.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.register_custom_ops_library(get_library_path())
    return so
