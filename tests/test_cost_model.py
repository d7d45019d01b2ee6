"""The measured cost model behind the dense fallback (ssic/cost_model.py) and its use by Session.edit."""

from __future__ import annotations

import numpy as np
import torch

import ssic
from ssic.cost_model import CostModel


def test_no_measurement_no_opinion():
    cm = CostModel()
    assert not cm.prefers_dense(0.9)
    cm.record_sparse(0.5, 10.0)
    assert not cm.prefers_dense(0.9)  # no dense run seen yet: only the MAC rule applies
    cm = CostModel()
    cm.record_dense(1.0)
    assert not cm.prefers_dense(0.9)  # no sparse run seen yet


def test_prediction_is_the_best_seen_cost_per_mac():
    cm = CostModel(window=3)
    cm.record_dense(2.0)
    cm.record_dense(1.0)  # the fastest dense (or prime) run bounds a dense run
    assert cm.dense_seconds == 1.0
    cm.record_sparse(0.5, 1.6)  # 3.2 s per dense-equivalent
    assert cm.prefers_dense(0.5) and not cm.prefers_dense(0.3)
    cm.record_sparse(0.1, 0.5)  # 5.0 s per dense-equivalent: fixed costs only raise it; the best one stays
    assert abs(cm.predicted_sparse_seconds(0.3) - 0.96) < 1e-9
    for _ in range(3):  # the window forgets the fast sample: the machine got busier
        cm.record_sparse(0.1, 0.5)
    assert abs(cm.predicted_sparse_seconds(0.3) - 1.5) < 1e-9 and cm.prefers_dense(0.3)


def test_explores_sparse_after_a_run_of_dense_choices():
    cm = CostModel(explore=3)
    cm.record_dense(1.0)
    cm.record_sparse(0.5, 2.0)
    assert [cm.prefers_dense(0.5) for _ in range(8)] == [True, True, True, False, True, True, True, False]


def export_two_convs(path):
    """A seeded conv-ReLU-conv model, ``x`` float32 [1, 3, 32, 32] -> ``y`` [1, 3, 32, 32], as ONNX."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["x"], output_names=["y"],
                      dynamo=False)
    return path


def test_session_falls_back_to_dense_where_measured_slower(tmp_path):
    path = export_two_convs(tmp_path / "n.onnx")
    sess = ssic.load(ssic.compile(path, output_dir=tmp_path / "n.ssic", exact=True, fallback_ratio=1.0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    sess.prime({"x": x})
    assert sess.cost.dense_seconds is not None  # the prime run was measured
    edited = x.copy()
    edited[..., 4:20, 4:20] += 1
    out = sess.edit({"x": edited})
    assert sess.last.mode == "sparse" and sess.last.reason == ""
    fraction = sess.last.macs / sess.last.macs_dense
    # the sparse graph's first run (its first allocations; after a release, its load too) is not a
    # measurement of a run: SD 1.5's UNet sent the next 16 edits dense on it
    assert sess.cost.predicted_sparse_seconds(fraction) is None
    sess.edit({"x": edited})
    assert sess.cost.predicted_sparse_seconds(fraction) is not None  # the warm sparse run was measured
    sess.release("sparse")
    sess.cost.forget_sparse()
    sess.edit({"x": edited})  # loads the graph again: not measured
    assert sess.cost.predicted_sparse_seconds(fraction) is None
    # this machine turns out slow at sparse runs: the same edit now runs dense, with the same result
    sess.cost.forget_sparse()
    sess.cost.record_sparse(fraction, 100 * sess.cost.dense_seconds)
    out2 = sess.edit({"x": edited})
    assert sess.last.mode == "dense" and sess.last.reason == "measured"
    np.testing.assert_allclose(out2["y"], out["y"], atol=1e-4)
    # forcing sparse still runs sparse
    sess.edit({"x": edited}, mode="sparse")
    assert sess.last.mode == "sparse"
