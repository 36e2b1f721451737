"""Forward and forward+backward tokens/s of the Flax model vs transformers (PyTorch) on the same CPU.

Model: the 12M Qwen2 student of experiments/fixture.py (vocab 32768, tied embeddings), float32, batch 8 x 256
tokens by default. JAX runs jitted through the nnx split/merge pure-function pattern; PyTorch runs eager
with its default (sdpa) attention. Both forwards materialize the [B, T, V] logits; the backward pass is
through a mean next-token cross-entropy. Median of --runs timed runs after --warmup untimed ones; JAX and
PyTorch runs are interleaved so both see the same load on a shared machine.

    python experiments/bench_model.py [--fixture /tmp/gkd_fixture] [--batch 8] [--seq 256] [--runs 7]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from fixture import build  # noqa: E402

from gkd_jax.models import from_pretrained  # noqa: E402


def timed_pair(fns, warmup, runs):
  """Median seconds of each fn; runs interleave the fns so all see the same machine load (shared CPUs)."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, ts in zip(fns, times):
      start = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - start)
  return [statistics.median(ts) for ts in times]


def jax_fns(model):
  graphdef, state = nnx.split(model)

  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask).logits

  def loss(state, ids, mask):
    logits = nnx.merge(graphdef, state)(ids, mask).logits[:, :-1].astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    nll = (jax.nn.logsumexp(logits, axis=-1) - target_logit) * mask[:, 1:]
    return nll.sum() / mask[:, 1:].sum()

  return state, jax.jit(forward), jax.jit(jax.value_and_grad(loss))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--fixture", default="/tmp/gkd_fixture")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--runs", type=int, default=7)
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args()

  path = os.path.join(build(args.fixture), "student")
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 1024, (args.batch, args.seq))
  mask = np.ones_like(ids)
  mask[: args.batch // 2, : args.seq // 4] = 0  # half the rows left padded by a quarter
  tokens = args.batch * args.seq

  state, fwd, fwd_bwd = jax_fns(from_pretrained(path))
  jids, jmask = jnp.asarray(ids), jnp.asarray(mask)

  import transformers

  tmodel = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tids, tmask = torch.tensor(ids), torch.tensor(mask)
  labels = torch.where(tmask.bool(), tids, -100)
  position_ids = torch.clamp(tmask.cumsum(-1) - 1, min=0)

  def torch_forward():
    with torch.no_grad():
      tmodel(input_ids=tids, attention_mask=tmask, position_ids=position_ids).logits

  def torch_forward_backward():
    tmodel.zero_grad(set_to_none=True)
    tmodel(input_ids=tids, attention_mask=tmask, position_ids=position_ids, labels=labels).loss.backward()

  results = {}
  results[("jax", "forward")], results[("torch", "forward")] = timed_pair(
      [lambda: fwd(state, jids, jmask).block_until_ready(), torch_forward], args.warmup, args.runs
  )
  results[("jax", "forward+backward")], results[("torch", "forward+backward")] = timed_pair(
      [lambda: jax.block_until_ready(fwd_bwd(state, jids, jmask)), torch_forward_backward], args.warmup, args.runs
  )

  print(
      f"\nQwen2 student (12.3M params, vocab 32768), float32, batch {args.batch} x {args.seq} = {tokens} tokens, "
      f"median of {args.runs}; jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), "
      f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
  )
  print(
      f"| {'pass':<17} | {'jax s':>8} | {'jax tok/s':>10} | {'torch s':>8} | {'torch tok/s':>11} | {'jax/torch':>9} |"
  )
  print(f"|{'-' * 19}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 13}|{'-' * 11}|")
  for kind in ("forward", "forward+backward"):
    j, t = results[("jax", kind)], results[("torch", kind)]
    print(f"| {kind:<17} | {j:>8.3f} | {tokens / j:>10.0f} | {t:>8.3f} | {tokens / t:>11.0f} | {t / j:>8.2f}x |")


if __name__ == "__main__":
  main()
