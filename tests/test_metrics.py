"""FLOP counts against a hand count, and the matmul ceiling measurement."""

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
