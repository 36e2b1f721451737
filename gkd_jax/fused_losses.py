"""The fused losses: JSD(β) and NLL from final hidden states and LM heads, chunk by chunk over the tokens, so
that no [tokens, V] logits tensor ever exists. Conventions (β, temperature, masks, reductions) are those of
`losses`; both heads are applied as `CausalLM.head` returns them: (weight [H, V], final-logit softcap).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gkd_jax import losses
from gkd_jax.models.layers import softcap as apply_softcap

CHUNK_BYTES = 64 << 20  # default size of one [chunk, V] float32 buffer


def fused_generalized_jsd_loss(
    student_hidden: ArrayLike,
    student_head: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_head: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    vocab_size: int | None = None,
) -> jax.Array:
  """JSD(β) computed from final hidden states chunk by chunk: no [tokens, V] logits tensor ever exists.

  Args:
    student_hidden [..., Hs] and teacher_hidden [..., Ht]: final normed hidden states (widths may differ).
    student_head [Hs, Vs], teacher_head [Ht, Vt]: LM head weights (the embedding transposed when tied).
    mask: bool [...] aligned to the targets.
    chunk_size: tokens per chunk; the peak extra memory is about four [chunk_size, V] float32 buffers.
      None picks the power of two that makes one such buffer about `CHUNK_BYTES` (64 MiB).
    student_softcap, teacher_softcap: final-logit softcaps (logits = cap·tanh(h·W/cap)), or None.
    vocab_size: shared vocabulary to cut both heads to (default: the smaller head).

  The teacher arguments are treated as constants (no gradient flows to them); the trainer stops the
  teacher's gradient anyway and this saves two matmuls per chunk. For "mean"/"sum" the gradient is
  computed in closed form inside the forward chunk loop (a custom VJP), so the backward pass only
  rescales it and no logits are recomputed: the matmul FLOPs equal the unfused loss's. What it adds is one
  read-modify-write of the [H, V] head gradient per chunk, which on a CPU makes it slower than the unfused
  loss at small chunks (experiments/bench_loss.py): a larger chunk_size trades memory for speed.
  reduction="none"/"seq_mean" use a rematerialized scan instead (one extra projection per chunk).
  """
  beta = losses._check_beta(beta)
  temperature = losses._check_temperature(temperature)
  losses._check_reduction(reduction)
  losses.expect(student_hidden, "student_hidden", "[..., hidden] floats")
  losses.expect(teacher_hidden, "teacher_hidden", "[..., hidden] floats")
  losses.expect(student_head, "student_head", "[hidden, vocab] floats", rank=None)  # its rank: the ValueError below
  losses.expect(teacher_head, "teacher_head", "[hidden, vocab] floats", rank=None)  # its rank: the ValueError below
  if student_head.ndim != 2 or teacher_head.ndim != 2:
    raise ValueError(
        f"heads must be [hidden, vocab], got {tuple(student_head.shape)} and " f"{tuple(teacher_head.shape)}"
    )
  if student_hidden.shape[-1] != student_head.shape[0]:
    raise ValueError(
        f"student_hidden width {student_hidden.shape[-1]} != student_head rows "
        f"{student_head.shape[0]} (shapes {tuple(student_hidden.shape)}, {tuple(student_head.shape)})"
    )
  if teacher_hidden.shape[-1] != teacher_head.shape[0]:
    raise ValueError(
        f"teacher_hidden width {teacher_hidden.shape[-1]} != teacher_head rows "
        f"{teacher_head.shape[0]} (shapes {tuple(teacher_hidden.shape)}, {tuple(teacher_head.shape)})"
    )
  if tuple(student_hidden.shape[:-1]) != tuple(teacher_hidden.shape[:-1]):
    raise ValueError(
        f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
        f"{tuple(teacher_hidden.shape)} must agree on all dims but the last"
    )
  losses._check_mask(mask, student_hidden.shape[:-1], what="hidden states")
  shared = min(student_head.shape[1], teacher_head.shape[1])
  vocab_size = shared if vocab_size is None else int(vocab_size)
  if not 1 <= vocab_size <= shared:
    raise ValueError(
        f"vocab_size {vocab_size} must be in [1, min(student {student_head.shape[1]}, "
        f"teacher {teacher_head.shape[1]})]"
    )
  chunk_size = _default_chunk(chunk_size, vocab_size)

  token_shape = student_hidden.shape[:-1]
  mask = jnp.ones(token_shape, bool) if mask is None else mask.astype(bool)
  hs, ht, m = _chunks(chunk_size, token_shape, student_hidden, teacher_hidden, mask)
  teacher_head = jax.lax.stop_gradient(teacher_head)
  ht = jax.lax.stop_gradient(ht)
  spec = _FusedSpec(
      beta,
      temperature,
      vocab_size,
      None if student_softcap is None else float(student_softcap),
      None if teacher_softcap is None else float(teacher_softcap),
  )

  if reduction in ("mean", "sum"):
    total = _fused_sum(spec, student_head, hs, teacher_head, ht, m)
    if reduction == "sum":
      return total
    denom = jnp.sum(mask) if num_items is None else num_items
    return total / jnp.maximum(jnp.asarray(denom, total.dtype), 1.0)

  per_token = _unchunk(_fused_per_token(spec, student_head, hs, teacher_head, ht, m), token_shape)
  return losses.reduce_tokens(per_token, mask, reduction, num_items)


def fused_nll_loss(
    hidden: ArrayLike,
    head: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    softcap: float | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """`losses.nll_loss` computed from hidden states [..., H] and an LM head [H, V] chunk by chunk (the SFT term
  of the fused path): a rematerialized scan, so no [tokens, V] logits exist in the forward or backward pass."""
  losses._check_reduction(reduction)
  label_smoothing = losses._check_label_smoothing(label_smoothing)
  losses.expect(hidden, "hidden", "[..., hidden] floats")
  losses.expect(head, "head", "[hidden, vocab] floats", rank=None)  # its rank: the ValueError below
  losses.expect(targets, "targets", "[...] integer token ids", rank=None, dtype=int)
  if head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
    raise ValueError(f"hidden width {hidden.shape[-1]} must equal the head's rows (head shape {tuple(head.shape)})")
  if tuple(targets.shape) != tuple(hidden.shape[:-1]):
    raise ValueError(
        f"targets shape {tuple(targets.shape)} must equal hidden shape without the last dim "
        f"{tuple(hidden.shape[:-1])}"
    )
  losses._check_mask(mask, hidden.shape[:-1], what="hidden states")
  vocab_size = head.shape[1] if vocab_size is None else int(vocab_size)
  chunk_size = _default_chunk(chunk_size, vocab_size)
  token_shape = hidden.shape[:-1]

  @jax.checkpoint
  def body(_, xs):
    h, t = xs
    logp = jax.nn.log_softmax(_chunk_logits(h, head, softcap, vocab_size), axis=-1)
    token_logp = jnp.take_along_axis(logp, t[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return None, losses.smoothed_nll(token_logp, logp, label_smoothing)

  _, per_token = jax.lax.scan(body, None, _chunks(chunk_size, token_shape, hidden, targets))
  return losses.reduce_tokens(_unchunk(per_token, token_shape), mask, reduction, num_items)


# ------------------------------------------------------------------------------------------------ chunks


def _default_chunk(chunk_size, vocab_size):
  if chunk_size is None:
    chunk_size = 1 << max(0, round(math.log2(max(1, CHUNK_BYTES // (4 * vocab_size)))))
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  return chunk_size


def _chunks(chunk_size, token_shape, *arrays):
  """Each [*token_shape, ...] array as [n_chunks, chunk, ...]: the token dims flattened, the last chunk padded
  with zero rows (masked out by the callers)."""
  n = math.prod(token_shape)
  chunk = min(chunk_size, max(n, 1))
  n_chunks = -(-n // chunk)

  def split(x):
    x = x.reshape(n, *x.shape[len(token_shape) :])
    x = jnp.pad(x, [(0, n_chunks * chunk - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])

  return tuple(split(x) for x in arrays)


def _unchunk(per_token, token_shape):
  """[n_chunks, chunk] per-token values back to token_shape, without the padding."""
  return per_token.reshape(-1)[: math.prod(token_shape)].reshape(token_shape)


def _raw_logits(hidden, head, vocab_size):
  """h·W for one chunk, cut to the shared vocabulary, accumulated in at least float32.

  The product uses the whole head and slices its [chunk, V] result: slicing the [H, V] head instead
  would copy it.
  """
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.promote_types(hidden.dtype, jnp.float32))
  return logits[:, :vocab_size]


def _chunk_logits(hidden, head, cap, vocab_size):
  return apply_softcap(_raw_logits(hidden, head, vocab_size), cap)


# ------------------------------------------------------------------------------------------------ JSD(β)


class _FusedSpec(NamedTuple):
  """Static settings of the fused loss (hashable, so it can be a nondiff argument of the custom VJP)."""

  beta: float
  temperature: float
  vocab_size: int
  s_cap: Optional[float]
  t_cap: Optional[float]


def _chunk_loss(spec, student_logits, t_head, ht, m):
  """Per-token JSD for one chunk given the student's chunk logits; zero where masked."""
  t_logits = _chunk_logits(ht, t_head, spec.t_cap, spec.vocab_size)
  s_logp = losses._tempered_logprobs(student_logits, spec.temperature)
  t_logp = losses._tempered_logprobs(t_logits, spec.temperature)
  return jnp.where(m, losses.jsd_from_logprobs(s_logp, t_logp, spec.beta), 0.0)


def _fused_per_token(spec, head, hs, t_head, ht, m):
  @jax.checkpoint  # keep only the chunk inputs; the [chunk, V] logits are recomputed in the backward pass
  def body(_, xs):
    h, h_t, mm = xs
    return None, _chunk_loss(spec, _chunk_logits(h, head, spec.s_cap, spec.vocab_size), t_head, h_t, mm)

  _, per_token = jax.lax.scan(body, None, (hs, ht, m))
  return per_token


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sum(spec, head, hs, t_head, ht, m):
  return _fused_sum_fwd(spec, head, hs, t_head, ht, m)[0]


def _jsd_and_student_logit_grad(student_logits, teacher_logits, beta, temperature):
  """Per-token JSD(β) [C] of finite logits [C, V] and its gradient w.r.t. the student logits [C, V]."""
  ls = losses._tempered_logprobs(student_logits, temperature)
  lt = losses._tempered_logprobs(teacher_logits, temperature)
  ps = jnp.exp(ls)
  if beta == 0.0:
    value = kl_a = kl_b = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
  elif beta == 1.0:
    value = kl_a = kl_b = jnp.sum(ps * (ls - lt), axis=-1)
  else:
    lm = losses._mixture_logprobs(ls, lt, beta)
    kl_a, kl_b = jnp.sum(ps * (ls - lm), axis=-1), jnp.sum(jnp.exp(lt) * (lt - lm), axis=-1)
    value = beta * kl_b + (1.0 - beta) * kl_a
  # The teacher's half of the gradient is unused, and XLA drops it.
  return value, losses.jsd_logit_grads(ls, lt, beta, kl_a, kl_b, 1.0 / temperature)[0]


def _fused_sum_fwd(spec, head, hs, t_head, ht, m):
  acc = jnp.promote_types(hs.dtype, jnp.float32)

  def body(carry, xs):
    loss_acc, d_head = carry
    h, h_t, mm = xs
    # Differentiate the chunk's loss w.r.t. its own logits, then through the projection by hand so
    # that the [chunk, V] cotangent lives only inside this iteration.
    t_logits = _chunk_logits(h_t, t_head, spec.t_cap, spec.vocab_size)
    s_logits, softcap_vjp = jax.vjp(lambda z: apply_softcap(z, spec.s_cap), _raw_logits(h, head, spec.vocab_size))
    per_token, dz = _jsd_and_student_logit_grad(s_logits, t_logits, spec.beta, spec.temperature)
    mm = mm.astype(acc)
    loss = jnp.sum(per_token * mm)
    (dz,) = softcap_vjp(dz * mm[:, None])
    # Columns past the shared vocabulary get zero gradient.
    dz = jnp.pad(dz, [(0, 0), (0, head.shape[1] - spec.vocab_size)]).astype(h.dtype)
    dh = jnp.dot(dz, head.T, preferred_element_type=acc)
    d_head = _add_outer_product(d_head, h, dz)
    return (loss_acc + loss, d_head), dh.astype(hs.dtype)

  (loss, d_head), d_hs = jax.lax.scan(body, (jnp.zeros((), acc), jnp.zeros(head.shape, acc)), (hs, ht, m))
  return loss, (d_head, d_hs, t_head, ht, m)


def _add_outer_product(acc, h, dz):
  """acc += hᵀ·dz in vocabulary blocks, updating acc in place.

  A plain `acc + h.T @ dz` materializes the [H, V] product next to the accumulator (XLA does not
  accumulate a dot into its operand); blocks of about the size of the [chunk, V] buffers keep the
  extra memory at that size.
  """
  width = acc.shape[1]
  n_blocks = max(1, min(width, -(-acc.shape[0] // h.shape[0])))
  size = width // n_blocks

  def add_block(start, acc, size):
    block = jax.lax.dynamic_slice_in_dim(acc, start, size, axis=1)
    block = block + jnp.dot(
        h.T, jax.lax.dynamic_slice_in_dim(dz, start, size, axis=1), preferred_element_type=acc.dtype
    )
    return jax.lax.dynamic_update_slice_in_dim(acc, block, start, axis=1)

  acc = jax.lax.fori_loop(0, n_blocks, lambda j, a: add_block(j * size, a, size), acc)
  if width % n_blocks:
    acc = add_block(n_blocks * size, acc, width - n_blocks * size)
  return acc


def _fused_sum_bwd(spec, residuals, g):
  d_head, d_hs, t_head, ht, m = residuals
  scale = lambda x: (g * x).astype(x.dtype)
  return scale(d_head), scale(d_hs), jnp.zeros_like(t_head), jnp.zeros_like(ht), np.zeros(m.shape, jax.dtypes.float0)


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)
