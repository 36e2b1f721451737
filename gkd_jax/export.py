"""Exports a run's student as a HuggingFace checkpoint (safetensors + config.json + tokenizer).

    python -m gkd_jax.export --workdir=DIR --out=HF_DIR [--step=N]

Rebuilds the run from DIR/config.json, restores its latest (or the given) checkpoint and writes the student,
LoRA adapters merged, loadable by transformers' AutoModelForCausalLM and by vLLM.
"""

import argparse
import json
import os

import jax
import ml_collections
from flax import nnx

from gkd_jax import checkpoints, models, resume, rollout


def export_student(student: nnx.Module, tokenizer, weights, out_dir: str) -> str:
  """Writes `student` with `weights` (its full params, LoRA merged) as a HuggingFace checkpoint with the
  tokenizer (process 0)."""
  nnx.update(student, jax.device_get(weights))
  if jax.process_index() == 0:
    models.save_pretrained(student, out_dir, tokenizer=tokenizer)
  return out_dir


def export(workdir: str, out: str, step: int | None = None) -> str:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  from gkd_jax import trainer

  setup = trainer.build(config)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  abstract = resume.abstract_state(setup.state)
  state, _ = ckpt.restore(abstract, step=step, fingerprint=resume.fingerprint(config))
  ckpt.close()
  return export_student(setup.student, setup.tokenizer, rollout.student_weights(state, setup.lora_spec), out)


def main(argv=None):
  # argparse, not absl flags: importing this module next to gkd_jax.main must not redefine --workdir.
  parser = argparse.ArgumentParser(prog="python -m gkd_jax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir (holds config.json, checkpoints/)")
  parser.add_argument("--out", required=True, help="output directory for the HuggingFace checkpoint")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = parser.parse_args(argv)
  print(export(args.workdir, args.out, args.step))


if __name__ == "__main__":
  main()
