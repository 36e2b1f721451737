"""FLOP counts against a hand count, the matmul ceiling measurement, MFU clamped at 1, and the optional
wandb logging."""

import logging
import re
import time

import numpy as np
import pytest

from gkd_jax import metrics
from gkd_jax.models import ModelConfig


def tiny_config() -> ModelConfig:
  """3 layers, hidden 16, 4 query / 2 KV heads of 4, MLP 40, vocabulary 100: small enough to count by hand."""
  return ModelConfig(
      model_type="qwen2",
      vocab_size=100,
      hidden_size=16,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=4,
  )


def test_forward_flops_per_token_by_hand():
  c = tiny_config()
  q, kv = 16, 8
  weights = 3 * (16 * (q + 2 * kv) + q * 16 + 3 * 16 * 40) + 16 * 100
  assert metrics.forward_flops_per_token(c, context=10) == 2 * weights + 3 * 4 * q * 10
  split = metrics.step_flops(c, c, batch=2, seq_len=8, completion_len=4, generated=4)
  assert split["student"] == pytest.approx(3 * split["teacher"])
  assert split["generation"] > 0
  assert (
      metrics.step_flops(c, None, 2, 8, 4)["teacher"] == 0 and metrics.step_flops(c, None, 2, 8, 4)["generation"] == 0
  )


def test_vision_flops_match_xla_and_enter_the_step():
  """The tower + projector count against XLA's own count of InternVL.image_features (matmuls dominate at these
  widths; XLA adds the elementwise work), and how a step adds it."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gkd_jax.models import InternVL, InternVLConfig

  vl = InternVLConfig.from_hf_dict(
      {
          "model_type": "internvl",
          "image_token_id": 5,
          "image_seq_length": 4,
          "vision_config": dict(
              hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, image_size=56
          ),
          "text_config": dict(
              model_type="qwen2",
              vocab_size=64,
              hidden_size=256,
              intermediate_size=512,
              num_hidden_layers=1,
              num_attention_heads=4,
              num_key_value_heads=2,
          ),
      }
  )
  graphdef, state = nnx.split(InternVL(vl, rngs=nnx.Rngs(0)))
  features = jax.jit(lambda s, px: nnx.merge(graphdef, s).image_features(px))
  cost = features.lower(state, jnp.zeros((2, 3, 3, 56, 56))).compile().cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  assert xla == pytest.approx(6 * metrics.vision_flops_per_tile(vl), rel=0.08)
  c, tile = vl.text, metrics.vision_flops_per_tile(vl)
  text = metrics.step_flops(c, c, 2, 8, 4, generated=4)
  frozen = metrics.step_flops(c, c, 2, 8, 4, generated=4, tiles=6, student_vision=vl, teacher_vision=vl)
  trained = metrics.step_flops(c, c, 2, 8, 4, tiles=6, student_vision=vl, vision_trained=True)
  assert frozen["student"] - text["student"] == pytest.approx(6 * tile)
  assert frozen["teacher"] - text["teacher"] == pytest.approx(6 * tile)
  assert frozen["generation"] - text["generation"] == pytest.approx(6 * tile)  # the prefill's features, once
  assert trained["student"] - text["student"] == pytest.approx(18 * tile)


def test_peak_flops_is_positive_and_finite():
  peak = metrics.measure_peak_flops(n=128, repeats=1)
  assert 1e6 < peak < 1e16


def test_mfu_over_one_is_clamped_and_warned_about_once(monkeypatch, caplog):
  monkeypatch.setattr(metrics, "_mfu_over_one_warned", False)
  c = tiny_config()
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


class FakeWandb:
  """Records what MetricsWriter asks of wandb (stands in for the module in sys.modules)."""

  def __init__(self):
    self.inits, self.logs, self.finished = [], [], []

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, data, step):
    self.logs.append((step, dict(data)))

  def finish(self, exit_code=0):
    self.finished.append(exit_code)


def wandb_config(**overrides):
  from gkd_jax import config as config_lib

  c = config_lib.base_config()
  c.wandb_project, c.wandb_run_name = "gkd", "tiny"
  c.teacher_model_server_api_key = "sk-secret"
  c.update(overrides)
  return c


def test_wandb_gets_the_records_and_the_redacted_config_and_resumes_by_id(tmp_path, monkeypatch):
  import sys

  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  writer = metrics.MetricsWriter(str(tmp_path), config=wandb_config())
  writer.write({"step": 1, "loss": 0.5, "mode": "dataset", "finite": True})
  writer.write({"step": 2, "loss": 0.25, "lr": 1e-3})
  writer.write({"step": 2, "jsd": 0.1}, prefix="eval")
  writer.close()
  assert fake.logs == [(1, {"train/loss": 0.5}), (2, {"train/loss": 0.25, "train/lr": 1e-3}), (2, {"eval/jsd": 0.1})]
  (init,) = fake.inits
  assert init["project"] == "gkd" and init["name"] == "tiny" and init["entity"] is None
  run_id = init["id"]
  assert re.fullmatch("[0-9a-f]{12}", run_id) and init["resume"] == "allow" and init["dir"] == str(tmp_path)
  assert init["config"]["teacher_model_server_api_key"] == "<redacted>" and init["config"]["wandb_project"] == "gkd"
  assert "sk-secret" not in repr(init)
  assert (tmp_path / "wandb_run_id").read_text() == run_id + "\n" and fake.finished == [0]

  again = metrics.MetricsWriter(str(tmp_path), resumed_step=1, config=wandb_config())  # a restart
  again.close()
  assert fake.inits[1]["id"] == run_id and fake.inits[1]["resume"] == "allow"

  off = metrics.MetricsWriter(str(tmp_path / "off"), config=wandb_config(wandb_project=None))
  off.write({"step": 1, "loss": 0.5})
  off.close()
  assert len(fake.inits) == 2 and not (tmp_path / "off" / "wandb_run_id").exists()


def test_wandb_project_without_wandb_installed_is_a_clear_error(monkeypatch):
  import sys

  from gkd_jax import config as config_lib

  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  c = wandb_config(model="m", dataset="d")
  with pytest.raises(ValueError, match=r"config.wandb_project='gkd' is invalid: .*pip install -e '.\[wandb\]'"):
    config_lib.validate(c)


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
  monkeypatch.setenv("WANDB_SILENT", "true")
  (tmp_path / "wandb_dir").mkdir()
  workdir = tmp_path / "run"
  writer = metrics.MetricsWriter(str(workdir), config=wandb_config())
  for step in (1, 2, 3):
    writer.write({"step": step, "distill_loss": 1.0 / step})
  writer.write({"step": 3, "top1_agreement": 0.75}, prefix="eval")
  writer.close()
  run_id = (workdir / "wandb_run_id").read_text().strip()
  (data,) = (tmp_path / "wandb_dir").rglob(f"run-{run_id}.wandb")
  # wandb's service process writes the file behind finish(): on a loaded host its records land a little later.
  deadline = time.time() + 60
  while b"eval/top1_agreement" not in data.read_bytes() and time.time() < deadline:
    time.sleep(0.2)
  raw = data.read_bytes()
  assert b"train/distill_loss" in raw and b"eval/top1_agreement" in raw and b"0.75" in raw
  assert b"<redacted>" in raw and b"sk-secret" not in raw
