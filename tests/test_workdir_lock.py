"""The workdir lock: one run per workdir (a second one is refused before anything loads, naming the holder),
stale locks of dead processes taken over, and the lock released however a run ends."""

import json
import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from gkd_jax import checkpoints, models, rollout, trainer, workdir_lock
from test_trainer import make_config, task, write_config  # noqa: F401  (module-scope fixture: tiny models, data)


def dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def no_model_loads(monkeypatch):
  def refuse(path, *a, **kw):
    raise AssertionError(f"a model was loaded ({path}) although the workdir is locked")

  monkeypatch.setattr(models, "from_pretrained", refuse)


def holder_pattern(lock):
  h = lock.holder
  return rf"host {re.escape(h['host'])}, pid {h['pid']}, started {re.escape(h['start_time'])}"


def test_a_second_run_in_a_locked_workdir_is_refused_before_loading(task, tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  lock = workdir_lock.acquire(str(workdir))
  assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
  with monkeypatch.context() as m:
    no_model_loads(m)
    with pytest.raises(
        workdir_lock.WorkdirLocked,
        match=rf"--workdir={re.escape(str(workdir))} is in use by another run: {holder_pattern(lock)} holds its lock",
    ):
      trainer.train(make_config(task), str(workdir))
    with pytest.raises(workdir_lock.WorkdirLocked):  # a lock is not re-entrant: a second taker is refused
      workdir_lock.acquire(str(workdir))

  # The CLI in another process: refused at start-up with the same message, nothing written.
  config = write_config(task, tmp_path / "cfg.py", total_steps=2)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "gkd_jax.main", f"--config={config}", f"--workdir={workdir}"],
      env=env,
      capture_output=True,
      timeout=600,
  )
  err = proc.stderr.decode()
  assert proc.returncode != 0 and re.search(rf"is in use by another run: {holder_pattern(lock)}", err), err[-2000:]
  assert sorted(os.listdir(workdir)) == [".lock"]  # no config.json, metrics or checkpoints
  lock.release()
  assert not (workdir / ".lock").exists()
  workdir_lock.acquire(str(workdir)).release()  # free again


def test_a_stale_lock_is_taken_over_held_for_the_run_and_released(task, tmp_path, monkeypatch, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  stale = {"host": socket.gethostname(), "pid": dead_pid(), "start_time": "2020-01-01T00:00:00+0000"}
  (workdir / ".lock").write_text(json.dumps(stale))  # left by a run killed with -9 (its flock went with it)
  real_build, seen = trainer.build, []

  def build(config):
    seen.append(json.loads((workdir / ".lock").read_text()))  # held while the run loads and trains
    return real_build(config)

  monkeypatch.setattr(trainer, "build", build)
  with caplog.at_level(logging.WARNING, logger="gkd_jax.workdir_lock"):
    trainer.train(make_config(task, lmbda=0.0, total_steps=2), str(workdir))
  assert f"taking over the stale lock {workdir / '.lock'} of host {stale['host']}, pid {stale['pid']}" in caplog.text
  assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
  assert not (workdir / ".lock").exists()  # released after a normal run


def test_the_lock_is_released_after_preemption_and_errors(task, tmp_path, monkeypatch):
  with monkeypatch.context() as m:
    m.setattr(checkpoints, "_preemption_requested", lambda: True)  # SIGTERM arrived during step 1
    with pytest.raises(checkpoints.Preempted, match="preempted: saved step 1"):
      trainer.train(make_config(task, lmbda=0.0, total_steps=2), str(tmp_path / "preempted"))
  assert sorted(os.listdir(tmp_path / "preempted" / "checkpoints")) == ["1"]
  assert not (tmp_path / "preempted" / ".lock").exists()

  def fail(*a, **kw):
    raise RuntimeError("the data source failed")

  monkeypatch.setattr(rollout.BatchSource, "get", fail)
  with pytest.raises(RuntimeError, match="the data source failed"):
    trainer.train(make_config(task, lmbda=0.0, total_steps=2), str(tmp_path / "failed"))
  assert not (tmp_path / "failed" / ".lock").exists()
