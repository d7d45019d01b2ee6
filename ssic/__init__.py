"""ssic: a spatially sparse inference compiler for generative image models.

Public API::

    ssic.compile(model_path, target="ort", lowering="fused", output_dir="out/")
    sess = ssic.load("out/")
    sess.prime({"x": original}); sess.edit({"x": edited}, mask=mask)
"""

from __future__ import annotations

from ssic.errors import SSICError

__version__ = "0.1.0"

__all__ = ["SSICError", "__version__", "compile", "load", "get_library_path"]


def __getattr__(name: str):
    # Lazy imports keep `import ssic` fast and free of onnxruntime/torch until needed.
    if name == "compile":
        from ssic.compiler import compile_model

        return compile_model
    if name == "load":
        from ssic.runtime import load

        return load
    if name == "get_library_path":
        from ssic.library import get_library_path

        return get_library_path
    raise AttributeError(f"module 'ssic' has no attribute {name!r}")
