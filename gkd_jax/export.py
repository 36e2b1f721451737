"""Exports a run's student as a HuggingFace checkpoint (safetensors + config.json + tokenizer).

    python -m gkd_jax.export --workdir=DIR --out=HF_DIR [--step=N]

Rebuilds the run from DIR/config.json, restores its latest (or the given) checkpoint and writes the student,
LoRA adapters merged, loadable by transformers' AutoModelForCausalLM and by vLLM.
"""
import json
import os

import ml_collections
from absl import app, flags

from gkd_jax import checkpoints, trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (holds config.json and checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output directory for the HuggingFace checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")


def export(workdir: str, out: str, step: int | None = None) -> str:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  setup = trainer.build(config)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  abstract = trainer.abstract_state(setup.state)
  setup.state, _ = ckpt.restore(abstract, step=step, fingerprint=trainer.fingerprint(config))
  ckpt.close()
  return trainer.export_student(setup, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(export(_WORKDIR.value, _OUT.value, _STEP.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
