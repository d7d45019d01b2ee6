"""Run any ssic graph with ONNX's reference evaluator and the NumPy op references.

Slow, but independent of the C++ kernels and of ONNX Runtime: tests use it as the oracle for the
compiled graphs, and it helps debugging a lowering (``ssic verify --reference``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ssic import ops


class _TileGather(OpRun):
    op_domain = ops.DOMAIN

    def _run(self, tiles, cache, src_idx, dst_idx, scale=None, shift=None, **attrs):
        kw = {a.name: getattr(self, a.name) for a in ops.TILE_GATHER.attributes}
        return (ops.tile_gather_ref(tiles, cache, src_idx, dst_idx, scale, shift, **kw),)


class _TileScatter(OpRun):
    op_domain = ops.DOMAIN

    def _run(self, tiles, cache, idx, residual=None, **attrs):
        kw = {a.name: getattr(self, a.name) for a in ops.TILE_SCATTER.attributes}
        return (ops.tile_scatter_ref(tiles, cache, idx, residual, **kw),)


class _TileConv(OpRun):
    op_domain = ops.DOMAIN

    def _run(self, tiles, cache, src_idx, dst_idx, weight, scale=None, shift=None, bias=None, addend=None, **attrs):
        kw = {a.name: getattr(self, a.name) for a in ops.TILE_CONV.attributes}
        return (ops.tile_conv_ref(tiles, cache, src_idx, dst_idx, weight, scale, shift, bias, addend, **kw),)


_TileGather.__name__ = ops.TILE_GATHER.name
_TileScatter.__name__ = ops.TILE_SCATTER.name
_TileConv.__name__ = ops.TILE_CONV.name
for _cls, _spec in ((_TileGather, ops.TILE_GATHER), (_TileScatter, ops.TILE_SCATTER), (_TileConv, ops.TILE_CONV)):
    _cls.op_schema = None
    for _a in _spec.attributes:
        setattr(_cls, _a.name, _a.default)


def run_reference(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict:
    """Evaluate ``model`` on ``feeds``; returns ``{output name: array}``."""
    sess = ReferenceEvaluator(model, new_ops=[_TileGather, _TileScatter, _TileConv])
    names = outputs or list(sess.output_names)
    return dict(zip(names, sess.run(names, feeds), strict=True))
