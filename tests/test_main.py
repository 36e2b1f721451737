"""The entry point: job dispatch and command-line overrides, on the bigram job (configs/bigram.py)."""

import json
import os
import subprocess
import sys

import pytest

from gkd_jax import main as gkd_main
import recipe_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg=None):
  return recipe_configs.load_config("bigram", arg)


def test_bigram_job_distills(tmp_path):
  config = load_config("runlocal")
  final = gkd_main.run(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len(records) == config.steps
  assert final["jsd"] < 0.1 * records[0]["loss"]
  assert final["top1_agreement"] > 0.9
  modes = [r["mode"] for r in records]
  assert set(modes) == {"on_policy", "dataset"}  # lmbda=0.5, seq_kd off


def test_demo_jobs_refuse_a_bucket_workdir():
  with pytest.raises(ValueError, match=r"--workdir=gs://b/run: the bigram job is an offline CPU demo"):
    gkd_main.run(load_config("runlocal"), "gs://b/run")


def test_cli_flags_override_config(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "gkd_jax.main",
          "--config=configs/bigram.py:runlocal",
          f"--workdir={tmp_path}",
          "--config.beta=1.0",
          "--config.lmbda=1.0",
          "--config.steps=20",
          "--config.log_every=10",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "beta=1.0, lmbda=1.0" in out.stdout
  assert "'on_policy': 20" in out.stdout


def test_transformers_no_torch_notice_is_dropped_and_nothing_else():
  import logging

  import gkd_jax  # noqa: F401  (installs the filter)

  seen = []
  handler = logging.Handler()
  handler.emit = seen.append
  logger = logging.getLogger("transformers")
  logger.addHandler(handler)
  try:  # error level: the filter must not depend on the verbosity the tests run with
    logger.error("PyTorch was not found. Models won't be available and only tokenizers, ... can be used.")
    logger.error("Some weights were not used")
  finally:
    logger.removeHandler(handler)
  assert [r.getMessage() for r in seen] == ["Some weights were not used"]


def run_cli(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "gkd_jax.main", *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )


def test_a_bad_config_value_is_one_error_line_and_its_traceback_only_when_verbose(tmp_path):
  args = ["--config=configs/bigram.py:runlocal", f"--workdir={tmp_path}", "--config.beta=2"]
  out = run_cli(*args)
  assert out.returncode == 1, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "beta must be in [0, 1]" in errors[0] and "got 2.0" in errors[0], out.stderr
  assert "Traceback" not in out.stderr
  verbose = run_cli(*args, "--verbosity=1")
  assert verbose.returncode == 1
  assert "Traceback" in verbose.stderr and "ValueError: beta must be in [0, 1]" in verbose.stderr
  assert not [line for line in verbose.stderr.splitlines() if line.startswith("error:")]


def raised_by(fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001
    return e
  raise AssertionError("did not raise")


def test_only_our_own_errors_count_as_user_errors(tmp_path):
  from gkd_jax import checkpoints, losses

  ours = raised_by(lambda: losses.generalized_jsd_loss(None, None, None, beta=2.0))
  assert gkd_main.is_user_error(ours)
  assert gkd_main.is_user_error(checkpoints.CheckpointError("bad checkpoint"))  # a gkd_jax class, raised anywhere
  assert gkd_main.is_user_error(raised_by(lambda: open(tmp_path / "missing")))  # the message names the path
  assert not gkd_main.is_user_error(raised_by(lambda: int("x")))  # a ValueError from outside gkd_jax
  assert not gkd_main.is_user_error(raised_by(lambda: gkd_main.run(None, str(tmp_path))))  # AttributeError
  assert not gkd_main.is_user_error(KeyError("k"))


def test_a_cpu_run_does_not_probe_the_tpu_backend(tmp_path):
  # With libtpu installed, JAX's TPU probe printed libtpu's "E0000 ... unexpected worker hostname" lines on
  # every CPU run; the entry point sets JAX_PLATFORMS=cpu on a host without accelerators when it is unset.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith(("TPU_", "CLOUD_TPU"))}
  out = run_cli("--config=configs/bigram.py:runlocal", f"--workdir={tmp_path}", "--config.steps=2", env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "E0000" not in out.stderr and "unexpected worker hostname" not in out.stderr, out.stderr[-2000:]
  assert "TPU" not in out.stderr, out.stderr[-2000:]
