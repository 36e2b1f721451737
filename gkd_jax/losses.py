"""GKD losses: the generalized JSD(β) over full, top-k and fused-chunked logits, plus NLL and metrics.

Conventions (see README):
  * β=0 is exactly KL(P_T‖P_S) (forward), β=1 exactly KL(P_S‖P_T) (reverse); otherwise
    JSD(β) = β·KL(P_T‖M) + (1−β)·KL(P_S‖M) with M = β·P_T + (1−β)·P_S, built in log space.
  * `temperature` divides both the student's and the teacher's logits.
  * Masks are booleans aligned to the targets; logits at position t predict token t+1
    (`shift_for_next_token` builds the aligned triple).
  * reduction="mean" divides the masked sum by the number of valid tokens, or by `num_items` (the global
    token count across hosts and accumulation micro-batches) when given.

All math runs in at least float32 (bf16 inputs are upcast). `beta`, `temperature`, `reduction` and sizes are static
Python values: they select the program, so bad values fail while tracing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

REDUCTIONS = ("mean", "sum", "none", "seq_mean")
CHUNK_BYTES = 64 << 20  # default size of one [chunk, V] float32 buffer in the fused loss


# ----------------------------------------------------------------------------------------------- checks


def _static_float(name, value):
  try:
    return float(value)
  except TypeError:  # also a traced value (ConcretizationTypeError is a TypeError)
    raise TypeError(
        f"{name} must be a static Python number (it selects the program), " f"got {type(value).__name__}"
    ) from None


def _check_beta(beta):
  beta = _static_float("beta", beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
  return beta


def _check_temperature(temperature, name="temperature"):
  temperature = _static_float(name, temperature)
  if not temperature > 0.0 or not math.isfinite(temperature):
    raise ValueError(f"{name} must be a finite number > 0, got {temperature}")
  return temperature


def _check_reduction(reduction, allowed=REDUCTIONS):
  if reduction not in allowed:
    raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def _check_same_shape(name_a, a, name_b, b):
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_mask(mask, token_shape, what="logits"):
  if mask is not None and tuple(mask.shape) != tuple(token_shape):
    raise ValueError(
        f"mask shape {tuple(mask.shape)} must equal the token shape of {what} "
        f"{tuple(token_shape)} (all dims but the last)"
    )


# --------------------------------------------------------------------------------------- core divergence


def _kl_from_logprobs(logp, logq):
  """Σ_v p·(log p − log q) over the last axis, with 0·log 0 = 0.

  Entries where p = 0 (log p = −inf, e.g. a masked vocabulary entry) contribute exactly 0 and a zero
  gradient: both operands are replaced before the subtraction so no NaN reaches the backward pass.
  """
  support = logp > -jnp.inf
  safe_logp = jnp.where(support, logp, 0.0)
  safe_logq = jnp.where(support, logq, 0.0)
  return jnp.sum(jnp.where(support, jnp.exp(safe_logp) * (safe_logp - safe_logq), 0.0), axis=-1)


def jsd_from_logprobs(student_logp: ArrayLike, teacher_logp: ArrayLike, beta: float) -> jax.Array:
  """Per-token JSD(β) from normalized log-probabilities [..., V] -> [...]. `beta` is a static float."""
  if beta == 0.0:
    return _kl_from_logprobs(teacher_logp, student_logp)
  if beta == 1.0:
    return _kl_from_logprobs(student_logp, teacher_logp)
  log_m = _mixture_logprobs(student_logp, teacher_logp, beta)
  return beta * _kl_from_logprobs(teacher_logp, log_m) + (1.0 - beta) * _kl_from_logprobs(student_logp, log_m)


def _f32(x):
  """At least float32 (bf16/f16 are upcast; float64 stays float64 for references and grad checks)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _tempered_logprobs(logits, temperature):
  return jax.nn.log_softmax(_f32(logits) / temperature, axis=-1)


def _sanitize(logits, mask):
  """Zeroes logits at masked positions so that garbage there (NaN, all −inf) cannot leak into gradients."""
  if mask is None:
    return logits
  return jnp.where(mask[..., None], logits, jnp.zeros((), logits.dtype))


# ---------------------------------------------------------------------------------------------- reduction


def reduce_tokens(
    per_token: ArrayLike, mask: ArrayLike | None = None, reduction: str = "mean", num_items: ArrayLike | None = None
) -> jax.Array:
  """Reduces per-token values [..., T] (zeroed where masked) by the project's normalization.

  "mean": Σ valid / (num_items or the local count of valid tokens); "sum": Σ valid; "none": the per-token
  values with zeros at masked positions; "seq_mean": the paper's per-sequence 1/L_y — each sequence's mean
  over its valid tokens, then summed over sequences and divided by num_items (global number of
  sequences) or by the local count of sequences with at least one valid token.
  A fully masked input gives 0 (and zero gradients) for every reduction.
  """
  _check_reduction(reduction)
  per_token = _f32(per_token)
  if mask is None:
    mask = jnp.ones(per_token.shape, bool)
  mask = mask.astype(bool)
  per_token = jnp.where(mask, per_token, 0.0)
  if reduction == "none":
    return per_token
  if reduction == "sum":
    return jnp.sum(per_token)
  if reduction == "mean":
    denom = jnp.sum(mask) if num_items is None else num_items
    return jnp.sum(per_token) / jnp.maximum(jnp.asarray(denom, per_token.dtype), 1.0)
  # seq_mean: the last axis is the sequence.
  lengths = jnp.sum(mask, axis=-1)
  per_seq = jnp.sum(per_token, axis=-1) / jnp.maximum(lengths, 1)
  denom = jnp.sum(lengths > 0) if num_items is None else num_items
  return jnp.sum(per_seq) / jnp.maximum(jnp.asarray(denom, per_token.dtype), 1.0)


# ------------------------------------------------------------------------------------------- public losses


def generalized_jsd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
) -> jax.Array:
  """Generalized JSD(β) between teacher and student next-token distributions over logits [..., V].

  Args:
    student_logits, teacher_logits: [..., V] logits of the same shape (see `align_vocab` when the two
      embedding sizes differ). Any float dtype; the math is at least float32.
    mask: optional bool [...] aligned to the targets; False positions contribute nothing.
    beta: 0 → KL(P_T‖P_S), 1 → KL(P_S‖P_T), else the mixture JSD(β). Near the endpoints the mixture
      vanishes like β·FKL or (1−β)·RKL, hence the exact special cases.
    temperature: divides both logits before the softmax.
    reduction: "mean" | "sum" | "none" | "seq_mean" (see `reduce_tokens`).
    num_items: global normalizer for "mean"/"seq_mean" (gradient accumulation, multi-host).
  """
  return jsd_loss_and_stats(  # (validates the arguments; XLA drops the unused diagnostics)
      student_logits, teacher_logits, mask, beta=beta, temperature=temperature, reduction=reduction, num_items=num_items
  )[0]


def jsd_loss_and_stats(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`generalized_jsd_loss` and the per-token diagnostics of `token_stats` (no gradient) from one pass over
  the [..., V] logits: both read the same tempered log-probabilities, which at V = 32k-152k costs more than
  the head's matmul. Stats at masked positions are meaningless (mask them when summing)."""
  beta = _check_beta(beta)
  temperature = _check_temperature(temperature)
  _check_reduction(reduction)
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _check_mask(mask, student_logits.shape[:-1])
  per_token, stats = _jsd_tokens(
      _f32(_sanitize(student_logits, mask)), _f32(_sanitize(teacher_logits, mask)), beta, temperature
  )
  return reduce_tokens(per_token, mask, reduction, num_items), jax.lax.stop_gradient(stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _jsd_tokens(student_logits, teacher_logits, beta, temperature):
  """(per-token JSD(β), per-token diagnostics) of two logits tensors. The backward pass is written in
  closed form (see `_jsd_bwd`), which reads and writes [..., V] far fewer times than differentiating the
  forward would; the diagnostics get no gradient."""
  return _jsd_fwd(student_logits, teacher_logits, beta, temperature)[0]


def _jsd_fwd(student_logits, teacher_logits, beta, temperature):
  ls = _tempered_logprobs(student_logits, temperature)
  lt = _tempered_logprobs(teacher_logits, temperature)
  stats = _stats_from_logprobs(ls, lt)
  if beta in (0.0, 1.0):
    value = stats["forward_kl"] if beta == 0.0 else stats["reverse_kl"]
    return (value, stats), (ls, lt, value, value)
  lm = _mixture_logprobs(ls, lt, beta)
  kl_s, kl_t = _kl_from_logprobs(ls, lm), _kl_from_logprobs(lt, lm)
  return (beta * kl_t + (1.0 - beta) * kl_s, stats), (ls, lt, kl_s, kl_t)


def _jsd_bwd(beta, temperature, residuals, g):
  """∂/∂z of the per-token value, with ls, lt, lm the student, teacher and mixture log-probabilities:
    β=0 (FKL): z_s: (p_s − p_t)/τ,                z_t: p_t·(lt − ls − FKL)/τ
    β=1 (RKL): z_s: p_s·(ls − lt − RKL)/τ,        z_t: (p_t − p_s)/τ
    else:      z_s: (1−β)·p_s·(ls − lm − KL_s)/τ, z_t: β·p_t·(lt − lm − KL_t)/τ,  KL_x = KL(P_x‖M).
  Entries with p = 0 (a blocked vocabulary entry) get exactly 0."""
  ls, lt, a, b = residuals
  g = g[0][..., None] / temperature  # the diagnostics' cotangent is ignored
  ps, pt = jnp.exp(ls), jnp.exp(lt)

  def weighted(p, lp, lq, kl):  # p·(log p − log q − KL), 0 where p = 0
    support = p > 0
    return jnp.where(support, p * (jnp.where(support, lp, 0.0) - jnp.where(support, lq, 0.0) - kl[..., None]), 0.0)

  if beta == 0.0:
    return g * (ps - pt), g * weighted(pt, lt, ls, a)
  if beta == 1.0:
    return g * weighted(ps, ls, lt, a), g * (pt - ps)
  lm = _mixture_logprobs(ls, lt, beta)
  return (1.0 - beta) * g * weighted(ps, ls, lm, a), beta * g * weighted(pt, lt, lm, b)


_jsd_tokens.defvjp(_jsd_fwd, _jsd_bwd)


def _mixture_logprobs(student_logp, teacher_logp, beta):
  """log M = log(β·P_T + (1−β)·P_S), in log space. Where both are −inf (a blocked vocabulary entry) M is
  unused; logaddexp gets finite stand-ins there, since its gradient at (−inf, −inf) is NaN."""
  blocked = (teacher_logp == -jnp.inf) & (student_logp == -jnp.inf)
  return jnp.logaddexp(
      jnp.where(blocked, 0.0, teacher_logp) + math.log(beta), jnp.where(blocked, 0.0, student_logp) + math.log1p(-beta)
  )


def teacher_topk(teacher_logits: ArrayLike, k: int) -> tuple[jax.Array, jax.Array]:
  """The teacher's top-k (values, indices) over the last axis; k is static and in [1, V]."""
  vocab = teacher_logits.shape[-1]
  if not isinstance(k, int) or not 1 <= k <= vocab:
    raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size), got {k!r}")
  return jax.lax.top_k(teacher_logits, k)


def topk_generalized_jsd_loss(
    student_logits: ArrayLike,
    teacher_topk_values: ArrayLike,
    teacher_topk_indices: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
    values_are_logprobs: bool = False,
) -> jax.Array:
  """JSD(β) restricted to the teacher's top-k tokens, both distributions renormalized over those k.

  Args:
    student_logits: [..., V].
    teacher_topk_values: [..., k] teacher logits (local teacher) or log-probabilities (a server's
      top-k logprobs, `values_are_logprobs=True`). Entries equal to −inf mark slots the teacher did not
      fill (a server that returned fewer than k); the student is renormalized over the filled slots only.
    teacher_topk_indices: [..., k] int token ids into the student's vocabulary.

  Temperature is applied to both sides before renormalizing. For log-probabilities this equals
  tempering the underlying logits: log p = z − log Z, and the constant log Z/τ cancels in the
  renormalization, so logits and log-probabilities are handled by the same math.
  """
  del values_are_logprobs  # Same math either way (see docstring); kept for call-site clarity.
  beta = _check_beta(beta)
  temperature = _check_temperature(temperature)
  _check_reduction(reduction)
  _check_same_shape("teacher_topk_values", teacher_topk_values, "teacher_topk_indices", teacher_topk_indices)
  if tuple(teacher_topk_values.shape[:-1]) != tuple(student_logits.shape[:-1]):
    raise ValueError(
        f"teacher top-k shape {tuple(teacher_topk_values.shape)} and student_logits shape "
        f"{tuple(student_logits.shape)} must agree on all dims but the last"
    )
  k, vocab = teacher_topk_values.shape[-1], student_logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"k (last dim of the teacher top-k arrays) must be in [1, {vocab}], got {k}")
  _check_mask(mask, student_logits.shape[:-1])
  student_k = jnp.take_along_axis(_f32(student_logits), teacher_topk_indices, axis=-1)
  teacher_k = _f32(teacher_topk_values)
  # Slots the teacher did not fill are excluded from BOTH renormalizations.
  filled = teacher_k > -jnp.inf
  if mask is not None:
    # Masked positions may hold anything (even no filled slot): give them one dummy slot of zeros.
    dummy = jnp.arange(k) == 0
    filled = jnp.where(mask[..., None], filled, dummy)
    student_k, teacher_k = _sanitize(student_k, mask), _sanitize(teacher_k, mask)
  s_logp = _tempered_logprobs(jnp.where(filled, student_k, -jnp.inf), temperature)
  t_logp = _tempered_logprobs(jnp.where(filled, teacher_k, -jnp.inf), temperature)
  return reduce_tokens(jsd_from_logprobs(s_logp, t_logp, beta), mask, reduction, num_items)


def align_vocab(
    student_logits: ArrayLike, teacher_logits: ArrayLike, vocab_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Cuts both logits to one shared vocabulary (embedding tables padded past the tokenizer's size).

  vocab_size: the tokenizer's vocabulary size; defaults to the smaller of the two last dims.
  """
  vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
  vocab_size = min(vs, vt) if vocab_size is None else int(vocab_size)
  if not 1 <= vocab_size <= min(vs, vt):
    raise ValueError(f"vocab_size {vocab_size} must be in [1, min(student {vs}, teacher {vt})]")
  return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def nll_loss(
    logits: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
) -> jax.Array:
  """Negative log-likelihood of `targets` [...] under `logits` [..., V] (the SFT term, temperature 1)."""
  _check_reduction(reduction)
  if tuple(targets.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
        f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
        f"{tuple(logits.shape[:-1])}"
    )
  _check_mask(mask, logits.shape[:-1])
  logp = jax.nn.log_softmax(_f32(_sanitize(logits, mask)), axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return reduce_tokens(-token_logp, mask, reduction, num_items)


# -------------------------------------------------------------------------------------- sequence alignment


def shift_for_next_token(
    input_ids: ArrayLike, loss_mask: ArrayLike, *per_position: ArrayLike, first_target: int = 1
) -> tuple[jax.Array, ...]:
  """Aligns outputs at position t with the token at t+1.

  Args:
    input_ids: [B, T] the full sequences (prompt + completion).
    loss_mask: [B, T] bool, True on the tokens that are loss targets (the completion tokens), aligned to
      input_ids.
    *per_position: arrays [B, T, ...] produced per input position (logits, hidden states, teacher top-k).
    first_target: the first column that can hold a target. With a left-padded prompt of static width P
      followed by the completion, passing P keeps only the completion columns, so the LM head is never
      applied to prompt positions.

  Returns:
    (targets [B, T-s], target_mask [B, T-s], *arrays [B, T-s, ...]) with s = first_target: the outputs at
    columns [s-1, T-1) paired with the tokens at [s, T) and their mask.
  """
  if tuple(input_ids.shape) != tuple(loss_mask.shape):
    raise ValueError(
        f"input_ids shape {tuple(input_ids.shape)} and loss_mask shape " f"{tuple(loss_mask.shape)} must be equal"
    )
  for i, a in enumerate(per_position):
    if tuple(a.shape[:2]) != tuple(input_ids.shape):
      raise ValueError(
          f"per-position array {i} has shape {tuple(a.shape)}; its first two dims must equal "
          f"input_ids shape {tuple(input_ids.shape)}"
      )
  s = first_target
  if not isinstance(s, int) or not 1 <= s < input_ids.shape[1]:
    raise ValueError(f"first_target must be an int in [1, {input_ids.shape[1] - 1}], got {s!r}")
  return (input_ids[:, s:], loss_mask[:, s:].astype(bool), *(a[:, s - 1 : -1] for a in per_position))


# ------------------------------------------------------------------------------------------------ metrics


def token_stats(student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: float = 1.0) -> dict[str, jax.Array]:
  """Per-token diagnostics [...]: forward KL(P_T‖P_S), reverse KL(P_S‖P_T), both entropies, top-1 agreement."""
  temperature = _check_temperature(temperature)
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  return _stats_from_logprobs(
      _tempered_logprobs(student_logits, temperature), _tempered_logprobs(teacher_logits, temperature)
  )


def _stats_from_logprobs(s_logp, t_logp):
  return {
      "forward_kl": _kl_from_logprobs(t_logp, s_logp),
      "reverse_kl": _kl_from_logprobs(s_logp, t_logp),
      "student_entropy": -_kl_from_logprobs(s_logp, jnp.zeros_like(s_logp)),
      "teacher_entropy": -_kl_from_logprobs(t_logp, jnp.zeros_like(t_logp)),
      "top1_agreement": (first_argmax(s_logp) == first_argmax(t_logp)).astype(jnp.float32),
  }


def first_argmax(x: ArrayLike) -> jax.Array:
  """jnp.argmax over the last axis (first index of the maximum) as a max and a min reduction: XLA:CPU
  vectorizes these, while argmax's (value, index) reduction runs ~60 ms over [8, 64, 32768]. NaN rows
  give the axis size."""
  x = jnp.asarray(x)
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def masked_mean(values: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
  """Mean of `values` over valid positions (0 when none is valid)."""
  return reduce_tokens(values, mask, "mean")


# -------------------------------------------------------------------------------------------- fused loss


def _raw_logits(hidden, head, bias, vocab_size):
  """h·W (+ b) for one chunk, cut to the shared vocabulary, accumulated in at least float32.

  The product uses the whole head and slices its [chunk, V] result: slicing the [H, V] head instead
  would copy it.
  """
  acc = jnp.promote_types(hidden.dtype, jnp.float32)
  logits = jnp.dot(hidden, head, preferred_element_type=acc)
  if bias is not None:
    logits = logits + bias.astype(acc)
  return logits[:, :vocab_size]


def _head_activation(logits, scale, softcap):
  """The elementwise tail of an LM head: logit scale, then final-logit softcapping."""
  if scale != 1.0:
    logits = logits * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  return logits


def apply_head(hidden, head, softcap=None, vocab_size=None):
  """[N, H] hidden states through a (weight [H, V], softcap) head as `CausalLM.head` returns it: float32
  logits cut to vocab_size, as every fused loss forms them chunk by chunk."""
  return _head_activation(_raw_logits(hidden, head, None, vocab_size), 1.0, softcap)


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
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
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
    student_bias/teacher_bias [V*], *_logit_scale, *_softcap: optional head extras
      (logits = softcap·tanh(scale·(h·W + b)/softcap)).
    vocab_size: shared vocabulary to cut both heads to (default: the smaller head).

  The teacher arguments are treated as constants (no gradient flows to them); the trainer stops the
  teacher's gradient anyway and this saves two matmuls per chunk. For "mean"/"sum" the gradient is
  computed in closed form inside the forward chunk loop (a custom VJP), so the backward pass only
  rescales it and no logits are recomputed: the matmul FLOPs equal the unfused loss's. What it adds is one
  read-modify-write of the [H, V] head gradient per chunk, which on a CPU makes it slower than the unfused
  loss at small chunks (experiments/bench_loss.py): a larger chunk_size trades memory for speed.
  reduction="none"/"seq_mean" use a rematerialized scan instead (one extra projection per chunk).
  """
  beta = _check_beta(beta)
  temperature = _check_temperature(temperature)
  _check_reduction(reduction)
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
  _check_mask(mask, student_hidden.shape[:-1], what="hidden states")
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
  n = math.prod(token_shape)
  chunk = min(chunk_size, max(n, 1))
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n

  def chunked(x):  # [..., D] -> [n_chunks, chunk, D] with zero rows (masked out) as padding
    x = x.reshape(n, *x.shape[len(token_shape) :])
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])

  hs, ht, m = chunked(student_hidden), chunked(teacher_hidden), chunked(mask)
  teacher = jax.lax.stop_gradient((teacher_head, teacher_bias))
  ht = jax.lax.stop_gradient(ht)
  spec = _FusedSpec(
      beta,
      temperature,
      vocab_size,
      float(student_logit_scale),
      float(teacher_logit_scale),
      None if student_softcap is None else float(student_softcap),
      None if teacher_softcap is None else float(teacher_softcap),
  )

  if reduction in ("mean", "sum"):
    total = _fused_sum(spec, (student_head, student_bias), hs, teacher, ht, m)
    if reduction == "sum":
      return total
    denom = jnp.sum(mask) if num_items is None else num_items
    return total / jnp.maximum(jnp.asarray(denom, total.dtype), 1.0)

  per_token = _fused_per_token(spec, (student_head, student_bias), hs, teacher, ht, m)
  per_token = per_token.reshape(-1)[:n].reshape(token_shape)
  return reduce_tokens(per_token, mask, reduction, num_items)


class _FusedSpec(NamedTuple):
  """Static settings of the fused loss (hashable, so it can be a nondiff argument of the custom VJP)."""

  beta: float
  temperature: float
  vocab_size: int
  s_scale: float
  t_scale: float
  s_cap: Optional[float]
  t_cap: Optional[float]


def _chunk_student_logits(spec, student, h):
  head, bias = student
  return _head_activation(_raw_logits(h, head, bias, spec.vocab_size), spec.s_scale, spec.s_cap)


def _chunk_loss(spec, student_logits, teacher, ht, m):
  """Per-token JSD for one chunk given the student's chunk logits; zero where masked."""
  t_head, t_bias = teacher
  t_logits = _head_activation(_raw_logits(ht, t_head, t_bias, spec.vocab_size), spec.t_scale, spec.t_cap)
  s_logp = _tempered_logprobs(student_logits, spec.temperature)
  t_logp = _tempered_logprobs(t_logits, spec.temperature)
  return jnp.where(m, jsd_from_logprobs(s_logp, t_logp, spec.beta), 0.0)


def _fused_per_token(spec, student, hs, teacher, ht, m):
  @jax.checkpoint  # keep only the chunk inputs; the [chunk, V] logits are recomputed in the backward pass
  def body(_, xs):
    h, h_t, mm = xs
    return None, _chunk_loss(spec, _chunk_student_logits(spec, student, h), teacher, h_t, mm)

  _, per_token = jax.lax.scan(body, None, (hs, ht, m))
  return per_token


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sum(spec, student, hs, teacher, ht, m):
  return _fused_sum_fwd(spec, student, hs, teacher, ht, m)[0]


def _jsd_and_student_logit_grad(student_logits, teacher_logits, beta, temperature):
  """Per-token JSD(β) [C] of finite logits [C, V] and its gradient w.r.t. the student logits [C, V].

  In closed form, to keep the number of [C, V] buffers small: with ls, lt, lm the student, teacher and
  mixture log-probabilities, ∂/∂z_s of the per-token value is
    β=0: (p_s − p_t)/τ;   β=1: p_s·(ls − lt − RKL)/τ;   else: (1−β)·p_s·(ls − lm − KL(P_S‖M))/τ.
  """
  ls = _tempered_logprobs(student_logits, temperature)
  lt = _tempered_logprobs(teacher_logits, temperature)
  ps = jnp.exp(ls)
  if beta == 0.0:
    pt = jnp.exp(lt)
    return jnp.sum(pt * (lt - ls), axis=-1), (ps - pt) / temperature
  if beta == 1.0:
    rkl = jnp.sum(ps * (ls - lt), axis=-1)
    return rkl, ps * (ls - lt - rkl[:, None]) / temperature
  lm = _mixture_logprobs(ls, lt, beta)
  kl_s = jnp.sum(ps * (ls - lm), axis=-1)
  kl_t = jnp.sum(jnp.exp(lt) * (lt - lm), axis=-1)
  grad = (1.0 - beta) / temperature * ps * (ls - lm - kl_s[:, None])
  return beta * kl_t + (1.0 - beta) * kl_s, grad


def _fused_sum_fwd(spec, student, hs, teacher, ht, m):
  head, bias = student
  acc = jnp.promote_types(hs.dtype, jnp.float32)

  def body(carry, xs):
    loss_acc, d_head, d_bias = carry
    h, h_t, mm = xs
    # Differentiate the chunk's loss w.r.t. its own logits, then through the projection by hand so
    # that the [chunk, V] cotangent lives only inside this iteration.
    t_head, t_bias = teacher
    t_logits = _head_activation(_raw_logits(h_t, t_head, t_bias, spec.vocab_size), spec.t_scale, spec.t_cap)
    s_logits, activation_vjp = jax.vjp(
        lambda z: _head_activation(z, spec.s_scale, spec.s_cap), _raw_logits(h, head, bias, spec.vocab_size)
    )
    per_token, dz = _jsd_and_student_logit_grad(s_logits, t_logits, spec.beta, spec.temperature)
    mm = mm.astype(acc)
    loss = jnp.sum(per_token * mm)
    (dz,) = activation_vjp(dz * mm[:, None])
    # Columns past the shared vocabulary get zero gradient.
    dz = jnp.pad(dz, [(0, 0), (0, head.shape[1] - spec.vocab_size)]).astype(h.dtype)
    dh = jnp.dot(dz, head.T, preferred_element_type=acc)
    d_head = _add_outer_product(d_head, h, dz)
    d_bias = None if bias is None else d_bias + jnp.sum(dz, axis=0, dtype=acc)
    return (loss_acc + loss, d_head, d_bias), dh.astype(hs.dtype)

  init = (jnp.zeros((), acc), jnp.zeros(head.shape, acc), None if bias is None else jnp.zeros(bias.shape, acc))
  (loss, d_head, d_bias), d_hs = jax.lax.scan(body, init, (hs, ht, m))
  return loss, ((d_head, d_bias), d_hs, teacher, ht, m)


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
  (d_head, d_bias), d_hs, teacher, ht, m = residuals
  scale = lambda x: None if x is None else (g * x).astype(x.dtype)
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return ((scale(d_head), scale(d_bias)), scale(d_hs), zeros(teacher), zeros(ht), np.zeros(m.shape, jax.dtypes.float0))


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)


def _default_chunk(chunk_size, vocab_size):
  if chunk_size is None:
    chunk_size = 1 << max(0, round(math.log2(max(1, CHUNK_BYTES // (4 * vocab_size)))))
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  return chunk_size


def fused_nll_loss(
    hidden: ArrayLike,
    head: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    bias: ArrayLike | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    num_items: ArrayLike | None = None,
) -> jax.Array:
  """`nll_loss` computed from hidden states [..., H] and an LM head [H, V] chunk by chunk (the SFT term of
  the fused path): a rematerialized scan, so no [tokens, V] logits exist in the forward or backward pass."""
  _check_reduction(reduction)
  if head.ndim != 2 or hidden.shape[-1] != head.shape[0]:
    raise ValueError(f"hidden width {hidden.shape[-1]} must equal the head's rows (head shape {tuple(head.shape)})")
  if tuple(targets.shape) != tuple(hidden.shape[:-1]):
    raise ValueError(
        f"targets shape {tuple(targets.shape)} must equal hidden shape without the last dim "
        f"{tuple(hidden.shape[:-1])}"
    )
  _check_mask(mask, hidden.shape[:-1], what="hidden states")
  vocab_size = head.shape[1] if vocab_size is None else int(vocab_size)
  chunk_size = _default_chunk(chunk_size, vocab_size)
  token_shape = hidden.shape[:-1]
  n = math.prod(token_shape)
  chunk = min(chunk_size, max(n, 1))
  n_chunks = -(-n // chunk)

  def chunked(x):
    x = x.reshape(n, *x.shape[len(token_shape) :])
    x = jnp.pad(x, [(0, n_chunks * chunk - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])

  @jax.checkpoint
  def body(_, xs):
    h, t = xs
    logits = _head_activation(_raw_logits(h, head, bias, vocab_size), float(logit_scale), softcap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return None, -jnp.take_along_axis(logp, t[:, None].astype(jnp.int32), axis=-1)[:, 0]

  _, per_token = jax.lax.scan(body, None, (chunked(hidden), chunked(targets)))
  return reduce_tokens(per_token.reshape(-1)[:n].reshape(token_shape), mask, reduction, num_items)
