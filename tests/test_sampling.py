"""Tests for gkd_jax.sampling: values against full recomputation and NumPy references."""
import dataclasses
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkd_jax import sampling

VOCAB = 64


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    eos_token_id: int | None = None
    pad_token_id: int = 0


class ToyLM(nnx.Module):
    """One-layer attention LM with the CausalLM cache contract (stand-in until gkd_jax.models lands)."""

    def __init__(self, vocab=VOCAB, dim=32, *, rngs):
        self.config = ToyConfig(vocab_size=vocab)
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Embed(256, dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)
        self.dim = dim

    def init_cache(self, batch_size, max_length, dtype=None):
        z = jnp.zeros((batch_size, max_length, self.dim), dtype or jnp.float32)
        return {"k": z, "v": z}

    def __call__(self, input_ids, attention_mask=None, *, positions=None, cache=None, cache_index=None):
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = self.embed(input_ids) + self.pos(positions)
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        if cache is None:
            qslot, keys, vals = jnp.arange(t), k, v
        else:
            keys = jax.lax.dynamic_update_slice(cache["k"], k, (0, cache_index, 0))
            vals = jax.lax.dynamic_update_slice(cache["v"], v, (0, cache_index, 0))
            qslot, cache = cache_index + jnp.arange(t), {"k": keys, "v": vals}
        s = keys.shape[1]
        kmask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        allowed = (jnp.arange(s)[None, :] <= qslot[:, None])[None] & kmask[:, None, :]
        att = jnp.einsum("btd,bsd->bts", q, keys) / math.sqrt(self.dim)
        att = jax.nn.softmax(jnp.where(allowed, att, -1e9), axis=-1)
        h = x + jnp.einsum("bts,bsd->btd", att, vals)
        logits = self.head(jnp.tanh(h)) * 3.0  # sharper than init so greedy has clear winners
        return SimpleNamespace(logits=logits, hidden_states=h, cache=cache)


# ----------------------------------------------------------------------------------------------------
# Fixtures: one tiny model, one batch of left-padded prompts of different lengths.

B, P, N = 4, 8, 8


@pytest.fixture(scope="module")
def model():
    return ToyLM(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = [8, 5, 3, 1]
    ids = np.zeros((B, P), np.int32)
    mask = np.zeros((B, P), np.int32)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = rng.integers(1, VOCAB, n)
        mask[i, P - n:] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def full_forward(model, ids, mask):
    """Logits by full recomputation (no cache), positions = number of real tokens before each one."""
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                            positions=jnp.asarray(positions)).logits, np.float64)


def greedy_by_recompute(model, ids, mask, n):
    """Reference greedy decode: at each step rerun the whole sequence and take the argmax."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    out = []
    for _ in range(n):
        nxt = full_forward(model, ids, mask)[:, -1].argmax(-1)
        out.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
    return np.stack(out, 1)


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
    np.testing.assert_array_equal(sampling.completion_mask_from_stops(jnp.array([[5, 3, 5, 1]]), 5),
                                  [[1, 0, 0, 0]])


def test_bucketing():
    assert [sampling.bucket_length(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    assert sampling.bucket_length(10, buckets=(8, 12, 64)) == 12
    with pytest.raises(ValueError):
        sampling.bucket_length(65, buckets=(16, 64))
    ids, mask = sampling.pad_to_bucket(np.array([[0, 4, 5], [1, 2, 3]]), np.array([[0, 1, 1], [1, 1, 1]]),
                                       pad_token_id=9)
    assert ids.shape == mask.shape == (2, 16)
    np.testing.assert_array_equal(ids[:, -3:], [[0, 4, 5], [1, 2, 3]])
    assert (ids[:, :-3] == 9).all() and (mask[:, :-3] == 0).all()


def test_left_align():
    ids = jnp.array([[1, 2, 0, 0], [0, 3, 4, 5], [6, 0, 7, 0]])
    mask = (ids > 0).astype(jnp.int32)
    out_ids, out_mask = sampling.left_align(ids, mask)
    np.testing.assert_array_equal(out_ids, [[0, 0, 1, 2], [0, 3, 4, 5], [0, 0, 6, 7]])
    np.testing.assert_array_equal(out_mask, [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 0.7, 0.0), (0, 1.0, 0.2), (5, 1.0, 0.0),
                                               (10, 0.6, 0.05), (0, 0.95, 0.1)])
def test_truncation_matches_numpy(top_k, top_p, min_p):
    logits = np.random.default_rng(1).normal(size=(16, VOCAB)) * 2
    temperature = 0.7
    got = np.asarray(sampling.sampling_logprobs(jnp.asarray(logits, jnp.float32), temperature=temperature,
                                                top_k=top_k, top_p=top_p, min_p=min_p))
    for row, logp in zip(logits, got):
        keep, p = allowed_set_numpy(row, temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(logp), keep)
        np.testing.assert_allclose(np.exp(logp), p, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# generate() against references.


def test_greedy_with_cache_equals_recompute(model, prompts):
    out = sampling.generate(model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=0.0,
                            return_logprobs=True)
    ref = greedy_by_recompute(model, *prompts, N)
    np.testing.assert_array_equal(out.completion_ids, ref)
    assert out.completion_mask.all() and (np.asarray(out.lengths) == N).all() and int(out.num_steps) == N
    # Greedy logprobs are the model's own log-softmax at the chosen token (first token checked).
    logits = full_forward(model, *prompts)[:, -1]
    ref_lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(out.logprobs[:, 0], ref_lp[np.arange(B), ref[:, 0]], atol=1e-4)


def test_top_k_1_equals_greedy(model, prompts):
    greedy = sampling.generate(model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=0.0)
    top1 = sampling.generate(model, *prompts, key=jax.random.key(3), max_new_tokens=N, temperature=1.3,
                             top_k=1)
    np.testing.assert_array_equal(top1.completion_ids, greedy.completion_ids)


def test_key_determinism(model, prompts):
    run = lambda k: np.asarray(sampling.generate(model, *prompts, key=jax.random.key(k), max_new_tokens=N,
                                                 temperature=1.0).completion_ids)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # One program served all three calls (the key is an argument, not a compile-time constant).


def test_first_token_frequencies_match_softmax(model):
    """8192 draws of the first token of one prompt vs softmax(logits/τ): chi-square at p = 1e-4."""
    n, tau = 8192, 1.7
    ids = jnp.tile(jnp.array([[3, 14, 15, 9]], jnp.int32), (n, 1))
    out = sampling.generate(model, ids, jnp.ones_like(ids), key=jax.random.key(42), max_new_tokens=1,
                            temperature=tau)
    logits = full_forward(model, ids[:1], np.ones((1, 4), np.int32))[0, -1] / tau
    p = np.exp(logits - logits.max())
    p /= p.sum()
    counts = np.bincount(np.asarray(out.completion_ids[:, 0]), minlength=VOCAB)
    expected = n * p
    assert expected.min() > 5, "test needs enough mass per cell for the chi-square approximation"
    chi2 = ((counts - expected) ** 2 / expected).sum()
    df = VOCAB - 1
    # Wilson–Hilferty approximation of the chi-square 1 - 1e-4 quantile (z = 3.719).
    limit = df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3
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
    out = sampling.generate(model, ids, mask, key=jax.random.key(7), max_new_tokens=N, temperature=tau,
                            top_k=top_k, top_p=top_p, min_p=min_p, return_logprobs=True)
    comp = np.asarray(out.completion_ids)
    full_ids = np.concatenate([np.asarray(ids), comp], 1)
    full_mask = np.concatenate([np.asarray(mask), np.ones_like(comp)], 1)
    logits = full_forward(model, full_ids, full_mask)[:, P - 1:-1]  # logits that produced each token
    for r in range(comp.shape[0]):
        for t in range(N):
            keep, p = allowed_set_numpy(logits[r, t], tau, top_k, top_p, min_p)
            assert keep[comp[r, t]], (r, t)
            np.testing.assert_allclose(out.logprobs[r, t], np.log(p[comp[r, t]]), atol=1e-4)
    assert len(np.unique(comp)) > 2  # really sampling, not collapsing to greedy


def test_stop_tokens_and_early_exit(model, prompts):
    greedy = np.asarray(greedy_by_recompute(model, *prompts, N))
    # Pick stop ids that rows 0 and 1 emit early; rows 2 and 3 must also stop for the loop to exit.
    first = {}
    for r in range(B):
        for t, tok in enumerate(greedy[r]):
            first.setdefault(int(tok), t)
    stops = sorted(first, key=first.get)[:2]
    out = sampling.generate(model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=0.0,
                            eos_token_ids=stops, pad_token_id=0)
    ref_mask = np.asarray(sampling.completion_mask_from_stops(jnp.asarray(greedy), stops))
    np.testing.assert_array_equal(out.completion_mask, ref_mask)
    np.testing.assert_array_equal(out.completion_ids, np.where(ref_mask, greedy, 0))
    np.testing.assert_array_equal(out.lengths, ref_mask.sum(-1))
    # The loop ran exactly until the last row stopped (or N if some row never stops).
    every_row_stops = np.asarray(sampling.is_stop(greedy, stops)).any(-1).all()
    assert int(out.num_steps) == (ref_mask.sum(-1).max() if every_row_stops else N)


def test_early_exit_counts_steps(model, prompts):
    # Every token is a stop token: one step and the loop is over.
    out = sampling.generate(model, *prompts, key=jax.random.key(0), max_new_tokens=N, temperature=1.0,
                            eos_token_ids=range(VOCAB))
    assert int(out.num_steps) == 1
    np.testing.assert_array_equal(out.lengths, np.ones(B))
    assert (np.asarray(out.completion_ids[:, 1:]) == 0).all()


def test_errors(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="no real token"):
        sampling.generate(model, ids, mask.at[2].set(0), key=jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="key"):
        sampling.generate(model, ids, mask, key=None, max_new_tokens=2)
