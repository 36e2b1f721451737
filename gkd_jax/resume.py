"""A run's train state: the fresh one (`initial_state`), the config fields a checkpoint must agree with, and
restoring the latest checkpoint of a workdir into a freshly built state (with the data loader's position)."""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gkd_jax import lora, optim
from gkd_jax import train_step as ts

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


def initial_state(config, student: nnx.Module, teacher_params, mesh) -> tuple[ts.TrainState, Any, Any, Any]:
  """(state, optimizer, lr schedule, LoRA spec) of a fresh run: the student's params (or LoRA adapters on
  its frozen weights), their optimizer state, and teacher_params as given, on the mesh."""
  tx, schedule = optim.from_config(config)
  params, base_params, lora_spec = nnx.state(student), None, lora.spec_from_config(config)
  if lora_spec is None:  # with LoRA only the language model's adapters train anyway
    tx = optim.freeze(tx, params, optim.frozen_parts(config))
  if lora_spec is not None:  # train adapters only; the student's weights become a frozen input
    base_params = params
    init = lambda base, key: lora.init_adapters(base, lora_spec, key)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    shardings = lora.adapter_shardings(jax.eval_shape(init, base_params, key), mesh)
    params = jax.jit(init, out_shardings=shardings)(base_params, key)  # created in place, on every host
    logger.info(
        "LoRA: %d trainable params (rank %d) on %s", lora.count(params), lora_spec.rank, lora_spec.target_modules
    )
  state = ts.create_train_state(
      params, tx, teacher_params=teacher_params, rng=jax.random.key(config.seed), base_params=base_params
  )
  # Params already sit in their logical shardings; small host values (step, rng, optimizer counts) are put
  # on the mesh replicated — through jit, which also works when the mesh spans several processes.
  replicated = NamedSharding(mesh, PartitionSpec())
  on_mesh = lambda x: isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
  state = jax.tree.map(lambda x: x if on_mesh(x) else jax.jit(lambda: x, out_shardings=replicated)(), state)
  return state, tx, schedule, lora_spec


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
