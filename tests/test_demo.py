"""The README's main command (configs/default.py, job "demo"): the whole pipeline at runlocal size."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from gkd_jax import evaluate, models
from gkd_jax import main as gkd_main
import recipe_configs
from gkd_jax.demos import arithmetic as demo
from gkd_jax.tasks import arithmetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg=None):
  return recipe_configs.load_config("default", arg)


def test_smoke_is_runlocal_and_other_args_are_an_error():
  assert load_config("smoke").to_dict() == load_config("runlocal").to_dict()
  assert load_config("smoke").teacher.total_steps < load_config().teacher.total_steps
  with pytest.raises(ValueError, match=r"configs/default.py:fast is invalid: the arg must be one of \(''"):
    load_config("fast")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  config = load_config("runlocal")
  return config, str(workdir), gkd_main.run(config, str(workdir))


def test_demo_writes_the_three_accuracies(demo_run):
  config, workdir, results = demo_run
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == results
  assert list(results["models"]) == ["teacher", "student_sft", "gkd"]
  assert results["count"] == config.task.num_test
  for name, m in results["models"].items():
    assert 0.0 <= m["chain_accuracy"] <= m["accuracy"] <= 1.0
    assert os.path.exists(os.path.join(workdir, name, "DONE"))
    assert models.load_tokenizer(m["checkpoint"]).get_vocab() == arithmetic.make_tokenizer().get_vocab()
  # The student is the smaller model, and GKD trained the SFT student's architecture.
  assert results["models"]["student_sft"]["params"] == results["models"]["gkd"]["params"]
  assert results["models"]["student_sft"]["params"] < results["models"]["teacher"]["params"]
  # Each training phase went through the trainer (its metrics) for the configured number of steps.
  for name, phase in (("teacher", config.teacher), ("student_sft", config.student_sft), ("gkd", config.gkd)):
    records = [json.loads(line) for line in open(os.path.join(workdir, name, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, phase.total_steps + 1))
  modes = {json.loads(line)["mode"] for line in open(os.path.join(workdir, "gkd", "metrics.jsonl"))}
  assert "on_policy" in modes  # runlocal keeps lmbda=0.5; its 4 steps draw both kinds with seed 0
  assert "distill_loss" in json.loads(open(os.path.join(workdir, "gkd", "metrics.jsonl")).readline())


def test_two_fresh_runs_write_bitwise_identical_weights(demo_run, tmp_path):
  """The README's main command at smoke size, run again from nothing by the CLI in a fresh process: every
  phase's exported weights equal the first run's bit for bit (seeded data, init and sampling)."""
  _, first, _ = demo_run
  again = tmp_path / "again"
  subprocess.run(
      [sys.executable, "-m", "gkd_jax.main", "--config=configs/default.py:smoke", f"--workdir={again}"],
      cwd=ROOT,
      check=True,
      capture_output=True,
      timeout=900,
  )
  for phase in ("teacher", "student_sft", "gkd"):
    ours = load_file(os.path.join(first, phase, "export", "model.safetensors"))
    theirs = load_file(str(again / phase / "export" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
      np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{phase}: {name}")


def test_rerun_skips_finished_phases(demo_run):
  config, workdir, _ = demo_run
  stamps = {name: os.path.getmtime(os.path.join(workdir, name, "DONE")) for name in demo.PHASES}
  out = subprocess.run(
      [sys.executable, "-m", "gkd_jax.main", "--config=configs/default.py:runlocal", f"--workdir={workdir}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  for name in demo.PHASES:
    assert f"[{name}] cached" in out.stdout
    assert os.path.getmtime(os.path.join(workdir, name, "DONE")) == stamps[name]
  assert "student, distilled (GKD)" in out.stdout


def test_moved_workdir_keeps_its_phases(demo_run, tmp_path, capsys):
  config, workdir, results = demo_run
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  again = demo.run(config, moved)
  out = capsys.readouterr().out
  for name in demo.PHASES:
    assert f"[{name}] cached" in out
    assert again["models"][name]["accuracy"] == results["models"][name]["accuracy"]
    assert again["models"][name]["checkpoint"].startswith(moved)


def test_interrupted_phase_resumes_and_changed_settings_redo_it(demo_run, tmp_path):
  # On the shared finished run, in place (its trainer checkpoints name absolute paths, so a copy elsewhere
  # could not resume), put back as it was afterwards for the other tests.
  _, workdir, _ = demo_run
  backup = str(tmp_path / "backup")
  shutil.copytree(workdir, backup)  # copy2: the DONE files keep their times
  try:
    _interrupt_resume_and_redo(load_config("runlocal"), workdir)
  finally:
    shutil.rmtree(workdir)
    shutil.move(backup, workdir)


def _interrupt_resume_and_redo(config, workdir: str):
  done = lambda name: os.path.join(workdir, name, "DONE")
  stamps = {name: os.path.getmtime(done(name)) for name in demo.PHASES}
  metrics = os.path.join(workdir, "gkd", "metrics.jsonl")
  log = open(metrics).read()
  # Killed after its last checkpoint but before DONE: the rerun resumes there instead of training again.
  os.remove(done("gkd"))
  demo.run(config, workdir)
  assert os.path.exists(done("gkd")) and open(metrics).read() == log
  # Changed GKD settings redo GKD from scratch, and only GKD.
  config.gkd.beta = 1.0
  demo.run(config, workdir)
  assert os.path.getmtime(done("teacher")) == stamps["teacher"]
  assert os.path.getmtime(done("student_sft")) == stamps["student_sft"]
  assert os.path.getmtime(done("gkd")) > stamps["gkd"]
  records = [json.loads(line) for line in open(metrics)]
  assert [r["step"] for r in records] == list(range(1, config.gkd.total_steps + 1))


def test_evaluate_scores_generations(demo_run):
  _, workdir, results = demo_run
  path = results["models"]["teacher"]["checkpoint"]
  model, tokenizer = models.from_pretrained(path), models.load_tokenizer(path)
  rows = arithmetic.load_task(os.path.join(workdir, "task"))["test"].select(range(5))
  greedy = evaluate.generate_completions(model, tokenizer, rows, max_new_tokens=8, batch_size=4)
  assert len(greedy) == 5  # a filler-padded last batch is cut back
  assert greedy == evaluate.generate_completions(model, tokenizer, rows, max_new_tokens=8, batch_size=2)
  sampled = evaluate.accuracy(model, tokenizer, rows, max_new_tokens=8, batch_size=4, temperature=1.0, seed=3)
  assert sampled["count"] == 5
  # The scorer sees exactly the generated text: a checker that counts completions gets them all.
  count = evaluate.accuracy(
      model,
      tokenizer,
      rows,
      max_new_tokens=8,
      batch_size=4,
      evaluate_fn=lambda completions, rows: {"n": len(completions)},
  )
  assert count == {"n": 5}
