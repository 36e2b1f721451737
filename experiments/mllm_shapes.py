"""Does GKD with images teach a vision-language student? The shapes task with the tiny InternVL pair, on a CPU.

    python experiments/mllm_shapes.py --workdir=/tmp/gkd_mllm_shapes [--fixture=/tmp/gkd_fixture_internvl]

Phases (each a real trainer run from configs/mllm_internvl.py:runlocal's settings, its student exported):
  teacher      the fixture's random-init InternVL teacher (1.0M params), SFT on the shapes task with its tower
               and projector trained (nothing pretrained here to freeze).
  student_sft  the random-init student (0.17M params), SFT briefly: the mediocre starting point.
  gkd          GKD from student_sft with the teacher (λ=0.5: dataset and on-policy steps, JSD(0.5)).
  sft_more     the control: student_sft trained on for as many steps by plain SFT on the same data.
Every phase trains the student's tower and projector too: the fixture's towers are random, so a frozen one would
leave nothing for the student to see with. Greedy accuracy on the test split (gkd_jax.tasks.shapes' checker,
overall and per question kind) for each checkpoint; a table on stdout and WORKDIR/results.json. Results:
experiments/results/mllm_shapes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixture  # noqa: E402

from gkd_jax import evaluate as evaluate_lib  # noqa: E402
from gkd_jax import images, models, rows, trainer  # noqa: E402
from gkd_jax.tasks import shapes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHASES = {
    "teacher": dict(objective="sft", lmbda=0.0, total_steps=3000, learning_rate=1e-3, batch_size=32),
    "student_sft": dict(objective="sft", lmbda=0.0, total_steps=150, learning_rate=3e-3, batch_size=32),
    "gkd": dict(objective="gkd", lmbda=0.5, beta=0.5, total_steps=600, learning_rate=1e-3, batch_size=32),
    "sft_more": dict(objective="sft", lmbda=0.0, total_steps=600, learning_rate=1e-3, batch_size=32),
}


def phase_config(fixture_dir: str, phase: dict, model: str, teacher: str | None):
  spec = os.path.join(ROOT, "configs", "mllm_internvl.py")
  import importlib.util

  module_spec = importlib.util.spec_from_file_location("mllm_internvl", spec)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config(f"runlocal={fixture_dir}")
  c.model, c.teacher_model, c.tokenizer = model, teacher, f"{fixture_dir}/tokenizer"
  c.eval_split = None  # evaluated once per phase below, on the whole test split
  c.train_vision_tower = c.train_projector = True
  c.warmup_steps, c.lr_schedule, c.log_every, c.save_every, c.keep_checkpoints = 20, "cosine", 50, 10_000, 1
  for k, v in phase.items():
    c[k] = v
  return c


def train(workdir: str, name: str, fixture_dir: str, model: str, teacher: str | None = None) -> str:
  phase_dir = os.path.join(workdir, name)
  export = os.path.join(phase_dir, "export")
  if not os.path.exists(os.path.join(export, "config.json")):
    t0 = time.perf_counter()
    trainer.train(phase_config(fixture_dir, PHASES[name], model, teacher), phase_dir)
    print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
  return export


def accuracy(model_dir: str, test_rows: list, tokenizer) -> dict:
  model = models.from_pretrained(model_dir)
  vl = models.load_vl_config(model_dir)
  inputs = images.image_inputs(model_dir, tokenizer, vl.image_seq_length)
  return evaluate_lib.accuracy(
      model,
      tokenizer,
      test_rows,
      max_new_tokens=4,
      batch_size=128,
      evaluate_fn=shapes.evaluate,
      image_inputs=inputs,
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--fixture", default="/tmp/gkd_fixture_internvl")
  ap.add_argument("--teacher-steps", type=int, default=PHASES["teacher"]["total_steps"])
  ap.add_argument("--teacher-lr", type=float, default=PHASES["teacher"]["learning_rate"])
  args = ap.parse_args()
  PHASES["teacher"].update(total_steps=args.teacher_steps, learning_rate=args.teacher_lr)
  t0 = time.perf_counter()
  fixture.build_internvl(args.fixture)
  tokenizer = models.load_tokenizer(os.path.join(args.fixture, "tokenizer"))
  test_rows = list(rows.load_rows(os.path.join(args.fixture, "test.jsonl"), split="train"))
  teacher = train(args.workdir, "teacher", args.fixture, os.path.join(args.fixture, "teacher"))
  student = train(args.workdir, "student_sft", args.fixture, os.path.join(args.fixture, "student"))
  checkpoints = {
      "teacher (SFT)": teacher,
      "student, initial (SFT)": student,
      "student, GKD": train(args.workdir, "gkd", args.fixture, student, teacher),
      "student, more SFT (control)": train(args.workdir, "sft_more", args.fixture, student),
  }
  results = {name: accuracy(path, test_rows, tokenizer) for name, path in checkpoints.items()}
  kinds = [k for k in next(iter(results.values())) if k.startswith("accuracy_")]
  print(f"\n| checkpoint | accuracy | {' | '.join(k.removeprefix('accuracy_') for k in kinds)} |")
  print("|---|---:|" + "---:|" * len(kinds))
  for name, r in results.items():
    print(f"| {name} | {r['accuracy']:.3f} | {' | '.join(f'{r[k]:.3f}' for k in kinds)} |")
  print(f"\n{results[next(iter(results))]['count']} test rows, greedy; {time.perf_counter() - t0:.0f} s in all")
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"phases": PHASES, "results": results, "seconds": time.perf_counter() - t0}, f, indent=1)


if __name__ == "__main__":
  main()
