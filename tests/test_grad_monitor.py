"""utils/monitoring/grad_monitor.py: per-layer gradient norms, vanishing/exploding flags, rate-limited warnings."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from utils.monitoring.grad_monitor import GradientMonitor


def test_gradient_monitor_flags_vanishing_and_exploding_layers(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    for i, scale in enumerate((0.0, 1e6, 1.0)):
        for p in model[i].parameters():
            p.grad = torch.full_like(p, scale)
    # model[3] has no gradient at all: skipped, not flagged
    monitor = GradientMonitor(vanishing_threshold=1e-8, exploding_threshold=1e3, warn_interval=5)
    with caplog.at_level(logging.WARNING, logger="utils.monitoring.grad_monitor"):
        metrics = monitor.observe(model, step=1)
    assert metrics["grad_monitor/vanishing_layers"] == 1 and metrics["grad_monitor/exploding_layers"] == 1
    assert monitor.last_vanishing == ["0"] and monitor.last_exploding == ["1"]
    assert metrics["grad_monitor/min_norm"] == 0.0 and metrics["grad_monitor/max_norm"] == pytest.approx(1e6 * math.sqrt(12))
    assert "vanishing" in caplog.text and "0=0" in caplog.text and "1=3.46e+06" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="utils.monitoring.grad_monitor"):
        for step in range(2, 6):
            monitor.observe(model, step)
    assert caplog.text == ""  # at most one warning per warn_interval steps
    assert monitor.vanishing_total == 5 and monitor.exploding_total == 5
    restored = GradientMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.observe(model, 6)["grad_monitor/vanishing_total"] == 6  # counters survive a resume
