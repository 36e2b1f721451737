"""FLOP counts against a hand count, the matmul ceiling measurement, MFU clamped at 1."""

import logging

import numpy as np
import pytest

from gkd_jax import metrics
from gkd_jax.models import ModelConfig


def test_forward_flops_per_token_by_hand():
  c = ModelConfig(
      model_type="qwen2",
      vocab_size=100,
      hidden_size=16,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=4,
  )
  q, kv = 16, 8
  weights = 3 * (16 * (q + 2 * kv) + q * 16 + 3 * 16 * 40) + 16 * 100
  assert metrics.forward_flops_per_token(c, context=10) == 2 * weights + 3 * 4 * q * 10
  split = metrics.step_flops(c, c, batch=2, seq_len=8, completion_len=4, generated=4)
  assert split["student"] == pytest.approx(3 * split["teacher"])
  assert split["generation"] > 0
  assert (
      metrics.step_flops(c, None, 2, 8, 4)["teacher"] == 0 and metrics.step_flops(c, None, 2, 8, 4)["generation"] == 0
  )


def test_peak_flops_is_positive_and_finite():
  peak = metrics.measure_peak_flops(n=128, repeats=1)
  assert 1e6 < peak < 1e16


def test_mfu_over_one_is_clamped_and_warned_about_once(monkeypatch, caplog):
  monkeypatch.setattr(metrics, "_mfu_over_one_warned", False)
  c = ModelConfig(
      model_type="qwen2",
      vocab_size=100,
      hidden_size=16,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=4,
  )
  batch = {"prompt_ids": np.zeros((4, 6), np.int32), "completion_ids": np.zeros((4, 5), np.int32)}
  step = lambda peak: metrics.throughput(c, c, 4, batch, "on_policy", 0.1, 0.1, 0.2, peak)
  flops = sum(metrics.step_flops(c, c, 4, 11, 5, generated=5).values())
  with caplog.at_level(logging.WARNING, logger="gkd_jax.metrics"):
    assert step(flops / 0.2 * 4)["mfu"] == pytest.approx(0.25, rel=1e-4)  # a sane ceiling: reported as is
    assert not caplog.records
    assert step(flops / 0.2 / 1.72)["mfu"] == 1.0  # a ceiling below the step's actual rate: MFU 1.72
    assert step(flops / 0.2 / 3.0)["mfu"] == 1.0
  assert len(caplog.records) == 1
  assert "MFU estimate 1.72 > 1: the measured matmul ceiling" in caplog.text
  assert "is below the step's actual rate" in caplog.text and "config.peak_flops" in caplog.text
