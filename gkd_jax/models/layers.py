"""Parameterized building blocks: dense projections, embedding, RMSNorm and LayerNorm with logical axis names.

Parameters live in `param_dtype` and are cast to the compute `dtype` at use (f32 master weights, bf16 math).
Every parameter carries its logical axis names as nnx `out_sharding` metadata (eager sharding off: the
loader and `gkd_jax.sharding` place arrays, so modules can be built without a mesh).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str | None], dtype, init: str) -> nnx.Param:
  """A Param with logical names. init: "normal" (std 0.02, HF's default), "ones" or "zeros"."""
  shape = tuple(shape)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap * tanh(x / cap), the logit softcapping of Gemma 2 (final logits and attention scores); None or 0: x."""
  return jnp.tanh(x / cap) * cap if cap else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
  """x [N, K] @ w [K, M] -> [N, M] in `dtype` (None: x's), accumulated in float32, and so are both products of
  its backward (their operands in x's dtype).

  For bf16 this is what TPU and GPU matrix units do anyway; XLA:CPU runs a bf16 x bf16 -> f32 product on
  native bf16 kernels (AVX512-BF16 / AMX through XNNPACK) at about 2.3x the rate of a bf16 -> bf16 one,
  which it computes by converting to f32 (384 vs 163 GFLOP/s at 2048^3 on a 2-core Zen 4). Autodiff of
  the plain expression would run the backward on the float32 cotangent instead. The backward forms dW as
  x^T [K, N] @ g [N, M] (both operands in the layout a GEMM reads), never a transpose of g."""
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dtype or x.dtype)


def _matmul_fwd(x, w, dtype):
  return matmul(x, w, dtype), (x, w)


def _matmul_bwd(dtype, residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nnx.Module):
  """y[..., *out] = sum over the last `len(in_shape)` dims of x[..., *in] * kernel[*in, *out] (+ bias[*out]).

  The kernel keeps head structure (e.g. [embed, heads, head_dim]) so heads shard without reshapes; the math
  runs as one 2D matmul, whose backward XLA:CPU handles much faster than multi-axis contractions.
  """

  def __init__(
      self,
      in_shape,
      out_shape,
      names,
      *,
      bias: bool = False,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.n_in, self.dtype = len(in_shape), dtype
    self.kernel = param(rngs, (*in_shape, *out_shape), names, param_dtype, "normal")
    self.bias = param(rngs, out_shape, names[len(in_shape) :], param_dtype, "zeros") if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    in_shape, out_shape = kernel.shape[: self.n_in], kernel.shape[self.n_in :]
    lead = x.shape[: x.ndim - self.n_in]
    y = matmul(x.astype(self.dtype).reshape(-1, math.prod(in_shape)), kernel.reshape(math.prod(in_shape), -1))
    y = y.reshape(*lead, *out_shape)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, hidden_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, (vocab_size, hidden_size), ("vocab", "embed"), param_dtype, "normal")

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
  """HF's RMSNorm, normalized in float32. Llama style: cast to the compute dtype, then scale by w.
  Gemma style (offset=True): scale by (1 + w) in float32, then cast."""

  def __init__(
      self,
      dim: int,
      eps: float,
      *,
      names=("norm",),
      offset: bool = False,
      dtype,
      param_dtype,
      rngs: nnx.Rngs | None = None,
  ):
    self.eps, self.offset, self.dtype = eps, offset, dtype
    self.scale = param(rngs, (dim,), names, param_dtype, "zeros" if offset else "ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    return _rms_norm(x, self.scale[...], self.eps, self.offset, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def _rms_norm(x, scale, eps, offset, dtype):
  """Rematerialized: the backward pass keeps x (and scale), not x's float32 copy, and recomputes the rest
  (under `lax.scan` the float32 copy would be stored for every layer)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if offset:
    return (x32 * (1.0 + scale.astype(jnp.float32))).astype(dtype)
  return x32.astype(dtype) * scale.astype(dtype)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm (scale and bias), normalized in float32, then cast to the compute dtype."""

  def __init__(self, dim: int, eps: float, *, names=("embed",), dtype, param_dtype, rngs: nnx.Rngs | None = None):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, (dim,), names, param_dtype, "ones")
    self.bias = param(rngs, (dim,), names, param_dtype, "zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    return _layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, dtype):
  """Rematerialized like `_rms_norm`: the backward keeps x, not its float32 copy."""
  x32 = x.astype(jnp.float32)
  x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
