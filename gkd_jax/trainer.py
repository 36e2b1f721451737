"""The GKD training loop: Algorithm 1 of the paper around the pure train step.

Each optimizer step draws one coin u from a generator seeded by (seed, step): u < lmbda → the student
samples the completions of the batch's prompts with its current params (on-policy); else, with seq_kd,
the teacher samples them; else the dataset's completions are used. The coin is the same on every host and
after a restart. Generation runs on the same mesh with the very params being trained; the train step then
takes the teacher's distributions on those sequences and updates the student.

    python -m gkd_jax.main --config=configs/NAME.py --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from gkd_jax import data as data_lib
from gkd_jax import lora, models, optim, sampling, sharding
from gkd_jax import metrics as metrics_lib
from gkd_jax import task_metrics
from gkd_jax import train_step as ts

logger = logging.getLogger(__name__)

MODES = ("on_policy", "seq_kd", "dataset")


def mode_for_step(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
  """Algorithm 1's per-step coin, from a generator seeded by (seed, step): same on every host and resume."""
  u = np.random.default_rng([seed, step]).random()
  return "on_policy" if u < lmbda else ("seq_kd" if seq_kd else "dataset")


def teacher_kind(config) -> str:
  """Which teacher the config asks for: "none" (SFT), "server", "self" (OPSD dynamic), or "model"."""
  if config.objective == "sft":
    return "none"
  if config.teacher_model_server:
    return "server"
  if not config.teacher_model:
    return "self"
  return "model"  # includes OPSD fixed: teacher_model == model gives a frozen copy of the initial student


def step_config(config, vocab_size: int) -> ts.StepConfig:
  kind = teacher_kind(config)
  if config.gkd_logits_topk:
    divergence = "topk"
  else:
    divergence = "fused" if config.fused_loss else "full"
  return ts.StepConfig(
      objective=config.objective,
      teacher=kind,
      divergence=divergence,
      beta=config.beta,
      temperature=config.temperature if config.loss_temperature is None else config.loss_temperature,
      topk=config.gkd_logits_topk or None,
      sft_alpha=config.sft_alpha,
      vocab_size=vocab_size,
      chunk_size=config.get("loss_chunk_size"),
      grad_accum_steps=config.grad_accum_steps,
      offload_teacher=bool(config.offload_teacher_model) and kind == "model" and _host_memory_available(),
  )


def _host_memory_available() -> bool:
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  if "pinned_host" in kinds:
    return True
  logger.warning(
      "offload_teacher_model: this backend has no pinned_host memory (it has %s); the teacher's "
      "params stay in device memory",
      sorted(kinds),
  )
  return False


# ------------------------------------------------------------------------------------------------ setup


@dataclasses.dataclass
class Setup:
  """Everything built once at start-up."""

  config: Any
  mesh: jax.sharding.Mesh
  tokenizer: Any
  student: nnx.Module
  teacher: nnx.Module | None
  loader: data_lib.DataLoader
  step_cfg: ts.StepConfig
  state: ts.TrainState
  train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
  batch_sharding: NamedSharding
  stop_ids: tuple
  lora_spec: lora.LoraSpec | None = None
  teacher_client: Any = None  # TeacherClient when the teacher is a server
  eval_step: Any = None  # jitted (state, batch) -> teacher-forced eval metrics
  eval_loader: Any = None  # held-out batches (config.eval_split), or None
  eval_rows: Any = None  # the held-out rows themselves, for the generation metric


def _check_same_tokenizer(tokenizer, path: str):
  """Teacher and student must share one tokenizer (cross-tokenizer distillation is out of scope)."""
  try:
    other = models.load_tokenizer(path)
  except (OSError, ValueError):
    logger.warning("no tokenizer next to %s; assuming it shares the student's", path)
    return
  if other.get_vocab() != tokenizer.get_vocab():
    raise ValueError(
        f"teacher_model {path!r} uses a different tokenizer ({len(other)} tokens) than the student "
        f"({len(tokenizer)} tokens); GKD needs one shared tokenizer"
    )


def _rows(config, source, split):
  rows = data_lib.load_rows(source, split=split, name=config.dataset_config)
  return data_lib.prepare_columns(
      rows, columns=config.dataset_columns.to_dict() or None, teacher_prompt_template=config.teacher_prompt_template
  )


def _loader(config, tokenizer, rows, batch_size, **kw):
  return data_lib.DataLoader(
      rows,
      tokenizer,
      batch_size=batch_size,
      seed=config.seed,
      max_length=config.max_length,
      buckets=tuple(config.get("length_buckets") or data_lib.DEFAULT_BUCKETS),
      max_prompt_length=config.max_prompt_length,
      max_completion_length=config.max_completion_length,
      **kw,
  )


def build(config) -> Setup:
  """Loads models, tokenizer and data, and builds the sharded train state and the jitted step."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(
        f"config.batch_size={config.batch_size} must be divisible by the mesh's data×fsdp size "
        f"{batch_shards} (the batch is split over both)"
    )
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  tokenizer = models.load_tokenizer(config.tokenizer or config.model)
  student = models.from_pretrained(
      config.model, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **models.model_options(config)
  )
  kind = teacher_kind(config)
  teacher = None
  if kind == "model":
    if config.teacher_model != config.model:
      _check_same_tokenizer(tokenizer, config.teacher_model)
    teacher = models.from_pretrained(
        config.teacher_model, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **models.model_options(config)
    )
  vocab_size = len(tokenizer)
  cfg = step_config(config, vocab_size)

  loader = _loader(
      config,
      tokenizer,
      _rows(config, config.dataset, config.dataset_split),
      config.batch_size,
      require_completion=config.lmbda < 1.0 and not config.seq_kd,
      drop_remainder=True,
  )

  tx, schedule = optim.make_optimizer(
      config.learning_rate,
      config.total_steps,
      warmup_steps=config.warmup_steps,
      schedule=config.lr_schedule,
      weight_decay=config.weight_decay,
      max_grad_norm=config.max_grad_norm,
  )
  params, base_params, lora_spec = nnx.state(student), None, lora_spec_from(config)
  if lora_spec is not None:  # train adapters only; the student's weights become a frozen input
    base_params = params
    init = lambda base, key: lora.init_adapters(base, lora_spec, key)
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    shardings = lora.adapter_shardings(jax.eval_shape(init, base_params, key), mesh)
    params = jax.jit(init, out_shardings=shardings)(base_params, key)  # created in place, on every host
    logger.info(
        "LoRA: %d trainable params (rank %d) on %s", lora.count(params), lora_spec.rank, lora_spec.target_modules
    )
  teacher_params = None if teacher is None else nnx.state(teacher)
  if cfg.offload_teacher:  # kept in host memory between steps; the step moves it in for the forward only
    teacher_params = jax.device_put(
        teacher_params, jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), teacher_params)
    )
  state = ts.create_train_state(
      params, tx, teacher_params=teacher_params, rng=jax.random.key(config.seed), base_params=base_params
  )
  # Params already sit in their logical shardings; small host values (step, rng, optimizer counts) are put
  # on the mesh replicated — through jit, which also works when the mesh spans several processes.
  replicated = NamedSharding(mesh, PartitionSpec())
  on_mesh = lambda x: isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
  state = jax.tree.map(lambda x: x if on_mesh(x) else jax.jit(lambda: x, out_shardings=replicated)(), state)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  step_fn, eval_fn = ts.make_steps(student, tx, schedule, cfg, teacher=teacher, lora_spec=lora_spec)
  train_step = jax.jit(
      step_fn, in_shardings=(state_sharding, None), out_shardings=(state_sharding, replicated), donate_argnums=0
  )
  # Generation stops at the tokenizer's eos and at every eos the model's config names (Llama 3 has two).
  model_eos = student.config.eos_token_id
  stop_ids = sampling.normalize_stop_ids(
      [
          t
          for t in [tokenizer.eos_token_id, *(model_eos if isinstance(model_eos, (list, tuple)) else [model_eos])]
          if t is not None
      ]
  )
  eval_loader = eval_rows = None
  if config.eval_split:
    eval_rows = _rows(config, config.eval_dataset or config.dataset, config.eval_split)
    eval_rows = eval_rows.select(range(min(config.eval_rows, len(eval_rows))))
    eval_loader = _loader(
        config,
        tokenizer,
        eval_rows,
        config.eval_batch_size,
        require_completion=True,
        shuffle=False,
        drop_remainder=False,
    )
  client = None
  if kind == "server":
    from gkd_jax.teacher_client import TeacherClient

    client = TeacherClient(config.teacher_model_server, config.gkd_logits_topk, vocab_size=vocab_size)
    client.check()  # fail at start-up, not at the first step
  eval_step = jax.jit(eval_fn, in_shardings=(state_sharding, None), out_shardings=replicated)
  return Setup(
      config,
      mesh,
      tokenizer,
      student,
      teacher,
      loader,
      cfg,
      state,
      train_step,
      batch_sharding,
      stop_ids,
      lora_spec,
      client,
      eval_step,
      eval_loader,
      eval_rows,
  )


def lora_spec_from(config) -> lora.LoraSpec | None:
  if not config.lora_rank:
    return None
  targets = config.lora_target_modules
  return lora.LoraSpec(
      rank=config.lora_rank,
      alpha=float(config.lora_alpha),
      use_rslora=config.lora_rslora,
      target_modules=tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets),
  )


def student_weights(setup: Setup):
  """The student's full weights in the current state (LoRA adapters merged in)."""
  state = setup.state
  return state.params if setup.lora_spec is None else _merge(state.base_params, state.params, setup.lora_spec)


_merge = jax.jit(lora.merge, static_argnums=2)


# ----------------------------------------------------------------------------------------- one step


def _global(batch_sharding, local: np.ndarray):
  """A host's rows of the global batch → one global array sharded over (data, fsdp)."""
  if np.ndim(local) == 0:
    return jnp.asarray(local)
  return jax.make_array_from_process_local_data(batch_sharding, np.asarray(local))


def sample_completions(setup: Setup, mode: str, batch: dict, step: int):
  """Completions for an on-policy (student) or seq_kd (teacher) step, from the current params."""
  config, state = setup.config, setup.state
  if mode == "on_policy":
    model, prompt, mask = (nnx.graphdef(setup.student), student_weights(setup)), "prompt_ids", "prompt_mask"
  else:
    params = student_weights(setup) if setup.teacher is None else state.teacher_params
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
      _global(setup.batch_sharding, batch[prompt]),
      _global(setup.batch_sharding, batch[mask]),
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


def prepare_batch(setup: Setup, step: int) -> tuple[dict, str, float]:
  """Host batch for `step` with its completions filled by the step's mode; returns (batch, mode, gen_seconds)."""
  config = setup.config
  batch = setup.loader.batch(step)
  mode = mode_for_step(config.seed, step, config.lmbda, config.seq_kd) if config.objective == "gkd" else "dataset"
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
    batch["completion_ids"], batch["completion_mask"] = sample_completions(setup, mode, batch, step)
    gen_time = time.perf_counter() - t0
  batch["completion_mask"] = batch["completion_mask"] & batch["row_mask"][:, None]
  batch["student_generated"] = np.array(mode == "on_policy")
  keys = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "student_generated"]
  if setup.step_cfg.teacher in ("model", "self") and "teacher_prompt_ids" in batch:
    keys += ["teacher_prompt_ids", "teacher_prompt_mask"]
  return {k: batch[k] for k in keys}, mode, gen_time


def request_teacher_topk(setup: Setup, batch: dict):
  """Starts the teacher server's top-k request for a host batch; returns a future of the batch's
  (values, indices) [B, C, k] at the completion columns (the positions predicting completion tokens)."""
  ids = np.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=1)
  mask = np.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
  future = setup.teacher_client.submit(ids, mask)
  p, c = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
  return _Mapped(future, lambda out: tuple(x[:, p - 1 : p + c - 1] for x in out))


class _Mapped:
  """A future whose result goes through `fn`."""

  def __init__(self, future, fn):
    self.future, self.fn = future, fn

  def result(self):
    return self.fn(self.future.result())


class BatchSource:
  """Host batches in step order. With a teacher server, the next step's top-k request goes out before the
  current step runs when the next batch is already known (a dataset step: its completions don't depend
  on the params being trained), so the HTTP round trip overlaps the device work."""

  def __init__(self, setup: Setup):
    self.setup, self.ahead = setup, None

  def _prepare(self, step):
    batch, mode, gen_time = prepare_batch(self.setup, step)
    topk = request_teacher_topk(self.setup, batch) if self.setup.teacher_client else None
    return step, batch, mode, gen_time, topk

  def get(self, step: int):
    ahead, self.ahead = self.ahead, None
    step_, batch, mode, gen_time, topk = ahead if ahead and ahead[0] == step else self._prepare(step)
    config = self.setup.config
    next_mode = mode_for_step(config.seed, step + 1, config.lmbda, config.seq_kd)
    if self.setup.teacher_client and step + 1 < config.total_steps and next_mode == "dataset":
      self.ahead = self._prepare(step + 1)
    if topk is not None:
      batch["teacher_topk_values"], batch["teacher_topk_indices"] = topk.result()
    return batch, mode, gen_time


# ------------------------------------------------------------------------------------------------ loop


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(setup: Setup, workdir: str | None = None) -> dict:
  """Held-out metrics of the current student: teacher-forced divergences (distill loss at the run's β, FKL,
  RKL, entropies, top-1 agreement) and NLL over the eval split, then the generation metric
  (config.eval_metric). The teacher's generation metric is computed once and cached in the workdir."""
  config, loader = setup.config, setup.eval_loader
  totals, tokens = {}, 0
  for step in range(loader.steps_per_epoch):
    batch = loader.batch(step)
    batch["completion_mask"] = batch["completion_mask"] & batch["row_mask"][:, None]
    keys = ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask"]
    if setup.step_cfg.teacher in ("model", "self") and "teacher_prompt_ids" in batch:
      keys += ["teacher_prompt_ids", "teacher_prompt_mask"]
    host = {k: batch[k] for k in keys}
    if setup.teacher_client is not None:
      host["teacher_topk_values"], host["teacher_topk_indices"] = request_teacher_topk(setup, host).result()
    out = jax.device_get(setup.eval_step(setup.state, {k: _global(setup.batch_sharding, v) for k, v in host.items()}))
    n = int(out.pop("tokens"))
    tokens += n
    for name, value in out.items():
      totals[name] = totals.get(name, 0.0) + float(value) * n
  result = {name: value / max(tokens, 1) for name, value in totals.items()}
  result["tokens"] = tokens
  metric = task_metrics.get(config.eval_metric)
  if metric is not None:
    if jax.process_count() > 1:
      logger.warning(
          "eval_metric=%s: generation-based evaluation runs on single-process runs only; skipped", config.eval_metric
      )
    else:
      rows = list(setup.eval_rows)
      student = (nnx.graphdef(setup.student), student_weights(setup))
      result.update({f"student_{k}": v for k, v in _generation_metric(setup, student, rows, metric).items()})
      result.update({f"teacher_{k}": v for k, v in _teacher_generation_metric(setup, rows, metric, workdir).items()})
  return result


def evaluate_workdir(config, workdir: str) -> dict:
  """--mode=eval: evaluates the workdir's latest checkpoint (or the initial student when there is none) and
  writes WORKDIR/eval.json."""
  from gkd_jax import checkpoints

  if not config.eval_split:
    raise ValueError("config.eval_split=None is invalid for --mode=eval: name the held-out split to evaluate")
  setup = build(config)
  with checkpoints.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    step = restore_or_start(setup, ckpt)
  result = {"step": step, **evaluate(setup, workdir)}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
  if setup.teacher_client is not None:
    setup.teacher_client.close()
  return result


def _generation_metric(setup, model, rows, metric) -> dict:
  from gkd_jax import evaluate as evaluate_lib

  config = setup.config
  completions = evaluate_lib.generate_completions(
      model,
      setup.tokenizer,
      rows,
      max_new_tokens=config.eval_max_new_tokens,
      batch_size=config.eval_batch_size,
      temperature=config.eval_temperature,
      seed=config.seed,
  )
  return {k: v for k, v in metric(completions, rows).items() if k != "count"}


def _teacher_generation_metric(setup, rows, metric, workdir) -> dict:
  """Once per workdir: the teacher does not change (a server teacher is not evaluated; OPSD-dynamic's
  teacher is the student)."""
  if setup.teacher is None:
    return {}
  path = None if workdir is None else os.path.join(workdir, "teacher_eval.json")
  if path and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  result = _generation_metric(setup, (nnx.graphdef(setup.teacher), setup.state.teacher_params), rows, metric)
  if path and jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(result, f)
  return result


def throughput(
    setup: Setup, batch: dict, mode: str, gen_time: float, train_time: float, step_time: float, peak_flops: float
) -> dict:
  """Step timing, tokens/s and an MFU estimate (model FLOPs / (time × measured matmul ceiling)). The train
  step runs teacher and student in one program: their split is estimated from their FLOP shares."""
  b, p = setup.config.batch_size, batch["prompt_ids"].shape[1]
  c = batch["completion_ids"].shape[1]
  teacher = (
      setup.teacher if setup.teacher is not None else (setup.student if setup.step_cfg.teacher == "self" else None)
  )
  generator = teacher if mode == "seq_kd" else setup.student
  flops = metrics_lib.step_flops(
      setup.student.config,
      None if teacher is None else teacher.config,
      b,
      p + c,
      c,
      generated=c if mode != "dataset" else 0,
      generator_config=generator.config,
  )
  share = flops["teacher"] / max(flops["teacher"] + flops["student"], 1.0)
  return {
      "step_s": round(step_time, 4),
      "generation_s": round(gen_time, 4),
      "teacher_s_est": round(train_time * share, 4),
      "student_s_est": round(train_time * (1 - share), 4),
      "tokens_per_s": round(b * (p + c) / step_time, 1),
      "mfu": round(sum(flops.values()) / (step_time * peak_flops), 5),
  }


def log_samples(setup: Setup, writer, batch: dict, step: int, workdir: str, count: int = 2):
  """A few sampled completions (decoded) to WORKDIR/samples.jsonl and TensorBoard."""
  if jax.process_index() != 0:
    return
  tok = setup.tokenizer
  rows = []
  for i in range(min(count, len(batch["prompt_ids"]))):
    prompt = batch["prompt_ids"][i][batch["prompt_mask"][i]]
    completion = batch["completion_ids"][i][batch["completion_mask"][i]]
    rows.append({"step": step, "prompt": tok.decode(prompt), "completion": tok.decode(completion)})
  with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  writer.write_text("samples", "\n\n".join(f"{r['prompt']} → {r['completion']}" for r in rows), step)


def export_student(setup: Setup, out_dir: str) -> str:
  """Writes the trained student (LoRA merged) as a HuggingFace checkpoint with the tokenizer (process 0)."""
  nnx.update(setup.student, jax.device_get(student_weights(setup)))
  if jax.process_index() == 0:
    models.save_pretrained(setup.student, out_dir, tokenizer=setup.tokenizer)
  return out_dir


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
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_or_start(setup: Setup, ckpt) -> int:
  """Restores the latest checkpoint into setup.state when there is one; returns the step to start at."""
  if ckpt.latest_step() is None:
    return 0
  setup.state, extra = ckpt.restore(abstract_state(setup.state), fingerprint=fingerprint(setup.config))
  step = setup.loader.resume_step(extra["data"])
  if step != int(setup.state.step):
    raise ValueError(
        f"checkpoint {ckpt.step_dir(ckpt.latest_step())}: data position {step} does not match the "
        f"state's step {int(setup.state.step)}"
    )
  logger.info("resumed from step %d", step)
  return step


def train(config, workdir: str) -> dict:
  """Builds everything from `config` and runs it; returns the last step's metrics."""
  return run(build(config), workdir)


def run(setup: Setup, workdir: str) -> dict:
  """Runs optimizer steps up to config.total_steps, resuming from the workdir's latest checkpoint; saves
  every `save_every` steps, at the end, and on preemption (SIGTERM), then exits cleanly."""
  from tqdm.auto import tqdm
  from gkd_jax import checkpoints

  config = setup.config
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=1))
  ckpt = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints, save_every=config.save_every
  )
  start = restore_or_start(setup, ckpt)
  preemption = checkpoints.install_preemption_handler()
  writer = metrics_lib.MetricsWriter(workdir, resumed_step=start)
  peak = (config.peak_flops or metrics_lib.measure_peak_flops(jnp.dtype(config.dtype))) * jax.process_count()
  bar = tqdm(
      total=config.total_steps,
      initial=start,
      disable=jax.process_index() != 0,
      desc=config.objective,
      dynamic_ncols=True,
  )
  record = {}
  source = BatchSource(setup)
  try:
    for step in range(start, config.total_steps):
      t0 = time.perf_counter()
      batch, mode, gen_time = source.get(step)
      host_batch = batch
      batch = {k: _global(setup.batch_sharding, v) for k, v in batch.items()}
      t1 = time.perf_counter()
      setup.state, metrics = setup.train_step(setup.state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      train_time = time.perf_counter() - t1
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(
            f"loss is {metrics['loss']} at step {step} (mode {mode}); stopping with the "
            f"last checkpoint (step {ckpt.latest_step()}) intact"
        )
      record = {
          "step": step + 1,
          "mode": mode,
          **metrics,
          **throughput(setup, host_batch, mode, gen_time, train_time, time.perf_counter() - t0, peak),
      }
      writer.write(record)
      if mode != "dataset" and config.sample_every and (step + 1) % config.sample_every == 0:
        log_samples(setup, writer, host_batch, step + 1, workdir)
      last = step + 1 == config.total_steps
      if setup.eval_loader is not None and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
        writer.write({"step": step + 1, **evaluate(setup, workdir)}, prefix="eval")
      bar.update(1)
      if (step + 1) % config.log_every == 0 or step + 1 == config.total_steps:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", mode=mode)
      stop = ckpt.reached_preemption(step + 1)
      ckpt.save(
          step + 1,
          setup.state,
          {"data": setup.loader.state(step + 1), "fingerprint": fingerprint(config)},
          force=stop or step + 1 == config.total_steps,
      )
      if stop:
        logger.warning("preempted: saved step %d and stopping", step + 1)
        break
  finally:
    bar.close()
    writer.close()
    ckpt.close()
    preemption.uninstall()
    if setup.teacher_client is not None:
      setup.teacher_client.close()
  if config.export_on_finish and int(setup.state.step) == config.total_steps:
    export_student(setup, os.path.join(workdir, "export"))
  return record
