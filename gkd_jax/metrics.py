"""Run metrics: JSON lines + TensorBoard event files in the workdir (and optionally a Weights & Biases run),
decoded samples, FLOP counts, step throughput and an MFU estimate."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid

import jax
import jax.numpy as jnp

from gkd_jax import config as config_lib
from gkd_jax import files, sharding, storage

logger = logging.getLogger(__name__)


class MetricsWriter:
  """Writes records as JSON lines — WORKDIR/metrics.jsonl for training, WORKDIR/{prefix}.jsonl otherwise
  (e.g. eval.jsonl) — and their numbers to TensorBoard (WORKDIR/tensorboard, tags "{prefix}/{name}"), on
  process 0 only. On resume, records past the restored step (from a run killed after its last checkpoint)
  are dropped so each file holds each step once.

  A URL workdir (gs://) cannot be appended to: the JSON-lines objects are rewritten whole and the event
  files (written to a local directory) uploaded at each `flush()` — the trainer's checkpoint saves — and at
  most every 30 s between them.

  With `config.wandb_project` set, the numbers of each record also go to a Weights & Biases run (keys
  "{prefix}/{name}", at the record's step), started with the run config (config.SECRET_FIELDS redacted) and
  resumed by id on restart: the id is kept in WORKDIR/wandb_run_id. wandb keeps its local files in WANDB_DIR,
  else in WORKDIR/wandb (a local workdir) or the current directory. After a restart from an earlier step,
  wandb drops (with a warning) the records of steps it already has."""

  def __init__(self, workdir: str, resumed_step: int = 0, config=None):
    self.workdir, self.resumed_step, self.files, self.tb = workdir, resumed_step, {}, None
    self._tb_local = self.wandb = None
    if jax.process_index() != 0:
      return
    storage.makedirs(workdir)
    from tensorboardX import SummaryWriter

    tb_dir = storage.join(workdir, "tensorboard")
    if storage.is_url(workdir):
      self._tb_local = tempfile.mkdtemp(prefix="gkd_jax_tb-")
      tb_dir = self._tb_local
    self.tb = SummaryWriter(tb_dir, purge_step=resumed_step + 1)
    if config is not None and config.get("wandb_project"):
      self.wandb = start_wandb(workdir, config)

  def _file(self, prefix: str) -> storage.JsonLines:
    if prefix not in self.files:
      path = storage.join(self.workdir, "metrics.jsonl" if prefix == "train" else f"{prefix}.jsonl")
      kept = keep_records_up_to(path, self.resumed_step) if storage.exists(path) else []
      self.files[prefix] = storage.JsonLines(path, lines=kept if storage.is_url(path) else None)
    return self.files[prefix]

  def write(self, record: dict, prefix: str = "train"):
    if self.tb is None:
      return
    self.write_lines(prefix, [record])
    step = record["step"]
    scalars = {
        f"{prefix}/{name}": value
        for name, value in record.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step"
    }
    for tag, value in scalars.items():
      self.tb.add_scalar(tag, value, step)
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)

  def write_lines(self, prefix: str, records: list[dict]):
    """Records to WORKDIR/{prefix}.jsonl only (no TensorBoard scalars)."""
    if self.tb is None:
      return
    f = self._file(prefix)
    with files.writing(f.path, "metrics", intact="the lines before this record are on disk"):
      for record in records:
        f.write(json.dumps(record))

  def write_text(self, tag: str, text: str, step: int):
    if self.tb is not None:
      self.tb.add_text(tag, text, step)

  def flush(self):
    """Everything written so far is in the workdir (on a URL workdir: uploaded) when this returns."""
    if self.tb is None:
      return
    for f in self.files.values():
      f.flush()
    self.tb.flush()
    if self._tb_local is not None:
      for name in storage.walk_files(self._tb_local):
        storage.upload(os.path.join(self._tb_local, name), storage.join(self.workdir, "tensorboard", name))

  def close(self, flush: bool = True):
    """Flushes (unless `flush` is off: the storage is known to be gone) and closes the files."""
    if self.tb is None:
      return
    try:
      if flush:
        self.flush()
    finally:
      for f in self.files.values():
        f.close(flush=False)
      self.tb.close()
      if self.wandb is not None:
        self.wandb.finish(exit_code=0 if flush else 1)
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)


def start_wandb(workdir: str, config):
  """A wandb run for the run in `workdir`: the one whose id WORKDIR/wandb_run_id holds (resumed), else a new one
  (its id written there first, so that a run killed before its first checkpoint resumes the same wandb run)."""
  import wandb  # optional (the wandb extra): imported only when config.wandb_project is set

  id_path = storage.join(workdir, "wandb_run_id")
  run_id = storage.read_text(id_path).strip() if storage.exists(id_path) else ""
  if not run_id:
    run_id = uuid.uuid4().hex[:12]  # (wandb ids: letters, digits, - and _)
    with files.writing(id_path, "the wandb run id"):
      storage.write_text(id_path, run_id + "\n")
  kwargs = {}
  if not os.environ.get("WANDB_DIR") and not storage.is_url(workdir):
    kwargs["dir"] = workdir  # wandb adds its own "wandb" folder
  return wandb.init(
      project=config.wandb_project,
      entity=config.get("wandb_entity"),
      name=config.get("wandb_run_name"),
      id=run_id,
      resume="allow",
      config=json.loads(config_lib.run_config_json(config)),
      **kwargs,
  )


def log_samples(tokenizer, writer: MetricsWriter, batch: dict, step: int, count: int = 2):
  """A few sampled completions (decoded) to WORKDIR/samples.jsonl and TensorBoard: the first `count` rows of
  process 0, fetched from its own devices (the batch is global arrays or host numpy)."""
  if jax.process_index() != 0:
    return
  keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
  local = {k: sharding.host_rows(batch[k], limit=count) for k in keys}
  rows = []
  for i in range(len(local["prompt_ids"])):
    prompt = local["prompt_ids"][i][local["prompt_mask"][i]]
    completion = local["completion_ids"][i][local["completion_mask"][i]]
    rows.append({"step": step, "prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(completion)})
  writer.write_lines("samples", rows)
  writer.write_text("samples", "\n\n".join(f"{r['prompt']} → {r['completion']}" for r in rows), step)


def keep_records_up_to(path: str, step: int) -> list[str]:
  """Drops the records of a JSON-lines file past `step` (logged after the checkpoint a run resumes from), and
  lines that are not JSON records: a partial last line left by a crash mid-write. Dropped unreadable lines
  are appended to PATH.dropped rather than lost; the file is replaced whole (storage.write_text), so an
  interruption here leaves either the old or the new file. Returns the kept lines."""
  lines = storage.read_lines(path)
  kept, past, bad = [], 0, []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line) if line.endswith("\n") else None
    except ValueError:
      record = None
    if not isinstance(record, dict):
      bad.append((number, line))
    elif record.get("step", 0) <= step:
      kept.append(line)
    else:
      past += 1
  if not bad and not past:
    return kept
  if bad:
    logger.warning(
        "%s: dropped %d unreadable line(s) (line %s; a partial last line is what a crash mid-write leaves); "
        "kept in %s.dropped",
        path,
        len(bad),
        ", ".join(str(n) for n, _ in bad[:5]),
        path,
    )
    dropped = "".join(storage.read_lines(path + ".dropped"))
    dropped += "".join(line if line.endswith("\n") else line + "\n" for _, line in bad)
    storage.write_text(path + ".dropped", dropped)
  with files.writing(path, "metrics"):
    storage.write_text(path, "".join(kept))
  return kept


# --------------------------------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(config, context: int) -> float:
  """Matmul FLOPs of one token's forward pass: 2·(weights touched) + attention over `context` tokens.

  Weights: q/k/v/o, the gated MLP and the LM head (the embedding lookup is free). Attention: QKᵀ and AV,
  2·2·heads·head_dim·context per layer.
  """
  h, layers = config.hidden_size, config.num_hidden_layers
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
  weights = layers * per_layer + h * config.vocab_size
  attention = layers * 4 * q * context
  return 2.0 * weights + attention


def vision_flops_per_tile(vl_config) -> float:
  """Matmul FLOPs of one image tile through a vision-language model's tower and projector (an
  models.InternVLConfig): patch embedding, the tower's layers up to vision_feature_layer over its 1 + patches
  tokens (projections, MLP, bidirectional attention), and the projector on the pixel-shuffled features."""
  v = vl_config.vision
  n, d, m = v.grid**2 + 1, v.hidden_size, v.intermediate_size
  run = (
      v.num_hidden_layers
      if vl_config.vision_feature_layer == -1
      else vl_config.vision_feature_layer % (v.num_hidden_layers + 1)
  )
  layers = run * (2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d)
  embed = 2 * (n - 1) * v.num_channels * v.patch_size**2 * d
  h, shuffled = vl_config.text.hidden_size, d * vl_config.shuffle_scale**2
  return embed + layers + 2 * vl_config.image_seq_length * (shuffled * h + h * h)


def step_flops(
    student_config,
    teacher_config,
    batch: int,
    seq_len: int,
    completion_len: int,
    generated: int = 0,
    generator_config=None,
    *,
    tiles: int = 0,
    student_vision=None,
    teacher_vision=None,
    vision_trained: bool = False,
) -> dict:
  """Estimated FLOPs of one optimizer step, split by phase.

  student: forward + backward (3× forward) over the whole sequence; teacher: one forward; generation:
  `generated` decoded tokens per row with a KV cache (context grows to seq_len). Vision-language models
  (`student_vision` / `teacher_vision`: their InternVLConfig) add their towers' work on the batch's `tiles`: a
  forward each (3× for the student when `vision_trained`), and the generating model's once per generation.
  """
  context = seq_len / 2  # mean causal context
  student_tiles = tiles * vision_flops_per_tile(student_vision) if student_vision is not None else 0.0
  teacher_tiles = tiles * vision_flops_per_tile(teacher_vision) if teacher_vision is not None else 0.0
  out = {
      "student": 3.0 * batch * seq_len * forward_flops_per_token(student_config, context)
      + (3.0 if vision_trained else 1.0) * student_tiles
  }
  out["teacher"] = (
      batch * seq_len * forward_flops_per_token(teacher_config, context) + teacher_tiles
      if teacher_config is not None
      else 0.0
  )
  gen = generator_config or student_config
  out["generation"] = batch * generated * forward_flops_per_token(gen, seq_len - completion_len / 2)
  if generated:
    out["generation"] += teacher_tiles if gen is teacher_config else student_tiles
  return out


def measure_peak_flops(dtype=jnp.float32, n: int = 1024, repeats: int = 3) -> float:
  """The machine's matmul ceiling in FLOP/s: the best of a few [n, n]·[n, n] products on all local
  devices (one per device, in parallel), accumulated in float32 as the models' matmuls are
  (`models.layers.matmul`: for bf16 that is also XLA:CPU's fast path)."""
  devices = jax.local_devices()
  x = [jax.device_put(jnp.ones((n, n), dtype), d) for d in devices]
  matmul = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32).astype(a.dtype))
  jax.block_until_ready([matmul(a) for a in x])
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready([matmul(a) for a in x])
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 * len(devices) / best


def throughput(
    student_config,
    teacher_config,
    batch_size: int,
    batch: dict,
    mode: str,
    gen_time: float,
    train_time: float,
    step_time: float,
    peak_flops: float,
    *,
    student_vision=None,
    teacher_vision=None,
    vision_trained: bool = False,
) -> dict:
  """Step timing, tokens/s and an MFU estimate (model FLOPs / (time × measured matmul ceiling)) of one step
  on the global `batch` (global or host arrays: only their shapes are read). teacher_config is None when no
  teacher forward runs. The train step runs teacher and student in one program: their split is estimated from
  their FLOP shares. An MFU estimate over 1 (a measured ceiling below what the step really ran at) is
  reported as 1.0, with one warning per process. Vision-language models: see step_flops (the batch's
  pixel_values give its tiles, padding tiles included: the towers run them too)."""
  b, p = batch_size, batch["prompt_ids"].shape[1]
  c = batch["completion_ids"].shape[1]
  pixels = batch.get("pixel_values")
  flops = step_flops(
      student_config,
      teacher_config,
      b,
      p + c,
      c,
      generated=c if mode != "dataset" else 0,
      generator_config=teacher_config if mode == "seq_kd" else student_config,
      tiles=0 if pixels is None else pixels.shape[0] * pixels.shape[1],
      student_vision=student_vision,
      teacher_vision=teacher_vision,
      vision_trained=vision_trained,
  )
  share = flops["teacher"] / max(flops["teacher"] + flops["student"], 1.0)
  rate = sum(flops.values()) / step_time
  mfu = rate / peak_flops
  if mfu > 1.0:
    global _mfu_over_one_warned
    if not _mfu_over_one_warned:
      _mfu_over_one_warned = True
      logger.warning(
          "MFU estimate %.3g > 1: the measured matmul ceiling (%.4g FLOP/s) is below the step's actual rate "
          "(%.4g FLOP/s), so mfu is reported clamped at 1.0. Pass the device's peak (config.peak_flops, per "
          "process) to fix it. (Logged once.)",
          mfu,
          peak_flops,
          rate,
      )
    mfu = 1.0
  return {
      "step_s": round(step_time, 4),
      "generation_s": round(gen_time, 4),
      "teacher_s_est": round(train_time * share, 4),
      "student_s_est": round(train_time * (1 - share), 4),
      "tokens_per_s": round(b * (p + c) / step_time, 1),
      "mfu": round(mfu, 5),
  }


_mfu_over_one_warned = False  # throughput's warning about an MFU estimate over 1: once per process
