"""Exports a run's student as a HuggingFace checkpoint (safetensors + config.json + tokenizer).

    python -m gkd_jax.export --workdir=DIR --out=HF_DIR [--step=N] [--overwrite]

Loads the run's student (the LoRA base) from DIR/config.json, restores its latest (or the given) checkpoint
and writes the student, LoRA adapters merged, loadable by transformers' AutoModelForCausalLM and by vLLM.
The teacher's weights and the dataset are not read (the teacher's part of the state is sized from its
config.json alone). HF_DIR must be new or empty unless --overwrite; the checkpoint is written beside it and
renamed in, so HF_DIR never holds a mix of two models.

HF_DIR may never be, contain or lie inside a training run's workdir (DIR itself, or any directory holding
checkpoints/) or a model directory the run reads (its model, teacher_model, tokenizer): those are refused
before anything loads, --overwrite or not, as replacing them would delete the run or its models.
"""

import argparse
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gkd_jax import checkpoints, files, host_malloc, images, models, resume, rollout, storage
from gkd_jax import config as config_lib
from gkd_jax import sharding as shd
from gkd_jax import train_step as ts


def export_student(
    student: nnx.Module, tokenizer, weights, out_dir: str, overwrite: bool = False, source: str | None = None
) -> str:
  """Writes `student` with `weights` (its full params, LoRA merged) as a HuggingFace checkpoint with the
  tokenizer (process 0), into a new or empty `out_dir` (or replacing its content with `overwrite`), never a
  mix of two models. `source`: the checkpoint the student was loaded from, whose image-processor settings a
  vision-language export carries along (so the export loads with its processor)."""
  nnx.update(student, jax.device_get(weights))
  if jax.process_index() == 0:

    def write(directory):
      models.save_pretrained(student, directory, tokenizer=tokenizer)
      if source is not None and models.load_vl_config(source) is not None:
        _copy_processor_files(source, directory)

    files.replace_directory(out_dir, write, overwrite=overwrite, what="export directory")
  return out_dir


def _copy_processor_files(source: str, out_dir: str) -> None:
  """The image processor's settings of checkpoint `source` (images.CONFIG_FILES) copied into `out_dir`."""
  directory = models.checkpoint_dir(source)
  for name in images.CONFIG_FILES:
    if os.path.exists(os.path.join(directory, name)):
      shutil.copyfile(os.path.join(directory, name), os.path.join(out_dir, name))


_MODEL_FIELDS = ("model", "teacher_model", "tokenizer")


def _workdirs_under(directory: str) -> list[str]:
  """The directories at or below `directory` that hold a run's checkpoints (a step directory in checkpoints/)."""
  found = set()
  for name in storage.list_files(directory):
    parts = name.split("/")
    for i in range(len(parts) - 2):
      if parts[i] == "checkpoints" and parts[i + 1].isdigit():
        found.add(storage.join(directory, *parts[:i]) if i else directory)
  return sorted(d for d in found if config_lib.has_checkpoints(d))


def check_out_collisions(workdir: str, out: str, config) -> None:
  """Refuses (ValueError naming --out, the directory it collides with and why) an `out` that is, contains or
  lies inside the run's workdir, any other workdir holding checkpoints, or a model directory the run reads
  (config.model, teacher_model, tokenizer). --overwrite does not lift this: it would replace them whole.
  Paths are compared normalized (storage.normalize: real paths locally, cleaned-up URLs)."""
  run = "the run's checkpoints, metrics and config.json"
  protected = [(workdir, f"the workdir {workdir} (the --workdir given)", run)]
  for d in storage.parents(out) + _workdirs_under(out):
    if config_lib.has_checkpoints(d):
      protected.append((d, f"the workdir {d} (it holds a run's checkpoints)", run))
  for field in _MODEL_FIELDS:
    path = config.get(field)
    if path and (storage.is_url(path) or os.path.isdir(path)):  # else a hub id: nothing local to replace
      protected.append(
          (
              path,
              f"the model directory {path} (config.{field} of this run)",
              f"the model files the run in {workdir} reads",
          )
      )
  for directory, what, holds in protected:
    if storage.within(out, directory):
      relation = "is" if storage.normalize(out) == storage.normalize(directory) else "lies inside"
    elif storage.within(directory, out):
      relation = "contains"
    else:
      continue
    raise ValueError(
        f"--out={out} {relation} {what}: an export there would replace or mix into {holds}; choose a "
        f"directory outside it (refused even with --overwrite)"
    )


def export(workdir: str, out: str, step: int | None = None, overwrite: bool = False) -> str:
  files.require_directory(workdir, "--workdir")
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run's workdir")
  try:
    config = ml_collections.ConfigDict(json.loads(storage.read_text(path)))
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): it should be the config a training run saved") from e
  check_out_collisions(workdir, out, config)  # before anything loads, --overwrite or not
  files.check_output_directory(out, overwrite=overwrite, what="--out")
  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  options = models.model_options(config)  # the layout (scanned or not) the checkpoint was saved in
  student = models.from_pretrained(config.model, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **options)
  teacher = None
  if ts.teacher_kind(config) == "model":
    teacher = _abstract_params(config.teacher_model, dtype, param_dtype, mesh, options)
  state, _, _, lora_spec = resume.initial_state(config, student, teacher, mesh)
  with checkpoints.Checkpointer(storage.join(workdir, "checkpoints")) as ckpt:
    state, _ = ckpt.restore(resume.abstract_state(state), step=step, fingerprint=resume.fingerprint(config))
  tokenizer = models.load_tokenizer(config.tokenizer or config.model)
  return export_student(
      student, tokenizer, rollout.student_weights(state, lora_spec), out, overwrite, source=config.model
  )


def _abstract_params(path: str, dtype, param_dtype, mesh, options: dict) -> nnx.State:
  """A model's params as ShapeDtypeStructs in their mesh shardings, from its config.json (no weights read)."""
  if storage.is_url(path):
    path = storage.local_copy(storage.join(path, "config.json"))
  elif not os.path.isdir(path):
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(path, "config.json")
  with open(os.path.join(path, "config.json") if os.path.isdir(path) else path) as f:
    cfg = models.config_from_hf_dict(json.load(f))
  abstract = nnx.eval_shape(
      lambda: models.build_model(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), mesh=mesh, **options)
  )
  state = nnx.state(abstract)
  for _, var in nnx.to_flat_state(state):
    value = var.get_value()
    sharding = shd.named_sharding(shd.variable_names(var), value.shape, mesh)
    var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
  return state


def main(argv=None):
  host_malloc.default_platform_to_cpu()  # CPU hosts: no TPU probe by libtpu (its start-up error lines)
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
