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
  sampling temperature t: sample_t, sample_chain_t, distinct_t, valid_t)."""
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
    out[f"valid_{t}"] = float(np.mean([arithmetic.check_chain(p, c) for g, p in zip(groups, problems) for c in g]))
  return out


def evaluate_product(config, directory: str, done: dict, task_data: str) -> dict:
  """evaluate_model of a phase's product, cached in directory/metrics.json."""
  from gkd_jax import file_cache

  fingerprint = file_cache.fingerprint([done["fingerprint"], config.eval.to_dict()])

  def compute():
    t0 = time.perf_counter()
    return dict(evaluate_model(done["model"], task_data, config.eval), eval_seconds=round(time.perf_counter() - t0, 1))

  return file_cache.json_cache(os.path.join(directory, "metrics.json"), fingerprint, compute)


# ------------------------------------------------------------------------------------------------------ runs


def jobs(config, only=None) -> list[tuple[str, int]]:
  """(run, seed) pairs, seed-major: a partial sweep has every arm at its first seeds."""
  names = list(config.runs)
  if only:
    unknown = sorted(set(only) - set(names))
    if unknown:
      raise ValueError(f"--only names unknown runs {unknown}; config.runs has {sorted(names)}")
    names = [n for n in names if n in only]
  return [(name, seed) for seed in config.seeds for name in names]


def run_dir(workdir: str, name: str, seed: int) -> str:
  return os.path.join(workdir, "runs", name, f"seed{seed}")


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


def train_and_evaluate(config, workdir: str, base: dict, name: str, seed: int) -> dict:
  import ml_collections
  from gkd_jax import models
  from gkd_jax.demos import arithmetic as demo

  run = config.runs[name]
  phase = {k: v for k, v in run.items() if k != "data"}
  phase["total_steps"] = config.steps
  seeded = config.copy_and_resolve_references()
  seeded.seed = seed
  dataset = base["data"][run.get("data", "full")]
  gkd = run.objective == "gkd"
  rel = os.path.relpath(run_dir(workdir, name, seed), workdir)
  done = demo.train_phase(
      rel,
      workdir,
      seeded,
      ml_collections.ConfigDict(phase),
      dataset=dataset,
      tokenizer=models.load_tokenizer(base["student"]["model"]),
      init_from=base["student"]["model"],
      teacher_model=base["teacher"]["model"] if gkd else None,
      depends=(base["task_id"], base["teacher"]["fingerprint"], base["student"]["fingerprint"]),
  )
  metrics = evaluate_product(config, run_dir(workdir, name, seed), done, base["data"]["full"])
  return {"train_seconds": done["seconds"], **metrics}


def work(config, workdir: str, base: dict, only=None) -> int:
  """Trains and evaluates every unclaimed job (finished phases and evaluations are cached by fingerprint, so
  a job whose settings did not change returns at once); returns how many this process went through."""
  done = 0
  for name, seed in jobs(config, only):
    directory = run_dir(workdir, name, seed)
    # The lock lives outside the run directory: train_phase may wipe that directory to restart a run.
    with _claim(os.path.join(workdir, "locks", f"{name}.seed{seed}")) as mine:
      if not mine:
        continue
      print(f"=== {name} seed {seed}", flush=True)
      result = train_and_evaluate(config, workdir, base, name, seed)
      with open(os.path.join(directory, "result.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
      os.replace(os.path.join(directory, "result.json.tmp"), os.path.join(directory, "result.json"))
      print(f"=== {name} seed {seed}: greedy {result['greedy']:.3f}", flush=True)
      done += 1
  return done


def spawn_workers(count: int, workdir: str, todo: list) -> None:
  """count worker processes of this sweep (same flags); waits for them, showing finished jobs."""
  from tqdm.auto import tqdm

  argv = [a for a in sys.argv[1:] if not a.startswith("--workers")]
  logs = [os.path.join(workdir, f"worker{i}.log") for i in range(count)]
  procs = [
      subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), *argv, "--worker"],
          stdout=open(log, "a"),
          stderr=subprocess.STDOUT,
      )
      for log in logs
  ]
  start = time.time()

  def finished():  # result files (re)written by this invocation's workers
    paths = [os.path.join(run_dir(workdir, n, s), "result.json") for n, s in todo]
    return sum(os.path.exists(p) and os.path.getmtime(p) >= start for p in paths)

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
  """{arm: {metric: [value per seed]}} for every finished run, plus 'teacher' and 'initial' (one value)."""
  results = {}
  for name in ("teacher", "initial"):
    path = os.path.join(workdir, BASE, name, "metrics.json")
    if os.path.exists(path):
      with open(path) as f:
        results[name] = {k: [v] for k, v in json.load(f)["value"].items()}
  for name in config.runs:
    for seed in config.seeds:
      path = os.path.join(run_dir(workdir, name, seed), "result.json")
      if os.path.exists(path):
        with open(path) as f:
          for k, v in json.load(f).items():
            results.setdefault(name, {}).setdefault(k, []).append(v)
  return results


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

  results_dir = _RESULTS_DIR.value or os.path.join(workdir, "report")
  if not _REPORT.value:
    t0 = time.perf_counter()
    base = prepare(config, workdir)
    if _WORKER.value or _WORKERS.value <= 1:
      work(config, workdir, base, _ONLY.value)
    else:
      spawn_workers(_WORKERS.value, workdir, jobs(config, _ONLY.value))
    if _WORKER.value:
      return
    print(f"sweep: {time.perf_counter() - t0:.0f} s this invocation", flush=True)
  sweep_report.write(config, collect(config, workdir), results_dir)


if __name__ == "__main__":  # flags here: tests import this module beside gkd_jax.main's flags
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/sweep.py", "The sweep's config file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep (shared by all its workers).")
  _WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes training runs in parallel (1 = in this one).")
  _WORKER = flags.DEFINE_bool("worker", False, "Internal: this process is a worker of a sweep.")
  _REPORT = flags.DEFINE_bool("report", False, "Only write the report from the results so far.")
  _ONLY = flags.DEFINE_list("only", None, "Run only these runs (names from config.runs).")
  _RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where the table and figures go (default WORKDIR/report).")
  app.run(main)
