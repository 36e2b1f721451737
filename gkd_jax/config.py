"""The run configuration: every field with its default, and start-up validation with one clear message.

Recipes in configs/ start from `base_config()` and override fields; `--config.field=value` flags override
them again. Field names follow TRL / ms-swift where those exist (beta, lmbda, seq_kd, temperature,
sft_alpha, max_completion_length, gkd_logits_topk, teacher_model, teacher_model_server,
offload_teacher_model).

Rerunning in a workdir whose checkpoints a run left resumes that run, so the config is compared with the
workdir's config.json first (`check_resume`), before anything loads and before config.json is replaced:
  - fields that fix the checkpoint's state or the data order (the trainer's fingerprint: model, teacher,
    dataset, seed, batch_size, LoRA, dtypes, top-k, ...) can never change: use a new workdir;
  - RESUME_SAFE_FIELDS (logging, sampling logs, eval settings and cadence, save_every / keep_checkpoints,
    total_steps, export_on_finish, the device mesh, offload_teacher_model, peak_flops, loss_chunk_size)
    change how the run is observed, saved, laid out or how long it runs: accepted with a warning listing
    them (old → new);
  - every other field (beta, lmbda, seq_kd, temperature, learning_rate, schedule, weight decay, clipping,
    lengths, ...) changes the method mid-run: refused with the list of changes, unless
    `allow_config_change=True` says the change is meant.
An accepted change keeps the previous config.json as config.replaced-TIMESTAMP.json.

SECRET_FIELDS (the teacher server's API key) are credentials, not part of the run: config.json holds them as
"<redacted>" (when set), and resuming never compares them (a key set, rotated or moved to $GKD_JAX_API_KEY
is no config change).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import time

import ml_collections
import numpy as np

from gkd_jax import files, optim, storage

OBJECTIVES = ("gkd", "sft")
EVAL_METRICS = ("none", "math", "arithmetic", "rouge", "shapes")  # scored by gkd_jax.evaluate.metric
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "offload")
ATTENTION = ("xla", "dot_product", "splash")

logger = logging.getLogger(__name__)

# Fields that may differ from the workdir's config.json when a run resumes (see the module docstring).
RESUME_SAFE_FIELDS = (
    "total_steps",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "sample_every",
    "export_on_finish",
    "peak_flops",
    "eval_dataset",
    "eval_split",
    "eval_rows",
    "eval_batch_size",
    "eval_every",
    "eval_metric",
    "eval_max_new_tokens",
    "eval_temperature",
    "mesh",
    "offload_teacher_model",
    "loss_chunk_size",
    "remat",
    "attention",
    "allow_config_change",
    "resume_step",
    "keep_period",
    "stop_on_zero_grad_steps",
    "wandb_project",
    "wandb_entity",
    "wandb_run_name",
)
# Credentials: written to config.json as REDACTED, never compared on resume, never in an error message.
SECRET_FIELDS = ("teacher_model_server_api_key",)
REDACTED = "<redacted>"
_RESUME_NOTES = {"total_steps": " (the learning-rate schedule now spans the new total)"}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Models. teacher_model: None → OPSD dynamic (the student's current params teach, given teacher_prompt);
  # equal to `model` → OPSD fixed (a frozen copy of the initial student).
  c.model = ""
  c.teacher_model = ml_collections.FieldReference(None, field_type=str)
  c.tokenizer = ml_collections.FieldReference(None, field_type=str)
  c.teacher_model_server = ml_collections.FieldReference(None, field_type=str)
  # The server's API key (sent as "Authorization: Bearer KEY"); None: $GKD_JAX_API_KEY, else no key ("": no key
  # either). Saved in the workdir's config.json as "<redacted>": prefer the environment variable on shared machines.
  c.teacher_model_server_api_key = ml_collections.FieldReference(None, field_type=str)
  c.offload_teacher_model = False
  c.dtype = "float32"  # compute dtype ("bfloat16" on TPU/GPU)
  c.param_dtype = "float32"  # master weights
  # Model execution. scan_layers: the decoder layers' weights are stacked on a leading "layers" axis and run
  # under one lax.scan (compile time independent of depth); False runs a Python loop over per-layer modules.
  # remat: per-layer activation checkpointing, "none" (keep all activations), "full" (keep only each layer's
  # input, recompute the rest in the backward pass), "dots" (keep the outputs of weight matmuls,
  # jax.checkpoint_policies.dots_with_no_batch_dims_saveable; recompute the elementwise and attention parts)
  # or "offload" (the same outputs, moved to host memory until the backward pass needs them). "dots" is the
  # default: on the recipes' TPU steps it costs ~0.5% more matmul FLOPs than "none" and keeps 35% less in
  # HBM (experiments/results/aot.md).
  # attention: "xla" (einsum + softmax), "dot_product" (jax.nn.dot_product_attention: cuDNN flash attention
  # on GPU, XLA elsewhere) or "splash" (the Pallas splash-attention kernel, TPU only, for the uncached
  # forward passes of training and scoring; cached sampling uses "xla"). Gemma 2's softcapped attention
  # always uses "xla".
  c.scan_layers = True
  c.remat = "dots"
  c.attention = "xla"
  # Method.
  c.objective = "gkd"  # "gkd" or "sft" (NLL only, no teacher)
  c.beta = 0.5  # 0 = forward KL(teacher‖student), 1 = reverse KL(student‖teacher)
  c.lmbda = 0.5  # probability of an on-policy (student-sampled) step
  c.seq_kd = False  # off-policy steps use teacher samples instead of the dataset
  c.temperature = 0.9  # sampling temperature; also the loss temperature unless loss_temperature is set
  c.loss_temperature = ml_collections.FieldReference(None, field_type=float)
  c.sft_alpha = 0.0  # + sft_alpha · NLL on steps the student did not generate
  c.label_smoothing = 0.0  # of the SFT term (objective=sft, sft_alpha): (1 - ε)·one-hot + ε·uniform targets
  c.gkd_logits_topk = ml_collections.FieldReference(None, field_type=int)
  c.fused_loss = False  # chunked loss from hidden states: no [B, T, V] logits
  c.loss_chunk_size = ml_collections.FieldReference(None, field_type=int)
  c.top_k = 0  # generation truncation (0 = off)
  c.top_p = 1.0
  # Data.
  c.dataset = ""  # hub name, local json/jsonl/parquet/arrow file(s) or a save_to_disk dir
  c.dataset_config = ml_collections.FieldReference(None, field_type=str)  # hub dataset config ("main" for gsm8k)
  c.dataset_split = "train"
  c.dataset_columns = ml_collections.ConfigDict()  # renames, e.g. {"question": "prompt", "answer": "completion"}
  # OPSD: build the teacher's privileged prompt from {prompt} and the reference {completion} of each row.
  c.teacher_prompt_template = ml_collections.FieldReference(None, field_type=str)
  c.max_length = 512
  c.max_prompt_length = 256
  c.max_completion_length = 128
  # Allowed padded widths of prompts and completions (None: gkd_jax.data.DEFAULT_BUCKETS, powers of two and
  # 1.5x powers of two from 16); each batch takes the smallest that fits, so a run compiles once per width.
  c.length_buckets = ml_collections.FieldReference(None, field_type=tuple)
  # Optimization.
  c.batch_size = 8  # global, over all hosts
  c.grad_accum_steps = 1
  c.total_steps = 1000
  c.learning_rate = 1e-5
  c.warmup_steps = 0
  c.lr_schedule = "cosine"
  c.weight_decay = 0.0
  c.max_grad_norm = 1.0
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  # LoRA (lora_rank 0 = full-parameter training). Target modules: comma-separated module names
  # (q, k, v, o, gate, up, down, lm_head) or "all-linear".
  c.lora_rank = 0
  c.lora_alpha = 16.0
  c.lora_target_modules = "all-linear"
  c.lora_rslora = False
  # Vision-language models (InternVL): the vision tower and the projector (ms-swift's "aligner") are frozen by
  # default, as ms-swift's --freeze_vit / --freeze_aligner; LoRA adapts the language model only.
  c.train_vision_tower = False
  c.train_projector = False
  # The most tiles the image processor cuts a picture into (its max_patches; a thumbnail is added when there are
  # several); each tile costs image_seq_length tokens (256 for InternVL3). None: the checkpoint's processor setting.
  c.image_max_tiles = ml_collections.FieldReference(None, field_type=int)
  # Evaluation on a held-out split (none when eval_split is None): teacher-forced divergences and NLL, plus a
  # generation metric ("math" exact match, "arithmetic" checker, "rouge", or "none"), every eval_every steps
  # (0: only at the end) and with --mode=eval.
  # eval_dataset defaults to `dataset`; data files carry no split names, so with them set it (held-out files).
  c.eval_dataset = ml_collections.FieldReference(None, field_type=str)
  c.eval_split = ml_collections.FieldReference(None, field_type=str)
  c.eval_rows = 256
  c.eval_batch_size = 32
  c.eval_every = 0
  c.eval_metric = "none"
  c.eval_max_new_tokens = 128
  c.eval_temperature = 0.0  # 0 = greedy
  # Logging and checkpoints (orbax, in workdir/checkpoints; a run resumes from the latest automatically).
  c.log_every = 10
  c.save_every = 500
  c.keep_checkpoints = 3
  # Also keep every checkpoint whose step is a multiple of keep_period (None: only the last keep_checkpoints),
  # so that a bad stretch of training cannot push all earlier history out of keep-N.
  c.keep_period = ml_collections.FieldReference(None, field_type=int)
  # Resume from this checkpoint step instead of the latest (None: the latest), e.g. the last good one before a
  # divergence; later checkpoints are set aside in WORKDIR/checkpoints.set-aside-TIMESTAMP. Applied once: a
  # rerun whose config.json already has the same resume_step (after a preemption) resumes from the latest.
  c.resume_step = ml_collections.FieldReference(None, field_type=int)
  # Stop when the global grad norm is exactly 0 for this many consecutive steps (a collapsed run); 0 = never.
  c.stop_on_zero_grad_steps = 20
  # Resume even when fields that change the method (beta, lmbda, learning_rate, ...) differ from the workdir's
  # config.json (see the module docstring).
  c.allow_config_change = False
  c.export_on_finish = True  # write the student as a HuggingFace checkpoint to workdir/export at the end
  c.sample_every = 50  # log a few decoded completions of generating steps (0 = never)
  c.peak_flops = ml_collections.FieldReference(None, field_type=float)  # per process, for MFU; None = measure
  # Weights & Biases (pip install -e '.[wandb]'): with a project set, process 0 also logs the train and eval
  # records to a wandb run, started with this config (SECRET_FIELDS redacted) and resumed on restart (its id is
  # kept in WORKDIR/wandb_run_id). None = off. WANDB_MODE=offline, WANDB_DIR, WANDB_API_KEY work as usual.
  c.wandb_project = ml_collections.FieldReference(None, field_type=str)
  c.wandb_entity = ml_collections.FieldReference(None, field_type=str)  # None: the API key's default entity
  c.wandb_run_name = ml_collections.FieldReference(None, field_type=str)  # None: wandb picks one
  return c


def parse_arg(arg: str | None) -> tuple[str | None, str | None]:
  """A recipe's `:arg`: "runlocal" or "runlocal=/path/to/fixture" → ("runlocal", path); anything else as is."""
  if not arg:
    return None, None
  name, _, value = arg.partition("=")
  return name, value or None


def use_local_fixture(c, fixture: str | None = None):
  """Points a recipe at the offline benchmark fixture (`python experiments/fixture.py DIR`: Qwen2 12M student,
  65M teacher, arithmetic chat rows) and shrinks it to a quick CPU run."""
  fixture = fixture or "/tmp/gkd_fixture"
  self_teacher = c.teacher_model == c.model  # OPSD fixed stays self-distillation
  c.model = f"{fixture}/student"
  if c.teacher_model:
    c.teacher_model = c.model if self_teacher else f"{fixture}/teacher"
  c.tokenizer = f"{fixture}/tokenizer"
  c.dataset, c.dataset_config, c.dataset_split = f"{fixture}/train.jsonl", None, "train"
  c.dataset_columns = ml_collections.ConfigDict()
  c.dtype = c.param_dtype = "float32"
  c.remat = "none"  # tiny models: nothing to gain from recomputing activations on a CPU
  c.batch_size, c.grad_accum_steps, c.total_steps, c.warmup_steps = 8, 1, 20, 2
  c.learning_rate = 1e-4
  c.max_length, c.max_prompt_length, c.max_completion_length = 128, 64, 32
  c.log_every, c.save_every = 5, 10
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c


# Float fields that reach the optimizer, the loss or the sampler as float32 (validate checks them there).
FLOAT32_FIELDS = (
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "beta",
    "lmbda",
    "temperature",
    "loss_temperature",
    "sft_alpha",
    "label_smoothing",
    "lora_alpha",
    "top_p",
    "eval_temperature",
)
_F32_MAX, _F32_TINY = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)


def validate(c) -> None:
  """Raises ValueError naming the field, its value and what is allowed — before anything is loaded."""

  def fail(field, value, allowed):
    raise ValueError(f"config.{field}={value!r} is invalid: {allowed}")

  if c.objective not in OBJECTIVES:
    fail("objective", c.objective, f"must be one of {OBJECTIVES}")
  if c.get("wandb_project") and importlib.util.find_spec("wandb") is None:
    fail("wandb_project", c.wandb_project, "logging to Weights & Biases needs wandb: pip install -e '.[wandb]'")
  if not c.model:
    fail("model", c.model, "set a local HF checkpoint directory or a hub id")
  if not c.dataset:
    fail("dataset", c.dataset, "set a hub dataset name or local json/jsonl/parquet/arrow files")
  for field in ("beta", "lmbda"):
    if not 0.0 <= c[field] <= 1.0:
      fail(field, c[field], "must be in [0, 1]")
  if not c.temperature > 0:
    fail("temperature", c.temperature, "must be > 0")
  if c.loss_temperature is not None and not c.loss_temperature > 0:
    fail("loss_temperature", c.loss_temperature, "must be > 0 (or None to use temperature)")
  if c.sft_alpha < 0:
    fail("sft_alpha", c.sft_alpha, "must be ≥ 0")
  if not 0.0 <= c.label_smoothing < 1.0:
    fail("label_smoothing", c.label_smoothing, "must be in [0, 1)")
  if c.label_smoothing and c.objective == "gkd" and not c.sft_alpha:
    fail("label_smoothing", c.label_smoothing, "smooths the SFT term: it needs objective='sft' or sft_alpha > 0")
  if c.gkd_logits_topk is not None and c.gkd_logits_topk < 1:
    fail("gkd_logits_topk", c.gkd_logits_topk, "must be a positive int (or None for the full vocabulary)")
  if c.teacher_model_server:
    if not c.gkd_logits_topk:
      fail(
          "gkd_logits_topk",
          c.gkd_logits_topk,
          "must be set with teacher_model_server: the server returns " "top-k log-probs",
      )
    if c.teacher_model:
      fail("teacher_model", c.teacher_model, "give either teacher_model or teacher_model_server, not both")
    if c.seq_kd:
      fail("seq_kd", c.seq_kd, "needs a local teacher to sample from; a teacher server only scores")
  if c.teacher_prompt_template and (
      "{prompt}" not in c.teacher_prompt_template or "{completion}" not in c.teacher_prompt_template
  ):
    fail("teacher_prompt_template", c.teacher_prompt_template, "must contain both {prompt} and {completion}")
  if c.fused_loss and c.gkd_logits_topk:
    fail("fused_loss", c.fused_loss, "cannot be combined with gkd_logits_topk (pick one)")
  if c.objective == "sft" and (c.teacher_model or c.teacher_model_server or c.lmbda > 0 or c.seq_kd):
    fail(
        "objective",
        c.objective,
        "SFT uses no teacher: unset teacher_model/teacher_model_server and set " "lmbda=0, seq_kd=False",
    )
  if c.dtype not in DTYPES or c.param_dtype not in DTYPES:
    fail(
        "dtype" if c.dtype not in DTYPES else "param_dtype",
        c.dtype if c.dtype not in DTYPES else c.param_dtype,
        f"must be one of {DTYPES}",
    )
  for field in (
      "max_length",
      "max_prompt_length",
      "max_completion_length",
      "batch_size",
      "grad_accum_steps",
      "total_steps",
      "log_every",
      "save_every",
      "keep_checkpoints",
  ):
    if not (isinstance(c[field], int) and c[field] >= 1):
      fail(field, c[field], "must be a positive int")
  buckets = c.get("length_buckets")
  if buckets is not None and not (len(buckets) and all(isinstance(b, int) and b >= 1 for b in buckets)):
    fail("length_buckets", buckets, "must be None or a non-empty tuple of positive ints")
  if c.max_prompt_length + 1 > c.max_length:
    fail("max_prompt_length", c.max_prompt_length, f"must leave room for a completion within max_length={c.max_length}")
  if c.batch_size % c.grad_accum_steps:
    fail("grad_accum_steps", c.grad_accum_steps, f"must divide batch_size={c.batch_size}")
  if not (math.isfinite(c.learning_rate) and c.learning_rate >= 0):
    fail("learning_rate", c.learning_rate, "must be ≥ 0 and finite")
  for field in ("weight_decay", "max_grad_norm"):
    if not (math.isfinite(c[field]) and c[field] >= 0):
      fail(field, c[field], "must be ≥ 0 and finite" + (" (0 = no clipping)" if field == "max_grad_norm" else ""))
  for axis in ("data", "fsdp", "tensor"):
    size = c.mesh[axis]
    if not (isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1)):
      fail(f"mesh.{axis}", size, "must be a positive int, or -1 for the devices the other axes leave")
  if [c.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
    fail("mesh", c.mesh.to_dict(), "at most one axis may be -1")
  if not 0 <= c.warmup_steps <= c.total_steps:
    fail("warmup_steps", c.warmup_steps, f"must be in [0, total_steps={c.total_steps}]")
  if c.lr_schedule not in optim.SCHEDULES:
    fail("lr_schedule", c.lr_schedule, f"must be one of {optim.SCHEDULES}")
  if not (isinstance(c.lora_rank, int) and c.lora_rank >= 0):
    fail("lora_rank", c.lora_rank, "must be an int ≥ 0 (0 = full-parameter training)")
  if c.image_max_tiles is not None and not (isinstance(c.image_max_tiles, int) and c.image_max_tiles >= 1):
    fail("image_max_tiles", c.image_max_tiles, "must be None (the processor's setting) or an int ≥ 1")
  for field in ("train_vision_tower", "train_projector"):
    if not isinstance(c[field], bool):
      fail(field, c[field], "must be True or False")
    if c[field] and c.lora_rank:
      fail(field, c[field], "must be False with LoRA (lora_rank > 0): LoRA adapts the language model only")
  if c.lora_rank and not c.lora_alpha > 0:
    fail("lora_alpha", c.lora_alpha, "must be > 0")
  if c.eval_metric not in EVAL_METRICS:
    fail("eval_metric", c.eval_metric, f"must be one of {EVAL_METRICS}")
  if c.eval_split is not None:
    for field in ("eval_rows", "eval_batch_size", "eval_max_new_tokens"):
      if not (isinstance(c[field], int) and c[field] >= 1):
        fail(field, c[field], "must be a positive int")
    from gkd_jax import rows  # here: it imports datasets, which only this check needs

    if not c.eval_dataset and rows.is_data_files(c.dataset):
      fail(
          "eval_split",
          c.eval_split,
          f"config.dataset={c.dataset!r} is data files, which carry no split names (any split of them is the "
          f"training rows): set config.eval_dataset to the held-out file(s)",
      )
  if c.eval_temperature < 0:
    fail("eval_temperature", c.eval_temperature, "must be ≥ 0 (0 = greedy)")
  if not isinstance(c.scan_layers, bool):
    fail("scan_layers", c.scan_layers, "must be True or False")
  if c.remat not in REMAT:
    fail("remat", c.remat, f"must be one of {REMAT}")
  if c.attention not in ATTENTION:
    fail("attention", c.attention, f"must be one of {ATTENTION}")
  if c.seq_kd and c.lmbda == 1.0 and c.objective == "gkd":
    logger.warning(
        "config.seq_kd=True never takes effect with config.lmbda=1.0: every step is on-policy (student samples), "
        "so no step samples from the teacher; lower lmbda to use seq_kd"
    )
  if not 0 < c.top_p <= 1:
    fail("top_p", c.top_p, "must be in (0, 1]")
  if c.top_k < 0:
    fail("top_k", c.top_k, "must be ≥ 0 (0 = off)")
  # Finite (or positive) as a Python float is not enough: these values reach the optimizer and the loss as
  # float32, where e.g. learning_rate=1e39 is inf and temperature=1e-50 is 0.
  for field in FLOAT32_FIELDS:
    value = c.get(field)
    if value is None or isinstance(value, bool):
      continue
    with np.errstate(over="ignore", under="ignore"):
      f32 = np.float32(value)
    if not np.isfinite(f32):
      fail(
          field,
          value,
          f"must be finite in float32, the dtype it is used in (it is {f32} there; the largest is {_F32_MAX:.4g})",
      )
    if value != 0 and f32 == 0:
      fail(
          field,
          value,
          f"is 0 in float32, the dtype it is used in (the smallest positive normal float32 is {_F32_TINY:.4g})",
      )
  if c.get("resume_step") is not None and not (isinstance(c.resume_step, int) and c.resume_step >= 1):
    fail("resume_step", c.resume_step, "must be a checkpoint step ≥ 1 (or None for the latest checkpoint)")
  keep_period = c.get("keep_period")
  if keep_period is not None:
    if not (isinstance(keep_period, int) and keep_period >= 1):
      fail("keep_period", keep_period, "must be a positive int (or None)")
    if keep_period % c.save_every:
      fail(
          "keep_period", keep_period, f"must be a multiple of save_every={c.save_every} (only saved steps can be kept)"
      )
  zero = c.get("stop_on_zero_grad_steps", 0)
  if not (isinstance(zero, int) and not isinstance(zero, bool) and zero >= 0):
    fail("stop_on_zero_grad_steps", zero, "must be an int ≥ 0 (0 = never stop on zero gradients)")


def validate_with_tokenizer(c, vocab_size: int) -> None:
  """The checks that need the tokenizer's vocabulary size; run as soon as it is loaded, before any model."""
  if c.gkd_logits_topk is not None and c.gkd_logits_topk > vocab_size:
    raise ValueError(
        f"config.gkd_logits_topk={c.gkd_logits_topk!r} is invalid: must be at most the tokenizer's vocabulary "
        f"size {vocab_size} (or None for the full vocabulary)"
    )


# ------------------------------------------------------------------------------------------------ resume


def has_checkpoints(workdir: str) -> bool:
  """Whether the workdir holds a complete checkpoint: a step directory (orbax's temporaries are not), on
  object storage one holding orbax's commit marker (written last, as there is no rename there)."""
  directory = storage.join(workdir, "checkpoints")
  steps = [n for n in storage.listdir(directory) if n.isdigit()]
  if not storage.is_url(workdir):
    return bool(steps)
  return any(storage.exists(storage.join(directory, n, "commit_success.txt")) for n in steps)


def config_changes(saved: dict, config) -> dict[str, tuple]:
  """{field: (saved value, new value)} for every top-level field that differs (JSON values; a field
  missing on one side counts as its default), SECRET_FIELDS aside."""
  now, defaults = json.loads(config.to_json()), json.loads(base_config().to_json())
  missing = object()
  changes = {}
  for field in sorted((saved.keys() | now.keys()) - set(SECRET_FIELDS)):
    old, new = saved.get(field, defaults.get(field, missing)), now.get(field, defaults.get(field, missing))
    if old != new:
      changes[field] = tuple(None if v is missing else v for v in (old, new))
  return changes


def _describe(changes: dict) -> str:
  return "; ".join(f"{k}: {old!r} → {new!r}{_RESUME_NOTES.get(k, '')}" for k, (old, new) in changes.items())


def check_resume(workdir: str, c, fixed_fields=()) -> dict[str, tuple]:
  """Compares `c` with the config.json of the run whose checkpoints are in `workdir`; returns the changes
  to accept, or raises ValueError listing the refused ones (old → new). Touches nothing on disk."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path) or not has_checkpoints(workdir):
    return {}
  try:
    saved = json.loads(storage.read_text(path))
  except ValueError as e:
    if c.get("allow_config_change"):
      return {"config.json": ("unreadable", "this config")}
    raise ValueError(
        f"{path} (the config of the run whose checkpoints are in {workdir}) is not valid JSON ({e}), so this "
        f"config cannot be checked against it; set allow_config_change=True to resume with this config anyway"
    ) from e
  changes = config_changes(saved, c)
  fixed = {k: v for k, v in changes.items() if k in fixed_fields}
  if fixed:
    raise ValueError(
        f"cannot resume the run in {workdir} with {_describe(fixed)}: these fields fix the checkpoint's state "
        f"or the data order; use a new workdir"
    )
  method = {k: v for k, v in changes.items() if k not in RESUME_SAFE_FIELDS}
  if method and not c.get("allow_config_change"):
    raise ValueError(
        f"cannot resume the run in {workdir} with a changed method: {_describe(method)} (saved config.json → "
        f"this config). Restore those values, use a new workdir, or set allow_config_change=True to continue "
        f"this run with them"
    )
  return changes


def run_config_json(c) -> str:
  """The config as saved in WORKDIR/config.json: SECRET_FIELDS that are set read REDACTED."""
  d = json.loads(c.to_json())
  for field in SECRET_FIELDS:
    if d.get(field) is not None:
      d[field] = REDACTED
  return json.dumps(d, indent=1)


def write_run_config(workdir: str, c, fixed_fields=(), write: bool = True) -> dict[str, tuple]:
  """Checks `c` against the workdir's run (check_resume), then saves it as WORKDIR/config.json (when `write`:
  process 0), keeping a replaced one as config.replaced-TIMESTAMP.json. Returns the accepted changes."""
  changes = check_resume(workdir, c, fixed_fields)
  if changes:
    logger.warning("resuming the run in %s with a changed config: %s", workdir, _describe(changes))
  if not write:
    return changes
  files.require_directory(workdir, "--workdir")
  storage.makedirs(workdir)
  path = storage.join(workdir, "config.json")
  with files.writing(path, "the run config"):
    if changes and storage.exists(path):  # kept beside (a copy: object storage has no rename)
      old = storage.join(workdir, f"config.replaced-{time.strftime('%Y%m%d-%H%M%S')}.json")
      storage.write_text(old, storage.read_text(path))
    storage.write_text(path, run_config_json(c))
  return changes
