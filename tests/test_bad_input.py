"""Bad input: each case fails with one clear message naming the field / file / row and the rule, before any
model loads where it can, and loses nothing that was on disk."""

import json
import logging
import math

import pytest

from gkd_jax import config as config_lib
from gkd_jax import models, sharding, trainer
from test_config import good
from test_trainer import make_config, task  # noqa: F401  (module-scope fixture: tiny models and task data)

# ------------------------------------------------------------------------------------------------ config

BAD_CONFIG = [
    ({"max_grad_norm": -1.0}, r"config.max_grad_norm=-1.0 is invalid: must be ≥ 0 and finite \(0 = no clip"),
    ({"weight_decay": -0.01}, r"config.weight_decay=-0.01 is invalid: must be ≥ 0 and finite"),
    ({"learning_rate": math.nan}, r"config.learning_rate=nan is invalid: must be ≥ 0 and finite"),
    ({"learning_rate": math.inf}, r"config.learning_rate=inf is invalid: must be ≥ 0 and finite"),
    ({"mesh.data": 0}, r"config.mesh.data=0 is invalid: must be a positive int, or -1 for the devices"),
    ({"mesh.tensor": -2}, r"config.mesh.tensor=-2 is invalid: must be a positive int, or -1"),
    ({"mesh.data": -1}, r"config.mesh=\{'data': -1, 'fsdp': -1, 'tensor': 1\} is invalid: at most one axis may be -1"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIG, ids=[str(i) for i in range(len(BAD_CONFIG))])
def test_bad_config_values(overrides, message):
  c = good()
  for k, v in overrides.items():
    if k.startswith("mesh."):
      c.mesh[k[5:]] = v
    else:
      c[k] = v
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_mesh_of_zero_is_refused_by_make_mesh_too():
  with pytest.raises(ValueError, match=r"mesh axis fsdp=0 is invalid: must be a positive int, or -1"):
    sharding.make_mesh(1, 0, -1)


def test_seq_kd_with_lmbda_one_warns(caplog):
  c = good()
  c.seq_kd, c.lmbda, c.teacher_model = True, 1.0, "/models/t"
  with caplog.at_level(logging.WARNING, logger="gkd_jax.config"):
    config_lib.validate(c)
  assert "config.seq_kd=True never takes effect with config.lmbda=1.0" in caplog.text
  caplog.clear()
  c.lmbda = 0.5
  with caplog.at_level(logging.WARNING, logger="gkd_jax.config"):
    config_lib.validate(c)
  assert "seq_kd" not in caplog.text


def no_model_loads(monkeypatch):
  def refuse(path, *a, **kw):
    raise AssertionError(f"a model was loaded ({path}) before the bad input was reported")

  monkeypatch.setattr(models, "from_pretrained", refuse)


def test_topk_larger_than_the_vocabulary_fails_before_models_load(task, monkeypatch):
  no_model_loads(monkeypatch)
  with pytest.raises(
      ValueError, match=r"config.gkd_logits_topk=64 is invalid: must be at most the tokenizer's " r"vocabulary size 29"
  ):
    trainer.build(make_config(task, gkd_logits_topk=64))
