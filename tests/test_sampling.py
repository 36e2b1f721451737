"""Tests for gkd_jax.sampling: values against full recomputation and NumPy references."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkd_jax import sampling
from gkd_jax import sharding as shd
from gkd_jax.models import CausalLM, ModelConfig
import helpers

VOCAB = 64
# A tiny Qwen2-shaped model (GQA, qkv bias, tied embeddings): the real KV cache is what is under test.
CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qkv_bias=True,
    tie_word_embeddings=True,
    max_position_embeddings=128,
)


def tiny_model(mesh=None):
  """Random weights, scaled up from HF's 0.02 init so that greedy paths and samples are diverse."""
  model = CausalLM(CONFIG, rngs=nnx.Rngs(0), mesh=mesh)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x * 12 if x.ndim >= 2 else x, state)
  if mesh is not None:
    state = helpers.shard_state(state, mesh)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------------
# Fixtures: one tiny model, one batch of left-padded prompts of different lengths.

B, P, N = 4, 8, 8


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  lengths = [8, 5, 3, 1]
  ids = np.zeros((B, P), np.int32)
  mask = np.zeros((B, P), np.int32)
  for i, n in enumerate(lengths):
    ids[i, P - n :] = rng.integers(1, VOCAB, n)
    mask[i, P - n :] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  return nnx.merge(graphdef, state)(ids, attention_mask=mask, positions=positions).logits


def full_forward(model, ids, mask):
  """Logits by full recomputation (no cache), positions = number of real tokens before each one."""
  return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask)), np.float64)


def greedy_by_recompute(model, ids, mask, n):
  """Reference greedy decode: at each step rerun the whole sequence and take the argmax.

  The sequence lives in a fixed [B, P+n] buffer (future slots masked out; causal attention ignores
  them anyway) so the reference compiles once.
  """
  ids = np.concatenate([np.asarray(ids), np.zeros((len(ids), n), np.int32)], 1)
  mask = np.concatenate([np.asarray(mask), np.zeros((len(ids), n), np.int32)], 1)
  p = ids.shape[1] - n
  for t in range(n):
    ids[:, p + t] = full_forward(model, ids, mask)[:, p + t - 1].argmax(-1)
    mask[:, p + t] = 1
  return ids[:, p:]


def allowed_set_numpy(logits, temperature, top_k, top_p, min_p):
  """Reference truncation over one row of float64 logits → (bool allowed [V], renormalized probs [V])."""
  z = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros(z.shape, bool)
  keep[order[: (top_k or len(z))]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  if top_p < 1:
    sorted_p = p[order]
    above = np.cumsum(sorted_p) - sorted_p
    keep[order[above >= top_p]] = False
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  if min_p > 0:
    keep &= p >= min_p * p.max()
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return keep, p


# ----------------------------------------------------------------------------------------------------
# Pure helpers.


def test_stop_mask_example():
  ids = jnp.array([[21, 7, 23, 24], [25, 26, 9, 28]])
  mask = sampling.completion_mask_from_stops(ids, [7, 9])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 0]])
  assert mask.dtype == jnp.bool_
  # No stop token → everything valid; a single int works; only the FIRST stop counts.
  np.testing.assert_array_equal(sampling.completion_mask_from_stops(ids, ()), np.ones((2, 4), bool))
  np.testing.assert_array_equal(sampling.completion_mask_from_stops(jnp.array([[5, 3, 5, 1]]), 5), [[1, 0, 0, 0]])


def test_bucketing():
  assert [sampling.bucket_length(n) for n in (1, 16, 17, 25, 64, 65)] == [16, 16, 24, 32, 64, 96]
  assert sampling.bucket_length(10, buckets=(8, 12, 64)) == 12
  with pytest.raises(ValueError):
    sampling.bucket_length(65, buckets=(16, 64))
  ids, mask = sampling.pad_to_bucket(np.array([[0, 4, 5], [1, 2, 3]]), np.array([[0, 1, 1], [1, 1, 1]]), pad_token_id=9)
  assert ids.shape == mask.shape == (2, 16)
  np.testing.assert_array_equal(ids[:, -3:], [[0, 4, 5], [1, 2, 3]])
  assert (ids[:, :-3] == 9).all() and (mask[:, :-3] == 0).all()


def test_left_align():
  ids = jnp.array([[1, 2, 0, 0], [0, 3, 4, 5], [6, 0, 7, 0]])
  mask = (ids > 0).astype(jnp.int32)
  out_ids, out_mask = sampling.left_align(ids, mask)
  np.testing.assert_array_equal(out_ids, [[0, 0, 1, 2], [0, 3, 4, 5], [0, 0, 6, 7]])
  np.testing.assert_array_equal(out_mask, [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])


def sampling_logprobs(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
  """[..., V] logits → [..., V] log-probs of the distribution `generate` samples from (-inf = excluded)."""
  logits = jnp.asarray(logits, jnp.float32)
  vals, ids = sampling._candidates(logits / temperature, top_k, top_p, min_p)
  logp = jax.nn.log_softmax(vals, axis=-1)
  if ids is None:
    return logp
  full = jnp.full(logits.shape, -jnp.inf, jnp.float32)
  return jnp.put_along_axis(full, ids, logp, axis=-1, inplace=False)


@pytest.mark.parametrize(
    "top_k,top_p,min_p", [(0, 0.7, 0.0), (0, 1.0, 0.2), (5, 1.0, 0.0), (10, 0.6, 0.05), (0, 0.95, 0.1)]
)
def test_truncation_matches_numpy(top_k, top_p, min_p):
  logits = np.random.default_rng(1).normal(size=(16, VOCAB)) * 2
  temperature = 0.7
  got = np.asarray(
      sampling_logprobs(
          jnp.asarray(logits, jnp.float32), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
      )
  )
  for row, logp in zip(logits, got):
    keep, p = allowed_set_numpy(row, temperature, top_k, top_p, min_p)
    np.testing.assert_array_equal(np.isfinite(logp), keep)
    np.testing.assert_allclose(np.exp(logp), p, atol=1e-5)


def chi2_limit(df, z=3.719):
  """Wilson–Hilferty approximation of the chi-square quantile at normal score z (3.719: p = 1e-4)."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_two_level_gumbel_is_exact():
  """The block-then-token draw matches softmax, never draws excluded tokens (incl. a whole -inf block)."""
  vocab, n = 250, 40000  # 250 = 15 full blocks of 16 + a padded one
  logits = np.random.default_rng(2).normal(size=vocab) * 1.5
  logits[::7] = -np.inf
  logits[32:48] = -np.inf  # block 2 entirely excluded
  x = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
  ids, lse = sampling.gumbel_categorical(jax.random.key(5), x)
  assert sampling._block_size(vocab) == 16
  p = np.exp(logits - logits.max())
  np.testing.assert_allclose(lse[0], np.log(p.sum()) + logits.max(), rtol=1e-6)
  p /= p.sum()
  counts = np.bincount(np.asarray(ids), minlength=vocab)
  assert counts[p == 0].sum() == 0
  keep = p > 0
  chi2 = ((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum()
  assert chi2 < chi2_limit(keep.sum() - 1), chi2


# ----------------------------------------------------------------------------------------------------
# generate() against references.


def test_greedy_with_cache_equals_recompute(model, prompts):
  out = sampling.generate(
      model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=0.0, return_logprobs=True
  )
  ref = greedy_by_recompute(model, *prompts, N)
  np.testing.assert_array_equal(out.completion_ids, ref)
  assert out.completion_mask.all() and (np.asarray(out.lengths) == N).all() and int(out.num_steps) == N
  # Greedy logprobs are the model's own log-softmax at the chosen token (first token checked).
  logits = full_forward(model, *prompts)[:, -1]
  ref_lp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
  )
  np.testing.assert_allclose(out.logprobs[:, 0], ref_lp[np.arange(B), ref[:, 0]], atol=1e-4)


def test_right_padded_prompts_are_left_aligned(model, prompts):
  ids, mask = (np.asarray(x) for x in prompts)
  order = np.argsort(1 - mask, axis=1, kind="stable")  # real tokens first: right padding
  right = [np.take_along_axis(x, order, 1) for x in (ids, mask)]
  kw = dict(key=jax.random.key(0), max_new_tokens=N, temperature=0.0)
  np.testing.assert_array_equal(
      sampling.generate(model, *right, **kw).completion_ids, sampling.generate(model, ids, mask, **kw).completion_ids
  )


def test_filler_rows_get_empty_completions(model, prompts):
  """Rows without a prompt token (a partial batch's fillers) complete to nothing; others are unchanged."""
  ids, mask = prompts
  kw = dict(key=jax.random.key(0), max_new_tokens=N, temperature=0.0)
  want = sampling.generate(model, ids, mask, **kw)
  got = sampling.generate(model, ids, mask.at[2].set(0), **kw)
  keep = np.array([0, 1, 3])
  np.testing.assert_array_equal(got.completion_ids[keep], want.completion_ids[keep])
  np.testing.assert_array_equal(got.lengths, np.where(np.arange(B) == 2, 0, want.lengths))
  assert not got.completion_mask[2].any() and (np.asarray(got.completion_ids[2]) == 0).all()
  # A batch of fillers only: the loop exits after the prefill.
  assert int(sampling.generate(model, ids, jnp.zeros_like(mask), **kw).num_steps) == 1


def test_top_k_1_equals_greedy(model, prompts):
  greedy = sampling.generate(model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=0.0)
  top1 = sampling.generate(model, *prompts, key=jax.random.key(3), max_new_tokens=N, temperature=1.3, top_k=1)
  np.testing.assert_array_equal(top1.completion_ids, greedy.completion_ids)


def test_key_determinism(model, prompts):
  run = lambda k: np.asarray(
      sampling.generate(model, *prompts, key=jax.random.key(k), max_new_tokens=N, temperature=1.0).completion_ids
  )
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # One program served all three calls (the key is an argument, not a compile-time constant).


def test_first_token_frequencies_match_softmax(model):
  """8192 draws of the first token of one prompt vs softmax(logits/τ): chi-square at p = 1e-4."""
  n, tau = 8192, 1.7
  ids = jnp.tile(jnp.array([[3, 14, 15, 9]], jnp.int32), (n, 1))
  out = sampling.generate(model, ids, jnp.ones_like(ids), key=jax.random.key(42), max_new_tokens=1, temperature=tau)
  logits = full_forward(model, ids[:1], np.ones((1, 4), np.int32))[0, -1] / tau
  p = np.exp(logits - logits.max())
  p /= p.sum()
  counts = np.bincount(np.asarray(out.completion_ids[:, 0]), minlength=VOCAB)
  expected = n * p
  assert expected.min() > 5, "test needs enough mass per cell for the chi-square approximation"
  chi2 = ((counts - expected) ** 2 / expected).sum()
  limit = chi2_limit(VOCAB - 1)
  assert chi2 < limit, (chi2, limit)
  # And it is not vacuous: a wrong temperature fails the same test.
  q = np.exp(logits * tau / 1.0 - (logits * tau).max())
  q = n * q / q.sum()
  assert ((counts - q) ** 2 / q).sum() > limit


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.6, 0.0), (0, 1.0, 0.3), (6, 0.9, 0.05)])
def test_sampled_tokens_stay_in_truncated_set(model, prompts, top_k, top_p, min_p):
  """Every sampled token lies in the NumPy allowed set at its own step; logprobs match that set."""
  tau = 1.5
  ids, mask = (jnp.tile(x, (8, 1)) for x in prompts)  # 32 rows
  out = sampling.generate(
      model,
      ids,
      mask,
      key=jax.random.key(7),
      max_new_tokens=N,
      temperature=tau,
      top_k=top_k,
      top_p=top_p,
      min_p=min_p,
      return_logprobs=True,
  )
  comp = np.asarray(out.completion_ids)
  full_ids = np.concatenate([np.asarray(ids), comp], 1)
  full_mask = np.concatenate([np.asarray(mask), np.ones_like(comp)], 1)
  logits = full_forward(model, full_ids, full_mask)[:, P - 1 : -1]  # logits that produced each token
  for r in range(comp.shape[0]):
    for t in range(N):
      keep, p = allowed_set_numpy(logits[r, t], tau, top_k, top_p, min_p)
      assert keep[comp[r, t]], (r, t)
      np.testing.assert_allclose(out.logprobs[r, t], np.log(p[comp[r, t]]), atol=1e-4)
  assert len(np.unique(comp)) > 2  # really sampling, not collapsing to greedy


def test_stop_tokens_and_early_exit(model, prompts):
  """Several stop ids: masks/pads/lengths match the reference, and the loop exits at the last stop."""
  greedy = np.asarray(greedy_by_recompute(model, *prompts, N))

  def lengths(stops):
    return np.asarray(sampling.completion_mask_from_stops(jnp.asarray(greedy), stops)).sum(-1)

  # The first stop-id set (of 2-3 ids emitted by the greedy paths) with which every row stops, at
  # different steps, all before N: then the loop must exit early, after exactly max(lengths) tokens.
  candidates = [
      c
      for k in (2, 3)
      for c in itertools.combinations(np.unique(greedy).tolist(), k)
      if (np.asarray(sampling.is_stop(greedy, c)).any(-1).all() and lengths(c).max() < N and len(set(lengths(c))) > 1)
  ]
  assert candidates, greedy
  stops = candidates[0]
  out = sampling.generate(
      model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=0.0, eos_token_ids=stops, pad_token_id=0
  )
  ref_mask = np.arange(N)[None] < lengths(stops)[:, None]
  np.testing.assert_array_equal(out.completion_mask, ref_mask)
  np.testing.assert_array_equal(out.completion_ids, np.where(ref_mask, greedy, 0))
  np.testing.assert_array_equal(out.lengths, lengths(stops))
  assert int(out.num_steps) == lengths(stops).max() < N


def test_vocab_size_limit(model, prompts):
  """A padded embedding table: ids at or past the tokenizer's vocab_size are never sampled."""
  out = sampling.generate(
      model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=3.0, vocab_size=40, return_logprobs=True
  )
  assert int(out.completion_ids.max()) < 40 and np.isfinite(out.logprobs).all()
  assert len(np.unique(out.completion_ids)) > 5


def test_early_exit_counts_steps(model, prompts):
  # Every token is a stop token: one step and the loop is over.
  out = sampling.generate(
      model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=1.0, eos_token_ids=range(VOCAB)
  )
  assert int(out.num_steps) == 1
  np.testing.assert_array_equal(out.lengths, np.ones(B))
  assert (np.asarray(out.completion_ids[:, 1:]) == 0).all()


def test_errors(model, prompts):
  ids, mask = prompts
  with pytest.raises(ValueError, match="must both be"):
    sampling.generate(model, ids, mask[:, 1:], key=jax.random.key(0), max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=2, temperature=-1.0)
  with pytest.raises(ValueError, match="key"):
    sampling.generate(model, ids, mask, key=None, max_new_tokens=2)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=CONFIG.max_position_embeddings)


def test_mesh_matches_single_device(model, prompts):
  """Params sharded by their logical names, batch over (data, fsdp), KV heads and vocab over tensor:
  the same greedy tokens as one device, and the same samples (random bits do not depend on sharding)."""
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = tiny_model(mesh)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  ids, mask = (jax.device_put(x, batch) for x in prompts)
  for temperature in (0.0, 1.0):
    kw = dict(key=jax.random.key(0), max_new_tokens=N, temperature=temperature, return_logprobs=True)
    got = sampling.generate(nnx.split(sharded), ids, mask, **kw)
    want = sampling.generate(model, *prompts, **kw)
    np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert got.completion_ids.sharding.mesh.shape == mesh.shape  # the program really ran on the mesh


def test_inside_callers_jit(model, prompts):
  """The trainer calls generate inside its own jitted step, with the params it trains."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, mask, key):
    out = sampling.generate((graphdef, state), ids, mask, key=key, max_new_tokens=N, temperature=1.0)
    return out.completion_ids

  want = sampling.generate(model, *prompts, key=jax.random.key(4), max_new_tokens=N, temperature=1.0)
  np.testing.assert_array_equal(step(state, *prompts, jax.random.key(4)), want.completion_ids)


def test_one_compile_per_shape(model, prompts):
  """New keys reuse the program; a new prompt bucket compiles once more (and only once)."""
  kw = dict(max_new_tokens=N, temperature=1.0)
  sampling.generate(model, *prompts, key=jax.random.key(0), **kw)
  before = sampling._generate_program._cache_size()
  for k in range(3):
    sampling.generate(model, *prompts, key=jax.random.key(k + 10), **kw)
  assert sampling._generate_program._cache_size() == before
  ids, mask = sampling.pad_to_bucket(*prompts)  # P = 8 → 16
  for k in range(2):
    sampling.generate(model, ids, mask, key=jax.random.key(k), **kw)
  assert sampling._generate_program._cache_size() == before + 1
  # The KV cache is donated: its buffers are consumed (reused for the output cache) by the program.
  graphdef, state = nnx.split(model)
  cache = sampling._init_cache(graphdef, state, B, P + N, None)
  sampling._generate_program(graphdef, sampling.SamplingConfig(**kw), state, cache, *prompts, jax.random.key(0))
  assert sampling._generate_program._cache_size() == before + 1
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(cache))
