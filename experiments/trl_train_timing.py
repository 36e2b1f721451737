"""Seconds per optimizer step of TRL's GKDTrainer (PyTorch, CPU, float32 or --bf16) on the bench fixture.

The baseline side of experiments/bench_train.py (which runs it under the interpreter given to
--compare-trl); it can be run alone too:

    python experiments/trl_train_timing.py /tmp/gkd_bench_fixture --lmbda 0 --steps 8 --warmup 2
    python experiments/trl_train_timing.py /tmp/gkd_bench_fixture --lmbda 1 --steps 6 --max-new-tokens 64
    python experiments/trl_train_timing.py /tmp/gkd_bench_fixture --lmbda 0 --bf16  # mixed precision

Settings match the gkd_jax side: batch 8, beta 0.5, temperature 0.9, lr 1e-5, no gradient checkpointing.
Prints one JSON line: median and per-step seconds after `warmup` steps, and the mean split of a step into
generation (the trainer's on-policy sampling call), teacher forward (a forward hook on the teacher) and the
rest (student forward + loss + backward + optimizer), plus real (unpadded) tokens per step.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("fixture")
  ap.add_argument("--lmbda", type=float, default=0.0)
  ap.add_argument("--beta", type=float, default=0.5)
  ap.add_argument("--steps", type=int, default=8, help="timed steps, after the warm-up")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens kept")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  ap.add_argument(
      "--bf16", action="store_true", help="TrainingArguments(bf16=True): f32 weights, bf16 autocast (mixed precision)"
  )
  args = ap.parse_args()

  import torch
  from datasets import load_dataset
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl.experimental.gkd import GKDConfig, GKDTrainer

  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  path = lambda name: os.path.join(args.fixture, name)
  tokenizer = AutoTokenizer.from_pretrained(path("tokenizer"))
  student = AutoModelForCausalLM.from_pretrained(path("student"), dtype=torch.float32)
  teacher = AutoModelForCausalLM.from_pretrained(path("teacher"), dtype=torch.float32)
  rows = load_dataset("json", data_files=path("train.jsonl"), split="train")

  clock = {"gen": 0.0, "teacher": 0.0, "tokens": 0}
  steps = []

  class StepClock(TrainerCallback):

    def on_step_begin(self, *a, **kw):
      clock.update(gen=0.0, teacher=0.0, tokens=0, start=time.perf_counter())

    def on_step_end(self, *a, **kw):
      steps.append(
          {
              "step_s": time.perf_counter() - clock["start"],
              "gen_s": clock["gen"],
              "teacher_s": clock["teacher"],
              "tokens": clock["tokens"],
          }
      )

  def before_teacher(module, inputs, kwargs):
    clock["teacher_start"] = time.perf_counter()
    clock["tokens"] += int(kwargs["attention_mask"].sum())  # the (possibly generated) sequences trained on

  def after_teacher(module, inputs, kwargs, output):
    clock["teacher"] += time.perf_counter() - clock["teacher_start"]

  teacher.register_forward_pre_hook(before_teacher, with_kwargs=True)
  teacher.register_forward_hook(after_teacher, with_kwargs=True)

  total = args.warmup + args.steps
  config = GKDConfig(
      output_dir=tempfile.mkdtemp(prefix="trl_timing_"),
      per_device_train_batch_size=args.batch,
      max_steps=total,
      lmbda=args.lmbda,
      beta=args.beta,
      temperature=0.9,
      max_new_tokens=args.max_new_tokens,
      learning_rate=1e-5,
      max_length=args.max_length,
      bf16=args.bf16,
      use_cpu=True,
      gradient_checkpointing=False,
      save_strategy="no",
      logging_steps=10**6,
      report_to=[],
      dataloader_num_workers=0,
      disable_tqdm=True,
      seed=0,
  )
  trainer = GKDTrainer(
      model=student,
      teacher_model=teacher,
      args=config,
      processing_class=tokenizer,
      train_dataset=rows,
      callbacks=[StepClock()],
  )
  sample = trainer.generate_on_policy_outputs

  def timed_sample(*a, **kw):
    start = time.perf_counter()
    out = sample(*a, **kw)
    clock["gen"] += time.perf_counter() - start
    return out

  trainer.generate_on_policy_outputs = timed_sample  # an instance attribute shadows the static method
  trainer.train()

  timed = steps[args.warmup :]
  mean = lambda key: statistics.fmean(s[key] for s in timed)
  step_s = [round(s["step_s"], 4) for s in timed]
  print(
      json.dumps(
          {
              "impl": "trl",
              "lmbda": args.lmbda,
              "batch": args.batch,
              "threads": torch.get_num_threads(),
              "bf16": args.bf16,
              "median_step_s": round(statistics.median(step_s), 4),
              "step_s": step_s,
              "mean_step_s": round(mean("step_s"), 4),
              "gen_s": round(mean("gen_s"), 4),
              "teacher_s": round(mean("teacher_s"), 4),
              "student_s": round(mean("step_s") - mean("gen_s") - mean("teacher_s"), 4),
              "tokens_per_step": mean("tokens"),
          }
      )
  )


if __name__ == "__main__":
  main()
