"""What makes a run resumable: the config fields a checkpoint must agree with, and restoring the latest
checkpoint of a workdir into a freshly built train state (with the data loader's position)."""

from __future__ import annotations

import json
import logging

import jax

logger = logging.getLogger(__name__)

# Config fields that fix the state's structure and the run's trajectory: resuming with any of them changed
# is refused. Everything else (total_steps, logging, eval) may change between restarts.
FINGERPRINT_FIELDS = (
    "model",
    "teacher_model",
    "teacher_model_server",
    "objective",
    "dataset",
    "dataset_split",
    "seed",
    "batch_size",
    "grad_accum_steps",
    "lora_rank",
    "lora_target_modules",
    "dtype",
    "param_dtype",
    "gkd_logits_topk",
    "fused_loss",
)


def fingerprint(config) -> str:
  return json.dumps({k: config.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True)


def abstract_state(state):
  """The state's shapes, dtypes and shardings: what a checkpoint is restored into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_or_start(ckpt, state, loader, config, resume_step: int | None = None) -> tuple[object, int]:
  """(state, step to start at): the latest checkpoint (or the one at `resume_step`) restored into `state`'s
  layout, with the loader's position checked against it; or `state` itself and 0 when there is no
  checkpoint. Resuming from an earlier step sets the later checkpoints aside (Checkpointer.set_aside_after)."""
  if resume_step is not None and resume_step not in ckpt.all_steps():
    raise ValueError(
        f"config.resume_step={resume_step} is not a checkpoint in {ckpt.directory} (steps: {ckpt.all_steps()}); "
        f"give one of those, or None for the latest"
    )
  if ckpt.latest_step() is None:
    return state, 0
  restored = ckpt.latest_step() if resume_step is None else resume_step
  state, extra = ckpt.restore(abstract_state(state), step=restored, fingerprint=fingerprint(config))
  step = loader.resume_step(extra["data"])
  if step != int(state.step):
    raise ValueError(
        f"checkpoint {ckpt.step_dir(restored)}: data position {step} does not match the state's step {int(state.step)}"
    )
  later, aside = ckpt.set_aside_after(step)
  if later:
    logger.warning(
        "config.resume_step=%d: resuming from step %d; the later checkpoints (steps %s) were moved to %s",
        step,
        step,
        later,
        aside,
    )
  logger.info("resumed from step %d", step)
  return state, step
