"""The paper's findings at toy scale: every run of configs/sweep.py over seeds, then a table and figures.

    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --workers=2
    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --report
    python experiments/sweep.py --config=configs/sweep.py:runlocal --workdir=/tmp/gkd_sweep_tiny

Stages, each cached in the workdir (a rerun skips what is done; an interrupted run resumes from its last
checkpoint, as the demo's phases do):

  base      the task (plus a copy with `data_fraction` of the train prompts, the same test sets), the teacher
            and the initial student (the demo's phases), the SeqKD dataset (the teacher's samples for every
            train prompt) and the evaluation of teacher and initial student.
  runs      runs/NAME/seedS for every run and seed: train from the initial student, export, evaluate.
            `--workers=N` starts N worker processes; a worker takes a run by an exclusive lock on
            locks/NAME.seedS (released by the OS if it dies), so any number of sweeps may share a
            workdir, on one machine or several over a shared file system.
  report    results.json, sweep.md (mean ± std over seeds) and fig_*.png into --results_dir.

`--only=a,b` restricts the runs (names from configs/sweep.py), e.g. to add seeds to one arm:
`--config.seeds='(0,1,2,3)' --only=onpolicy_rkl`.
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
  for name, done in (("teacher", teacher), ("initial", student)):
    evaluate_product(config, os.path.join(base, name), done, tasks["full"]["data"])
  return {
      "task_id": task_id,
      "teacher": teacher,
      "student": student,
      "data": {"full": tasks["full"]["data"], "fraction": tasks["fraction"]["data"], "seqkd": seqkd},
  }


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_model(model_dir: str, task_data: str, ev) -> dict:
  """Every metric of the sweep for one checkpoint (keys: greedy, greedy_chain, long, long_chain, and per
  sampling temperature t: sample_t, sample_chain_t, distinct_t (distinct valid chains among a problem's
  samples), unique_t (distinct completions among them) and valid_t (the samples' valid-chain rate))."""
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
  m = arithmetic.evaluate(complete(test), test)
  out["greedy"], out["greedy_chain"] = m["accuracy"], m["chain_accuracy"]
  m = arithmetic.evaluate(complete(long), long)
  out["long"], out["long_chain"] = m["accuracy"], m["chain_accuracy"]
  n, problems = ev.num_samples, test[: ev.diversity_problems]
  for i, t in enumerate(ev.temperatures):
    m = arithmetic.evaluate(complete(test, t, seed=1 + i), test)
    out[f"sample_{t}"], out[f"sample_chain_{t}"] = m["accuracy"], m["chain_accuracy"]
    texts = complete([p for p in problems for _ in range(n)], t, seed=101 + i)
    groups = [texts[j * n : (j + 1) * n] for j in range(len(problems))]
    out[f"distinct_{t}"] = float(np.mean([arithmetic.distinct_valid_chains(g, p) for g, p in zip(groups, problems)]))
    # Distinct texts among a problem's samples, right or wrong: the diversity Self-BLEU measures.
    out[f"unique_{t}"] = float(np.mean([len(set(g)) for g in groups]))
    out[f"valid_{t}"] = float(np.mean([arithmetic.check_chain(p, c) for g, p in zip(groups, problems) for c in g]))
  return out


def validation_accuracy(model_dir: str, task_data: str, ev) -> float:
  """Greedy accuracy on the validation split: what the learning-rate grid is scored by."""
  from gkd_jax import evaluate as evaluate_lib
  from gkd_jax import models
  from gkd_jax.tasks import arithmetic

  rows = list(arithmetic.load_task(os.path.dirname(task_data))["validation"])[: ev.num_validation]
  model, tokenizer = models.from_pretrained(model_dir), models.load_tokenizer(model_dir)
  texts = evaluate_lib.generate_completions(
      model, tokenizer, rows, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, temperature=0.0
  )
  return arithmetic.evaluate(texts, rows)["accuracy"]


def evaluate_product(config, directory: str, done: dict, task_data: str) -> dict:
  """evaluate_model of a phase's product, cached in directory/metrics.json."""
  from gkd_jax import file_cache

  fingerprint = file_cache.fingerprint([done["fingerprint"], config.eval.to_dict()])

  def compute():
    t0 = time.perf_counter()
    return dict(evaluate_model(done["model"], task_data, config.eval), eval_seconds=round(time.perf_counter() - t0, 1))

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
# Jobs are ("grid", arm, lr): the arm on seed config.grid_seed at one rate of config.lr_grid, scored by greedy
# accuracy on the validation split; and ("final", arm, seed): the arm at its chosen rate, evaluated on the test
# split. A run's directory is runs/ARM/lrLR/seedS, so the final run of grid_seed at the chosen rate is the grid
# run itself (its training is cached; only the test evaluation is new).


def onpolicy_arms(config) -> dict[str, str]:
  """{arm: divergence} of the λ=1, full-data arms with a named divergence: the candidates for "best"."""
  return {
      name: run.divergence
      for name, run in config.runs.items()
      if run.lmbda == 1.0 and run.data == "full" and run.divergence in config.divergences
  }


def settings(config, name: str, best: str | None) -> dict | None:
  """The arm's training fields with its divergence resolved to β (None while it needs "best" and best is
  unknown); learning rate and seed are added per run."""
  run = config.runs[name]
  divergence = best if run.divergence == "best" else run.divergence
  if divergence is None:
    return None
  out = dict(config.train.to_dict(), objective=run.objective, lmbda=run.lmbda, data=run.data)
  if run.objective == "gkd":
    if divergence not in config.divergences:
      raise ValueError(
          f"runs.{name}.divergence={run.divergence!r}: expected 'best' or one of {sorted(config.divergences)}"
      )
    out["beta"] = config.divergences[divergence]
  return out


def canonical(config, name: str, best: str | None) -> str | None:
  """An arm with a named divergence and the same resolved settings, else the arm itself (so best_lambda_000
  reuses supkd's runs when best is fkl); None while `best` is unknown and needed."""
  mine = settings(config, name, best)
  if mine is None:
    return None
  named = sorted(other for other in config.runs if config.runs[other].divergence != "best")
  return next((other for other in named if settings(config, other, best) == mine), name)


def run_dir(workdir: str, name: str, lr: float, seed: int) -> str:
  return os.path.join(workdir, "runs", name, f"lr{lr:g}", f"seed{seed}")


_KEYS: dict = {}


def sweep_key(config, workdir: str) -> str:
  """What every result file depends on besides its path (arm, rate, seed): the base models' fingerprints and
  the config, less the seeds and rates (adding some keeps the other results). A result written under another
  key is stale and its job runs again; its training and evaluation come back from their own fingerprinted
  caches where nothing they depend on changed."""
  from gkd_jax import file_cache

  done = [os.path.join(workdir, BASE, phase, "DONE") for phase in ("teacher", "student_sft")]
  memo = (workdir, id(config), tuple(os.path.getmtime(p) if os.path.exists(p) else None for p in done))
  if memo not in _KEYS:
    shared = {k: v for k, v in config.to_dict().items() if k not in ("seeds", "lr_grid")}
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


def validation_score(config, workdir: str, name: str, lr: float) -> float | None:
  found = _read_result(config, workdir, os.path.join(run_dir(workdir, name, lr, config.grid_seed), "validation.json"))
  return None if found is None else found["greedy"]


def best_divergence(config, workdir: str) -> str | None:
  """The on-policy divergence whose arm scores highest on validation at its best rate; None until all of
  their grid runs finished. Ties go to the smaller β."""
  scores = {}
  for name, divergence in onpolicy_arms(config).items():
    found = [validation_score(config, workdir, name, lr) for lr in config.lr_grid]
    if None in found:
      return None
    scores[divergence] = max(found)
  if not scores:
    raise ValueError("arms use divergence='best' but config.runs has no λ=1 arm with a named divergence")
  return max(scores, key=lambda d: (scores[d], -config.divergences[d]))


def chosen_lr(config, workdir: str, name: str) -> float | None:
  """The rate of config.lr_grid with the best validation accuracy for the arm (its canonical arm's grid);
  None until the grid finished. Ties go to the smaller rate."""
  canon = canonical(config, name, best_divergence(config, workdir))
  if canon is None:
    return None
  found = {lr: validation_score(config, workdir, canon, lr) for lr in sorted(config.lr_grid)}
  if None in found.values():
    return None
  return max(found, key=lambda lr: (found[lr], -lr))


def jobs(config, only=None) -> list[tuple[str, str, float | int]]:
  """Grid jobs first (arms not needing "best" before those that do), then final jobs seed-major (a partial
  sweep has every arm at its first seeds). `only` restricts the arms; arms that need "best" bring the
  on-policy arms' grid jobs with them."""
  names = list(config.runs)
  if only:
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"--only names unknown runs {unknown}; config.runs has {sorted(names)}")
    names = [n for n in names if n in only]
  needs_best = [n for n in names if config.runs[n].divergence == "best"]
  grid_arms = [n for n in config.runs if n in names or (needs_best and n in onpolicy_arms(config))]
  grid_arms.sort(key=lambda n: config.runs[n].divergence == "best")
  out = [("grid", n, lr) for n in grid_arms for lr in config.lr_grid]
  return out + [("final", n, seed) for seed in config.seeds for n in names]


def _job_dir(config, workdir: str, job) -> str | None:
  """Where the job's result goes; None while it waits for "best" or the arm's grid."""
  kind, name, x = job
  canon = canonical(config, name, best_divergence(config, workdir))
  if canon is None:
    return None
  if kind == "grid":
    return run_dir(workdir, canon, x, config.grid_seed)
  lr = chosen_lr(config, workdir, name)
  return None if lr is None else run_dir(workdir, canon, lr, x)


def _result_name(job) -> str:
  return "validation.json" if job[0] == "grid" else "result.json"


def _done(config, workdir: str, directory: str, job) -> bool:
  return _read_result(config, workdir, os.path.join(directory, _result_name(job))) is not None


def train_run(config, workdir: str, base: dict, name: str, lr: float, seed: int) -> dict:
  """Trains (or finds cached) one run of an arm; returns the phase's DONE record."""
  import ml_collections
  from gkd_jax import models
  from gkd_jax.demos import arithmetic as demo

  phase = settings(config, name, best_divergence(config, workdir))
  data = phase.pop("data")
  phase.update(learning_rate=lr, total_steps=config.steps)
  seeded = config.copy_and_resolve_references()
  seeded.seed = seed
  gkd = phase["objective"] == "gkd"
  rel = os.path.relpath(run_dir(workdir, canonical(config, name, best_divergence(config, workdir)), lr, seed), workdir)
  return demo.train_phase(
      rel,
      workdir,
      seeded,
      ml_collections.ConfigDict(phase),
      dataset=base["data"][data],
      tokenizer=models.load_tokenizer(base["student"]["model"]),
      init_from=base["student"]["model"],
      teacher_model=base["teacher"]["model"] if gkd else None,
      depends=(base["task_id"], base["teacher"]["fingerprint"], base["student"]["fingerprint"]),
  )


def run_job(config, workdir: str, base: dict, job) -> dict:
  kind, name, x = job
  if kind == "grid":
    lr, seed = x, config.grid_seed
  else:
    lr, seed = chosen_lr(config, workdir, name), x
  done = train_run(config, workdir, base, name, lr, seed)
  if kind == "grid":
    return {"greedy": validation_accuracy(done["model"], base["data"]["full"], config.eval), "learning_rate": lr}
  metrics = evaluate_product(config, os.path.dirname(done["model"]), done, base["data"]["full"])
  return {"train_seconds": done["seconds"], "learning_rate": lr, **metrics}


def work(config, workdir: str, base: dict, only=None) -> int:
  """Runs every job that is ready (its grid or "best" known) and unclaimed, until all have results; waits
  while the only jobs left are claimed by other workers or wait on them. Finished phases and evaluations
  are cached by fingerprint, so a job whose settings did not change returns at once. Returns how many jobs
  this process ran."""
  ran = 0
  while True:
    pending, started = 0, False
    for job in jobs(config, only):
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
        print(f"=== {job[0]} {job[1]} {job[2]}: greedy {result['greedy']:.3f}", flush=True)
        ran, started = ran + 1, True
        break  # rescan: this result may have unblocked jobs earlier in the order
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


def spawn_workers(config, count: int, workdir: str, todo: list) -> None:
  """count worker processes of this sweep (same flags); waits for them, showing finished jobs."""
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
  start = time.time()

  def finished():  # result files (re)written by this invocation's workers
    dirs = [(_job_dir(config, workdir, job), job) for job in todo]
    paths = [os.path.join(d, _result_name(job)) for d, job in dirs if d is not None and _done(config, workdir, d, job)]
    return sum(os.path.getmtime(p) >= start for p in paths)

  with tqdm(total=len(todo), desc="runs") as bar:
    while any(p.poll() is None for p in procs):
      time.sleep(5)
      bar.update(finished() - bar.n)
    bar.update(finished() - bar.n)
  failed = [log for p, log in zip(procs, logs) if p.returncode]
  if failed:
    raise RuntimeError(f"sweep workers failed; see {failed}")


# ---------------------------------------------------------------------------------------------------- report


def collect(config, workdir: str) -> dict:
  """{arm: {metric: [value per seed]}} for every finished final run, plus 'teacher' and 'initial' (one value
  each), and 'selection': the validation accuracy per arm and rate, the chosen rates and the best divergence."""
  results = {}
  for name in ("teacher", "initial"):
    found = _read(os.path.join(workdir, BASE, name, "metrics.json"))
    if found:
      results[name] = {k: [v] for k, v in found["value"].items()}
  best = best_divergence(config, workdir) if any(r.divergence == "best" for r in config.runs.values()) else None
  selection = {"best_divergence": best, "validation": {}, "learning_rate": {}, "same_runs_as": {}}
  for name in config.runs:
    canon = canonical(config, name, best)
    if canon is None:
      continue
    if canon != name:
      selection["same_runs_as"][name] = canon
    selection["validation"][name] = {f"{lr:g}": validation_score(config, workdir, canon, lr) for lr in config.lr_grid}
    lr = chosen_lr(config, workdir, name)
    if lr is None:
      continue
    selection["learning_rate"][name] = lr
    for seed in config.seeds:
      path = os.path.join(run_dir(workdir, canon, lr, seed), "result.json")
      for k, v in (_read_result(config, workdir, path) or {}).items():
        if k == "sweep":
          continue
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
      spawn_workers(config, _WORKERS.value, workdir, jobs(config, _ONLY.value))
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
