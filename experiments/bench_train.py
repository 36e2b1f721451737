"""Training throughput of the GKD step (gkd_jax.trainer) against TRL's GKDTrainer, side by side.

On a fixture of experiments/fixture.py, beta 0.5, temperature 0.9, three modes: off-policy (lmbda 0, the
dataset's completions), on-policy (lmbda 1, new tokens sampled by the student) and mixed (lmbda 0.5).
Shapes (--shape): "small" (Qwen2 12.3M student, 65M teacher, 32,768 embedding rows, batch 8, 64 new tokens)
and "qwen4l" (Qwen2.5-0.5B and -1.5B widths cut to 4 layers, 151,936 rows, batch 4, prompts and completions
up to 128 tokens each). --full-vocab pads the tokenizer to the embedding rows (small: 32,768; qwen4l: Qwen2.5's
151,665), so both sides compute every LM-head column as with a real checkpoint; without it the tokenizer has
1,024 tokens and gkd_jax cuts its heads to them (TRL does not): quote the full-vocabulary form first.

    python experiments/bench_train.py --full-vocab --compare-trl /root/venv/bin/python --steps 10 --warmup 3
    python experiments/bench_train.py --compare-trl /root/venv/bin/python --steps 10 --warmup 3  # cut form
    python experiments/bench_train.py --shape qwen4l --full-vocab --compare-trl /root/venv/bin/python --steps 3
    python experiments/bench_train.py --modes off --steps 3 --warmup 2  # a quick smoke run, ours only
    python experiments/bench_train.py --modes off --set fused_loss=True  # any config field
    python experiments/bench_train.py --modes off --variant "bf16:dtype='bfloat16'"  # A/B, interleaved

Both sides run under the same glibc malloc settings: gkd_jax.host_malloc's (what the gkd_jax CLI uses on
CPU hosts; this script re-executes itself under them and TRL's subprocess inherits them), or with
--system-malloc glibc's defaults on both sides.

What runs is the real trainer: `trainer.build(config)` and, per step, the loop body of `trainer.run`
(`BatchSource.get` → the global batch, with the student's sampler call on generating steps, its completions
left on the devices; the jitted, donated `setup.train_step`; metrics fetched to the host), without
checkpoints or metric files. Timings:

  step      wall time of that loop body (median over the timed steps is "s/step").
  gen       the sampler call inside it: from its dispatch until its completions are computed
            (`rollout.prepare_batch`'s own timer, a thread waiting on them; the host does not wait).
  teacher   the teacher's part of the train step, timed on its own right after each step: the same teacher
            forward the step runs (`train_step.completion_hidden` + the head, or the hidden states for the
            fused loss), jitted separately, on the same batch and params.
  student   step - gen - teacher: the student forward + loss + backward + optimizer, and host overhead.

The split columns are means per step (so they add up to the mean step, which for mixed differs from the
median). MFU = model FLOPs / time / peak, where the peak is the best matmul rate this machine reaches in
this run at the row's precision (`metrics.measure_peak_flops`, best of 10 2048² products accumulated in f32,
measured at the start and after each mode; the largest is kept) and FLOPs count the shapes the step runs (padded): teacher forward, student
forward + backward (3×) and the decode steps, with the LM head only where its logits are used (the
completion columns, and the last position of the prefill) and over the columns it multiplies (the
tokenizer's vocabulary when the head is cut to it). "step MFU" leaves out generation: the train step's
FLOPs over its own time. tokens/s counts real (unpadded) prompt + completion tokens.

The number of XLA compiles after the warm-up is counted (jax.monitoring backend-compile events) and must
be 0. The warm-up lasts `--warmup` steps, and longer for mixed until both kinds of step have run once.

--precisions (default f32,bf16) runs ours at dtype=float32 and dtype=bfloat16 (f32 master weights and
optimizer either way; bf16 compute, float32 accumulation), taking turns step by step. With --compare-trl
PYTHON, each mode then runs experiments/trl_train_timing.py under PYTHON at each precision (bf16=False /
True: torch autocast over f32 weights), with the same fixture, batch, steps and warm-up, and two markdown
tables are printed: the 2×2 of precisions, and each side at its faster precision (the fair headline). The
CPU model and the ISA extensions that decide matmul speed (AVX-512, AVX512-BF16, AMX) head the tables. torch's thread count is the
faster of --trl-threads (default 1 and 2) on a short off-policy probe first: on a busy shared machine
torch's spinning threads can be several times slower than one thread.

--variant LABEL:FIELD=VALUE;... builds one more trainer per variant; the base run and the variants then
take turns step by step, so an A/B of a config field sees the same machine load on both sides.
"""

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time

if "--system-malloc" in sys.argv:
  os.environ["GKD_JAX_MALLOC"] = "system"
from gkd_jax import host_malloc  # noqa: E402

host_malloc.default_platform_to_cpu()  # no libtpu probing (and its error lines) on a CPU host
host_malloc.reexec_if_wanted()  # before jax starts; TRL's subprocess inherits the same malloc settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fixture  # noqa: E402
from cpuinfo import cpu_description  # noqa: E402

from gkd_jax import config as config_lib  # noqa: E402
from gkd_jax import metrics as metrics_lib  # noqa: E402
from gkd_jax import train_step as ts  # noqa: E402
from gkd_jax import rollout, sharding, trainer  # noqa: E402

MODES = {"off": 0.0, "on": 1.0, "mixed": 0.5}
# Per fixture shape: batch, prompt and new-token widths, and the tokenizer size of the full-vocabulary form.
SHAPES = {
    "small": dict(batch=8, max_prompt=64, max_new_tokens=64, full_tokenizer=32768),
    "qwen4l": dict(batch=4, max_prompt=128, max_new_tokens=128, full_tokenizer=151665),
}
NAMES = {"off": "off-policy (λ=0)", "on": "on-policy (λ=1)", "mixed": "mixed (λ=0.5)"}


# ------------------------------------------------------------------------------------------ compiles

_compiles = [0]


def _count_compile(event, duration, **kw):
  if event == "/jax/core/compile/backend_compile_duration":
    _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


# ------------------------------------------------------------------------------------------ config


def make_config(args, lmbda, total_steps, overrides):
  c = config_lib.base_config()
  c.model, c.teacher_model = "student", "teacher"  # use_local_fixture points both at the fixture
  config_lib.use_local_fixture(c, args.fixture)
  c.lmbda, c.beta, c.temperature = lmbda, 0.5, 0.9
  c.batch_size, c.total_steps, c.warmup_steps, c.learning_rate = args.batch, total_steps, 0, 1e-5
  c.max_prompt_length, c.max_completion_length = args.max_prompt, args.max_new_tokens
  c.max_length = args.max_prompt + args.max_new_tokens
  c.peak_flops = 1.0  # MFU is computed here, against the ceiling measured over the whole run
  for item in overrides:
    key, _, value = item.partition("=")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    c[key] = value
  config_lib.validate(c)
  return c


# ------------------------------------------------------------------------------------------ FLOPs


def _body(cfg, context):
  """Forward FLOPs per token without the LM head."""
  return metrics_lib.forward_flops_per_token(cfg, context) - 2.0 * cfg.hidden_size * cfg.vocab_size


def _head_columns(model, vocab):
  try:
    return model.lm_head_weight(vocab).shape[1]
  except TypeError:  # a gkd_jax from before the head was cut to the vocabulary (for A/B runs)
    return model.lm_head_weight().shape[1]


def step_flops(setup, head_columns, p, c, generated):
  """(train-step FLOPs, generation FLOPs) of one step at prompt width p and completion width c. The LM head
  counts the columns the program multiplies (the vocabulary when the head is cut to it)."""
  b, s, t = setup.config.batch_size, setup.student.config, setup.teacher.config
  head_s, head_t = 2.0 * s.hidden_size * head_columns[0], 2.0 * t.hidden_size * head_columns[1]
  seq = p + c
  student = 3.0 * b * (seq * _body(s, seq / 2) + c * head_s)
  teacher = b * (seq * _body(t, seq / 2) + c * head_t)
  gen = 0.0
  if generated:  # prefill of the prompt (head at its last position), then one token per decode step
    gen = b * (p * _body(s, p / 2) + head_s + (generated - 1) * (_body(s, p + generated / 2) + head_s))
  return student + teacher, gen


# ------------------------------------------------------------------------------------------ ours


def teacher_forward_fn(setup):
  """The teacher's part of the train step as its own program (what `teacher_side` computes in the step)."""
  graph, vocab, fused = nnx.graphdef(setup.teacher), setup.step_cfg.vocab_size, setup.step_cfg.divergence == "fused"

  @jax.jit
  def forward(params, batch):
    teacher = nnx.merge(graph, params)
    _, _, hidden = ts.completion_hidden(
        teacher, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    )
    return hidden if fused else teacher.logits(hidden, vocab, dtype=jnp.float32)

  return forward


class Runner:
  """One trainer setup stepping through its run; several runners (variants) take turns step by step."""

  def __init__(self, args, mode, overrides):
    lmbda = MODES[mode]
    self.expected = {"on_policy"} if lmbda == 1 else ({"dataset"} if lmbda == 0 else {"on_policy", "dataset"})
    self.setup, self.state = trainer.build(make_config(args, lmbda, 10**6, overrides))
    self.source = rollout.BatchSource(self.setup)
    self.teacher_forward = teacher_forward_fn(self.setup)
    vocab = self.setup.step_cfg.vocab_size  # (before the first step donates the modules' arrays)
    self.head_columns = [_head_columns(m, vocab) for m in (self.setup.student, self.setup.teacher)]
    self.mode, self.next_step, self.seen, self.records = mode, 0, set(), []

  def step(self, record=True):
    setup, step = self.setup, self.next_step
    t0 = time.perf_counter()
    batch, kind, gen = self.source.get(step, self.state)  # global arrays; sampled completions stay on device
    self.state, metrics = setup.train_step(self.state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    step_s = time.perf_counter() - t0
    gen_s = gen.result()
    t1 = time.perf_counter()
    jax.block_until_ready(self.teacher_forward(self.state.teacher_params, batch))
    teacher_s = time.perf_counter() - t1
    if not np.isfinite(metrics["loss"]):
      raise FloatingPointError(f"{self.mode}: loss {metrics['loss']} at step {step}")
    self.seen.add(kind)
    self.next_step += 1
    if record:
      p, c = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
      train_flops, gen_flops = step_flops(setup, self.head_columns, p, c, c if kind == "on_policy" else 0)
      self.records.append(
          dict(
              kind=kind,
              step_s=step_s,
              gen_s=gen_s,
              teacher_s=teacher_s,
              shape=(p, c),
              # Counted on the host (all rows: one process), after the timing; no device program to compile.
              tokens=int(
                  sharding.host_rows(batch["prompt_mask"]).sum() + sharding.host_rows(batch["completion_mask"]).sum()
              ),
              train_flops=train_flops,
              gen_flops=gen_flops,
          )
      )

  def warm_up(self, steps):
    while self.next_step < steps or not self.seen >= self.expected:
      self.step(record=False)


def run_ours(args, mode, variants):
  """Builds and warms up one runner per variant, then times `steps` steps of each, taking turns."""
  runners = [Runner(args, mode, overrides) for overrides in variants]
  for r in runners:
    r.warm_up(args.warmup)
  before = _compiles[0]
  for _ in range(args.steps):
    for r in runners:
      r.step()
  compiles = _compiles[0] - before
  return [summarize(r.records, compiles, r.next_step - len(r.records)) for r in runners]


def summarize(records, compiles, warm_steps):
  mean = lambda key: statistics.fmean(r[key] for r in records)
  step_s, gen_s, teacher_s = mean("step_s"), mean("gen_s"), mean("teacher_s")
  train_s = step_s - gen_s
  return {
      "median_step_s": statistics.median(r["step_s"] for r in records),
      "mean_step_s": step_s,
      "gen_s": gen_s,
      "teacher_s": teacher_s,
      "student_s": train_s - teacher_s,
      "tokens_per_s": sum(r["tokens"] for r in records) / sum(r["step_s"] for r in records),
      "flops_per_s": (mean("train_flops") + mean("gen_flops")) / step_s,  # MFU once the ceiling is known
      "step_flops_per_s": mean("train_flops") / train_s,
      "gflops_per_step": (mean("train_flops") + mean("gen_flops")) / 1e9,
      "shapes": sorted({r["shape"] for r in records}),
      "kinds": sorted({r["kind"] for r in records}),
      "compiles_after_warmup": compiles,
      "warmup_steps": warm_steps,
      "steps": len(records),
      "step_s": [round(r["step_s"], 3) for r in records],
  }


# ------------------------------------------------------------------------------------------ TRL


def run_trl(args, mode, threads, precision="f32", steps=None, warmup=None):
  script = os.path.join(HERE, "trl_train_timing.py")
  cmd = [
      args.compare_trl,
      script,
      args.fixture,
      "--lmbda",
      str(MODES[mode]),
      "--steps",
      str(steps or args.steps),
      "--warmup",
      str(warmup or args.warmup),
      "--batch",
      str(args.batch),
      "--max-new-tokens",
      str(args.max_new_tokens),
      "--max-length",
      str(args.max_prompt + args.max_new_tokens),
      "--threads",
      str(threads),
  ] + (["--bf16"] if precision == "bf16" else [])
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(
      f"  TRL {mode} {precision}, {threads} thread(s): {result['median_step_s']:.3f} s/step",
      file=sys.stderr,
      flush=True,
  )
  return result


def pick_trl_threads(args):
  """The faster torch thread count on a short off-policy run: on a busy shared machine torch's spinning
  OpenMP threads can be several times slower than one thread, so this is the fair baseline."""
  if len(args.trl_threads) == 1:
    return args.trl_threads[0]
  probe = {t: run_trl(args, "off", t, steps=2, warmup=1)["median_step_s"] for t in args.trl_threads}
  return min(probe, key=probe.get)


# ------------------------------------------------------------------------------------------ report


DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def precision_of(overrides):
  dtypes = [o.partition("=")[2].strip("'\"") for o in overrides if o.partition("=")[0].strip() == "dtype"]
  return {v: k for k, v in DTYPES.items()}[dtypes[-1]] if dtypes else "f32"


def measure_peak(precision):
  """The matmul ceiling at a precision: best of 10 products of 2048² matrices, accumulated in f32 as the
  models' are (on a shared machine, the best is the closest to what the cores can do)."""
  return metrics_lib.measure_peak_flops(jnp.dtype(DTYPES[precision]), n=2048, repeats=10)


def split(r):
  return f"{r['gen_s']:.2f} / {r['teacher_s']:.2f} / {r['student_s']:.2f}"


def table(rows, compare):
  """One line per mode and precision (and variant): ours beside TRL at the same precision."""
  lines = []
  if compare:
    lines.append(
        "| mode | precision | ours s/step | TRL s/step | ratio (TRL/ours) | tokens/s | gen / teacher / student s | "
        "MFU (step MFU) | TRL gen / teacher / student s |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---|---:|---|")
  else:
    lines.append("| mode | precision | ours s/step | tokens/s | gen / teacher / student s | MFU (step MFU) |")
    lines.append("|---|---|---:|---:|---|---:|")
  for mode, label, ours, trl in rows:
    mfu = f"{100 * ours['mfu']:.0f}% ({100 * ours['step_mfu']:.0f}%)"
    head = f"| {NAMES[mode]} | {label} | {ours['median_step_s']:.3f} |"
    if compare and trl:
      lines.append(
          f"{head} {trl['median_step_s']:.3f} | {trl['median_step_s'] / ours['median_step_s']:.2f}× | "
          f"{ours['tokens_per_s']:,.0f} | {split(ours)} | {mfu} | {split(trl)} ({trl['threads']} thr) |"
      )
    elif compare:
      lines.append(f"{head} | | {ours['tokens_per_s']:,.0f} | {split(ours)} | {mfu} | |")
    else:
      lines.append(f"{head} {ours['tokens_per_s']:,.0f} | {split(ours)} | {mfu} |")
  return "\n".join(lines)


def best_table(rows):
  """Per mode, each side at its own fastest precision: the fair headline."""
  lines = ["| mode | ours best s/step | TRL best s/step | speed-up (TRL best / ours best) |", "|---|---:|---:|---:|"]
  for mode in dict.fromkeys(m for m, *_ in rows):
    ours = min(((o["median_step_s"], l) for m, l, o, t in rows if m == mode and t), default=None)
    trl = min(((t["median_step_s"], l) for m, l, o, t in rows if m == mode and t), default=None)
    if ours and trl:
      lines.append(f"| {NAMES[mode]} | {ours[0]:.3f} ({ours[1]}) | {trl[0]:.3f} ({trl[1]}) | {trl[0] / ours[0]:.2f}× |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="fixture shape (experiments/fixture.py)")
  ap.add_argument(
      "--full-vocab",
      action="store_true",
      help="pad the fixture's tokenizer to the embedding rows (32,768; qwen4l: Qwen2.5's 151,665), so both sides "
      "compute every LM-head column, as with a real checkpoint",
  )
  ap.add_argument("--fixture", help="fixture directory (default: /tmp/gkd_bench_SHAPE[_full])")
  ap.add_argument("--modes", default="off,on,mixed")
  ap.add_argument("--steps", type=int, default=10, help="timed steps per mode, after the warm-up")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--batch", type=int, help="rows per step (default: the shape's)")
  ap.add_argument("--max-new-tokens", type=int, help="new tokens on generating steps (default: the shape's)")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
  ap.add_argument(
      "--variant",
      action="append",
      default=[],
      metavar="LABEL:FIELD=VALUE;...",
      help="also run ours with these overrides, right after the base run of each mode (A/B)",
  )
  ap.add_argument(
      "--precisions",
      default="f32,bf16",
      help="ours at dtype=float32 / bfloat16 (f32 master weights either way), TRL at bf16=False / True (autocast)",
  )
  ap.add_argument("--compare-trl", metavar="PYTHON", help="interpreter with torch + trl: also time TRL's GKDTrainer")
  ap.add_argument(
      "--trl-threads",
      default="1,2",
      help="torch thread counts to try on a short probe; the faster is used for every mode",
  )
  ap.add_argument(
      "--system-malloc",
      action="store_true",
      help="run both sides with glibc's default malloc settings instead of gkd_jax.host_malloc's (which the "
      "gkd_jax CLI applies on CPU hosts; TRL's subprocess inherits whichever this process runs with)",
  )
  ap.add_argument("--json", help="also write all results to this file")
  args = ap.parse_args()
  args.trl_threads = [int(t) for t in args.trl_threads.split(",")]
  shape = SHAPES[args.shape]
  args.batch = args.batch or shape["batch"]
  args.max_new_tokens = args.max_new_tokens or shape["max_new_tokens"]
  args.max_prompt = shape["max_prompt"]
  if args.fixture is None:
    name = "gkd_bench_fixture" if args.shape == "small" else f"gkd_bench_{args.shape}"
    args.fixture = os.path.join("/tmp", name + ("_full" if args.full_vocab else ""))
  fixture.build(args.fixture, args.shape, shape["full_tokenizer"] if args.full_vocab else None)

  precisions = args.precisions.split(",")
  variants = [(p, args.set + [f"dtype='{DTYPES[p]}'"]) for p in precisions] + [
      (v.partition(":")[0], args.set + v.partition(":")[2].split(";")) for v in args.variant
  ]
  peak_dtypes = sorted({precision_of(o) for _, o in variants} | set(precisions))
  peaks = {p: [measure_peak(p)] for p in peak_dtypes}
  print(
      f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
      f"malloc {'gkd_jax.host_malloc' if host_malloc.applied() else 'system default'} (both sides); "
      f"overrides {args.set or 'none'}",
      file=sys.stderr,
      flush=True,
  )
  trl_threads = pick_trl_threads(args) if args.compare_trl else None
  rows = []
  for mode in args.modes.split(","):
    results = run_ours(args, mode, [overrides for _, overrides in variants])
    for (label, overrides), ours in zip(variants, results):
      ours["precision"] = precision_of(overrides)
      print(
          f"  ours {mode} {label}: {ours['median_step_s']:.3f} s/step, shapes {ours['shapes']}, "
          f"{ours['compiles_after_warmup']} compiles after {ours['warmup_steps']} warm-up steps",
          file=sys.stderr,
          flush=True,
      )
    host_malloc.release()  # our freed buffers back to the kernel before TRL's process needs the memory
    trl = {p: run_trl(args, mode, trl_threads, p) for p in precisions} if args.compare_trl else {}
    rows += [(mode, label, ours, trl.get(label)) for (label, _), ours in zip(variants, results)]
    for p in peak_dtypes:
      peaks[p].append(measure_peak(p))
  peak = {p: max(v) for p, v in peaks.items()}  # the ceiling is the best rate seen in this run
  for _, _, ours, _ in rows:
    ours["mfu"] = ours["flops_per_s"] / peak[ours["precision"]]
    ours["step_mfu"] = ours["step_flops_per_s"] / peak[ours["precision"]]
  print(
      f"\n{cpu_description()}; jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS') or '(none)'}; "
      f"malloc: {'gkd_jax.host_malloc settings' if host_malloc.applied() else 'system default'} on both sides; "
      f"{args.shape} fixture, tokenizer {'padded to the embedding rows' if args.full_vocab else 'of 1,024 tokens'}, "
      f"batch {args.batch}, {args.steps} timed steps after ≥{args.warmup} warm-up, {args.max_new_tokens} new tokens on "
      f"generating steps; matmul ceilings "
      + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peak.items())
      + f" (MFU is against its row's); load {os.getloadavg()[0]:.1f}"
  )
  print(table(rows, bool(args.compare_trl)))
  if args.compare_trl and len(precisions) > 1:
    print()
    print(best_table(rows))
  print(
      "compiles after warm-up: "
      + ", ".join(f"{m} {l} {o['compiles_after_warmup']}" for m, l, o, _ in rows)
      + "; shapes (P, C): "
      + ", ".join(f"{m} {l} {o['shapes']}" for m, l, o, _ in rows)
      + "; GFLOP/step: "
      + ", ".join(f"{m} {l} {o['gflops_per_step']:.1f}" for m, l, o, _ in rows)
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          {
              "cpu": cpu_description(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "peak_flops": peak,
              "peaks": peaks,
              "overrides": args.set,
              "rows": [{"mode": m, "variant": l, "ours": o, "trl": t} for m, l, o, t in rows],
          },
          f,
          indent=1,
      )


if __name__ == "__main__":
  main()
