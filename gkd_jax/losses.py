"""GKD losses: the generalized JSD(β) over full and top-k logits, plus NLL and metrics (the chunked losses that
start from hidden states are in `fused_losses`).

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

import chex
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

REDUCTIONS = ("mean", "sum", "none", "seq_mean")


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


ANY_RANK = frozenset(range(1, 9))  # [..., D]: any number of leading token dims


def expect(x, name: str, layout: str, rank: int | frozenset | None = ANY_RANK, dtype=float):
  """chex rank (None: any) and dtype checks whose failure says what the argument `name` must be
  ("student_logits must be [..., vocab] floats"). They read only shapes and dtypes, so under jit they cost
  nothing: they run once, while tracing."""
  message = f"{name} must be {layout}"
  if rank is not None:
    chex.assert_rank(x, set(rank) if isinstance(rank, frozenset) else rank, custom_message=message)
  chex.assert_type(x, dtype, custom_message=message)


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
  expect(student_logits, "student_logits", "[..., vocab] floats")
  expect(teacher_logits, "teacher_logits", "[..., vocab] floats")
  _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
  _check_mask(mask, student_logits.shape[:-1])
  per_token, stats = _jsd_tokens(
      _f32(_sanitize(student_logits, mask)), _f32(_sanitize(teacher_logits, mask)), beta, temperature
  )
  return reduce_tokens(per_token, mask, reduction, num_items), jax.lax.stop_gradient(stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _jsd_tokens(student_logits, teacher_logits, beta, temperature):
  """(per-token JSD(β), per-token diagnostics) of two logits tensors. The backward pass is written in
  closed form (see `jsd_logit_grads`), which reads and writes [..., V] far fewer times than differentiating the
  forward would; the diagnostics get no gradient."""
  return _jsd_fwd(student_logits, teacher_logits, beta, temperature)[0]


def _jsd_fwd(student_logits, teacher_logits, beta, temperature):
  ls = _tempered_logprobs(student_logits, temperature)
  lt = _tempered_logprobs(teacher_logits, temperature)
  stats = _stats_from_logprobs(ls, lt, student_logits, teacher_logits)
  if beta in (0.0, 1.0):
    value = stats["forward_kl"] if beta == 0.0 else stats["reverse_kl"]
    return (value, stats), (ls, lt, value, value)
  lm = _mixture_logprobs(ls, lt, beta)
  kl_s, kl_t = _kl_from_logprobs(ls, lm), _kl_from_logprobs(lt, lm)
  return (beta * kl_t + (1.0 - beta) * kl_s, stats), (ls, lt, kl_s, kl_t)


def _jsd_bwd(beta, temperature, residuals, g):
  ls, lt, a, b = residuals
  return jsd_logit_grads(ls, lt, beta, a, b, g[0][..., None] / temperature)  # the diagnostics' cotangent is ignored


def jsd_logit_grads(ls, lt, beta, kl_a, kl_b, scale):
  """Closed-form ∂/∂z of the per-token JSD(β) w.r.t. the student's and the teacher's logits, times `scale`
  (the cotangent over τ, broadcast against [..., V]). With ls, lt, lm the student, teacher and mixture
  tempered log-probabilities [..., V]:
    β=0 (FKL): z_s: p_s − p_t,                z_t: p_t·(lt − ls − FKL)
    β=1 (RKL): z_s: p_s·(ls − lt − RKL),      z_t: p_t − p_s
    else:      z_s: (1−β)·p_s·(ls − lm − KL_s), z_t: β·p_t·(lt − lm − KL_t),  KL_x = KL(P_x‖M).
  kl_a, kl_b [...]: (FKL, FKL), (RKL, RKL) or (KL_s, KL_t) as `_jsd_fwd` keeps them. Entries with p = 0
  (a blocked vocabulary entry) get exactly 0. Writing this by hand reads and writes [..., V] far fewer
  times than differentiating the forward; the fused loss uses it chunk by chunk."""
  ps, pt = jnp.exp(ls), jnp.exp(lt)

  def weighted(p, lp, lq, kl):  # p·(log p − log q − KL), 0 where p = 0
    support = p > 0
    return jnp.where(support, p * (jnp.where(support, lp, 0.0) - jnp.where(support, lq, 0.0) - kl[..., None]), 0.0)

  if beta == 0.0:
    return scale * (ps - pt), scale * weighted(pt, lt, ls, kl_a)
  if beta == 1.0:
    return scale * weighted(ps, ls, lt, kl_a), scale * (pt - ps)
  lm = _mixture_logprobs(ls, lt, beta)
  return (1.0 - beta) * scale * weighted(ps, ls, lm, kl_a), beta * scale * weighted(pt, lt, lm, kl_b)


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
) -> jax.Array:
  """JSD(β) restricted to the teacher's top-k tokens, both distributions renormalized over those k.

  Args:
    student_logits: [..., V].
    teacher_topk_values: [..., k] teacher logits (local teacher) or log-probabilities (a server's
      top-k logprobs). Entries equal to −inf mark slots the teacher did not
      fill (a server that returned fewer than k); the student is renormalized over the filled slots only.
    teacher_topk_indices: [..., k] int token ids into the student's vocabulary.

  Temperature is applied to both sides before renormalizing. For log-probabilities this equals
  tempering the underlying logits: log p = z − log Z, and the constant log Z/τ cancels in the
  renormalization, so logits and log-probabilities are handled by the same math.
  """
  beta = _check_beta(beta)
  temperature = _check_temperature(temperature)
  _check_reduction(reduction)
  expect(student_logits, "student_logits", "[..., vocab] floats")
  expect(teacher_topk_values, "teacher_topk_values", "[..., k] floats")
  expect(teacher_topk_indices, "teacher_topk_indices", "[..., k] integer token ids", dtype=int)
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
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Negative log-likelihood of `targets` [...] under `logits` [..., V] (the SFT term, temperature 1). With
  label_smoothing ε the target is (1 - ε)·one-hot + ε·uniform over the V entries: per token
  (1 - ε)·NLL - ε·mean_v log p_v (transformers' label_smoothing_factor)."""
  _check_reduction(reduction)
  label_smoothing = _check_label_smoothing(label_smoothing)
  expect(logits, "logits", "[..., vocab] floats")
  expect(targets, "targets", "[...] integer token ids", rank=None, dtype=int)
  if tuple(targets.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
        f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
        f"{tuple(logits.shape[:-1])}"
    )
  _check_mask(mask, logits.shape[:-1])
  logp = jax.nn.log_softmax(_f32(_sanitize(logits, mask)), axis=-1)
  token_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return reduce_tokens(smoothed_nll(token_logp, logp, label_smoothing), mask, reduction, num_items)


def _check_label_smoothing(value) -> float:
  value = _static_float("label_smoothing", value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
  return value


def smoothed_nll(token_logp: jax.Array, logp: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-token loss of a target log-prob [...] and the full log-probs [..., V] under label smoothing ε (a
  static float; 0 is the plain NLL and adds no pass over the vocabulary)."""
  if not label_smoothing:
    return -token_logp
  return -(1.0 - label_smoothing) * token_logp - label_smoothing * jnp.mean(logp, axis=-1)


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
      _tempered_logprobs(student_logits, temperature),
      _tempered_logprobs(teacher_logits, temperature),
      student_logits,
      teacher_logits,
  )


def _stats_from_logprobs(s_logp, t_logp, student_logits, teacher_logits):
  """Top-1 agreement compares the argmax of the logits (the same tokens as the log-probs' for any temperature
  > 0): an argmax over a recomputed [..., V] value may not find its own maximum when XLA fuses the max
  reduction and the comparison with two copies of the computation that round differently."""
  return {
      "forward_kl": _kl_from_logprobs(t_logp, s_logp),
      "reverse_kl": _kl_from_logprobs(s_logp, t_logp),
      "student_entropy": -_kl_from_logprobs(s_logp, jnp.zeros_like(s_logp)),
      "teacher_entropy": -_kl_from_logprobs(t_logp, jnp.zeros_like(t_logp)),
      "top1_agreement": (first_argmax(student_logits) == first_argmax(teacher_logits)).astype(jnp.float32),
  }


def first_argmax(x: ArrayLike) -> jax.Array:
  """jnp.argmax over the last axis (first index of the maximum) as a max and a min reduction: XLA:CPU
  vectorizes these, while argmax's (value, index) reduction runs ~60 ms over [8, 64, 32768]. NaN rows
  give the axis size."""
  x = jnp.asarray(x)
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
