"""The embedded default demo: a whole GKD pipeline on the offline arithmetic task, minutes on a CPU.

    task         make_task(workdir/task): chat rows "Add a+b+c" -> "a+b=s s+c=t Answer: t", chains in random
                 operand order in train (a multimodal teacher), prompt order in test.
    teacher      a random-init Qwen2 saved as an HF checkpoint, trained by SFT (objective="sft").
    student_sft  a smaller random-init Qwen2, SFT'd briefly: the mediocre starting point (the paper
                 starts its students from SFT checkpoints).
    gkd          GKD from student_sft with the teacher: on-policy mixture (lmbda), JSD(beta).
    eval         greedy accuracy and chain accuracy of the three checkpoints on the test split.

Every phase goes through the real code path: HF checkpoints on disk, the tokenizer via load_tokenizer, the
DataLoader, the trainer (its tqdm bar, metrics.jsonl, checkpoints and HF export in workdir/PHASE) and the
sampler. Each phase writes workdir/PHASE/DONE last, holding a fingerprint of its settings and of the phases it
depends on: a rerun skips phases whose DONE matches and redoes the others; a phase interrupted with unchanged
settings resumes from the trainer's last checkpoint. Evaluations are cached beside them (PHASE/eval.json).
Results: a table on stdout and workdir/results.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

from flax import nnx

from gkd_jax import config as config_lib
from gkd_jax import evaluate as evaluate_lib
from gkd_jax import file_cache, models, trainer
from gkd_jax.models import safetensors_io
from gkd_jax.tasks import arithmetic

PHASES = ("teacher", "student_sft", "gkd")
LABELS = {"teacher": "teacher (SFT)", "student_sft": "student, initial (SFT)", "gkd": "student, distilled (GKD)"}


def _plain(config) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _read_done(phase_dir: str) -> dict | None:
  try:
    return json.loads(file_cache.read_text(os.path.join(phase_dir, "DONE")) or "null")
  except ValueError:
    return None


def _write_done(phase_dir: str, record: dict):
  file_cache.write_atomic(os.path.join(phase_dir, "DONE"), json.dumps(record, indent=1, sort_keys=True))


def init_checkpoint(arch: dict, tokenizer, out_dir: str, seed: int) -> str:
  """A random-init Qwen2 (HF config fields in `arch`) saved with the tokenizer, as a hub model would be."""
  hf = {
      "model_type": "qwen2",
      "vocab_size": len(tokenizer),
      "eos_token_id": tokenizer.eos_token_id,
      "pad_token_id": tokenizer.pad_token_id,
      "tie_word_embeddings": True,
      **arch,
  }
  model = models.CausalLM(models.ModelConfig.from_hf_dict(hf), rngs=nnx.Rngs(seed))
  return models.save_pretrained(model, out_dir, tokenizer=tokenizer)


def num_params(model_dir: str) -> int:
  reader = safetensors_io.CheckpointReader(model_dir)
  return sum(math.prod(reader.shape(k)) for k in reader.keys())


def trainer_config(config, phase: dict, dataset: str, model: str, teacher_model: str | None = None):
  """The run config of one training phase: base_config() + the demo's shared fields + the phase's own."""
  c = config_lib.base_config()
  c.seed, c.dataset, c.model, c.log_every = config.seed, dataset, model, config.log_every
  for k, v in config.lengths.items():
    c[k] = v
  c.teacher_model = teacher_model
  c.export_on_finish, c.keep_checkpoints = True, 1  # the phase's product is the HF export
  c.remat = "none"  # tiny CPU models: no activation memory to save
  for k, v in phase.items():
    if k not in ("arch", "init_seed"):
      c[k] = v
  config_lib.validate(c)
  return c


def train_phase(
    name: str,
    workdir: str,
    config,
    phase,
    *,
    dataset: str,
    tokenizer,
    init_from: str | None = None,
    teacher_model: str | None = None,
    depends: tuple = (),
) -> dict:
  """Runs (or skips, when its DONE matches) one training phase; returns its DONE record (with 'model').

  A phase interrupted with the same settings resumes from the trainer's last checkpoint in workdir/PHASE;
  with other settings it restarts clean."""
  phase_dir = os.path.join(workdir, name)
  # Paths enter relative to the workdir, so a moved or copied workdir keeps its finished phases.
  fingerprint = file_cache.fingerprint(
      [_plain(phase), _plain(config.lengths), config.seed, os.path.relpath(dataset, workdir), list(depends)]
  )
  done = _read_done(phase_dir)
  if done and done.get("fingerprint") == fingerprint:
    done["model"] = os.path.join(workdir, done["model"])
    if os.path.isdir(done["model"]):
      print(f"[{name}] cached: {done['model']}", flush=True)
      return done
  started = os.path.join(phase_dir, "STARTED")
  if done or file_cache.read_text(started) != fingerprint:
    shutil.rmtree(phase_dir, ignore_errors=True)
  os.makedirs(phase_dir, exist_ok=True)
  with open(started, "w") as f:
    f.write(fingerprint)
  t0 = time.perf_counter()
  if init_from is None:  # deterministic in init_seed, so a resumed phase rebuilds the same one
    init_from = init_checkpoint(phase.arch.to_dict(), tokenizer, os.path.join(phase_dir, "init"), phase.init_seed)
  run_config = trainer_config(config, phase, dataset, init_from, teacher_model)
  print(
      f"[{name}] {run_config.objective} from {init_from}: {run_config.total_steps} steps of "
      f"{run_config.batch_size}"
      + (f", teacher {teacher_model}, lmbda={run_config.lmbda}, " f"beta={run_config.beta}" if teacher_model else ""),
      flush=True,
  )
  last = trainer.train(run_config, phase_dir)  # exports the final student to phase_dir/export
  model_dir = os.path.join(phase_dir, "export")
  record = {
      "fingerprint": fingerprint,
      "model": os.path.relpath(model_dir, workdir),
      "params": num_params(model_dir),
      "seconds": round(time.perf_counter() - t0, 1),
      "last": last,
  }
  _write_done(phase_dir, record)
  return dict(record, model=model_dir)


def eval_phase(name: str, workdir: str, config, done: dict, rows) -> dict:
  """Greedy accuracy of a phase's checkpoint on the test rows, cached next to it (eval.json)."""
  path = os.path.join(workdir, name, "eval.json")
  fingerprint = file_cache.fingerprint([done["fingerprint"], _plain(config.eval)])

  def compute():
    t0 = time.perf_counter()
    model = models.from_pretrained(done["model"])
    tokenizer = models.load_tokenizer(done["model"])
    metrics = evaluate_lib.accuracy(
        model, tokenizer, rows, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size
    )
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return metrics

  return file_cache.json_cache(path, fingerprint, compute, field="metrics")


def run(config, workdir: str) -> dict:
  """The pipeline; returns (and writes to workdir/results.json) the three models' test metrics."""
  t0 = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  paths = arithmetic.make_task(os.path.join(workdir, "task"), **config.task.to_dict())
  tokenizer = models.load_tokenizer(paths["tokenizer"])
  dataset = paths["data"]
  task_id = file_cache.fingerprint(config.task.to_dict())

  teacher = train_phase(
      "teacher", workdir, config, config.teacher, dataset=dataset, tokenizer=tokenizer, depends=(task_id,)
  )
  student = train_phase(
      "student_sft", workdir, config, config.student_sft, dataset=dataset, tokenizer=tokenizer, depends=(task_id,)
  )
  distilled = train_phase(
      "gkd",
      workdir,
      config,
      config.gkd,
      dataset=dataset,
      tokenizer=tokenizer,
      init_from=student["model"],
      teacher_model=teacher["model"],
      depends=(task_id, teacher["fingerprint"], student["fingerprint"]),
  )

  rows = arithmetic.load_task(os.path.join(workdir, "task"))[config.eval.split]
  if config.eval.num_examples:
    rows = rows.select(range(min(config.eval.num_examples, len(rows))))
  results = {"split": config.eval.split, "count": len(rows), "models": {}}
  for name, done in zip(PHASES, (teacher, student, distilled)):
    metrics = eval_phase(name, workdir, config, done, rows)
    results["models"][name] = {
        "accuracy": metrics["accuracy"],
        "chain_accuracy": metrics["chain_accuracy"],
        "params": done["params"],
        "train_seconds": done["seconds"],
        "checkpoint": done["model"],
    }
  results["gain"] = results["models"]["gkd"]["accuracy"] - results["models"]["student_sft"]["accuracy"]
  results["seconds"] = round(time.perf_counter() - t0, 1)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(format_table(results), flush=True)
  return results


def format_table(results: dict) -> str:
  lines = [
      f"greedy accuracy on {results['count']} {results['split']} problems",
      f"{'model':<28}{'params':>10}{'accuracy':>10}{'chain acc':>11}",
  ]
  for name, m in results["models"].items():
    lines.append(f"{LABELS[name]:<28}{m['params']:>10,}{m['accuracy']:>10.3f}{m['chain_accuracy']:>11.3f}")
  lines.append(
      f"GKD gain over the initial student: {100 * results['gain']:+.1f} points "
      f"({results['seconds']:.0f} s this run)"
  )
  return "\n".join(lines)
