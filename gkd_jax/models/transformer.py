"""Decoder-only causal LM (Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3) in Flax NNX, with a functional KV cache.

Two layer layouts: a Python loop over per-layer modules (`scan_layers=False`; params "layers.<i>.attn.q.kernel"),
or one stacked DecoderLayer whose params carry a leading "layers" axis, run under `lax.scan`
(`scan_layers=True`; params "layers.attn.q.kernel" of [L, ...]): compile time then no longer grows with depth.
Per-layer differences (Gemma's sliding-window alternation and local RoPE base) become scanned per-layer
arrays. The KV cache follows the layout: a list of per-layer {"k", "v"}, or one {"k", "v"} of [L, B, S, K, D].

Masking works on cache *slots*: without a cache the T tokens sit in slots 0..T-1, with a cache the new tokens
are written to slots [cache_index, cache_index+T). A query in slot i sees slot j when j <= i, the attention
mask marks j as a real token, and (sliding layers) i - j < window. Rows are left padded, so real tokens are
contiguous and slot distance equals position distance, as in HF.

The LM head (`CausalLM.head` / `logits`, `apply_head`, `head_product`) lives here too, so that the sampler, the
train step and the fused losses apply one head; the file is longer than 500 lines for that.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from gkd_jax import sharding as shd
from gkd_jax.models import rope
from gkd_jax.models.config import ModelConfig
from gkd_jax.models.layers import Dense, Embed, RMSNorm, matmul, param, softcap

# Masked scores: a large finite value, so that a fully masked (padding) row gives a uniform softmax, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

Cache = Any  # loop: per layer {"k": [B, S, kv_heads, head_dim], "v": same}; scanned: {"k": [L, B, S, ...], "v"}
ATTENTION_KINDS = ("xla", "dot_product", "splash")
REMAT_KINDS = ("none", "full", "dots", "offload")
_NO_WINDOW = 2**30  # the per-layer window of a full-attention layer under scan (larger than any sequence)


def remat_policy(remat: bool | str | None):
  """(enabled, policy) for a `remat` setting: False / None / "none" (off), True / "full" (save nothing but
  the layer inputs), "dots" (save the outputs of weight matmuls: dots_with_no_batch_dims_saveable; attention
  and elementwise ops are recomputed), "offload" (the same outputs, moved to the host's pinned memory in the
  forward pass and brought back for the backward: offload_dot_with_no_batch_dims), or the name of any other
  jax.checkpoint_policies member."""
  if remat in (False, None, "none"):
    return False, None
  if remat in (True, "full"):
    return True, None
  if remat == "dots":
    return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if remat == "offload":
    return True, jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  policy = getattr(jax.checkpoint_policies, remat, None) if isinstance(remat, str) else None
  if policy is None:
    raise ValueError(f"remat={remat!r} is invalid: one of {REMAT_KINDS}, True/False, or a jax.checkpoint_policies name")
  return True, policy


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
  logits: jax.Array  # [B, T, V]
  hidden_states: jax.Array  # [B, T, H], final-normed, before the LM head
  cache: Any = None  # updated cache, None without one


class Attention(nnx.Module):

  def __init__(
      self, cfg: ModelConfig, layer: int | None, *, dtype, param_dtype, mesh, rules, rngs: nnx.Rngs, attention="xla"
  ):
    h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Dense((h,), (n, d), ("embed", "heads", "head_dim"), bias=cfg.qkv_bias, **kw)
    self.k = Dense((h,), (kv, d), ("embed", "kv_heads", "head_dim"), bias=cfg.qkv_bias, **kw)
    self.v = Dense((h,), (kv, d), ("embed", "kv_heads", "head_dim"), bias=cfg.qkv_bias, **kw)
    self.o = Dense((n, d), (h,), ("heads", "head_dim", "embed"), bias=cfg.o_bias, **kw)
    if cfg.qk_norm:  # Qwen3 / Gemma3: RMSNorm over head_dim of q and k, before RoPE
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, names=("head_dim",), offset=cfg.norm_offset, **kw)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, names=("head_dim",), offset=cfg.norm_offset, **kw)
    else:
      self.q_norm = self.k_norm = None
    self.window = None if layer is None else cfg.window(layer)  # stacked layers get theirs per call
    self.attention = attention
    self.scale = (cfg.query_pre_attn_scalar or d) ** -0.5
    self.softcap = cfg.attn_logit_softcapping
    self.groups = n // kv
    self.dtype, self.mesh, self.rules = dtype, mesh, rules

  def __call__(self, x, cos, sin, q_slots, kv_mask, layer_cache, cache_index, window=None):
    """`window` (traced int, stacked layers only) overrides the static per-layer window."""
    c = lambda a, names: shd.constrain(a, names, self.mesh, self.rules)
    q, k, v = _project(x, self.q, self.k, self.v)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    q = c(q, ("batch", "length", "heads", "head_dim"))
    if layer_cache is not None:
      idx = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), idx)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), idx)
      layer_cache = {"k": k, "v": v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    k = c(k, ("batch", "cache_length", "kv_heads", "head_dim"))
    v = c(v, ("batch", "cache_length", "kv_heads", "head_dim"))

    s = k.shape[1]
    kv_slots = jnp.arange(s)
    allowed = (kv_slots[None, :] <= q_slots[:, None]) & kv_mask[:, None, :].astype(bool)  # [B, T, S]
    window = self.window if window is None else window
    if window is not None:
      allowed &= (q_slots[:, None] - kv_slots[None, :]) < window
    kind = self.attention
    if self.softcap or (kind == "splash" and layer_cache is not None):
      kind = "xla"  # softcapped scores (Gemma 2) and cached calls (sampling) need the explicit einsum
    if kind == "dot_product":
      out = _dot_product(q, k, v, allowed, self.scale)
    elif kind == "splash":
      out = _splash(q, k, v, kv_mask, window, self.scale, mesh=self.mesh, rules=self.rules)
    else:
      out = self._xla(q, k, v, allowed)
    out = c(out, ("batch", "length", "heads", "head_dim"))
    return self.o(out), layer_cache

  def _xla(self, q, k, v, allowed):
    b, t, _, d = q.shape
    # GQA: query heads grouped under their KV head; batch-major layouts keep XLA's dots transpose-free.
    q = q.reshape(b, t, -1, self.groups, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * self.scale
    scores = softcap(scores, self.softcap)  # Gemma 2
    scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
    out = softmax_values(scores, v, self.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, -1, d)


def _project(x, *denses):
  """The Dense layers applied to one input, flattened once to [N, H]: their backward passes then share one
  saved copy of it (under `lax.scan` each reshape's output would otherwise be stored separately per layer)."""
  flat = x.reshape(-1, x.shape[-1])
  return [dense(flat).reshape(*x.shape[:-1], *dense.kernel.shape[1:]) for dense in denses]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softmax_values(scores: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """softmax(scores) over keys, applied to the values: [B, K, G, T, S] (float32) x [B, K, S, D] -> [B, K, G, T, D]
  (the probabilities cast to `dtype` for the product).

  Its backward keeps only the float32 probabilities (and v), like the custom-JVP softmax. Autodiff of the
  plain expression keeps the masked scores, their exp and the probabilities' `dtype` copy; unrolled, XLA
  fuses those away, but under `lax.scan` (scan_layers) each is stored for every layer."""
  return _probs_values(jax.nn.softmax(scores, axis=-1), v, dtype)


def _probs_values(probs, v, dtype):
  # float32 accumulation: XLA:CPU's fast bf16 kernels (see layers.matmul); what TPU/GPU do anyway.
  return jnp.einsum("bkgts,bksd->bkgtd", probs.astype(dtype), v, preferred_element_type=jnp.float32).astype(dtype)


def _softmax_values_fwd(scores, v, dtype):
  probs = jax.nn.softmax(scores, axis=-1)
  return _probs_values(probs, v, dtype), (probs, v)


def _softmax_values_bwd(dtype, residuals, g):
  probs, v = residuals
  d_v = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(dtype), g, preferred_element_type=jnp.float32).astype(v.dtype)
  d_probs = jnp.einsum("bkgtd,bksd->bkgts", g, v, preferred_element_type=jnp.float32)
  d_scores = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True))
  return d_scores, d_v


softmax_values.defvjp(_softmax_values_fwd, _softmax_values_bwd)


def _dot_product(q, k, v, allowed, scale):
  """jax.nn.dot_product_attention with the mask spelled out (left padding, causal, window): XLA's fused
  attention; cuDNN's flash attention on GPU for 16-bit inputs."""
  cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  return jax.nn.dot_product_attention(
      q, k, v, mask=allowed[:, None], scale=scale, implementation="cudnn" if cudnn else None
  ).astype(q.dtype)


def _splash(q, k, v, kv_mask, window, scale, *, interpret: bool = False, mesh=None, rules=None):
  """Pallas splash attention (TPU): causal (+ local window) block-sparse mask, left padding as segment ids
  (padding tokens form their own segment, so real rows see exactly the tokens the XLA path lets them see;
  padding rows differ, and nothing reads them). Uncached calls only (query slot i == key slot i); the
  sequence length must be a multiple of 128 (the kernel's lane width). KV heads are repeated per query head.
  `interpret`: run the kernel in Pallas' interpreter (any backend; slow, for checks). Under a mesh (given,
  or set with jax.set_mesh) the kernel runs per device with `shard_map`, the batch split like the
  activations' "batch" axis and the heads gathered on each device."""
  if jax.default_backend() != "tpu" and not interpret:
    raise ValueError(
        f"attention='splash' needs a TPU (the Pallas splash-attention kernel); this backend is "
        f"{jax.default_backend()!r}: use 'xla' or 'dot_product'"
    )
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  t, n = q.shape[1], q.shape[2]
  if window is not None and not isinstance(window, int):
    raise ValueError("attention='splash' needs static windows: build the model with scan_layers=False")
  if t % 128:
    raise ValueError(f"attention='splash' needs a sequence length that is a multiple of 128, got {t}")
  block = next(size for size in (512, 256, 128) if t % size == 0)
  mask = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), offset=0)
  fields = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
  sizes = sk.BlockSizes(**{f"block_{f}": block for f in fields})
  mha = sk.make_splash_mha(
      sm.MultiHeadMask([mask] * n), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
  seg = sk.SegmentIds(q=kv_mask.astype(jnp.int32), kv=kv_mask.astype(jnp.int32))
  groups = n // k.shape[2]
  # [B, T, N, D] -> [B, N, T, D]; the kernel takes pre-scaled queries and one KV head per query head.
  qh = (q * scale).transpose(0, 2, 1, 3)
  kh = jnp.repeat(k.transpose(0, 2, 1, 3), groups, axis=1)
  vh = jnp.repeat(v.transpose(0, 2, 1, 3), groups, axis=1)
  run = jax.vmap(mha)
  mesh = shd._current_mesh(mesh)
  if mesh is not None and math.prod(mesh.shape.values()) > 1:
    batch = shd.logical_to_spec(("batch",), (q.shape[0],), mesh, rules)[0]
    spec = jax.sharding.PartitionSpec(batch)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=spec, check_vma=False)
  out = run(qh, kh, vh, seg)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), act = silu (SwiGLU) or tanh-approximated gelu (Gemma)."""

  def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, mesh, rules, rngs: nnx.Rngs):
    h, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Dense((h,), (m,), ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
    self.up = Dense((h,), (m,), ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
    self.down = Dense((m,), (h,), ("mlp", "embed"), bias=cfg.mlp_bias, **kw)
    self.act = cfg.hidden_act  # a string: static attributes must hash equal across instances (jit cache)
    self.mesh, self.rules = mesh, rules

  def __call__(self, x):
    gate, up = _project(x, self.gate, self.up)
    hidden = gated_activation(gate, up, self.act)
    hidden = shd.constrain(hidden, ("batch", "length", "mlp"), self.mesh, self.rules)
    return self.down(hidden)


def _activation(x, act: str):
  return jax.nn.silu(x) if act == "silu" else jax.nn.gelu(x, approximate=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_activation(gate: jax.Array, up: jax.Array, act: str) -> jax.Array:
  """act(gate) * up, whose backward keeps only gate and up and recomputes the activation (autodiff of the
  expression keeps act's intermediates too: three more [B, T, intermediate] arrays per layer under scan)."""
  return _activation(gate, act) * up


def _gated_activation_fwd(gate, up, act):
  return gated_activation(gate, up, act), (gate, up)


def _gated_activation_bwd(act, residuals, g):
  _, vjp = jax.vjp(lambda a, b: _activation(a, act) * b, *residuals)
  return vjp(g)


gated_activation.defvjp(_gated_activation_fwd, _gated_activation_bwd)


class DecoderLayer(nnx.Module):
  """One block. `layer` None: a layer of a stack, whose window and RoPE choice arrive per call."""

  def __init__(
      self, cfg: ModelConfig, layer: int | None, *, dtype, param_dtype, mesh, rules, rngs: nnx.Rngs, attention="xla"
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, names=("embed",), offset=cfg.norm_offset, **kw)
    self.attn_norm = norm()
    self.attn = Attention(cfg, layer, mesh=mesh, rules=rules, attention=attention, **kw)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, mesh=mesh, rules=rules, **kw)
    # Gemma's "sandwich": the attention and MLP outputs are normed too, before the residual add.
    self.attn_out_norm = norm() if cfg.sandwich_norm else None
    self.mlp_out_norm = norm() if cfg.sandwich_norm else None
    self.local_rope = layer is not None and cfg.has_local_rope and cfg.window(layer) is not None
    self.mesh, self.rules = mesh, rules

  def __call__(self, x, rope_tables, q_slots, kv_mask, layer_cache, cache_index, window=None, local=None):
    """`window` / `local` (traced, stacked layers only): this layer's window and whether it uses the local
    RoPE tables."""
    if local is not None:
      (cos_g, sin_g), (cos_l, sin_l) = rope_tables
      cos, sin = jnp.where(local, cos_l, cos_g), jnp.where(local, sin_l, sin_g)
    else:
      cos, sin = rope_tables[1 if self.local_rope else 0]
    h, layer_cache = self.attn(self.attn_norm(x), cos, sin, q_slots, kv_mask, layer_cache, cache_index, window)
    x = x + (h if self.attn_out_norm is None else self.attn_out_norm(h))
    h = self.mlp(self.mlp_norm(x))
    x = x + (h if self.mlp_out_norm is None else self.mlp_out_norm(h))
    return shd.constrain(x, ("batch", "length", "act_embed"), self.mesh, self.rules), layer_cache


def call_layer(layer: nnx.Module, remat, *args):
  """layer(*args), checkpointed under `remat` (a `remat_policy` setting). Functional (split, jax.checkpoint,
  merge): nnx.remat writes the layer back after the call, which fails when the step runs it inside a
  lax.scan (gradient accumulation) — "Cannot mutate Param from a different trace level"."""
  enabled, policy = remat_policy(remat)
  if not enabled:
    return layer(*args)
  graphdef, state = nnx.split(layer)
  return jax.checkpoint(functools.partial(_merged_call, graphdef), policy=policy)(state, *args)


def _merged_call(graphdef, state, *args):
  return nnx.merge(graphdef, state)(*args)


def _stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
  """One DecoderLayer whose params are the given layers' params stacked on a leading "layers" axis."""
  graphdef, first = nnx.split(layers[0])
  states = [first] + [nnx.split(layer)[1] for layer in layers[1:]]

  def stack(*vs):
    names = vs[0].get_metadata().get("out_sharding") or (None,) * vs[0].get_value().ndim
    return vs[0].replace(jnp.stack([v.get_value() for v in vs]), out_sharding=("layers", *names))

  return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def head_product(hidden: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
  """hidden [..., H] @ w [H, V] -> [..., V] in `dtype` (None: the compute dtype, w's), accumulated in float32
  (`layers.matmul`; XLA:CPU's bf16 -> bf16 head at a decode step's shape is 14x slower).

  Through `matmul`'s backward dW is hidden^T [H, N] @ dlogits [N, V]: both operands in the layout a GEMM
  reads directly. Left to autodiff, XLA:CPU computes the tied embedding's gradient as dlogits^T @ hidden and
  fuses the whole loss backward into a [V, N] transpose of dlogits: strided reads of every [N, V] operand
  (0.37 s of a 1.4 s step at V = 32,768)."""
  flat = hidden.reshape(-1, hidden.shape[-1]).astype(w.dtype)
  return matmul(flat, w, dtype).reshape(*hidden.shape[:-1], w.shape[-1])


def apply_head(hidden: jax.Array, w: jax.Array, cap: float | None, vocab_size: int | None = None, *, dtype=None):
  """The LM head as `CausalLM.head` returns it, (weight [H, V'], softcap), on hidden states [..., H]:
  softcapped logits [..., V] cut to vocab_size. `dtype` as in `head_product`."""
  logits = softcap(head_product(hidden, w, dtype), cap)
  return logits if vocab_size is None else logits[..., :vocab_size]


class CausalLM(nnx.Module):
  """Decoder-only LM.

  `remat`: per-layer activation checkpointing, see `remat_policy` ("none", "full", "dots", a bool or a
  `jax.checkpoint_policies` name). `scan_layers`: stacked layer params run under `lax.scan` (see the module
  docstring). `attention`: "xla", "dot_product" or "splash" (see Attention). `mesh` (optional, static) is
  used for activation sharding constraints; without it the constraints follow a mesh set with
  `jax.set_mesh`, or are skipped.
  """

  def __init__(
      self,
      config: ModelConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
      remat: bool | str = False,
      mesh: Mesh | None = None,
      rules=None,
      scan_layers: bool = False,
      attention: str = "xla",
  ):
    if attention not in ATTENTION_KINDS:
      raise ValueError(f"attention={attention!r} is invalid: one of {ATTENTION_KINDS}")
    remat_policy(remat)  # validates
    if scan_layers and attention == "splash" and config.sliding_window is not None:
      raise ValueError(
          "attention='splash' takes static per-layer windows: with a sliding window use scan_layers=False "
          "or attention='xla'/'dot_product'"
      )
    self.config = config
    self.dtype, self.param_dtype = dtype, param_dtype
    self.remat, self.mesh, self.scan_layers, self.attention = remat, mesh, bool(scan_layers), attention
    self.rules = shd.DEFAULT_RULES if rules is None else tuple(tuple(r) for r in rules)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = Embed(config.vocab_size, config.hidden_size, **kw)
    # Built in the same order either way, so one seed gives the same weights in both layouts.
    layers = [
        DecoderLayer(config, None if scan_layers else i, mesh=mesh, rules=self.rules, attention=attention, **kw)
        for i in range(config.num_hidden_layers)
    ]
    self.layers = _stack_layers(layers) if scan_layers else nnx.List(layers)
    self.final_norm = RMSNorm(
        config.hidden_size, config.rms_norm_eps, names=("embed",), offset=config.norm_offset, **kw
    )
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Dict(
          kernel=param(  # [H, V], like a Dense kernel
              rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype, "normal"
          )
      )

  def lm_head_weight(self, vocab_size: int | None = None) -> jax.Array:
    """[H, V] in the compute dtype: logits = hidden_states @ lm_head_weight() (then softcap if set).

    With `vocab_size` (the tokenizer's size; callers then use only logits[..., :vocab_size]) the head may
    come back cut to its first vocab_size columns, so the product skips logits nobody reads. It is cut
    only when that drops at least 1/8 of the columns: the cut is a copy of the kept columns, which costs
    more than it saves when the embedding is barely padded (e.g. Qwen2.5's 151,936 rows for 151,665 tokens).
    Callers slice the logits to vocab_size either way.
    """
    if self.lm_head is None:
      w = self.embed.embedding[...]
      if vocab_size is not None and vocab_size <= w.shape[0] * 7 // 8:
        w = w[:vocab_size]
      w = w.T
    else:
      w = self.lm_head["kernel"][...]
      if vocab_size is not None and vocab_size <= w.shape[1] * 7 // 8:
        w = w[:, :vocab_size]
    return w.astype(self.dtype)

  def head(self, vocab_size: int | None = None) -> tuple[jax.Array, float | None]:
    """(weight [H, V'], final-logit softcap or None): the LM head for code that applies it in chunks
    (the fused losses); `logits` is the same head applied at once."""
    return self.lm_head_weight(vocab_size), self.logit_softcap

  @property
  def logit_softcap(self) -> float | None:
    """The final-logit softcap (Gemma 2; None: none): logits = cap * tanh(hidden @ head / cap)."""
    return self.config.final_logit_softcapping or None

  def logits(self, hidden: jax.Array, vocab_size: int | None = None, *, dtype=None) -> jax.Array:
    """LM head + final-logit softcapping on hidden states [..., H] -> [..., V] (V = vocab_size if given).
    `dtype`: the matmul's accumulation/output type (None: the compute dtype)."""
    return apply_head(hidden, *self.head(vocab_size), vocab_size, dtype=dtype)

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> Cache:
    """Zeroed KV cache (compute dtype): per layer {"k", "v"} of [B, max_length, kv_heads, head_dim], or
    with scan_layers one {"k", "v"} of [L, B, max_length, kv_heads, head_dim]."""
    cfg = self.config
    shape = (batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim)
    dtype = dtype or self.dtype
    if self.scan_layers:
      shape = (cfg.num_hidden_layers, *shape)
      return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]

  def _layer_flags(self):
    """Per-layer (window [L] int32 or None, local-RoPE [L] bool or None) for the scanned stack."""
    cfg = self.config
    layers = range(cfg.num_hidden_layers)
    window = local = None
    if cfg.sliding_window is not None:
      window = jnp.asarray([cfg.window(i) or _NO_WINDOW for i in layers], jnp.int32)
    if cfg.has_local_rope:
      local = jnp.asarray([cfg.window(i) is not None for i in layers])
    return window, local

  def _scan(self, x, tables, q_slots, mask, cache, cache_index, policy):
    graphdef, state = nnx.split(self.layers)
    window, local = self._layer_flags()

    def body(x, xs):
      layer_state, layer_window, layer_local, layer_cache = xs
      layer = nnx.merge(graphdef, layer_state)
      return layer(x, tables, q_slots, mask, layer_cache, cache_index, layer_window, layer_local)

    if policy is not False:
      body = jax.checkpoint(body, policy=policy)
    return jax.lax.scan(body, x, (state, window, local, cache))

  def embed_tokens(self, ids: jax.Array) -> jax.Array:
    """Token embeddings [..., H] in the compute dtype, times Gemma's sqrt(hidden) where the family has it."""
    x = self.embed(ids)
    if self.config.embed_scale:  # Gemma: sqrt(hidden), rounded to the weights' dtype like HF
      x = x * jnp.asarray(self.config.hidden_size**0.5, self.param_dtype).astype(self.dtype)
    return x

  def __call__(
      self,
      input_ids,
      attention_mask=None,
      *,
      positions=None,
      cache: Cache | None = None,
      cache_index=None,
      inputs_embeds=None,
  ) -> ModelOutput:
    """input_ids [B, T]. Without cache: attention_mask [B, T] (1 = real token). With cache: the tokens are
    written to slots [cache_index, cache_index+T) and attention_mask is [B, S] over all cache slots.
    positions [B, T] default to (number of real tokens before the slot), i.e. cumsum(mask) - 1.
    inputs_embeds [B, T, H] (optional) replaces `embed_tokens(input_ids)` (a multimodal model's merged
    embeddings); input_ids still give the shapes."""
    # Shape and dtype checks only: under jit they run once, while tracing.
    for name, x in (("input_ids", input_ids), ("positions", positions)):
      if x is not None:
        chex.assert_rank(x, 2, custom_message=f"{name} must be [batch, time] integers")
        chex.assert_type(x, int, custom_message=f"{name} must be [batch, time] integers")
    b, t = input_ids.shape
    if cache is None:
      mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
      if mask.shape != (b, t):
        raise ValueError(f"attention_mask must be [B, T]={(b, t)} without a cache, got {mask.shape}")
      q_slots = jnp.arange(t)
      cache_index = None
    else:
      if cache_index is None:
        raise ValueError("cache_index is required with a cache")
      s = (cache["k"].shape[2]) if self.scan_layers else cache[0]["k"].shape[1]
      if attention_mask is None:
        mask = (jnp.arange(s) < cache_index + t).astype(jnp.int32)[None].repeat(b, 0)
      else:
        mask = attention_mask.astype(jnp.int32)
      if mask.shape != (b, s):
        raise ValueError(f"with a cache, attention_mask must be [B, S]={(b, s)}, got {mask.shape}")
      cache_index = jnp.asarray(cache_index, jnp.int32)
      q_slots = cache_index + jnp.arange(t)
    if positions is None:
      all_pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
      positions = all_pos if cache is None else jax.lax.dynamic_slice_in_dim(all_pos, cache_index, t, axis=1)

    tables = [rope.cos_sin(self.config, positions)]
    if self.config.has_local_rope:  # Gemma 3: sliding layers use their own base
      tables.append(rope.cos_sin(self.config, positions, local=True))
    if inputs_embeds is None:
      x = self.embed_tokens(input_ids)
    else:
      if inputs_embeds.shape != (b, t, self.config.hidden_size):
        raise ValueError(
            f"inputs_embeds must be [B, T, H]={(b, t, self.config.hidden_size)}, got {inputs_embeds.shape}"
        )
      x = inputs_embeds.astype(self.dtype)
    x = shd.constrain(x, ("batch", "length", "act_embed"), self.mesh, self.rules)
    enabled, policy = remat_policy(self.remat)
    if self.scan_layers:
      x, new_cache = self._scan(x, tables, q_slots, mask, cache, cache_index, policy if enabled else False)
    else:
      new_cache = None if cache is None else []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else cache[i]
        x, layer_cache = call_layer(layer, self.remat, x, tables, q_slots, mask, layer_cache, cache_index)
        if cache is not None:
          new_cache.append(layer_cache)

    hidden = self.final_norm(x)
    logits = self.logits(hidden)
    logits = shd.constrain(logits, ("batch", "length", "vocab"), self.mesh, self.rules)
    return ModelOutput(logits=logits, hidden_states=hidden, cache=new_cache)
