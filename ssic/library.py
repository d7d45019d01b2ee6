"""Locating and loading ``libssic_ort.so``, the ONNX Runtime custom-op library of the ssic ops."""

from __future__ import annotations

import ctypes
import functools
import numbers
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


#: Symbols the op library exports (plugins/ort/exports.map); a library without them is not ours.
REQUIRED_SYMBOLS = ("RegisterCustomOps", "SSIC_OrtLibraryVersion")
_MAX_LIBRARY_BYTES = 1 << 30
_ELF_MACHINES = {"x86_64": "EM_X86_64", "amd64": "EM_X86_64", "aarch64": "EM_AARCH64", "arm64": "EM_AARCH64"}


def check_library_file(path: str) -> None:
    """Check that ``path`` is a complete ELF shared library exporting the ssic op entry points.

    Done before the file is mapped by ``dlopen`` or ONNX Runtime: a truncated copy would end the
    process with SIGBUS when a page past the end of the file is touched, and a foreign library would
    run its constructors. Checks: size, ELF magic, 64-bit little-endian shared object for this
    machine, every segment and section inside the file, and :data:`REQUIRED_SYMBOLS` defined in
    ``.dynsym`` (read with pyelftools). Raises ``SSICError`` (one line) otherwise.
    """
    import platform

    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    hint = f"point {ENV_VAR} at the ssic build of {LIBRARY_NAME} or rebuild it with `pip install -e .`"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 64 or size > _MAX_LIBRARY_BYTES:
                raise SSICError(f"{path} is not the ssic op library ({size} bytes); {hint}")
            if f.read(4) != b"\x7fELF":
                raise SSICError(f"{path} is not a shared library (no ELF header); {hint}")
            f.seek(0)
            elf = ELFFile(f)
            hdr = elf.header
            want_machine = _ELF_MACHINES.get(platform.machine().lower())
            if elf.elfclass != 64 or not elf.little_endian or hdr["e_type"] != "ET_DYN" or (
                    want_machine and hdr["e_machine"] != want_machine):
                raise SSICError(f"{path} is not a 64-bit shared library for this machine ({hdr['e_machine']}, "
                                f"{hdr['e_type']}); {hint}")
            if hdr["e_shoff"] + hdr["e_shnum"] * hdr["e_shentsize"] > size or \
                    hdr["e_phoff"] + hdr["e_phnum"] * hdr["e_phentsize"] > size:
                raise SSICError(f"{path} is truncated ({size} bytes, its headers end later); {hint}")
            for seg in elf.iter_segments():
                if seg["p_offset"] + seg["p_filesz"] > size:
                    raise SSICError(f"{path} is truncated ({size} bytes, a segment ends at "
                                    f"{seg['p_offset'] + seg['p_filesz']}); {hint}")
            for sec in elf.iter_sections():
                if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > size:
                    raise SSICError(f"{path} is truncated ({size} bytes, section {sec.name} ends at "
                                    f"{sec['sh_offset'] + sec['sh_size']}); {hint}")
            dynsym = elf.get_section_by_name(".dynsym")
            missing = []
            for name in REQUIRED_SYMBOLS:
                syms = dynsym.get_symbol_by_name(name) if dynsym is not None else None
                if not syms or all(s["st_shndx"] == "SHN_UNDEF" for s in syms):
                    missing.append(name)
            if missing:
                raise SSICError(f"{path} is not the ssic op library (it does not export {', '.join(missing)}); {hint}")
    except SSICError:
        raise
    except OSError as exc:
        raise SSICError(f"cannot read the op library {path}: {exc.strerror or exc}") from None
    except (ELFError, Exception) as exc:  # noqa: BLE001 - pyelftools raises assorted errors on damaged files
        raise SSICError(f"{path} is a damaged ELF file ({type(exc).__name__}); {hint}") from None


@functools.cache
def _checked_version(path: str, size: int, mtime_ns: int) -> str:
    check_library_file(path)
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise SSICError(f"{path} is not a loadable op library ({exc}); rebuild it with `pip install -e .`") from None
    fn = lib.SSIC_OrtLibraryVersion
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return fn().decode()


def _version_of(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SSICError(f"cannot read the op library {path}: {exc.strerror or exc}") from None
    return _checked_version(path, st.st_size, st.st_mtime_ns)


def library_version() -> str:
    """Return the version string compiled into ``libssic_ort.so`` (e.g. ``"0.1.0"``).

    The file is checked first (:func:`check_library_file`); raises ``SSICError`` when it is damaged
    or not the ssic library.
    """
    return _version_of(get_library_path())


def max_threads() -> int:
    """The largest thread count :func:`check_threads` accepts: 4 per CPU, at least 64."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_threads(threads) -> int | None:
    """Validate an intra-op thread count; returns it as an int (``None`` = ONNX Runtime's default).

    Accepts integers 1..:func:`max_threads`. ONNX Runtime creates every thread up front, so a huge
    count exhausts memory or crashes the process; zero and negative counts are refused too.
    Raises ``SSICError`` (one line) otherwise.
    """
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise SSICError(f"threads must be an integer, got {threads!r}")
    n = int(threads)
    if not 1 <= n <= max_threads():
        raise SSICError(f"threads must be between 1 and {max_threads()}, got {n}")
    return n


def make_session_options(threads: int | None = None):
    """Return ``onnxruntime.SessionOptions`` with the ssic op library registered.

    ``threads`` sets the intra-op thread count (the ops parallelise on that pool); ``None`` keeps
    ONNX Runtime's default.
    """
    import onnxruntime as ort

    threads = check_threads(threads)
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    path = get_library_path()
    _version_of(path)  # checked before ONNX Runtime maps it
    so.register_custom_ops_library(path)
    return so
