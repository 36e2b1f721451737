"""The GKD training loop: Algorithm 1 of the paper around the pure train step.

    python -m gkd_jax.main --config=configs/NAME.py --workdir=DIR

`build` loads models, tokenizer and data once and jits the step (a `Setup`); `run` then takes, per step,
the mode drawn by the step's coin, the batch (its completions sampled by the student on-policy steps, by the
teacher on seq_kd steps: gkd_jax.rollout), one train step, and logs, evaluates (gkd_jax.evaluate) and saves
(gkd_jax.checkpoints; resuming: gkd_jax.resume). The train state is a value threaded through the loop.
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

from gkd_jax import checkpoints, evaluate, export, files, lora, models, resume, rollout, sampling, sharding
from gkd_jax import storage, teacher_client, workdir_lock
from gkd_jax import images as images_lib
from gkd_jax import config as config_lib
from gkd_jax import data as data_lib
from gkd_jax import rows as rows_lib
from gkd_jax import metrics as metrics_lib
from gkd_jax import train_step as ts

logger = logging.getLogger(__name__)


def teacher_server_api_key(config) -> str | None:
  """config.teacher_model_server_api_key, or when that is None $GKD_JAX_API_KEY (empty = unset), or None."""
  key = config.get("teacher_model_server_api_key")
  return key if key is not None else os.environ.get(teacher_client.API_KEY_ENV) or None


def teacher_server_client(config, vocab_size: int):
  """The TeacherClient of config.teacher_model_server (with its API key), checked: an unreachable server, a
  missing or wrong key (HTTP 401) or a k it does not serve stops the run here, not at the first step."""
  client = teacher_client.TeacherClient(
      config.teacher_model_server,
      config.gkd_logits_topk,
      vocab_size=vocab_size,
      api_key=teacher_server_api_key(config),
  )
  try:
    client.check()
  except BaseException:
    client.close()
    raise
  return client


def _offload_possible(config) -> bool:
  """Asked only when the run offloads a model teacher (the check warns when the backend cannot)."""
  return bool(config.offload_teacher_model) and ts.teacher_kind(config) == "model" and host_memory_available()


def host_memory_available() -> bool:
  """Whether this backend can keep arrays in pinned host memory (offload_teacher_model)."""
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """Everything built once at start-up, fixed for the run. The train state is not in it: it is a value that
  functions take and return (`build` returns the initial one, `run` the one it ended with)."""

  config: Any
  mesh: jax.sharding.Mesh
  tokenizer: Any
  student: nnx.Module
  teacher: nnx.Module | None
  loader: data_lib.DataLoader
  step_cfg: ts.StepConfig
  train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
  batch_sharding: NamedSharding
  stop_ids: tuple
  lora_spec: lora.LoraSpec | None = None
  teacher_client: Any = None  # TeacherClient when the teacher is a server
  eval_step: Any = None  # jitted (state, batch) -> teacher-forced eval metrics
  eval_loader: Any = None  # held-out batches (config.eval_split), or None
  eval_rows: Any = None  # the held-out rows themselves, for the generation metric
  image_inputs: Any = None  # images.ImageInputs of a vision-language student (None: text only)


def check_model_fits(config, field: str, model_config, mesh) -> None:
  """What a run config asks of a model that its config.json alone can refuse, before any weight loads.

  - Sequence length: the longest sequence a run forms (and samples) is prompt + completion, at most
    min(max_length, max_prompt_length + max_completion_length); beyond max_position_embeddings the model
    would be run on positions it was never trained on (and generation fails mid-run).
  - Heads over mesh.tensor (gkd_jax.sharding: a dim that the mesh axis does not divide is silently
    replicated): mesh.tensor must divide num_attention_heads, else the whole attention (q and o, most of its
    weights and FLOPs) is replicated on every tensor device. KV heads fewer than mesh.tensor are
    legitimately replicated (GQA: the k/v projections are the small part; Megatron and vLLM do the same),
    as long as mesh.tensor is a multiple of them; otherwise mesh.tensor must divide them too.
  """
  name = f"config.{field}={config[field]!r}"
  longest = min(config.max_length, config.max_prompt_length + config.max_completion_length)
  limit = model_config.max_position_embeddings
  if longest > limit:
    raise ValueError(
        f"config.max_length={config.max_length}, max_prompt_length={config.max_prompt_length} and "
        f"max_completion_length={config.max_completion_length} allow sequences of {longest} tokens "
        f"(min(max_length, max_prompt_length + max_completion_length)), beyond {name}'s limit: its config.json "
        f"has max_position_embeddings={limit}. Lower them to at most {limit} tokens in all"
    )
  tensor = mesh.shape["tensor"]
  heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
  if tensor > 1 and (heads % tensor or (kv % tensor and tensor % kv)):
    divisors = [t for t in range(1, heads + 1) if heads % t == 0 and (kv % t == 0 or t % kv == 0)]
    raise ValueError(
        f"config.mesh.tensor={tensor} does not fit {name}: it has num_attention_heads={heads} and "
        f"num_key_value_heads={kv}, and mesh.tensor must divide the attention heads (KV heads may be fewer "
        f"than mesh.tensor, then replicated, if mesh.tensor is a multiple of them); tensor sizes that fit: "
        f"{divisors}"
    )


def _check_same_tokenizer(tokenizer, path: str):
  """Teacher and student must share one tokenizer (cross-tokenizer distillation is out of scope)."""
  try:
    other = models.load_tokenizer(path)
  except (OSError, ValueError) as e:
    logger.warning("cannot check that teacher_model shares the student's tokenizer: %s; assuming it does", e)
    return
  if other.get_vocab() != tokenizer.get_vocab():
    raise ValueError(
        f"teacher_model {path!r} uses a different tokenizer ({len(other)} tokens) than the student "
        f"({len(tokenizer)} tokens); GKD needs one shared tokenizer"
    )


def build(config) -> tuple[Setup, ts.TrainState]:
  """Loads models, tokenizer and data, and builds the jitted step (the Setup) and the initial sharded train
  state."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_shards:
    raise ValueError(
        f"config.batch_size={config.batch_size} must be divisible by the mesh's data×fsdp size "
        f"{batch_shards} (the batch is split over both)"
    )
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  tokenizer = models.load_tokenizer(config.tokenizer or config.model)
  config_lib.validate_with_tokenizer(config, len(tokenizer))
  kind = ts.teacher_kind(config)
  if kind == "model" and config.teacher_model != config.model:
    _check_same_tokenizer(tokenizer, config.teacher_model)  # before any model loads
  for field in ("model", "teacher_model") if kind == "model" else ("model",):
    check_model_fits(config, field, models.load_config(config[field]), mesh)  # config.json only
  student_vl = models.load_vl_config(config.model)  # None: text-only
  teacher_vl = models.load_vl_config(config.teacher_model) if kind == "model" else None
  image_inputs = _image_inputs(config, tokenizer, student_vl, teacher_vl)
  # The data before the weights: a bad dataset, split or row fails in seconds, not after a model load.
  loader = data_lib.loader_from_config(
      config,
      tokenizer,
      rows_lib.rows_from_config(config, config.dataset, config.dataset_split),
      config.batch_size,
      require_completion=config.lmbda < 1.0 and not config.seq_kd,
      drop_remainder=True,
      image_inputs=image_inputs,
  )
  if kind == "server" and loader.has_images:
    raise ValueError(
        f"config.teacher_model_server={config.teacher_model_server!r}: the dataset {config.dataset!r} has images, "
        f"and a served teacher receives token ids only (the image would never reach it); give a local "
        f"teacher_model for multimodal data"
    )
  eval_rows, eval_loader = evaluate.held_out(config, tokenizer, image_inputs) if config.eval_split else (None, None)
  options = models.model_options(config)
  student_options = options if student_vl is None else {**options, **_vision_training(config)}
  student = models.from_pretrained(config.model, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **student_options)
  teacher = None
  if kind == "model":  # a teacher's tower and projector never train
    teacher = models.from_pretrained(config.teacher_model, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **options)
  vocab_size = len(tokenizer)
  cfg = ts.StepConfig.from_run_config(config, vocab_size, offload_teacher=_offload_possible(config))

  teacher_params = None if teacher is None else nnx.state(teacher)
  if cfg.offload_teacher:  # kept in host memory between steps; the step moves it in for the forward only
    teacher_params = jax.device_put(
        teacher_params, jax.tree.map(lambda x: x.sharding.with_memory_kind("pinned_host"), teacher_params)
    )
  state, tx, schedule, lora_spec = resume.initial_state(config, student, teacher_params, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn, eval_fn = ts.make_steps(student, tx, schedule, cfg, teacher=teacher, lora_spec=lora_spec)
  train_step = jax.jit(
      step_fn, in_shardings=(state_sharding, None), out_shardings=(state_sharding, replicated), donate_argnums=0
  )
  # Generation stops at the tokenizer's eos and at every eos the model's config names (Llama 3 has two).
  model_eos = student.config.eos_token_id
  model_eos = model_eos if isinstance(model_eos, (list, tuple)) else [model_eos]
  stop_ids = sampling.normalize_stop_ids([t for t in [tokenizer.eos_token_id, *model_eos] if t is not None])
  client = None
  if kind == "server":
    client = teacher_server_client(config, vocab_size)  # fail at start-up, not at the first step
  eval_step = jax.jit(eval_fn, in_shardings=(state_sharding, None), out_shardings=replicated)
  setup = Setup(
      config=config,
      mesh=mesh,
      tokenizer=tokenizer,
      student=student,
      teacher=teacher,
      loader=loader,
      step_cfg=cfg,
      train_step=train_step,
      batch_sharding=batch_sharding,
      stop_ids=stop_ids,
      lora_spec=lora_spec,
      teacher_client=client,
      eval_step=eval_step,
      eval_loader=eval_loader,
      eval_rows=eval_rows,
      image_inputs=image_inputs,
  )
  return setup, state


def _vision_training(config) -> dict:
  """from_pretrained's options for a vision-language student: its tower and projector train as the config says."""
  return {"train_vision_tower": config.train_vision_tower, "train_projector": config.train_projector}


def _image_inputs(config, tokenizer, student, teacher):
  """The image preprocessing of a vision-language student (None for a text-only one), checked against the
  teacher: both must read the same image tokens, so each must take the same tiles and tokens per tile.
  `student` / `teacher`: their InternVLConfig, None for a text-only model or no local teacher."""
  if ts.teacher_kind(config) == "model" and (student is None) != (teacher is None):
    which = "teacher_model" if student is None else "model"
    raise ValueError(
        f"config.{which}={config[which]!r} is a vision-language model but the other is text-only: GKD with images "
        f"needs both to read them (or both text-only)"
    )
  if student is None:
    if config.train_vision_tower or config.train_projector:
      raise ValueError(
          f"config.train_vision_tower / train_projector are for vision-language models; config.model={config.model!r} "
          f"is text-only"
      )
    return None
  if teacher is not None:
    fields = {
        "image_token_id": lambda c: c.image_token_id,
        "image_seq_length": lambda c: c.image_seq_length,
        "vision image_size": lambda c: c.vision.image_size,
    }
    differ = [f"{f} {get(student)} vs {get(teacher)}" for f, get in fields.items() if get(student) != get(teacher)]
    if differ:
      raise ValueError(
          f"config.model={config.model!r} and config.teacher_model={config.teacher_model!r} read images differently "
          f"({', '.join(differ)}): one prompt's image tokens must suit both"
      )
  inputs = images_lib.image_inputs(
      models.checkpoint_dir(config.model), tokenizer, student.image_seq_length, max_tiles=config.image_max_tiles
  )
  if inputs.context_token_id != student.image_token_id:
    raise ValueError(
        f"the tokenizer's image token {inputs.context_token!r} is id {inputs.context_token_id}, but "
        f"config.model={config.model!r} reads image features at image_token_id={student.image_token_id}"
    )
  return inputs


def train(config, workdir: str) -> dict:
  """Builds everything from `config` and runs it; returns the last step's metrics. Raises
  `checkpoints.Preempted` when a SIGTERM (or JAX's multi-host preemption notice) stopped it after saving."""
  files.require_directory(workdir, "--workdir")
  checkpoints.check_shared_workdir(workdir)  # every process must see one workdir (a bucket on a pod)
  with workdir_lock.hold(workdir):  # one run per workdir, refused before anything loads
    config_lib.check_resume(workdir, config, resume.FINGERPRINT_FIELDS)  # before anything loads
    return _run(*build(config), workdir)[1]


def run(setup: Setup, state: ts.TrainState, workdir: str) -> tuple[ts.TrainState, dict]:
  """Runs optimizer steps up to config.total_steps, resuming from the workdir's latest checkpoint; saves
  every `save_every` steps, at the end, and on preemption (SIGTERM), then raises `checkpoints.Preempted`
  (the CLI exits with checkpoints.PREEMPTED_EXIT_CODE: rerun me), or on a first Ctrl-C, then raises
  `checkpoints.Interrupted` (the CLI exits with 130). `state` is the initial state (from `build`; donated to
  the step). Returns the state the run ended with and the last step's record. Holds the workdir's lock (gkd_jax.workdir_lock)
  throughout: raises WorkdirLocked when another run has it."""
  with workdir_lock.hold(workdir):
    return _run(setup, state, workdir)


def _run(setup: Setup, state: ts.TrainState, workdir: str) -> tuple[ts.TrainState, dict]:
  from tqdm.auto import tqdm

  config = setup.config
  resume_step = _resume_step(workdir, config)  # read before config.json is replaced
  config_lib.write_run_config(workdir, config, resume.FINGERPRINT_FIELDS, write=jax.process_index() == 0)
  ckpt = checkpoints.Checkpointer(
      storage.join(workdir, "checkpoints"),
      max_to_keep=config.keep_checkpoints,
      save_every=config.save_every,
      keep_period=config.get("keep_period"),
  )
  state, start = resume.restore_or_start(ckpt, state, setup.loader, config, resume_step)
  all_finite = jax.jit(_all_finite, out_shardings=NamedSharding(setup.mesh, PartitionSpec()))
  zero_grad_limit, zero_grad_steps = config.get("stop_on_zero_grad_steps", 0), 0
  preemption = checkpoints.install_preemption_handler()
  writer = metrics_lib.MetricsWriter(workdir, resumed_step=start, config=config)
  peak = (config.peak_flops or metrics_lib.measure_peak_flops(jnp.dtype(config.dtype))) * jax.process_count()
  bar = tqdm(
      total=config.total_steps,
      initial=start,
      disable=jax.process_index() != 0,
      desc=config.objective,
      dynamic_ncols=True,
  )
  record, source, fp = {}, rollout.BatchSource(setup), resume.fingerprint(config)
  preempted = failure = None
  try:
    for step in range(start, config.total_steps):
      done = step + 1
      t0 = time.perf_counter()
      # Algorithm 1: the step's coin picks the mode; on-policy / seq_kd steps sample their completions, which
      # stay on the devices: the batch is global arrays, and the host does not wait for the sampler.
      batch, mode, gen = source.get(step, state)
      t1 = time.perf_counter()
      state, metrics = setup.train_step(state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      gen_time = gen.result()
      train_time = time.perf_counter() - max(t1, gen.end or t1)  # from when batch and completions were both ready
      for name in ("loss", "grad_norm"):  # every step: the step's metrics are on the host anyway
        if name in metrics and not np.isfinite(metrics[name]):
          raise _diverged(
              f"{'the global grad norm' if name == 'grad_norm' else 'the loss'} is {metrics[name]}", done, mode, ckpt
          )
      if zero_grad_limit:
        zero_grad_steps = zero_grad_steps + 1 if metrics.get("grad_norm") == 0.0 else 0
        if zero_grad_steps >= zero_grad_limit:
          raise Collapsed(
              f"the global grad norm was exactly 0 for {zero_grad_steps} consecutive steps (steps "
              f"{done - zero_grad_steps + 1}-{done}): the student gets no training signal any more (a collapsed "
              f"run: e.g. saturated weights after a too high learning rate, or batches without target tokens); "
              f"stopping. {_resume_hint(ckpt)}. Set config.stop_on_zero_grad_steps=0 to train on regardless"
          )
      step_time = time.perf_counter() - t0
      timing = metrics_lib.throughput(
          setup.student.config,
          _teacher_config(setup),
          config.batch_size,
          batch,
          mode,
          gen_time,
          train_time,
          step_time,
          peak,
          **_vision_configs(setup),
      )
      record = {"step": done, "mode": mode, **metrics, **timing}
      writer.write(record)
      if mode != "dataset" and config.sample_every and done % config.sample_every == 0:
        metrics_lib.log_samples(setup.tokenizer, writer, batch, done)
      last = done == config.total_steps
      if setup.eval_loader is not None and ((config.eval_every and done % config.eval_every == 0) or last):
        writer.write({"step": done, **evaluate.evaluate(setup, state, workdir)}, prefix="eval")
      bar.update(1)
      if done % config.log_every == 0 or last:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", mode=mode)
      stop = ckpt.reached_preemption(done)
      if (stop or last or done % config.save_every == 0) and not bool(all_finite(state.params)):
        raise _diverged("a parameter is not finite (inf or nan) after the update", done, mode, ckpt)
      if ckpt.save(done, state, {"data": setup.loader.state(done), "fingerprint": fp}, force=stop or last):
        writer.flush()  # the logs cover every checkpointed step (on a bucket they are uploaded here)
      if stop:
        ckpt.wait()
        stopped = checkpoints.Interrupted if preemption.interrupted else checkpoints.Preempted
        preempted = stopped(done, workdir)
        break
  except BaseException as e:
    failure = e
    raise
  finally:
    bar.close()
    _stop(setup, writer, ckpt, failure)
    preemption.uninstall()
  if preempted is not None:
    raise preempted
  if config.export_on_finish and int(state.step) == config.total_steps:
    weights = rollout.student_weights(state, setup.lora_spec)
    export.export_student(
        setup.student, setup.tokenizer, weights, storage.join(workdir, "export"), overwrite=True, source=config.model
    )  # the run's own export
  return state, record


def evaluate_workdir(config, workdir: str) -> dict:
  """--mode=eval: evaluates the workdir's latest checkpoint (or the initial student when there is none) and
  writes WORKDIR/eval.json."""
  if not config.eval_split:
    raise ValueError("config.eval_split=None is invalid for --mode=eval: name the held-out split to evaluate")
  files.require_directory(workdir, "--workdir")
  setup, state = build(config)
  with checkpoints.Checkpointer(storage.join(workdir, "checkpoints")) as ckpt:
    state, step = resume.restore_or_start(ckpt, state, setup.loader, config)
  result = {"step": step, **evaluate.evaluate(setup, state, workdir)}
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "eval.json"), json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
  if setup.teacher_client is not None:
    setup.teacher_client.close()
  return result


class Collapsed(RuntimeError):
  """The global grad norm stayed exactly 0 for config.stop_on_zero_grad_steps consecutive steps."""


def _all_finite(tree) -> jax.Array:
  """Whether every float leaf of `tree` is finite (one jitted reduction; run at save steps only)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _resume_hint(ckpt) -> str:
  last = ckpt.latest_step()  # saves are checked finite before they start: every listed step is good
  if last is None:
    return "No checkpoint was saved before it: start again (in a new workdir), e.g. with a lower learning_rate"
  return (
      f"The last good checkpoint is step {last} in {ckpt.directory}: to resume from it, rerun with "
      f"--config.resume_step={last} (changing e.g. learning_rate too needs --config.allow_config_change=True)"
  )


def _diverged(what: str, done: int, mode: str, ckpt) -> FloatingPointError:
  """The error of a non-finite step; `done` counts steps like checkpoints do (from 1)."""
  return FloatingPointError(f"{what} at step {done} (mode {mode}): stopping without saving it. {_resume_hint(ckpt)}")


def _resume_step(workdir: str, config) -> int | None:
  """config.resume_step, unless this workdir's run was already rewound to it (its config.json has the same
  resume_step: a rerun of the same command after a preemption continues from the latest checkpoint)."""
  step = config.get("resume_step")
  path = storage.join(workdir, "config.json")
  if step is not None and jax.process_index() == 0 and config_lib.has_checkpoints(workdir) and storage.exists(path):
    try:
      saved = json.loads(storage.read_text(path)).get("resume_step")
    except ValueError:
      saved = None
    if saved == step:
      logger.warning(
          "config.resume_step=%d was applied by an earlier run in %s (its config.json has it): resuming from "
          "the latest checkpoint",
          step,
          workdir,
      )
      step = None
  if jax.process_count() > 1:  # process 0's answer: the others might read config.json after it was replaced
    step = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    step = None if step < 0 else step
  return step


def _stop(setup: Setup, writer, ckpt, failure: BaseException | None) -> None:
  """Closes the run's outputs. After a failure nothing here may hide it: errors are logged, and when the
  storage itself is gone nothing more is written or waited for."""
  lost = isinstance(failure, storage.StorageError)
  steps = [
      lambda: writer.close(flush=not lost),
      lambda: ckpt.close(wait=not lost),
      lambda: setup.teacher_client is not None and setup.teacher_client.close(),
  ]
  for close in steps:
    if failure is None:
      close()
      continue
    try:
      close()
    except Exception as e:  # noqa: BLE001 - the failure being raised is the one to report
      logger.warning("while stopping after %s: %s", type(failure).__name__, storage.short(e))


def _teacher_config(setup: Setup):
  """The config of the model the train step runs as the teacher (None for a server or no teacher)."""
  if setup.teacher is not None:
    return setup.teacher.config
  return setup.student.config if setup.step_cfg.teacher == "self" else None


def _vision_configs(setup: Setup) -> dict:
  """metrics.throughput's vision-language arguments: the towers' configs (None for text-only models)."""
  teacher = (
      setup.teacher if setup.teacher is not None else (setup.student if setup.step_cfg.teacher == "self" else None)
  )
  return {
      "student_vision": getattr(setup.student, "vl_config", None),
      "teacher_vision": getattr(teacher, "vl_config", None),
      "vision_trained": bool(getattr(setup.student, "train_vision_tower", False)),
  }
