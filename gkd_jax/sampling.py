"""Jitted autoregressive sampling with a KV cache, inside the training program.

The student samples with the very params it trains: `generate` takes the model (or its NNX
`(graphdef, state)` split) and compiles ONE program per (graphdef, sampling settings, batch, prompt
length, max_new_tokens): a prefill of the whole prompt into the KV cache, then a `lax.while_loop` that
decodes one token per step and exits as soon as every row has emitted a stop token. Bound the number of
compiles by padding prompts to a few lengths with `pad_to_bucket`.

    out = generate(model, prompt_ids, prompt_mask, key=jax.random.fold_in(key, step),
                   max_new_tokens=128, temperature=0.9, eos_token_ids=(eos,))
    out.completion_ids    # [B, N] int32, pad_token_id after the first stop token
    out.completion_mask   # [B, N] bool, True up to AND including the first stop token
    out.lengths           # [B] int32, completion_mask.sum(-1)
    out.logprobs          # [B, N] float32 (return_logprobs=True), 0 where the mask is False

Distribution. Logits are divided by the temperature, then truncated to the top_k tokens, then to the
smallest prefix (in descending probability) whose mass reaches top_p (measured after top_k, as in HF),
then tokens with probability < min_p * max probability are dropped. `logprobs` are log-probabilities
under that final renormalized distribution, i.e. exactly the distribution each token was drawn from
(the behaviour policy). With temperature 0 (greedy) that distribution is a point mass, so `logprobs`
are instead the model's own untempered, untruncated log-softmax at the chosen token.

Randomness comes only from `key`: token t is drawn with `split(key, max_new_tokens)[t]`, so the same
key gives the same tokens and the trainer folds its step into the key to sample differently every step.
"""

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding

from gkd_jax import sharding as shd
from gkd_jax.buckets import bucket_size


class SampleOutput(NamedTuple):
  """What `generate` returns (a pytree; every field is a device array)."""

  completion_ids: jax.Array  # [B, N] int32, pad_token_id after the first stop token
  completion_mask: jax.Array  # [B, N] bool, tokens up to and including the first stop token
  lengths: jax.Array  # [B] int32
  logprobs: Any  # [B, N] float32 or None; see the module docstring for which distribution
  num_steps: jax.Array  # () int32, tokens decoded before the loop exited (≤ N; < N on early exit)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Everything that shapes the compiled program (hashable: a static argument of the jit)."""

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  eos_token_ids: tuple = ()
  pad_token_id: int = 0
  return_logprobs: bool = False
  vocab_size: int | None = None  # sample only ids < vocab_size (embedding tables padded past the tokenizer)

  def __post_init__(self):
    if not (isinstance(self.max_new_tokens, (int, np.integer)) and self.max_new_tokens >= 1):
      raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
    if not 0 <= self.min_p < 1:
      raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p!r}")
    if self.vocab_size is not None and self.vocab_size < 1:
      raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")


# ----------------------------------------------------------------------------------------------------
# Pure helpers (also used by the trainer and the data pipeline).


def normalize_stop_ids(eos_token_ids) -> tuple:
  """None | int | iterable of ints → a sorted tuple of unique ints (HF configs use all three forms)."""
  if eos_token_ids is None:
    return ()
  if isinstance(eos_token_ids, (int, np.integer)):
    return (int(eos_token_ids),)
  return tuple(sorted({int(t) for t in eos_token_ids}))


def is_stop(ids, stop_ids):
  """Boolean mask of the positions of `ids` that hold one of `stop_ids` (a static sequence)."""
  stop_ids = normalize_stop_ids(stop_ids)
  if not stop_ids:
    return jnp.zeros(jnp.shape(ids), bool)
  return (jnp.asarray(ids)[..., None] == jnp.asarray(stop_ids, jnp.asarray(ids).dtype)).any(-1)


def completion_mask_from_stops(ids, stop_ids):
  """[..., N] ids → [..., N] bool: True for tokens up to and including the first stop token.

  A row without a stop token is all True (it was cut by max_new_tokens). Pure and jittable.
  """
  stop = is_stop(ids, stop_ids).astype(jnp.int32)
  stops_before = jnp.cumsum(stop, axis=-1) - stop  # exclusive count: the stop token itself stays in
  return stops_before == 0


def bucket_length(length: int, buckets: Sequence[int] | None = None) -> int:
  """The smallest bucket ≥ length (default buckets: powers of two from 16, then any larger power of two).
  Raises if none of the given buckets fits."""
  if buckets is None:
    return bucket_size(int(length), None)
  return bucket_size(int(length), max(buckets), buckets)


def pad_to_bucket(prompt_ids, prompt_mask, *, buckets=None, pad_token_id=0):
  """Left-pads [B, P] prompts to [B, bucket_length(P)] so the sampler compiles once per bucket.

  Host-side (NumPy) on purpose: it runs in the data pipeline, before arrays are sharded.
  """
  ids, mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
  if ids.shape != mask.shape or ids.ndim != 2:
    raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [B, P]")
  extra = bucket_length(ids.shape[1], buckets) - ids.shape[1]
  ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_token_id)
  mask = np.pad(mask, ((0, 0), (extra, 0)), constant_values=0)
  return ids, mask


def left_align(ids, mask):
  """Moves each row's real tokens (mask=1) to the right end, keeping their order: any padding → left.

  A stable argsort of the 0/1 mask puts pads first; it is the identity on already left-padded rows.
  """
  order = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True)
  return jnp.take_along_axis(ids, order, axis=-1), jnp.take_along_axis(mask, order, axis=-1)


def _candidates(logits, top_k, top_p, min_p):
  """Truncates float32 logits [..., V] → (values [..., K], vocab ids [..., K] | None), -inf = dropped.

  Works on the top_k slice only when top_k is set (cheap: K ≪ V); top_p needs a full sort otherwise.
  """
  vocab = logits.shape[-1]
  k = top_k if 0 < top_k < vocab else (vocab if top_p < 1 else 0)
  ids = None
  if k:
    logits, ids = lax.top_k(logits, k)  # sorted, descending
  if top_p < 1:
    probs = jax.nn.softmax(logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    # Keep the smallest prefix reaching top_p: token i stays iff the tokens above it hold < top_p.
    logits = jnp.where(mass_above < top_p, logits, -jnp.inf)
  if min_p > 0:
    # p_i ≥ min_p · p_max  ⇔  logit_i ≥ max logit + log(min_p), independent of normalization.
    top = jnp.max(logits, axis=-1, keepdims=True)
    logits = jnp.where(logits >= top + math.log(min_p), logits, -jnp.inf)
  return logits, ids


def _argmax(x):
  """First index of the maximum over the last axis, for finite x (NaN rows give the last index).

  Same result as jnp.argmax, but two plain reductions instead of XLA's variadic (value, index) reduce,
  which XLA:CPU does not vectorize: ~6x faster over a 32k vocab, where it is a decode step's hot spot.
  """
  iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), iota, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1)


def _pick(x, index):
  """x[b, index[b]] for [B, V] x: a masked sum (vectorizes on CPU, unlike a gather)."""
  iota = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(iota == index[:, None], x, 0.0), axis=-1)


def _block_size(vocab: int) -> int:
  """Power of two ≥ √vocab: minimizes the blocks + block_size Gumbel draws of the two-level sampler."""
  return 1 << math.ceil(math.log2(max(2.0, math.sqrt(vocab))))


def gumbel_categorical(key, logits, *, block_size=None):
  """One exact draw per row from softmax(logits) over [B, V] (-inf = excluded) → (ids [B], logsumexp [B]).

  Two-level Gumbel-max: draw a block of `block_size` tokens with probability ∝ its mass, then a token
  in it ∝ its own mass; the product is exactly the token's probability. This needs V/block + block
  random numbers per row instead of V (random bits, not FLOPs, dominate a CPU decode step at 32k+
  vocab), and the block log-masses give the logsumexp for the log-probability for free.
  """
  batch, vocab = logits.shape
  block = block_size or _block_size(vocab)
  num_blocks = -(-vocab // block)
  x = jnp.pad(logits, ((0, 0), (0, num_blocks * block - vocab)), constant_values=-jnp.inf)
  x = x.reshape(batch, num_blocks, block)
  block_lse = jax.nn.logsumexp(x, axis=-1)  # [B, nb]; -inf for fully excluded blocks: never drawn
  noise = jax.random.gumbel(key, (batch, num_blocks + block), jnp.float32)  # one RNG call for both levels
  j = _argmax(block_lse + noise[:, :num_blocks])
  inner = jnp.take_along_axis(x, j[:, None, None], axis=1)[:, 0]  # [B, block]
  i = _argmax(inner + noise[:, num_blocks:])
  return j * block + i, jax.nn.logsumexp(block_lse, axis=-1)


def sample_logits(key, logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, block_size=None):
  """Draws one token per row from [B, V] logits → (tokens [B] int32, logprobs [B] float32).

  The draw is exact (Gumbel-max, see `gumbel_categorical`); excluded tokens carry -inf logits and are
  never drawn. The logprobs are unused unless requested, and then XLA removes them.
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    tokens = _argmax(logits)
    # The model's own distribution at the greedy token; see the module docstring.
    return tokens, _pick(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)
  vals, ids = _candidates(logits / temperature, top_k, top_p, min_p)
  choice, lse = gumbel_categorical(key, vals, block_size=block_size)
  logp = _pick(vals, choice) - lse
  tokens = choice if ids is None else jnp.take_along_axis(ids, choice[:, None], -1)[:, 0]
  return tokens.astype(jnp.int32), logp


# ----------------------------------------------------------------------------------------------------
# The compiled program.


def _last_logits(model, out, vocab_size=None):
  """[B, V] logits of the last position, from the final hidden state through the model's head.

  The prefill thus never materializes [B, P, V] logits: XLA does not push the slice through the LM-head
  matmul, and at P=512, V=152k that would be the largest buffer of the whole program. The unused full
  logits are then dead code and are removed. The head comes cut to the vocabulary where that pays
  (CausalLM.lm_head_weight): fewer columns per step.
  """
  return model.logits(out.hidden_states[:, -1], vocab_size)


class _Loop(NamedTuple):
  step: jax.Array  # index of the next token to produce
  cache: Any
  mask: jax.Array  # [B, P+N] int32, 1 = cache slot holds a real token
  ids: jax.Array  # [B, N] int32
  logprobs: Any  # [B, N] float32, or None when not requested (then XLA drops their computation)
  done: jax.Array  # [B] bool, row has emitted a stop token


@functools.partial(jax.jit, static_argnames=("graphdef", "config"), donate_argnames=("cache",))
def _generate_program(graphdef, config: SamplingConfig, state, cache, prompt_ids, prompt_mask, key, pixel_values=None):
  """Prefill + while-loop decode. Returns (SampleOutput, cache); the donated cache is updated in place.
  pixel_values (a multimodal model's images) go to the prefill only: the decode steps feed text tokens."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_ids.shape
  n, pad = config.max_new_tokens, config.pad_token_id
  stops = config.eos_token_ids
  draw = functools.partial(
      sample_logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p
  )

  prompt_ids, prompt_mask = left_align(prompt_ids.astype(jnp.int32), prompt_mask.astype(jnp.int32))
  num_real = prompt_mask.sum(-1)  # [B]; position of the first new token
  filler = num_real == 0  # rows without a prompt (a partial batch's fillers) get an empty completion
  mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, n), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)  # pads get 0; they are masked anyway

  # One key per step, split up front: the loop body then spends no RNG work on key derivation.
  step_keys = jax.random.split(key, n)
  images = {} if pixel_values is None else {"pixel_values": pixel_values}
  out = model(prompt_ids, attention_mask=mask, positions=positions, cache=cache, cache_index=0, **images)
  tok, logp = draw(step_keys[0], _last_logits(model, out, config.vocab_size))
  tok = jnp.where(filler, pad, tok)
  ids = jnp.full((batch, n), pad, jnp.int32).at[:, 0].set(tok)
  logprobs = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(logp) if config.return_logprobs else None
  init = _Loop(jnp.int32(1), out.cache, mask, ids, logprobs, is_stop(tok, stops) | filler)

  def cond(c):
    return (c.step < n) & ~jnp.all(c.done)

  def body(c):
    # Feed token step-1 into cache slot P+step-1, then draw token `step` from its logits.
    slot = prompt_len + c.step - 1
    last = lax.dynamic_slice_in_dim(c.ids, c.step - 1, 1, axis=1)
    mask = lax.dynamic_update_slice_in_dim(c.mask, jnp.ones((batch, 1), jnp.int32), slot, axis=1)
    out = model(last, attention_mask=mask, positions=(num_real + c.step - 1)[:, None], cache=c.cache, cache_index=slot)
    tok, logp = draw(step_keys[c.step], _last_logits(model, out, config.vocab_size))
    # Finished rows keep emitting pad (their extra work is the price of a batched loop).
    tok = jnp.where(c.done, pad, tok)
    ids = lax.dynamic_update_slice_in_dim(c.ids, tok[:, None], c.step, axis=1)
    logprobs = c.logprobs
    if logprobs is not None:
      logp = jnp.where(c.done, 0.0, logp)
      logprobs = lax.dynamic_update_slice_in_dim(logprobs, logp[:, None], c.step, axis=1)
    return _Loop(c.step + 1, out.cache, mask, ids, logprobs, c.done | is_stop(tok, stops))

  final = lax.while_loop(cond, body, init)
  completion_mask = completion_mask_from_stops(final.ids, stops) & ~filler[:, None]
  result = SampleOutput(
      completion_ids=jnp.where(completion_mask, final.ids, pad),
      completion_mask=completion_mask,
      lengths=completion_mask.sum(-1).astype(jnp.int32),
      logprobs=jnp.where(completion_mask, final.logprobs, 0.0) if config.return_logprobs else None,
      num_steps=final.step,
  )
  return result, final.cache


# The gkd_jax cache layout (CausalLM.init_cache): per layer {"k", "v"} of [B, S, kv_heads, head_dim], or
# stacked on a leading layer axis for scanned models.
_CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length", "mesh"))
def _init_cache(graphdef, state, batch, length, mesh):
  """A zeroed cache, placed by logical axis names (batch over data+fsdp, KV heads over tensor).

  It is donated to the sampling program, whose output cache aliases it, so its sharding must be the one
  the model's attention wants; allocated inside a jit so no host copy is ever made.
  """
  model = nnx.merge(graphdef, state)
  max_len = getattr(model.config, "max_position_embeddings", None)
  if max_len and length > max_len:
    raise ValueError(f"prompt + max_new_tokens = {length} exceeds max_position_embeddings = {max_len}")
  if getattr(model, "mesh", None) is not None:
    mesh = model.mesh
  rules = getattr(model, "rules", None)

  def place(x):
    stacked = getattr(model, "scan_layers", False)
    if x.ndim == 4 + stacked:
      names = ("layers",) * stacked + _CACHE_AXES
    else:
      names = (None,) * stacked + ("batch",) + (None,) * (x.ndim - 1 - stacked)
    return shd.constrain(x, names, mesh, rules)

  return jax.tree.map(place, model.init_cache(batch, length))


# ----------------------------------------------------------------------------------------------------
# Public entry point.


def _split(model_or_split):
  if isinstance(model_or_split, tuple) and len(model_or_split) == 2:
    return model_or_split
  if isinstance(model_or_split, nnx.Module):
    return nnx.split(model_or_split)
  raise TypeError(f"expected an nnx.Module or a (graphdef, state) pair, got {type(model_or_split)}")


def _check_prompts(prompt_ids, prompt_mask):
  if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
    raise ValueError(
        f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} " "must both be [batch, prompt_len]"
    )
  if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
    raise TypeError(f"prompt_ids must be integers, got {prompt_ids.dtype}")


def generate(
    model,
    prompt_ids,
    prompt_mask,
    *,
    key,
    max_new_tokens,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    eos_token_ids=(),
    pad_token_id=0,
    return_logprobs=False,
    vocab_size=None,
    pixel_values=None,
):
  """Samples `max_new_tokens` tokens after each prompt; returns a `SampleOutput`.

  model: an nnx `CausalLM` or its `nnx.split` pair (graphdef, state) — pass the state being trained.
    Any module with the CausalLM call / `init_cache` contract works.
  prompt_ids, prompt_mask: [B, P] ints / 0-1; left padding expected (other padding is left-aligned
    inside the program). A row without any real token is a filler row (gkd_jax.data pads partial
    batches with them): its completion is empty (mask all False, length 0) and it does not keep the
    loop running. Sharded inputs are fine: the program runs under their shardings. Use
    `pad_to_bucket` to bound compiles.
  key: a jax.random key; required (fold the training step into it).
  temperature: 0 = greedy. top_k (0 = off), top_p (1 = off), min_p (0 = off): see the module docstring.
  eos_token_ids: int or several ints (e.g. Llama 3's two); empty = no early stop.
  pad_token_id: written after a row's first stop token.
  return_logprobs: also return the log-probability of each sampled token.
  vocab_size: sample only token ids below it (the tokenizer's size, when the embedding table is padded).
  pixel_values: [B, tiles, C, H, W] images of a vision-language model (InternVL) for the prompts' image
    tokens, given to the prefill call only; None (text-only) compiles the same program as before.

  The jitted program is cached per (graphdef, settings, shapes); the KV cache is allocated once per
  call and donated to it. Works inside a caller's jit too (then donation is moot and XLA plans memory).
  Errors (bad settings or shapes, prompt + max_new_tokens over max_position_embeddings) raise.
  """
  graphdef, state = _split(model)
  config = SamplingConfig(
      int(max_new_tokens),
      float(temperature),
      int(top_k),
      float(top_p),
      float(min_p),
      normalize_stop_ids(eos_token_ids),
      int(pad_token_id),
      bool(return_logprobs),
      None if vocab_size is None else int(vocab_size),
  )
  prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
  _check_prompts(prompt_ids, prompt_mask)
  if key is None:
    raise ValueError("generate needs an explicit PRNG key")
  batch, prompt_len = prompt_ids.shape
  # Under a mesh (the model's, jax.set_mesh's, or the one the prompts are sharded over) the cache is
  # sharded like the activations; without one it lives on the default device.
  traced = isinstance(prompt_ids, jax.core.Tracer)  # inside the caller's jit: its mesh / rules apply
  sharding = None if traced else getattr(prompt_ids, "sharding", None)
  mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
  cache = _init_cache(graphdef, state, batch, prompt_len + config.max_new_tokens, mesh)
  images = {} if pixel_values is None else {"pixel_values": pixel_values}  # text-only: today's call, cache entry
  result, _ = _generate_program(graphdef, config, state, cache, prompt_ids, prompt_mask, key, **images)
  return result
