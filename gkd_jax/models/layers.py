"""Parameterized building blocks: einsum projections, embedding and RMSNorm with logical axis names.

Parameters live in `param_dtype` and are cast to the compute `dtype` at use (f32 master weights, bf16 math).
Every parameter carries its logical axis names as nnx `out_sharding` metadata (eager sharding off: the
loader and `gkd_jax.sharding` place arrays, so modules can be built without a mesh).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Sequence[str | None], dtype, init: str,
          fan_in: int = 1) -> nnx.Param:
    """A Param with logical names. init: "normal" (std 0.02 like HF), "fan_in", "ones" or "zeros"."""
    shape = tuple(shape)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = 0.02 if init == "normal" else fan_in ** -0.5
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Einsum(nnx.Module):
    """y = einsum(spec, x, kernel) (+ bias): a dense layer whose kernel keeps head structure, e.g.
    [embed, heads, head_dim], so heads can be sharded without reshapes."""

    def __init__(self, spec: str, kernel_shape, kernel_names, *, bias_shape=None, bias_names=None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        self.kernel = param(rngs, kernel_shape, kernel_names, param_dtype, "normal")
        self.bias = None if bias_shape is None else param(rngs, bias_shape, bias_names, param_dtype, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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
    """HF's RMSNorm: normalize in float32, cast back to the compute dtype, then scale."""

    def __init__(self, dim: int, eps: float, *, names=("norm",), dtype, param_dtype, rngs: nnx.Rngs | None = None):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, (dim,), names, param_dtype, "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * self.scale[...].astype(self.dtype)
