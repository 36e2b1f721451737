"""Every recipe in configs/ loads and validates for each of its args; local variants run end to end."""

import json
import os
import subprocess
import sys

import pytest

from gkd_jax import config as config_lib
from gkd_jax import rollout, trainer
from gkd_jax import train_step as ts
import recipe_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "gsm8k_qwen2_5": ["", "7b", "runlocal"],
    "on_policy_distillation": ["", "runlocal"],
    "opsd": ["", "fixed", "runlocal", "runlocal_fixed"],
    "sft": ["", "lora", "runlocal"],
    "teacher_server": ["", "runlocal"],
    "mllm_internvl": ["", "runlocal", "runlocal_on_policy"],
}


load = recipe_configs.load_config


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in RECIPES.items() for a in args])
def test_recipe_validates(name, arg):
  c = load(name, arg)
  assert c.job == "train"
  config_lib.validate(c)
  text = open(os.path.join(ROOT, "configs", f"{name}.py")).read()
  for launch in ("python -m gkd_jax.main", "--worker=all", "runlocal"):
    assert launch in text, f"{name}: docstring lacks {launch!r}"
  # The pod command: a workdir every worker shares, rerun while the trainer exits 75 (preempted after saving).
  assert "--workdir=gs://$BUCKET/" in text, f"{name}: the TPU pod command needs a gs:// workdir"
  assert "until python -m gkd_jax.main" in text and "-eq 75" in text, f"{name}: no restart loop on exit 75"


def test_opsd_modes():
  assert load("opsd", "")["teacher_model"] is None
  fixed = load("opsd", "runlocal_fixed=/fx")
  assert fixed.teacher_model == fixed.model == "/fx/student"
  assert ts.teacher_kind(load("opsd", "")) == "self"
  assert ts.teacher_kind(fixed) == "model"


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fixture

  return fixture.build(str(tmp_path_factory.mktemp("fixture")), vocab_size=2048, num_rows=256)


def test_runlocal_recipe_through_the_cli(fixture_dir, tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "gkd_jax.main",
          f"--config=configs/gsm8k_qwen2_5.py:runlocal={fixture_dir}",
          f"--workdir={tmp_path}",
          "--config.total_steps=3",
          "--config.max_completion_length=8",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert os.path.exists(tmp_path / "export" / "model.safetensors")


def test_opsd_runlocal_trains_with_teacher_prompts(fixture_dir, tmp_path):
  c = load("opsd", f"runlocal={fixture_dir}")
  c.total_steps, c.max_completion_length = 2, 8
  setup, state = trainer.build(c)
  batch, mode, _ = rollout.prepare_batch(setup, state, 0)
  assert "teacher_prompt_ids" in batch and batch["teacher_prompt_ids"].shape[1] > batch["prompt_ids"].shape[1]
  _, record = trainer.run(setup, state, str(tmp_path))
  assert record["step"] == 2 and record["distill_loss"] >= 0
