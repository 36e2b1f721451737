"""Divergence guards: no checkpoint with non-finite values, the message naming the last good one and
config.resume_step to resume from it, resuming from an earlier checkpoint, the zero-gradient collapse guard."""

import dataclasses
import json
import logging
import os
import re

import jax.numpy as jnp
import pytest

from gkd_jax import trainer
from test_trainer import losses_by_step, make_config, task  # noqa: F401  (module-scope fixture: tiny models, data)


def steps_on_disk(workdir):
  return sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())


def test_a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(task, tmp_path):
  """learning_rate=1e30 (finite in float32): step 1's update blows the weights up to ~1e30, step 2's loss is
  nan. The run stops at step 2 (counted like checkpoints, from 1) with step 1's checkpoint the last one."""
  workdir = tmp_path / "run"
  config = make_config(task, lmbda=0.0, total_steps=6, save_every=1, learning_rate=1e30, lr_schedule="constant")
  message = (
      rf"the loss is nan at step 2 \(mode dataset\): stopping without saving it. The last good checkpoint is step 1 "
      rf"in {re.escape(str(workdir / 'checkpoints'))}: to resume from it, rerun with --config.resume_step=1"
  )
  with pytest.raises(FloatingPointError, match=message):
    trainer.train(config, str(workdir))
  assert steps_on_disk(workdir) == [1] and not (workdir / ".lock").exists()


def test_non_finite_params_are_never_saved(task, tmp_path):
  """A step whose loss and grad norm are finite but whose update left an inf in the params: the save of that
  step is refused (a jitted all-finite check at save steps only)."""
  setup, state = trainer.build(make_config(task, lmbda=0.0, total_steps=6, save_every=2))
  step, calls = setup.train_step, []

  def poisoned(state, batch):
    state, metrics = step(state, batch)
    calls.append(1)
    if len(calls) == 4:  # step 4: its loss and grads were finite, its update is not; the save at step 4 finds it
      state.params["embed"]["embedding"][...] = state.params["embed"]["embedding"][...].at[0, 0].set(jnp.inf)
    return state, metrics

  setup = dataclasses.replace(setup, train_step=poisoned)
  with pytest.raises(
      FloatingPointError,
      match=r"a parameter is not finite \(inf or nan\) after the update at step 4 \(mode dataset\): stopping "
      r"without saving it. The last good checkpoint is step 2 .* --config.resume_step=2",
  ):
    trainer.run(setup, state, str(tmp_path))
  assert steps_on_disk(tmp_path) == [2]


def test_resume_step_rewinds_once_setting_later_checkpoints_aside(task, tmp_path, caplog):
  workdir = tmp_path / "run"
  trainer.train(make_config(task, lmbda=0.0, total_steps=4, save_every=1, export_on_finish=False), str(workdir))
  full = losses_by_step(workdir)
  assert steps_on_disk(workdir) == [2, 3, 4]
  rewind = make_config(task, lmbda=0.0, total_steps=4, save_every=1, export_on_finish=False, resume_step=2)
  with caplog.at_level(logging.WARNING):
    trainer.train(rewind, str(workdir))
  (aside,) = [p for p in os.listdir(workdir) if p.startswith("checkpoints.set-aside-")]
  assert sorted(os.listdir(workdir / aside)) == ["3", "4"]
  assert "resuming from step 2; the later checkpoints (steps [3, 4]) were moved to" in caplog.text
  assert steps_on_disk(workdir) == [2, 3, 4] and losses_by_step(workdir) == full  # steps 3, 4 trained again
  assert [json.loads(l)["step"] for l in open(workdir / "metrics.jsonl")] == [1, 2, 3, 4]
  # The same command again (as after a preemption): config.json has resume_step=2, so it is not rewound again.
  caplog.clear()
  rerun = make_config(task, lmbda=0.0, total_steps=5, save_every=1, export_on_finish=False, resume_step=2)
  with caplog.at_level(logging.WARNING):
    trainer.train(rerun, str(workdir))
  assert "config.resume_step=2 was applied by an earlier run" in caplog.text
  assert steps_on_disk(workdir) == [3, 4, 5] and sorted(losses_by_step(workdir)) == [1, 2, 3, 4, 5]
  with pytest.raises(ValueError, match=r"config.resume_step=1 is not a checkpoint in .* \(steps: \[3, 4, 5\]\)"):
    trainer.train(make_config(task, lmbda=0.0, total_steps=5, save_every=1, resume_step=1), str(workdir))


def test_a_run_whose_gradients_stay_zero_stops(task, tmp_path):
  """A collapsed student (no gradient signal at all) stops after stop_on_zero_grad_steps steps of exactly 0."""
  setup, state = trainer.build(make_config(task, lmbda=0.0, total_steps=12, save_every=2, stop_on_zero_grad_steps=3))
  step, calls = setup.train_step, []

  def dead(state, batch):  # from step 4 on the global grad norm is exactly 0 (e.g. saturated weights)
    state, metrics = step(state, batch)
    calls.append(1)
    return state, dict(metrics, grad_norm=jnp.zeros(()) if len(calls) >= 4 else metrics["grad_norm"])

  setup = dataclasses.replace(setup, train_step=dead)
  with pytest.raises(
      trainer.Collapsed,
      match=r"the global grad norm was exactly 0 for 3 consecutive steps \(steps 4-6\).* The last good checkpoint "
      r"is step 4 .*Set config.stop_on_zero_grad_steps=0 to train on regardless",
  ):
    trainer.run(setup, state, str(tmp_path))
