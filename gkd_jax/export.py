"""Exports a run's student as a HuggingFace checkpoint (safetensors + config.json + tokenizer).

    python -m gkd_jax.export --workdir=DIR --out=HF_DIR [--step=N] [--overwrite]

Rebuilds the run from DIR/config.json, restores its latest (or the given) checkpoint and writes the student,
LoRA adapters merged, loadable by transformers' AutoModelForCausalLM and by vLLM. HF_DIR must be new or
empty unless --overwrite; the checkpoint is written beside it and renamed in, so HF_DIR never holds a mix
of two models.
"""

import argparse
import json
import os

import ml_collections

from gkd_jax import checkpoints, files, trainer


def export(workdir: str, out: str, step: int | None = None, overwrite: bool = False) -> str:
  files.require_directory(workdir, "--workdir")
  files.check_output_directory(out, overwrite=overwrite, what="--out")  # before anything loads
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): it should be the config a training run saved") from e
  setup = trainer.build(config)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  abstract = trainer.abstract_state(setup.state)
  setup.state, _ = ckpt.restore(abstract, step=step, fingerprint=trainer.fingerprint(config))
  ckpt.close()
  return trainer.export_student(setup, out, overwrite=overwrite)


def main(argv=None):
  # argparse, not absl flags: importing this module next to gkd_jax.main must not redefine --workdir.
  parser = argparse.ArgumentParser(prog="python -m gkd_jax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir (holds config.json, checkpoints/)")
  parser.add_argument("--out", required=True, help="output directory for the HuggingFace checkpoint")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
  args = parser.parse_args(argv)
  print(export(args.workdir, args.out, args.step, args.overwrite))


if __name__ == "__main__":
  main()
