"""Where ssic may write: output-directory checks for ``--force``, file modes, output-file checks.

The rules (each failure is one ``SSICError`` line, raised before anything is written or removed):

- ``compile -o DIR --force`` replaces ``DIR`` only when it is an ssic artefact (a ``manifest.json``
  with ``"format": "ssic-artefact"``), never the model's folder, the working folder or a folder that
  contains either of them; any other existing path is refused and left untouched;
- directories and files ssic creates get the modes the process's umask gives ordinary files
  (usually 0755/0644), not the 0700/0600 of temporary names they are written under;
- an output file (``ssic edit -o``) has a suffix of :data:`OUTPUT_SUFFIXES`, lies in an existing
  writable directory and is none of the command's input files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ssic.errors import SSICError

#: Suffixes ``ssic edit -o`` writes (case-insensitive): an image (8-bit RGB) or the model output as is.
OUTPUT_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".npy": "NPY"}
OUTPUT_SUFFIXES_TEXT = ".jpg, .jpeg, .png or .npy"


def is_artefact_dir(path: Path) -> bool:
    """True when ``path`` is a directory holding an ssic manifest (``"format": "ssic-artefact"``)."""
    mf = Path(path) / "manifest.json"
    try:
        if not mf.is_file() or mf.stat().st_size > 64 * 2**20:
            return False
        data = json.loads(mf.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == "ssic-artefact"


def _protected_dirs(protected: Iterable[str | os.PathLike]) -> list[Path]:
    dirs = [Path.cwd().resolve()]
    for p in protected:
        p = Path(p).resolve()
        dirs.append(p if p.is_dir() else p.parent)
    return dirs


def check_output_dir(out: str | os.PathLike, *, force: bool, protected: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output directory that ssic must not create or replace; returns None when it may.

    ``protected`` are the command's inputs (files or folders): a file protects its folder. The
    working folder is always protected. With ``force`` an existing ``out`` may be replaced only when
    it is an ssic artefact directory that is not protected and contains nothing protected.
    Raises ``SSICError`` (one line) otherwise; nothing is touched either way.
    """
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise SSICError(f"output directory {out} exists (use --force to replace it)")
    if out.is_symlink():
        raise SSICError(f"refusing to replace {out} with --force: it is a symbolic link; remove it yourself")
    if not out.is_dir():
        raise SSICError(f"refusing to replace {out} with --force: it is a file, not an artefact directory")
    resolved = out.resolve()
    for d in _protected_dirs(protected):
        if resolved == d or resolved in d.parents:
            what = "the working folder" if d == Path.cwd().resolve() else f"the input's folder {d}"
            raise SSICError(f"refusing to replace {out} with --force: it is or contains {what}")
    if not is_artefact_dir(out):
        raise SSICError(f"refusing to replace {out} with --force: it is not an ssic artefact (no ssic "
                        "manifest.json); choose another -o or remove it yourself")


def umask() -> int:
    """The process's file-mode creation mask (read from /proc where possible, so it is not changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes of ordinary new files and directories.

    Directories get ``0777 & ~umask`` (usually 0755), files ``0666 & ~umask`` (usually 0644):
    ``tempfile.mkdtemp``/``mkstemp`` create 0700/0600, and that mode would survive a rename.
    """
    mask = umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def check_output_file(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      suffixes: dict[str, str] | None = None, what: str = "output") -> str:
    """Check that ``path`` can be written as an output file; returns its format (e.g. ``"PNG"``).

    The suffix must be one of ``suffixes`` (default :data:`OUTPUT_SUFFIXES`, case-insensitive), the
    folder must exist and be writable, ``path`` must not be a directory or one of ``inputs``.
    Raises ``SSICError`` (one line) otherwise.
    """
    suffixes = OUTPUT_SUFFIXES if suffixes is None else suffixes
    path = Path(path)
    fmt = suffixes.get(path.suffix.lower())
    if fmt is None:
        accepted = OUTPUT_SUFFIXES_TEXT if suffixes is OUTPUT_SUFFIXES else ", ".join(sorted(suffixes))
        raise SSICError(f"{what} must end in {accepted}, got {path.name or str(path)}")
    parent = path.parent
    if not parent.exists():
        raise SSICError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise SSICError(f"cannot write {path}: {parent} is not a directory")
    if path.is_dir():
        raise SSICError(f"cannot write {path}: it is a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SSICError(f"cannot write {path}: permission denied")
    for p in inputs:
        if p is not None and Path(p).exists() and path.exists() and os.path.samefile(p, path):
            raise SSICError(f"{what} {path} is one of the input files; choose another -o")
    return fmt


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call ``write(file object)`` on a temporary file next to ``path``, then rename it to ``path``.

    A failure (disk full, Ctrl-C) leaves ``path`` as it was. The file gets the umask's usual mode.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
