"""The paper's findings at toy scale: every run of configs/sweep.py over seeds, then a report and figures.

    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --workers=2
    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --report
    python experiments/sweep.py --config=configs/sweep.py:runlocal --workdir=/tmp/gkd_sweep_tiny

Stages, each cached in the workdir (a rerun skips what is done; an interrupted run resumes from its last
checkpoint, as the demo's phases do):

  base      the task (plus a copy with `data_fraction` of the train prompts, the same test sets), the teacher
            and the initial student (the demo's phases), the SeqKD dataset (the teacher's samples for every
            train prompt) and the evaluation of teacher and initial student.
  runs      runs/ARM/lrLR/seedS: train from the initial student (the trainer scores greedy validation accuracy
            every `eval_every` steps), export, evaluate. First every arm's learning-rate grid on the selection
            seeds (validation split; the grid widens at an edge), then the test seeds at the chosen rate
            (test split). `--workers=N` starts N worker processes; a worker takes a run by an exclusive lock
            on locks/..., released by the OS if it dies, so any number of sweeps may share a workdir, on one
            machine or several over a shared file system.
  report    results.json, sweep.md and fig_*.png into --results_dir (experiments/sweep_report.py).

`--only=a,b` restricts the runs (names from configs/sweep.py), e.g. to add seeds to one arm:
`--config.seeds='(0,1,2,3,4,5)' --only=rkl_l1`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

BASE = "base"


# ----------------------------------------------------------------------------------------------- base stage


def _tasks(config, workdir: str) -> dict:
  from gkd_jax.tasks import arithmetic

  task = config.task.to_dict()
  fraction = dict(task, num_train=max(1, round(config.data_fraction * task["num_train"])))
  return {
      "full": arithmetic.make_task(os.path.join(workdir, BASE, "task"), **task),
      "fraction": arithmetic.make_task(os.path.join(workdir, BASE, "task_fraction"), **fraction),
  }


def _seqkd_dataset(config, workdir: str, teacher: dict, task_data: str) -> str:
  """The teacher's samples (τ = config.seqkd.temperature) for every train prompt, as chat rows in a jsonl file:
  SeqKD's training set. Samples cut at the length limit (no EOS) or empty are dropped and counted."""
  from gkd_jax import evaluate as evaluate_lib
  from gkd_jax import file_cache, models
  from gkd_jax.tasks import arithmetic

  path = os.path.join(workdir, BASE, "seqkd", "train.jsonl")
  fingerprint = file_cache.fingerprint([teacher["fingerprint"], config.seqkd.to_dict(), config.lengths.to_dict()])

  def compute():
    rows = list(arithmetic.load_task(os.path.dirname(task_data))["train"])
    model, tokenizer = models.from_pretrained(teacher["model"]), models.load_tokenizer(teacher["model"])
    texts = evaluate_lib.generate_completions(
        model,
        tokenizer,
        rows,
        max_new_tokens=config.lengths.max_completion_length,
        batch_size=config.seqkd.batch_size,
        temperature=config.seqkd.temperature,
        seed=config.seed,
    )
    kept = 0
    with open(path + ".tmp", "w") as f:
      for row, text in zip(rows, texts):
        content = text[: -len(arithmetic.EOS_TOKEN)].strip()
        if text.endswith(arithmetic.EOS_TOKEN) and content:
          messages = [m for m in row["messages"] if m["role"] != "assistant"]
          messages.append({"role": "assistant", "content": content})
          f.write(json.dumps({"messages": messages}) + "\n")
          kept += 1
    os.replace(path + ".tmp", path)
    correct = sum(arithmetic.check_answer(r, t) for r, t in zip(rows, texts))
    return {"rows": kept, "dropped": len(rows) - kept, "answer_accuracy": correct / len(rows)}

  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not os.path.exists(path) and os.path.exists(path + ".stats.json"):  # the data was removed: redo it
    os.remove(path + ".stats.json")
  stats = file_cache.json_cache(path + ".stats.json", fingerprint, compute)
  print(
      f"[seqkd] {stats['rows']} teacher samples ({stats['dropped']} cut at the length limit or empty, dropped), "
      f"answer accuracy {stats['answer_accuracy']:.3f}",
      flush=True,
  )
  return path


def prepare(config, workdir: str) -> dict:
  """The base stage; returns what the runs need: datasets, the teacher and the initial student. Sweeps
  sharing the workdir take turns (the first builds, the others find it cached)."""
  os.makedirs(os.path.join(workdir, BASE), exist_ok=True)
  with open(os.path.join(workdir, BASE, "LOCK"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _prepare(config, workdir)


def _prepare(config, workdir: str) -> dict:
  from gkd_jax import file_cache, models
  from gkd_jax.demos import arithmetic as demo

  tasks = _tasks(config, workdir)
  tokenizer = models.load_tokenizer(tasks["full"]["tokenizer"])
  task_id = file_cache.fingerprint(config.task.to_dict())
  base = os.path.join(workdir, BASE)
  teacher = demo.train_phase(
      "teacher", base, config, config.teacher, dataset=tasks["full"]["data"], tokenizer=tokenizer, depends=(task_id,)
  )
  student = demo.train_phase(
      "student_sft",
      base,
      config,
      config.student_sft,
      dataset=tasks["full"]["data"],
      tokenizer=tokenizer,
      depends=(task_id,),
  )
  seqkd = _seqkd_dataset(config, workdir, teacher, tasks["full"]["data"])
  found = {}
  for name, done in (("teacher", teacher), ("initial", student)):
    metrics = evaluate_product(config, os.path.join(base, name), done, tasks["full"]["data"], validation=True)
    found[name] = metrics["validation"]
  check_base(config, found)
  return {
      "task_id": task_id,
      "teacher": teacher,
      "student": student,
      "data": {"full": tasks["full"]["data"], "fraction": tasks["fraction"]["data"], "seqkd": seqkd},
  }


def check_base(config, found: dict) -> None:
  """Stops the sweep before any run when a base model misses the design's bars (config.base_bars, checked on
  the validation split): a teacher that has not learned the task or a student outside the intended regime
  would void every comparison. Small models learn to copy operands in a sudden jump whose timing varies with
  float rounding, so a rerun on another host can land elsewhere."""
  bars = config.get("base_bars")
  if not bars:
    return
  checks = (
      ("teacher", "greedy", ">=", bars.teacher_greedy_min),
      ("initial", "greedy", ">=", bars.student_greedy_min),
      ("initial", "sample_1.0", "<=", bars.student_sample_max),
  )
  missed = [
      f"{name} validation {metric} = {found[name][metric]:.3f} (needs {op} {bar})"
      for name, metric, op, bar in checks
      if not (found[name][metric] >= bar if op == ">=" else found[name][metric] <= bar)
  ]
  if missed:
    raise RuntimeError(
        "base models miss config.base_bars: " + "; ".join(missed) + ". Change the phase's init_seed or steps "
        "(configs/sweep.py) and rerun: the base stage retrains, and no arm has run on these models."
    )


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_model(model_dir: str, task_data: str, ev) -> dict:
  """Every test metric of the sweep for one checkpoint. Keys: greedy, greedy_chain, long, long_chain; per
  sampling temperature t: sample_t and sample_chain_t (accuracy of one sample per test problem) and, over
  ev.diversity_problems x ev.num_samples samples, minor_t (the share of minor modes among the valid chains:
  the diversity measure), distinct_t (distinct valid chains per problem), unique_t (distinct texts per
  problem, right or wrong) and valid_t (the valid-chain rate); errors_greedy and errors_t: the share of test
  completions per first fault (arithmetic.ERROR_KINDS)."""
  import numpy as np
  from gkd_jax import evaluate as evaluate_lib
  from gkd_jax import models
  from gkd_jax.tasks import arithmetic

  model, tokenizer = models.from_pretrained(model_dir), models.load_tokenizer(model_dir)
  splits = arithmetic.load_task(os.path.dirname(task_data))
  test = list(splits["test"])[: ev.num_test]
  long = list(splits["test_long"])[: ev.num_test_long]

  def complete(rows, temperature=0.0, seed=0):
    return evaluate_lib.generate_completions(
        model,
        tokenizer,
        rows,
        max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size,
        temperature=temperature,
        seed=seed,
    )

  out = {}
  texts = complete(test)
  m = arithmetic.evaluate(texts, test)
  out["greedy"], out["greedy_chain"] = m["accuracy"], m["chain_accuracy"]
  out["errors_greedy"] = arithmetic.error_breakdown(texts, test)
  m = arithmetic.evaluate(complete(long), long)
  out["long"], out["long_chain"] = m["accuracy"], m["chain_accuracy"]
  n, problems = ev.num_samples, test[: ev.diversity_problems]
  for i, t in enumerate(ev.temperatures):
    texts = complete(test, t, seed=1 + i)
    m = arithmetic.evaluate(texts, test)
    out[f"sample_{t}"], out[f"sample_chain_{t}"] = m["accuracy"], m["chain_accuracy"]
    out[f"errors_{t}"] = arithmetic.error_breakdown(texts, test)
    texts = complete([p for p in problems for _ in range(n)], t, seed=101 + i)
    groups = [texts[j * n : (j + 1) * n] for j in range(len(problems))]
    minor = [arithmetic.minor_mode(p, c) for g, p in zip(groups, problems) for c in g]
    valid = [x for x in minor if x is not None]
    out[f"minor_{t}"] = float(np.mean(valid)) if valid else float("nan")
    out[f"distinct_{t}"] = float(np.mean([arithmetic.distinct_valid_chains(g, p) for g, p in zip(groups, problems)]))
    out[f"unique_{t}"] = float(np.mean([len(set(g)) for g in groups]))
    out[f"valid_{t}"] = len(valid) / len(minor)
  return out


def validation_metrics(model_dir: str, task_data: str, ev) -> dict:
  """Greedy and τ=1 accuracy on the validation split (keys greedy, sample_1.0): what the learning rates are
  chosen by."""
  from gkd_jax import evaluate as evaluate_lib
  from gkd_jax import models
  from gkd_jax.tasks import arithmetic

  rows = list(arithmetic.load_task(os.path.dirname(task_data))["validation"])[: ev.num_validation]
  model, tokenizer = models.from_pretrained(model_dir), models.load_tokenizer(model_dir)
  out = {}
  for key, temperature in (("greedy", 0.0), ("sample_1.0", 1.0)):
    texts = evaluate_lib.generate_completions(
        model, tokenizer, rows, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, temperature=temperature
    )
    out[key] = arithmetic.evaluate(texts, rows)["accuracy"]
  return out


def evaluate_product(config, directory: str, done: dict, task_data: str, validation: bool = False) -> dict:
  """evaluate_model of a phase's product, cached in directory/metrics.json; with `validation`, also its
  validation_metrics (the base models: the gate and the curves' step 0 read them; a run has its curve)."""
  from gkd_jax import file_cache

  # A directory is a base model's (validation) or a run's (not) for good: the flag needs no place here.
  fingerprint = file_cache.fingerprint([done["fingerprint"], config.eval.to_dict()])

  def compute():
    t0 = time.perf_counter()
    out = evaluate_model(done["model"], task_data, config.eval)
    if validation:
      out["validation"] = validation_metrics(done["model"], task_data, config.eval)
    return dict(out, eval_seconds=round(time.perf_counter() - t0, 1))

  return file_cache.json_cache(os.path.join(directory, "metrics.json"), fingerprint, compute)


@contextlib.contextmanager
def _claim(path: str):
  """Yields True when this process holds the exclusive lock on path (another holder: False)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------------ runs
#
# Jobs are ("grid", arm, (lr, seed)): the arm on a selection seed at one rate, scored on the validation split;
# and ("final", arm, seed): the arm on a test seed at its chosen rate, evaluated on the test split. A run's
# directory is runs/ARM/lrLR/seedS.


def settings(config, name: str) -> dict:
  """The arm's training fields with its divergence resolved to β; learning rate and seed are added per run."""
  run = config.runs[name]
  out = dict(config.train.to_dict(), objective=run.objective, lmbda=run.lmbda, data=run.data)
  if run.objective == "gkd":
    if run.divergence not in config.divergences:
      raise ValueError(f"runs.{name}.divergence={run.divergence!r}: expected one of {sorted(config.divergences)}")
    out["beta"] = config.divergences[run.divergence]
  return out


def run_dir(workdir: str, name: str, lr: float, seed: int) -> str:
  return os.path.join(workdir, "runs", name, f"lr{lr:g}", f"seed{seed}")


_KEYS: dict = {}
# Fields that choose which runs exist, or only shape the report: adding seeds, rates or contrasts keeps results.
_NOT_IN_KEY = ("seeds", "selection_seeds", "lr_grid", "lr_widen", "contrasts")


def sweep_key(config, workdir: str) -> str:
  """What every result file depends on besides its path (arm, rate, seed): the base models' fingerprints and
  the config, less the fields that only choose runs or shape the report. A result written under another key
  is stale and its job runs again; its training and evaluation come back from their own fingerprinted caches
  where nothing they depend on changed."""
  from gkd_jax import file_cache

  done = [os.path.join(workdir, BASE, phase, "DONE") for phase in ("teacher", "student_sft")]
  memo = (workdir, id(config), tuple(os.path.getmtime(p) if os.path.exists(p) else None for p in done))
  if memo not in _KEYS:
    shared = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    _KEYS[memo] = file_cache.fingerprint([shared, [file_cache.read_text(p) for p in done]])
  return _KEYS[memo]


def _read_result(config, workdir: str, path: str) -> dict | None:
  """A result file of this sweep (validation.json, result.json), or None when absent or stale."""
  found = _read(path)
  return found if found is not None and found.get("sweep") == sweep_key(config, workdir) else None


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, ValueError):
    return None


SELECTION_METRIC = "sample_1.0"  # the primary metric, on the validation split


def validation_score(config, workdir: str, name: str, lr: float) -> float | None:
  """The arm's selection score at a rate: the primary metric on validation, averaged over the selection
  seeds; None until every selection seed finished."""
  found = [
      _read_result(config, workdir, os.path.join(run_dir(workdir, name, lr, seed), "validation.json"))
      for seed in config.selection_seeds
  ]
  return None if None in found else sum(f[SELECTION_METRIC] for f in found) / len(found)


def lr_grid(config, workdir: str, name: str) -> tuple[list[float], float | None]:
  """(the arm's rates so far, the chosen rate or None). The grid starts as config.lr_grid; while every rate
  has its score and the best is an edge, it widens by the grid's ratio on that side, up to config.lr_widen
  times per side. Ties go to the smaller rate."""
  grid = sorted(config.lr_grid)
  ratio = grid[1] / grid[0] if len(grid) > 1 else 10.0
  widened = {"low": 0, "high": 0}
  while True:
    scores = {lr: validation_score(config, workdir, name, lr) for lr in grid}
    if None in scores.values():
      return grid, None
    best = max(grid, key=lambda lr: (scores[lr], -lr))
    side = "low" if best == grid[0] else "high" if best == grid[-1] else None
    if side is None or len(grid) == 1 or widened[side] >= config.lr_widen:
      return grid, best
    widened[side] += 1
    grid = [grid[0] / ratio] + grid if side == "low" else grid + [grid[-1] * ratio]


def chosen_lr(config, workdir: str, name: str) -> float | None:
  return lr_grid(config, workdir, name)[1]


def arms(config, only=None) -> list[str]:
  names = list(config.runs)
  if only:
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"--only names unknown runs {unknown}; config.runs has {sorted(names)}")
    names = [n for n in names if n in only]
  return names


def jobs(config, workdir: str, only=None) -> list[tuple[str, str, tuple | int]]:
  """The jobs known so far: every arm's grid runs (its current grid x the selection seeds), then final jobs
  seed-major (a partial sweep has every arm at its first seeds). A final job waits for its arm's rate."""
  names = arms(config, only)
  out = [("grid", n, (lr, s)) for n in names for lr in lr_grid(config, workdir, n)[0] for s in config.selection_seeds]
  return out + [("final", n, seed) for seed in config.seeds for n in names]


def _job_dir(config, workdir: str, job) -> str | None:
  """Where the job's result goes; None while a final job waits for its arm's grid."""
  kind, name, x = job
  if kind == "grid":
    return run_dir(workdir, name, *x)
  lr = chosen_lr(config, workdir, name)
  return None if lr is None else run_dir(workdir, name, lr, x)


def _result_name(job) -> str:
  return "validation.json" if job[0] == "grid" else "result.json"


def _done(config, workdir: str, directory: str, job) -> bool:
  return _read_result(config, workdir, os.path.join(directory, _result_name(job))) is not None


def train_run(config, workdir: str, base: dict, name: str, lr: float, seed: int) -> dict:
  """Trains (or finds cached) one run of an arm; returns the phase's DONE record. The trainer evaluates greedy
  accuracy on the validation split every config.eval_every steps (the run's curve)."""
  import ml_collections
  from gkd_jax import models
  from gkd_jax.demos import arithmetic as demo

  phase = settings(config, name)
  data = phase.pop("data")
  phase.update(learning_rate=lr, total_steps=config.steps)
  phase.update(
      eval_dataset=base["data"]["full"],
      eval_split="validation",
      eval_every=config.eval_every,
      eval_metric="arithmetic",
      eval_rows=config.eval.num_validation,
      eval_batch_size=config.eval.batch_size,
      eval_max_new_tokens=config.lengths.max_completion_length,
  )
  seeded = config.copy_and_resolve_references()
  seeded.seed = seed
  gkd = phase["objective"] == "gkd"
  return demo.train_phase(
      os.path.relpath(run_dir(workdir, name, lr, seed), workdir),
      workdir,
      seeded,
      ml_collections.ConfigDict(phase),
      dataset=base["data"][data],
      tokenizer=models.load_tokenizer(base["student"]["model"]),
      init_from=base["student"]["model"],
      teacher_model=base["teacher"]["model"] if gkd else None,
      depends=(base["task_id"], base["teacher"]["fingerprint"], base["student"]["fingerprint"]),
  )


def curve(directory: str) -> dict[str, float]:
  """{step: greedy validation accuracy} from a run's trainer evaluations (WORKDIR/eval.jsonl)."""
  points = {}
  with open(os.path.join(directory, "eval.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "student_accuracy" in record:
        points[str(record["step"])] = record["student_accuracy"]
  return points


def run_job(config, workdir: str, base: dict, job) -> dict:
  kind, name, x = job
  lr, seed = x if kind == "grid" else (chosen_lr(config, workdir, name), x)
  done = train_run(config, workdir, base, name, lr, seed)
  out = {"learning_rate": lr, "train_seconds": done["seconds"], "curve": curve(run_dir(workdir, name, lr, seed))}
  if kind == "grid":
    return dict(out, **validation_metrics(done["model"], base["data"]["full"], config.eval))
  return dict(out, **evaluate_product(config, os.path.dirname(done["model"]), done, base["data"]["full"]))


def work(config, workdir: str, base: dict, only=None) -> int:
  """Runs every job that is ready (its arm's rate known) and unclaimed, until all have results; waits while
  the only jobs left are claimed by other workers or wait on them. Finished phases and evaluations are cached
  by fingerprint, so a job whose settings did not change returns at once. Returns how many jobs this process
  ran."""
  ran = 0
  while True:
    pending, started = 0, False
    for job in jobs(config, workdir, only):
      directory = _job_dir(config, workdir, job)
      if directory is not None and _done(config, workdir, directory, job):
        continue
      pending += 1
      if directory is None:
        continue
      # The lock lives outside the run directory: train_phase may wipe that directory to restart a run.
      lock = os.path.join(workdir, "locks", os.path.relpath(directory, os.path.join(workdir, "runs")) + f".{job[0]}")
      with _claim(lock) as mine:
        if not mine or _done(config, workdir, directory, job):
          continue
        print(f"=== {job[0]} {job[1]} {job[2]}", flush=True)
        result = dict(run_job(config, workdir, base, job), sweep=sweep_key(config, workdir))
        path = os.path.join(directory, _result_name(job))
        with open(path + ".tmp", "w") as f:
          json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"=== {job[0]} {job[1]} {job[2]}: τ=1 {result[SELECTION_METRIC]:.3f}", flush=True)
        ran, started = ran + 1, True
        break  # rescan: this result may have unblocked jobs (a widened grid, a chosen rate)
    if not pending:
      return ran
    if not started:
      time.sleep(2)


def _pin(index: int, count: int) -> None:
  """Pins worker `index` of `count` to its share of this process's CPUs. XLA:CPU's thread pool spans every
  core it sees, so unpinned workers contend for all of them: two 100-step on-policy runs side by side on 2
  cores took 53 s unpinned and 44 s pinned to one core each."""
  if not hasattr(os, "sched_setaffinity"):
    return
  cores = sorted(os.sched_getaffinity(0))
  if count > 1 and count <= len(cores):
    share = len(cores) // count
    os.sched_setaffinity(0, set(cores[index * share : (index + 1) * share]))


def spawn_workers(config, count: int, workdir: str, only=None) -> None:
  """count worker processes of this sweep (same flags); waits for them, showing finished jobs (the total
  grows when a grid widens)."""
  from tqdm.auto import tqdm

  argv = [a for a in sys.argv[1:] if not a.startswith(("--workers", "--worker_index"))]
  logs = [os.path.join(workdir, f"worker{i}.log") for i in range(count)]
  procs = [
      subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *argv, "--worker", f"--worker_index={i}", f"--workers={count}"],
          stdout=open(log, "a"),
          stderr=subprocess.STDOUT,
      )
      for i, log in enumerate(logs)
  ]

  def progress():  # (jobs with results, jobs known)
    todo = jobs(config, workdir, only)
    dirs = [(_job_dir(config, workdir, job), job) for job in todo]
    return sum(d is not None and _done(config, workdir, d, job) for d, job in dirs), len(todo)

  done, total = progress()
  with tqdm(total=total, initial=done, desc="runs") as bar:
    while any(p.poll() is None for p in procs):
      time.sleep(5)
      done, bar.total = progress()
      bar.update(done - bar.n)
  failed = [log for p, log in zip(procs, logs) if p.returncode]
  if failed:
    raise RuntimeError(f"sweep workers failed; see {failed}")


# ---------------------------------------------------------------------------------------------------- report


def collect(config, workdir: str) -> dict:
  """{arm: {metric: [value per test seed]}} for every finished final run, plus 'teacher' and 'initial' (one
  value each), and 'selection': per arm the selection score (validation τ=1, mean over the selection seeds) at
  each rate of its grid, each selection run's validation metrics, and the chosen rate."""
  results = {}
  for name in ("teacher", "initial"):
    found = _read(os.path.join(workdir, BASE, name, "metrics.json"))
    if found:
      results[name] = {k: [v] for k, v in found["value"].items()}
  selection = {"metric": SELECTION_METRIC, "seeds": list(config.selection_seeds), "score": {}, "runs": {}}
  selection["learning_rate"] = {}
  for name in config.runs:
    grid, lr = lr_grid(config, workdir, name)
    selection["score"][name] = {f"{x:g}": validation_score(config, workdir, name, x) for x in grid}
    selection["runs"][name] = {
        f"{x:g}": [
            _read_result(config, workdir, os.path.join(run_dir(workdir, name, x, seed), "validation.json"))
            for seed in config.selection_seeds
        ]
        for x in grid
    }
    if lr is None:
      continue
    selection["learning_rate"][name] = lr
    for seed in config.seeds:
      path = os.path.join(run_dir(workdir, name, lr, seed), "result.json")
      for k, v in (_read_result(config, workdir, path) or {}).items():
        if k != "sweep":
          results.setdefault(name, {}).setdefault(k, []).append(v)
  return {"selection": selection, **results}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  import jax
  # Runs share shapes: compiled programs are reused across runs and worker processes.
  jax.config.update("jax_compilation_cache_dir", os.path.join(_WORKDIR.value, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import sweep_report

  if _WORKER.value:
    _pin(_WORKER_INDEX.value, _WORKERS.value)
  results_dir = _RESULTS_DIR.value or os.path.join(workdir, "report")
  if not _REPORT.value:
    t0 = time.perf_counter()
    base = prepare(config, workdir)
    if _WORKER.value or _WORKERS.value <= 1:
      work(config, workdir, base, _ONLY.value)
    else:
      spawn_workers(config, _WORKERS.value, workdir, _ONLY.value)
    if _WORKER.value:
      return
    print(f"sweep: {time.perf_counter() - t0:.0f} s this invocation", flush=True)
  sweep_report.write(config, collect(config, workdir), results_dir)


if __name__ == "__main__":  # flags here: tests import this module beside gkd_jax.main's flags
  from gkd_jax import host_malloc

  host_malloc.reexec_if_wanted()  # CPU hosts: the CLI's malloc settings (workers inherit them)
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/sweep.py", "The sweep's config file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep (shared by all its workers).")
  _WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes training runs in parallel (1 = in this one).")
  _WORKER = flags.DEFINE_bool("worker", False, "Internal: this process is a worker of a sweep.")
  _WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "Internal: which worker (for CPU pinning).")
  _REPORT = flags.DEFINE_bool("report", False, "Only write the report from the results so far.")
  _ONLY = flags.DEFINE_list("only", None, "Run only these runs (names from config.runs).")
  _RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where the table and figures go (default WORKDIR/report).")
  app.run(main)
