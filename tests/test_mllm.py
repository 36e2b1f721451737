"""GKD with images end to end: configs/mllm_internvl.py's local runs on the tiny InternVL pair and the shapes task
(experiments/fixture.py), the modes with images, what stays frozen, LoRA's reach, refusals, and the export."""

import json
import os
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gkd_jax import config as config_lib
from gkd_jax import export as export_lib
from gkd_jax import lora, models, rollout, trainer
import helpers
import recipe_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import fixture

  return fixture.build_internvl(str(tmp_path_factory.mktemp("internvl")), num_train=96, num_test=16)


def recipe(fixture_dir, arg="runlocal", **overrides):
  c = recipe_configs.load_config("mllm_internvl", f"{arg}={fixture_dir}")
  c.peak_flops = 1e11  # no matmul-ceiling measurement per test
  c.eval_rows, c.eval_batch_size = 8, 8
  for k, v in overrides.items():
    c[k] = v
  config_lib.validate(c)
  return c


def records(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _part(params, name):
  return jax.tree.leaves(jax.device_get(params[name]))


def _unchanged(before, after) -> bool:
  return all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("arg,modes", [("runlocal", {"dataset", "on_policy"}), ("runlocal_on_policy", {"on_policy"})])
def test_runlocal_end_to_end(fixture_dir, tmp_path, arg, modes):
  workdir = tmp_path / "run"
  c = recipe(fixture_dir, arg, total_steps=4, save_every=2, learning_rate=1e-2)
  setup, state = trainer.build(c)
  batch = setup.loader.batch(0)

  # The images reach student and teacher (the losses change without them); only completion text is scored.
  image_token = models.load_vl_config(c.model).image_token_id
  assert (batch["prompt_ids"] == image_token).any() and not (batch["completion_ids"] == image_token).any()
  inputs = rollout.model_inputs(setup, dict(batch, student_generated=np.array(False)))
  glob = lambda b: {k: rollout.to_global(setup.batch_sharding, v) for k, v in b.items()}
  seen = jax.device_get(setup.eval_step(state, glob(inputs)))
  blind = jax.device_get(setup.eval_step(state, glob(dict(inputs, pixel_values=np.zeros_like(batch["pixel_values"])))))
  assert seen["nll"] != blind["nll"] and seen["distill_loss"] != blind["distill_loss"]
  assert seen["tokens"] == batch["completion_mask"].sum()

  # Frozen by default: the tower and projector keep their weights and have no optimizer state (Adam's two
  # moments for the language model's params only; a 300M-param tower's would cost 2.4 GB).
  before = {name: _part(state.params, name) for name in ("vision_tower", "projector", "language_model")}
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in before["language_model"])

  final, _ = trainer.run(setup, state, str(workdir))
  steps = records(workdir)
  assert [r["step"] for r in steps] == [1, 2, 3, 4] and {r["mode"] for r in steps} == modes
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in steps)
  evaluation = [json.loads(line) for line in open(workdir / "eval.jsonl")][-1]
  assert 0.0 <= evaluation["student_accuracy"] <= 1.0 and 0.0 <= evaluation["teacher_accuracy"] <= 1.0
  assert _unchanged(before["vision_tower"], _part(final.params, "vision_tower"))
  assert _unchanged(before["projector"], _part(final.params, "projector"))
  assert not _unchanged(before["language_model"], _part(final.params, "language_model"))

  # The export is a whole InternVL checkpoint with its image processor: transformers reads it and computes the
  # same logits as gkd_jax for prompts with images.
  export = workdir / "export"
  assert (export / "preprocessor_config.json").exists()
  ours = models.from_pretrained(str(export))
  theirs = transformers.InternVLForConditionalGeneration.from_pretrained(str(export), attn_implementation="eager")
  ids, mask, pixels = batch["prompt_ids"][:2], batch["prompt_mask"][:2], batch["pixel_values"][:2]
  got = np.asarray(ours(ids, mask, pixel_values=pixels).logits)
  flat = np.concatenate([p[:n] for p, n in zip(pixels, batch["num_tiles"][:2])])
  with torch.no_grad():
    want = theirs(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        pixel_values=torch.tensor(flat),
    ).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4)
  if arg == "runlocal_on_policy":  # the export CLI's path (restore from the workdir) gives the same checkpoint
    again = export_lib.export(str(workdir), str(tmp_path / "again"))
    assert sorted(os.listdir(again)) == sorted(os.listdir(export))
    helpers.assert_same_tensors(again, str(export))


def test_seq_kd_top_k_and_a_trained_tower(fixture_dir, tmp_path):
  c = recipe(
      fixture_dir,
      lmbda=0.0,
      seq_kd=True,
      gkd_logits_topk=4,
      total_steps=2,
      eval_split=None,
      export_on_finish=False,
      learning_rate=1e-2,
      train_vision_tower=True,
      train_projector=True,
  )
  setup, state = trainer.build(c)
  batch, mode, _ = rollout.prepare_batch(setup, state, 0)
  assert mode == "seq_kd" and batch["pixel_values"].shape[:2] == (8, 2)  # two-picture rows: 2 tiles
  before = {name: _part(state.params, name) for name in ("vision_tower", "projector")}
  final, record = trainer.run(setup, state, str(tmp_path))
  assert record["step"] == 2 and np.isfinite(record["distill_loss"]) and 0 <= record["top1_agreement"] <= 1
  for name in ("vision_tower", "projector"):
    assert not _unchanged(before[name], _part(final.params, name)), name


def test_lora_adapts_the_language_model_only(fixture_dir):
  student = models.from_pretrained(os.path.join(fixture_dir, "student"))
  spec = lora.LoraSpec(rank=2, target_modules=("all-linear",))
  adapters = lora.init_adapters(nnx.state(student, nnx.Param), spec, jax.random.key(0))
  names = [jax.tree_util.keystr(p[:1], simple=True) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
  assert names and all(n.startswith("language_model") for n in names)
  with pytest.raises(ValueError, match="train_vision_tower.*LoRA"):
    recipe(fixture_dir, lora_rank=4, train_vision_tower=True)


def test_served_teacher_refused_for_image_data(fixture_dir):
  c = recipe(fixture_dir, teacher_model=None, teacher_model_server="http://127.0.0.1:9", gkd_logits_topk=4)
  with pytest.raises(ValueError, match="teacher_model_server.*has images"):
    trainer.build(c)
