"""XLA:CPU matmul rates under its library options, beside torch's, at the bench models' shapes.

    python experiments/probe_xla_cpu.py                       # every flag set below, f32 and bf16, + torch
    python experiments/probe_xla_cpu.py --flags "--xla_cpu_use_xnnpack=false"   # one more set to try

Each XLA_FLAGS set runs in its own process (XLA reads the flags once, at backend start). Per shape and
precision: GFLOP/s of the best of `--repeats` calls of a jitted product. "bf16" multiplies bf16 operands
with float32 accumulation (`preferred_element_type=float32`, then cast), as gkd_jax's models do
(`models.layers.matmul`); "bf16->bf16" is the plain bf16 product, which XLA:CPU computes by converting to
f32. torch runs the same shapes (f32, and bf16 through oneDNN), at `--threads` threads.

Shapes: the 12M student / 65M teacher of experiments/fixture.py at batch 8 (448 tokens): [448, 256] @
[256, 768] (q/k/v), [448, 1024] @ [1024, 256] (MLP down), the LM head [192, 256] @ [256, 32768], a decode
step's head [8, 256] @ [256, 32768], and 2048^3 (the MFU ceiling's product). Results of a run on the
2-core bench machine: experiments/results/xla_cpu_flags.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

FLAG_SETS = (
    "",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_onednn_custom_call=true",
)
SHAPES = ((448, 256, 768), (448, 1024, 256), (192, 256, 32768), (8, 256, 32768), (2048, 2048, 2048))


def best_rate(fn, m, k, n, repeats):
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return round(2 * m * k * n / best / 1e9, 1)


def child_jax(repeats):
  import jax
  import jax.numpy as jnp
  import numpy as np

  products = {
      "f32": (jnp.float32, lambda a, b: a @ b),
      "bf16": (jnp.bfloat16, lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)),
      "bf16->bf16": (jnp.bfloat16, lambda a, b: a @ b),
  }
  out = {}
  for name, (dtype, product) in products.items():
    f = jax.jit(product)
    for m, k, n in SHAPES:
      a = jnp.asarray(np.random.randn(m, k), dtype)
      b = jnp.asarray(np.random.randn(k, n), dtype)
      out[f"{name} {m}x{k}x{n}"] = best_rate(lambda: f(a, b).block_until_ready(), m, k, n, repeats)
  print(json.dumps(out))


def child_torch(repeats, threads):
  import torch

  torch.set_num_threads(threads)
  out = {}
  for name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
    for m, k, n in SHAPES:
      a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
      out[f"{name} {m}x{k}x{n}"] = best_rate(lambda: a @ b, m, k, n, repeats)
  print(json.dumps(out))


def run_child(args, env, *extra):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", *extra, "--repeats", str(args.repeats)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--flags", action="append", default=[], help="one more XLA_FLAGS set to try (repeatable)")
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child == "jax":
    return child_jax(args.repeats)
  if args.child == "torch":
    return child_torch(args.repeats, args.threads)

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from cpuinfo import cpu_description  # noqa: E402 (the same CPU line as the train benchmark)

  columns = {}
  for flags in FLAG_SETS + tuple(args.flags):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    columns[f"XLA {flags or '(defaults)'}"] = run_child(args, env, "jax")
    print(f"  done: XLA_FLAGS={flags!r}", file=sys.stderr, flush=True)
  if not args.no_torch:
    columns[f"torch ({args.threads} thr)"] = run_child(args, dict(os.environ), "torch", "--threads", str(args.threads))

  import jax

  print(f"{cpu_description()}; jax {jax.__version__}; GFLOP/s, best of {args.repeats}; load {os.getloadavg()[0]:.1f}")
  rows = list(dict.fromkeys(k for col in columns.values() for k in col if k != "error"))
  print("| product | " + " | ".join(f"`{c}`" for c in columns) + " |")
  print("|---|" + "---:|" * len(columns))
  for row in rows:
    print(f"| {row} | " + " | ".join(str(col.get(row, col.get("error", "—"))) for col in columns.values()) + " |")


if __name__ == "__main__":
  main()
