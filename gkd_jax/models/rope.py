"""Rotary position embeddings with HF's scaling variants (default, linear, dynamic NTK, llama3, yarn).

Frequencies follow transformers' `modeling_rope_utils` (float32 throughout); rotation uses the
"rotate half" layout of HF checkpoints (first half of head_dim paired with the second half).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from gkd_jax.models.config import ModelConfig


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
  return (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
  # Long wavelengths are divided by `factor`, short ones kept, the band in between interpolated smoothly.
  factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
  old_len = p["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(cfg: ModelConfig, base: float, dim: int, p: dict) -> tuple[np.ndarray, float]:
  orig = p.get("original_max_position_embeddings") or cfg.max_position_embeddings
  factor = p.get("factor") or cfg.max_position_embeddings / orig

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attn = p.get("attention_factor")
  if attn is None:
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)

  def correction_dim(rotations):
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
  if p.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp  # weight of the unscaled frequency
  pos_freqs = (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
  inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv.astype(np.float32), float(attn)


def rope_tables(cfg: ModelConfig, local: bool = False) -> tuple[np.ndarray, float]:
  """Static inverse frequencies [head_dim/2] and cos/sin scale ("dynamic" is adjusted per call)."""
  base, p = cfg.rope(local)
  dim, kind = cfg.head_dim, p.get("rope_type", "default")
  if kind == "yarn":
    return _yarn(cfg, base, dim, p)
  inv_freq = _base_inv_freq(base, dim)
  if kind == "linear":
    inv_freq = (inv_freq / np.float32(p["factor"])).astype(np.float32)
  elif kind == "llama3":
    inv_freq = _llama3(inv_freq, p)
  return inv_freq, 1.0


def cos_sin(cfg: ModelConfig, positions: jnp.ndarray, local: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
  """float32 cos, sin of shape [B, T, head_dim] for integer positions [B, T]."""
  inv_freq, scale = rope_tables(cfg, local)
  inv_freq = jnp.asarray(inv_freq)
  base, p = cfg.rope(local)
  if p.get("rope_type") == "dynamic":
    # NTK-aware: once the longest position in the call exceeds the trained length, raise the base.
    # Stateless version of HF's update: identical for a single forward of the whole sequence.
    dim, factor, max_len = cfg.head_dim, p["factor"], cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
    base = base * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x [B, T, heads, head_dim]; cos/sin [B, T, head_dim]. Returns x's dtype."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
