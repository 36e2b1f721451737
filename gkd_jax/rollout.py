"""Batch production for the training loop: Algorithm 1's per-step coin, the completions it asks for, and
the teacher server's top-k requests, prefetched one step ahead when they do not depend on the params.

    source = BatchSource(setup)
    batch, mode, gen = source.get(step, state)   # global jax.Arrays; completions sampled if on-policy
    state, metrics = setup.train_step(state, batch)
    gen.result()                                 # seconds the sampler took (0 on dataset steps)

The coin u for a step comes from a generator seeded by (seed, step): u < lmbda → the student samples the
completions of the batch's prompts with its current params (on-policy); else, with seq_kd, the teacher
samples them; else the dataset's completions are used. The coin is the same on every host and after a
restart.

Batches stay on the device. The loader's host rows become global arrays once (`to_global`); on generating
steps the sampler's completions (global arrays, rows where their prompts are) go straight into the train
step, with no gather across hosts and no host copy. Host copies of this host's rows are fetched from the
addressable shards (`host_rows`) only where the host needs them: the teacher server's request and the
logged samples.
"""

from __future__ import annotations

import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax import lora, sampling, sharding

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


@functools.lru_cache(maxsize=None)
def _finish_fn(batch_sharding):
  """Jitted (ids, mask, row_mask) -> (ids, mask & row_mask), both laid out like the rest of the batch."""
  return jax.jit(lambda ids, mask, rows: (ids, mask & rows[:, None]), out_shardings=(batch_sharding, batch_sharding))


def sample_completions(setup, state, mode: str, batch: dict, step: int) -> tuple[jax.Array, jax.Array]:
  """Completions [B, max_completion_length] (global arrays, sharded like the prompts) for an on-policy
  (student) or seq_kd (teacher) step, from the params in `state`; `batch` holds the global prompt arrays."""
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
      batch[prompt],
      batch[mask],
      key=key,
      max_new_tokens=config.max_completion_length,
      temperature=config.temperature,
      top_k=config.get("top_k", 0),
      top_p=config.get("top_p", 1.0),
      eos_token_ids=setup.stop_ids,
      pad_token_id=setup.tokenizer.pad_token_id,
      vocab_size=setup.step_cfg.vocab_size,
      pixel_values=batch.get("pixel_values"),
  )
  return out.completion_ids, out.completion_mask


def model_inputs(setup, batch: dict) -> dict:
  """The keys of a batch that the train and eval steps take (teacher prompts only for a local teacher)."""
  keys = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask"]
  keys += [k for k in ("student_generated", "pixel_values") if k in batch]
  if setup.step_cfg.teacher in ("model", "self") and "teacher_prompt_ids" in batch:
    keys += ["teacher_prompt_ids", "teacher_prompt_mask"]
  return {k: batch[k] for k in keys}


class Seconds:
  """Seconds from `start` until `arrays` are computed, measured by a thread that waits on them, so the host
  goes on dispatching meanwhile; `result()` waits for the measurement. Without arrays: a known value."""

  def __init__(self, start: float | None = None, arrays=None, value: float = 0.0):
    self.value, self.thread, self.end = value, None, None  # end: time.perf_counter() when they were ready
    if arrays is not None:
      self.thread = threading.Thread(target=self._wait, args=(start, arrays), daemon=True)
      self.thread.start()

  def _wait(self, start, arrays):
    try:
      jax.block_until_ready(arrays)
    except Exception:  # noqa: BLE001 - a failed computation raises where the train step uses its result
      pass
    self.end = time.perf_counter()
    self.value = self.end - start

  def result(self) -> float:
    if self.thread is not None:
      self.thread.join()
    return self.value


def _prepare(setup, state, step: int) -> tuple[dict, dict, str, Seconds]:
  """(global batch, host batch, mode, generation seconds) of `step`; see `prepare_batch`. The host batch is the
  loader's rows of this host, with dataset completions only (sampled ones stay on the device)."""
  config = setup.config
  host = setup.loader.batch(step)
  mode = step_mode(config, step)
  glob = functools.partial(to_global, setup.batch_sharding)
  if mode == "dataset":
    missing = np.flatnonzero(host["row_mask"] & ~host["has_completion"])
    if len(missing):
      raise ValueError(
          f"step {step} is an off-policy step (lmbda={config.lmbda}, seq_kd={config.seq_kd}) but "
          f"rows {missing.tolist()} of its batch have no completion; use lmbda=1 or seq_kd for "
          f"prompt-only data"
      )
    host["completion_mask"] = host["completion_mask"] & host["row_mask"][:, None]
    host["student_generated"] = np.array(False)
    return {k: glob(v) for k, v in model_inputs(setup, host).items()}, host, mode, Seconds()
  # Prompts (and teacher prompts: the seq_kd sampler may read them) go to the devices once, for the sampler
  # and the train step alike; the completions never leave them.
  batch = {k: glob(v) for k, v in host.items() if k.startswith(("prompt_", "teacher_prompt_", "pixel_values"))}
  t0 = time.perf_counter()
  ids, mask = sample_completions(setup, state, mode, batch, step)
  batch["completion_ids"], batch["completion_mask"] = _finish_fn(setup.batch_sharding)(
      ids, mask, glob(host["row_mask"])
  )
  batch["student_generated"] = glob(np.array(mode == "on_policy"))
  del host["completion_ids"], host["completion_mask"]  # the dataset's, not this step's
  return model_inputs(setup, batch), host, mode, Seconds(t0, (ids, mask))


def prepare_batch(setup, state, step: int) -> tuple[dict, str, Seconds]:
  """Global batch of `step` (jax.Arrays over setup.batch_sharding, the train step's inputs) with its
  completions filled by the step's mode; returns (batch, mode, generation seconds). Sampled completions are
  [B, max_completion_length]; dataset completions keep the loader's bucketed width."""
  batch, _, mode, gen = _prepare(setup, state, step)
  return batch, mode, gen


def request_teacher_topk(client, batch: dict) -> "Mapped":
  """Starts the teacher server's top-k request for this host's rows of a batch (host numpy, or global arrays:
  then their addressable rows are fetched, see `host_rows`); returns a future of those rows' (values,
  indices) [b, C, k] at the completion columns (the positions predicting completion tokens)."""
  batch = {k: sharding.host_rows(batch[k]) for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
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
  """Global batches in step order. With a teacher server, the next step's top-k request goes out before the
  current step runs when the next batch is already known (a dataset step: its completions don't depend
  on the params being trained), so the HTTP round trip overlaps the device work."""

  def __init__(self, setup):
    self.setup, self.ahead = setup, None

  def _prepare(self, step, state):
    batch, host, mode, gen = _prepare(self.setup, state, step)
    client = self.setup.teacher_client
    # The host rows the request needs: the loader's, and on generating steps the completions' addressable rows.
    topk = request_teacher_topk(client, {**batch, **host}) if client else None
    return step, batch, mode, gen, topk

  def get(self, step: int, state) -> tuple[dict, str, Seconds]:
    """(global batch, mode, generation seconds) of `step`; on-policy completions come from `state`'s params."""
    ahead, self.ahead = self.ahead, None
    _, batch, mode, gen, topk = ahead if ahead and ahead[0] == step else self._prepare(step, state)
    config = self.setup.config
    if self.setup.teacher_client and step + 1 < config.total_steps and step_mode(config, step + 1) == "dataset":
      self.ahead = self._prepare(step + 1, state)  # a dataset step reads no params
    if topk is not None:
      values, indices = topk.result()
      batch["teacher_topk_values"], batch["teacher_topk_indices"] = (
          to_global(self.setup.batch_sharding, values),
          to_global(self.setup.batch_sharding, indices),
      )
    return batch, mode, gen
