"""Sampling throughput: gkd_jax.sampling.generate vs transformers `generate` (PyTorch), same weights.

New tokens per second for batch 1 / 8 / 32, prompt 64, 128 new tokens, on the Qwen2 12M student of
experiments/fixture.py. Both sides generate all 128 tokens (no stop ids in JAX; min_new_tokens in HF) with
the same distribution (temperature 0.9, no top-k / top-p: GKD's on-policy default) or greedy.

    python experiments/bench_sampling.py [--fixture /tmp/gkd_fixture] [--repeats 3]

Timings are medians of `repeats` interleaved JAX / HF runs after a warm-up (JAX's includes the compile,
reported separately). Run both sides on the same machine in one go; absolute numbers on shared CPUs are noisy.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixture  # noqa: E402

from gkd_jax import sampling  # noqa: E402
from gkd_jax.models import from_pretrained  # noqa: E402

PROMPT, NEW = 64, 128


def jax_runner(model, ids, temperature):
  mask = np.ones_like(ids)
  calls = iter(range(10**6))

  def run():  # a fresh key each call, as the trainer does (fold in the step)
    out = sampling.generate(
        model,
        ids,
        mask,
        key=jax.random.fold_in(jax.random.key(0), next(calls)),
        max_new_tokens=NEW,
        temperature=temperature,
    )
    jax.block_until_ready(out)
    assert int(out.num_steps) == NEW and bool(out.completion_mask.all())
    return np.asarray(out.completion_ids)

  return run


def torch_runner(model, ids, temperature, pad_id):
  import torch

  ids_t = torch.from_numpy(ids).long()
  kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)

  def run(new=NEW):
    with torch.no_grad():
      out = model.generate(
          ids_t,
          attention_mask=torch.ones_like(ids_t),
          max_new_tokens=new,
          min_new_tokens=new,
          pad_token_id=pad_id,
          **kw,
      )
    assert out.shape[1] == PROMPT + new
    return out[:, PROMPT:].numpy()

  return run


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def pick_torch_threads(run_hf):
  """The faster of 1 thread and all threads, on a short run: on a busy machine torch's spinning OpenMP
  threads can be 10x slower than a single thread, so this is the fair baseline."""
  import torch

  probe = {}
  for threads in sorted({1, os.cpu_count()}):
    torch.set_num_threads(threads)
    run_hf(8)  # warm-up
    probe[threads] = timed(lambda: run_hf(16))
  best = min(probe, key=probe.get)
  torch.set_num_threads(best)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--fixture", default="/tmp/gkd_fixture")
  ap.add_argument("--batches", default="1,8,32")
  ap.add_argument("--modes", default="sample,greedy")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  import torch
  import transformers
  from transformers import AutoModelForCausalLM

  student = os.path.join(fixture.build(args.fixture), "student")
  jax_model = from_pretrained(student, dtype=jnp.float32)
  torch_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
  pad_id = jax_model.config.pad_token_id or 0
  print(
      f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
      f"transformers {transformers.__version__}; prompt {PROMPT}, {NEW} new tokens, float32"
  )

  rows, agree = [], []
  for mode in args.modes.split(","):
    temperature = 0.9 if mode == "sample" else 0.0
    for batch in map(int, args.batches.split(",")):
      ids = np.random.default_rng(batch).integers(3, 1024, (batch, PROMPT)).astype(np.int32)
      run_jax, run_hf = jax_runner(jax_model, ids, temperature), torch_runner(torch_model, ids, temperature, pad_id)
      t_first = timed(run_jax)  # compile + first run
      threads = pick_torch_threads(run_hf)
      # Interleaved, so that both see the same load on a shared machine; medians.
      pairs = [(timed(run_jax), timed(run_hf)) for _ in range(args.repeats)]
      t_jax, t_hf = np.median(pairs, axis=0)
      rows.append((mode, batch, batch * NEW / t_jax, batch * NEW / t_hf, threads, t_hf / t_jax, t_first))
      if mode == "greedy":  # same weights, same greedy tokens (until a float near-tie, if any)
        same = (run_jax() == run_hf()).all(0)
        agree.append(f"batch {batch}: {int(np.argmin(same)) if not same.all() else NEW}")
      print(f"  done {mode} batch {batch}", file=sys.stderr, flush=True)

  print("\n| mode | batch | gkd_jax tok/s | HF generate tok/s (torch threads) | speed-up | JAX compile+1st run (s) |")
  print("|---|---:|---:|---:|---:|---:|")
  for mode, batch, jx, hf, threads, ratio, first in rows:
    print(f"| {mode} | {batch} | {jx:,.0f} | {hf:,.0f} ({threads}) | {ratio:.1f}x | {first:.1f} |")
  if agree:
    print(f"\nGreedy tokens identical to HF (first differing step, {NEW} = all): " + ", ".join(agree))


if __name__ == "__main__":
  main()
