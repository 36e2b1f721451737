"""Loss benchmark: forward+backward time and XLA temporary memory, unfused vs fused, vs TRL's torch loss.

    python experiments/bench_loss.py                      # the full grid (B·T ∈ {1024, 4096}, V ∈ {32768, 151936})
    python experiments/bench_loss.py --tokens 1024 --vocab 32768 --repeats 3   # a quick subset

Columns:
  jax_logits   generalized_jsd_loss from given logits (gradient w.r.t. the student logits): the same
               computation TRL's `GKDTrainer.generalized_jsd_loss` does, timed beside it (trl_logits).
  jax_unfused  hidden states → logits (h·W for student and teacher) → loss, gradient w.r.t. the student's
               hidden states and head: what a trainer does without fusion.
  jax_fused    fused_generalized_jsd_loss on the same inputs (chunked, no [tokens, V] logits).
Temp memory is XLA's temp_size_in_bytes from the compiled executable's memory analysis (JAX only).
Times are medians over --repeats runs after one warm-up run, on whatever CPU this runs on. A case whose
memory would not fit in this machine's available RAM is not timed ("nan"); its temp memory is still shown.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from gkd_jax import fused_losses as F  # noqa: E402
from gkd_jax import losses as L  # noqa: E402

H = 1024


def median_time(fn, repeats):
  fn()  # warm-up (and compile)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_cases(n, v, dtype, beta, chunk_size):
  key = jax.random.split(jax.random.key(0), 4)
  hs = jax.random.normal(key[0], (n, H), dtype)
  ht = jax.random.normal(key[1], (n, H), dtype)
  ws = (jax.random.normal(key[2], (H, v), jnp.float32) / 8).astype(dtype)
  wt = (jax.random.normal(key[3], (H, v), jnp.float32) / 8).astype(dtype)
  mask = jnp.arange(n) % 10 != 0

  def from_logits(s, t, m):
    return L.generalized_jsd_loss(s, t, m, beta=beta)

  def unfused(hs, ws, ht, wt, m):
    return L.generalized_jsd_loss(hs @ ws, jax.lax.stop_gradient(ht @ wt), m, beta=beta)

  def fused(hs, ws, ht, wt, m):
    return F.fused_generalized_jsd_loss(hs, ws, ht, wt, m, beta=beta, chunk_size=chunk_size)

  # Logits as a model would hand them over (in the compute dtype).
  s_logits = jax.jit(lambda a, b: a @ b)(hs, ws)
  t_logits = jax.jit(lambda a, b: a @ b)(ht, wt)
  return {
      "jax_logits": (jax.value_and_grad(from_logits), (s_logits, t_logits, mask)),
      "jax_unfused": (jax.value_and_grad(unfused, argnums=(0, 1)), (hs, ws, ht, wt, mask)),
      "jax_fused": (jax.value_and_grad(fused, argnums=(0, 1)), (hs, ws, ht, wt, mask)),
  }, (s_logits, t_logits, mask)


def available_bytes():
  """MemAvailable from /proc/meminfo (Linux); inf elsewhere."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return float("inf")


def run_jax(fn, args, repeats):
  """(median seconds or nan when it would not fit in memory, XLA temp bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes
  if temp + mem.output_size_in_bytes > 0.8 * available_bytes():
    return float("nan"), temp
  t = median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)
  return t, temp


def run_trl(s_logits, t_logits, mask, beta, repeats, dtype):
  # About eight [tokens, V] float32 tensors live at once in TRL's loss and its backward.
  if 8 * s_logits.size * 4 > 0.8 * available_bytes():
    return float("nan")
  import torch

  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  from trl.experimental.gkd import GKDTrainer

  tdtype = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16}[dtype]
  s = torch.from_numpy(np.asarray(s_logits, np.float32)).to(tdtype)
  t = torch.from_numpy(np.asarray(t_logits, np.float32)).to(tdtype)
  labels = torch.where(torch.from_numpy(np.asarray(mask)), 0, -100)

  def step():
    x = s.detach().requires_grad_(True)
    loss = GKDTrainer.generalized_jsd_loss(x, t, labels=labels, beta=beta)
    loss.backward()

  return median_time(step, repeats)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
  ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  ap.add_argument("--beta", type=float, default=0.5)
  ap.add_argument("--chunk-size", type=int, default=None, help="default: the library's adaptive choice")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-trl", action="store_true")
  args = ap.parse_args()

  try:
    import torch

    torch.set_num_threads(os.cpu_count())
    have_torch = not args.no_trl
  except ImportError:
    have_torch = False

  print(
      f"# jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cpus; H={H}, "
      f"beta={args.beta}, chunk={args.chunk_size or 'auto'}; median of {args.repeats} fwd+bwd runs"
  )
  header = (
      f"| {'B*T':>5} | {'V':>6} | {'dtype':>8} | {'trl_logits s':>12} | {'jax_logits s':>12} | "
      f"{'trl/jax':>7} | {'unfused s':>9} | {'fused s':>7} | {'fused/unf':>9} | "
      f"{'unfused MiB':>11} | {'fused MiB':>9} | {'mem ratio':>9} |"
  )
  print(header)
  print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
  for n in args.tokens:
    for v in args.vocab:
      for dname in args.dtypes:
        dtype = getattr(jnp, dname)
        cases, logits = jax_cases(n, v, dtype, args.beta, args.chunk_size)
        res = {name: run_jax(fn, a, args.repeats) for name, (fn, a) in cases.items()}
        trl = run_trl(*logits, args.beta, args.repeats, dtype) if have_torch else float("nan")
        del cases, logits
        (tl, _), (tu, mu), (tf, mf) = res["jax_logits"], res["jax_unfused"], res["jax_fused"]
        print(
            f"| {n:>5} | {v:>6} | {dname:>8} | {trl:>12.3f} | {tl:>12.3f} | {trl / tl:>7.2f} | "
            f"{tu:>9.3f} | {tf:>7.3f} | {tf / tu:>9.2f} | {mu / 2**20:>11.1f} | {mf / 2**20:>9.1f} | "
            f"{mf / mu:>9.3f} |",
            flush=True,
        )


if __name__ == "__main__":
  main()
