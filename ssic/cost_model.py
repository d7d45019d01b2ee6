"""A measured cost model for the dense fallback: is a sparse run predicted to beat a dense one here?

The compile-time rule (``fallback_ratio``, a fraction of the dense MACs) assumes a sparse MAC costs
what a dense one does. It does not: the gathers and the small GEMMs of a sparse run reach 0.2-0.9 of
ONNX Runtime's dense throughput per MAC depending on the model, the edit and the machine (measured on
trained Real-ESRGAN: a 30% edit ran 1.6x *slower* sparse than dense at half the dense MACs,
BENCHMARKS.md). So the session measures what it runs.

Model: a sparse run that does a fraction ``f`` of the dense MACs costs at least ``c * f`` seconds,
where ``c`` (seconds per dense-model-equivalent of MACs) is the smallest ``seconds / f`` seen over the
recent sparse runs, a lower bound because fixed per-run costs only add to it; a dense run costs ``d``
seconds, the smallest seen over dense runs and prime runs (a prime run is a dense run plus cache
writes, so it bounds ``d`` from above). The session runs dense when ``c * f > d``. Both estimates err
towards sparse, so the model never sends an edit dense that the measurements do not show to be
slower; until both a sparse and a dense (or prime) run have been seen, only the MAC rule applies.
After ``explore`` dense choices in a row the next edit runs sparse anyway, so the estimate follows a
machine whose load changed instead of keeping its last sparse samples for ever.
"""

from __future__ import annotations

import threading
from collections import deque


class CostModel:
    """Online estimate of dense and sparse run times of one session (thread-safe).

    ``window``: how many recent sparse runs define ``c`` (old ones age out, so a machine that gets
    busier or quieter is followed).
    """

    def __init__(self, window: int = 8, explore: int = 16) -> None:
        self._lock = threading.Lock()
        self._per_model: deque[float] = deque(maxlen=window)
        self.dense_seconds: float | None = None
        self.explore = explore
        self._dense_in_a_row = 0

    def record_dense(self, seconds: float) -> None:
        """A dense (or prime: an upper bound of dense) run took ``seconds``."""
        if seconds > 0:
            with self._lock:
                self.dense_seconds = seconds if self.dense_seconds is None else min(self.dense_seconds, seconds)

    def record_sparse(self, mac_fraction: float, seconds: float) -> None:
        """A sparse run doing ``mac_fraction`` (sparse MACs / dense MACs, > 0) of the work took ``seconds``."""
        if mac_fraction > 0 and seconds > 0:
            with self._lock:
                self._per_model.append(seconds / mac_fraction)

    def forget_sparse(self) -> None:
        """Drop the sparse measurements (say, after the machine's load changed)."""
        with self._lock:
            self._per_model.clear()

    def predicted_sparse_seconds(self, mac_fraction: float) -> float | None:
        """Lower bound of a sparse run's seconds at ``mac_fraction``, or None before any sparse run."""
        with self._lock:
            return min(self._per_model) * mac_fraction if self._per_model else None

    def prefers_dense(self, mac_fraction: float) -> bool:
        """Whether the measurements show a sparse run at ``mac_fraction`` to be slower than a dense run
        (False every ``explore``-th time in a row, to measure sparse again)."""
        predicted = self.predicted_sparse_seconds(mac_fraction)
        slower = predicted is not None and self.dense_seconds is not None and predicted > self.dense_seconds
        with self._lock:
            if slower and self._dense_in_a_row >= self.explore:
                slower = False
            self._dense_in_a_row = self._dense_in_a_row + 1 if slower else 0
        return slower
