"""Batch production for the training loop: Algorithm 1's per-step coin, the completions it asks for, and
the teacher server's top-k requests, prefetched one step ahead when they do not depend on the params.

    source = BatchSource(setup)
    batch, mode, gen_s = source.get(step, state)   # host numpy arrays; completions sampled if on-policy
    state, metrics = setup.train_step(state, {k: to_global(setup.batch_sharding, v) for k, v in batch.items()})

The coin u for a step comes from a generator seeded by (seed, step): u < lmbda → the student samples the
completions of the batch's prompts with its current params (on-policy); else, with seq_kd, the teacher
samples them; else the dataset's completions are used. The coin is the same on every host and after a
restart.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from gkd_jax import lora, sampling

MODES = ("on_policy", "seq_kd", "dataset")


def mode_for_step(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
  """Algorithm 1's per-step coin, from a generator seeded by (seed, step): same on every host and resume."""
  u = np.random.default_rng([seed, step]).random()
  return "on_policy" if u < lmbda else ("seq_kd" if seq_kd else "dataset")


def step_mode(config, step: int) -> str:
  """The mode of `step` under `config`: the coin for GKD, always the dataset for SFT."""
  if config.objective != "gkd":
    return "dataset"
  return mode_for_step(config.seed, step, config.lmbda, config.seq_kd)


def to_global(batch_sharding, local: np.ndarray) -> jax.Array:
  """A host's rows of the global batch → one global array sharded over (data, fsdp)."""
  if np.ndim(local) == 0:
    return jnp.asarray(local)
  return jax.make_array_from_process_local_data(batch_sharding, np.asarray(local))


_merge = jax.jit(lora.merge, static_argnums=2)


def student_weights(state, lora_spec: lora.LoraSpec | None):
  """The student's full weights in a train state (LoRA adapters merged in)."""
  return state.params if lora_spec is None else _merge(state.base_params, state.params, lora_spec)


def sample_completions(setup, state, mode: str, batch: dict, step: int) -> tuple[np.ndarray, np.ndarray]:
  """Completions for an on-policy (student) or seq_kd (teacher) step, from the params in `state`."""
  config = setup.config
  if mode == "on_policy":
    model, prompt, mask = (
        (nnx.graphdef(setup.student), student_weights(state, setup.lora_spec)),
        "prompt_ids",
        "prompt_mask",
    )
  else:
    params = student_weights(state, setup.lora_spec) if setup.teacher is None else state.teacher_params
    graph = nnx.graphdef(setup.student if setup.teacher is None else setup.teacher)
    model = (graph, params)
    prompt, mask = (
        ("teacher_prompt_ids", "teacher_prompt_mask")
        if "teacher_prompt_ids" in batch
        else ("prompt_ids", "prompt_mask")
    )
  key = jax.random.fold_in(jax.random.fold_in(state.rng, step), MODES.index(mode))
  out = sampling.generate(
      model,
      to_global(setup.batch_sharding, batch[prompt]),
      to_global(setup.batch_sharding, batch[mask]),
      key=key,
      max_new_tokens=config.max_completion_length,
      temperature=config.temperature,
      top_k=config.get("top_k", 0),
      top_p=config.get("top_p", 1.0),
      eos_token_ids=setup.stop_ids,
      pad_token_id=setup.tokenizer.pad_token_id,
      vocab_size=setup.step_cfg.vocab_size,
  )
  ids = np.asarray(multihost_utils.process_allgather(out.completion_ids, tiled=True))
  mask = np.asarray(multihost_utils.process_allgather(out.completion_mask, tiled=True))
  lo = jax.process_index() * setup.loader.local_batch_size
  return ids[lo : lo + setup.loader.local_batch_size], mask[lo : lo + setup.loader.local_batch_size]


def model_inputs(setup, batch: dict) -> dict:
  """The keys of a host batch that the train and eval steps take (teacher prompts only for a local teacher)."""
  keys = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask"]
  if "student_generated" in batch:
    keys.append("student_generated")
  if setup.step_cfg.teacher in ("model", "self") and "teacher_prompt_ids" in batch:
    keys += ["teacher_prompt_ids", "teacher_prompt_mask"]
  return {k: batch[k] for k in keys}


def prepare_batch(setup, state, step: int) -> tuple[dict, str, float]:
  """Host batch for `step` with its completions filled by the step's mode; returns (batch, mode, gen_seconds)."""
  config = setup.config
  batch = setup.loader.batch(step)
  mode = step_mode(config, step)
  gen_time = 0.0
  if mode == "dataset":
    missing = np.flatnonzero(batch["row_mask"] & ~batch["has_completion"])
    if len(missing):
      raise ValueError(
          f"step {step} is an off-policy step (lmbda={config.lmbda}, seq_kd={config.seq_kd}) but "
          f"rows {missing.tolist()} of its batch have no completion; use lmbda=1 or seq_kd for "
          f"prompt-only data"
      )
  else:
    t0 = time.perf_counter()
    batch["completion_ids"], batch["completion_mask"] = sample_completions(setup, state, mode, batch, step)
    gen_time = time.perf_counter() - t0
  batch["completion_mask"] = batch["completion_mask"] & batch["row_mask"][:, None]
  batch["student_generated"] = np.array(mode == "on_policy")
  return model_inputs(setup, batch), mode, gen_time


def request_teacher_topk(client, batch: dict) -> "Mapped":
  """Starts the teacher server's top-k request for a host batch; returns a future of the batch's
  (values, indices) [B, C, k] at the completion columns (the positions predicting completion tokens)."""
  ids = np.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=1)
  mask = np.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
  future = client.submit(ids, mask)
  p, c = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
  return Mapped(future, lambda out: tuple(x[:, p - 1 : p + c - 1] for x in out))


class Mapped:
  """A future whose result goes through `fn`."""

  def __init__(self, future, fn):
    self.future, self.fn = future, fn

  def result(self):
    return self.fn(self.future.result())


class BatchSource:
  """Host batches in step order. With a teacher server, the next step's top-k request goes out before the
  current step runs when the next batch is already known (a dataset step: its completions don't depend
  on the params being trained), so the HTTP round trip overlaps the device work."""

  def __init__(self, setup):
    self.setup, self.ahead = setup, None

  def _prepare(self, step, state):
    batch, mode, gen_time = prepare_batch(self.setup, state, step)
    client = self.setup.teacher_client
    topk = request_teacher_topk(client, batch) if client else None
    return step, batch, mode, gen_time, topk

  def get(self, step: int, state) -> tuple[dict, str, float]:
    """(host batch, mode, generation seconds) of `step`; on-policy completions come from `state`'s params."""
    ahead, self.ahead = self.ahead, None
    _, batch, mode, gen_time, topk = ahead if ahead and ahead[0] == step else self._prepare(step, state)
    config = self.setup.config
    if self.setup.teacher_client and step + 1 < config.total_steps and step_mode(config, step + 1) == "dataset":
      self.ahead = self._prepare(step + 1, state)  # a dataset step reads no params
    if topk is not None:
      batch["teacher_topk_values"], batch["teacher_topk_indices"] = topk.result()
    return batch, mode, gen_time
