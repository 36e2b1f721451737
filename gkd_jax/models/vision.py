"""The InternViT image encoder (transformers' `InternVLVisionModel`) in Flax NNX.

pixel_values [N, C, H, W] -> patch embedding (the stride-`patch` convolution as one matmul on the flattened
patches) -> [CLS] + patches + absolute position embeddings -> pre-norm layers (layer_norm or rms_norm,
optional q/k RMSNorm over all heads, GELU MLP, layer scale on both residual branches) -> final LayerNorm
unless `use_mean_pooling`. A module of its own, so another multimodal family can bring its own tower.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from gkd_jax import sharding as shd
from gkd_jax.models.layers import Dense, LayerNorm, RMSNorm, param
from gkd_jax.models.transformer import call_layer, remat_policy

NORM_TYPES = ("layer_norm", "rms_norm")


def activation(x: jax.Array, name: str) -> jax.Array:
  """transformers' ACT2FN for the activations InternVL uses ("gelu" is the exact, erf form)."""
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return jax.nn.gelu(x, approximate=True)
  if name in ("silu", "swish"):
    return jax.nn.silu(x)
  if name == "relu":
    return jax.nn.relu(x)
  raise ValueError(f"unsupported activation {name!r} (gelu, gelu_pytorch_tanh, gelu_new, silu, relu)")


def _square(value, field: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision_config.{field}={list(value)}: only square images / patches are supported")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Frozen (hashable) InternViT architecture, read from transformers' `internvl_vision` config dict."""

  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  image_size: int = 448
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "gelu"
  norm_type: str = "layer_norm"
  layer_norm_eps: float = 1e-6
  attention_bias: bool = False
  use_qk_norm: bool = False
  use_mean_pooling: bool = True
  use_absolute_position_embeddings: bool = True
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"vision_config.hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
          f"{self.num_attention_heads}"
      )
    if self.norm_type not in NORM_TYPES:
      raise ValueError(f"vision_config.norm_type={self.norm_type!r}: one of {NORM_TYPES}")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision_config.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    activation(jnp.zeros(()), self.hidden_act)  # validates the name

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @classmethod
  def from_hf_dict(cls, d: dict) -> "VisionConfig":
    if d.get("model_type", "internvl_vision") != "internvl_vision":
      raise ValueError(f"vision_config.model_type={d.get('model_type')!r}: only internvl_vision is supported")
    return cls(
        hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        image_size=_square(d.get("image_size", 448), "image_size"),
        patch_size=_square(d.get("patch_size", 14), "patch_size"),
        num_channels=d.get("num_channels", 3),
        hidden_act=d.get("hidden_act", "gelu"),
        norm_type=d.get("norm_type", "layer_norm"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6),
        attention_bias=bool(d.get("attention_bias", False)),
        use_qk_norm=bool(d.get("use_qk_norm", False)),
        use_mean_pooling=bool(d.get("use_mean_pooling", True)),
        use_absolute_position_embeddings=bool(d.get("use_absolute_position_embeddings", True)),
        hf_config_json=json.dumps(d, sort_keys=True),
    )

  def to_hf_dict(self) -> dict:
    d = json.loads(self.hf_config_json)
    d.update(
        model_type="internvl_vision",
        hidden_size=self.hidden_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        intermediate_size=self.intermediate_size,
        image_size=[self.image_size] * 2,
        patch_size=[self.patch_size] * 2,
        num_channels=self.num_channels,
        hidden_act=self.hidden_act,
        norm_type=self.norm_type,
        layer_norm_eps=self.layer_norm_eps,
        attention_bias=self.attention_bias,
        use_qk_norm=self.use_qk_norm,
        use_mean_pooling=self.use_mean_pooling,
        use_absolute_position_embeddings=self.use_absolute_position_embeddings,
    )
    return d


def _norm(cfg: VisionConfig, dim: int, names, kw):
  if cfg.norm_type == "rms_norm":
    return RMSNorm(dim, cfg.layer_norm_eps, names=names, **kw)
  return LayerNorm(dim, cfg.layer_norm_eps, names=names, **kw)


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention over [CLS] + patches (no mask: every tile has the same length)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Dense((d,), (n, hd), ("embed", "heads", "head_dim"), bias=cfg.attention_bias, **kw)
    self.k = Dense((d,), (n, hd), ("embed", "heads", "head_dim"), bias=cfg.attention_bias, **kw)
    self.v = Dense((d,), (n, hd), ("embed", "heads", "head_dim"), bias=cfg.attention_bias, **kw)
    self.o = Dense((n, hd), (d,), ("heads", "head_dim", "embed"), bias=True, **kw)
    if cfg.use_qk_norm:  # RMSNorm over all heads at once (eps 1e-6, whatever layer_norm_eps is), as in HF
      self.q_norm = RMSNorm(d, 1e-6, names=("embed",), **kw)
      self.k_norm = RMSNorm(d, 1e-6, names=("embed",), **kw)
    else:
      self.q_norm = self.k_norm = None
    self.scale = hd**-0.5
    self.dtype = dtype

  def __call__(self, x):
    q, k, v = self.q(x), self.k(x), self.v(x)  # [N, S, heads, head_dim]
    if self.q_norm is not None:
      flat = lambda a: a.reshape(*a.shape[:-2], -1)
      q = self.q_norm(flat(q)).reshape(q.shape)
      k = self.k_norm(flat(k)).reshape(k.shape)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * self.scale
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v, preferred_element_type=jnp.float32).astype(self.dtype)
    return self.o(out)


class VisionLayer(nnx.Module):
  """x += lambda_1 * attn(norm(x)); x += lambda_2 * mlp(norm(x))."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, m = cfg.hidden_size, cfg.intermediate_size
    self.attn_norm = _norm(cfg, d, ("embed",), kw)
    self.attn = VisionAttention(cfg, **kw)
    self.mlp_norm = _norm(cfg, d, ("embed",), kw)
    self.fc1 = Dense((d,), (m,), ("embed", "mlp"), bias=True, **kw)
    self.fc2 = Dense((m,), (d,), ("mlp", "embed"), bias=True, **kw)
    self.lambda_1 = param(rngs, (d,), ("embed",), param_dtype, "ones")
    self.lambda_2 = param(rngs, (d,), ("embed",), param_dtype, "ones")
    self.act, self.dtype = cfg.hidden_act, dtype

  def __call__(self, x):
    x = x + self.lambda_1[...].astype(self.dtype) * self.attn(self.attn_norm(x))
    h = self.fc2(activation(self.fc1(self.mlp_norm(x)), self.act))
    return x + self.lambda_2[...].astype(self.dtype) * h


class VisionTower(nnx.Module):
  """InternViT: `tower(pixel_values [N, C, H, W], feature_layer=-1) -> [N, 1 + patches, D]`.

  `feature_layer` follows transformers' `vision_feature_layer`: -1 is the last layer's output after the final
  LayerNorm (`last_hidden_state`); any other index k picks `hidden_states[k]` (0: the embeddings, i: the
  output of layer i; negative from the end of the L + 1 states), un-normed, and the layers after it are not
  run. H and W must equal `image_size` (the position embeddings are not interpolated). `remat` checkpoints
  each layer (the settings of `transformer.remat_policy`).
  """

  def __init__(
      self,
      cfg: VisionConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
      remat: bool | str = False,
      mesh=None,
      rules=None,
  ):
    remat_policy(remat)  # validates
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, c, p = cfg.hidden_size, cfg.num_channels, cfg.patch_size
    self.config = cfg
    self.dtype = dtype
    # The patch convolution's kernel [C, p, p, D] (HF's [D, C, p, p] transposed) applied to flattened patches.
    self.patch_embed = Dense((c, p, p), (d,), (None, None, None, "embed"), bias=True, **kw)
    self.cls_token = param(rngs, (d,), ("embed",), param_dtype, "normal")
    if cfg.use_absolute_position_embeddings:
      self.position_embeddings = param(rngs, (1 + cfg.grid**2, d), ("length", "embed"), param_dtype, "normal")
    else:
      self.position_embeddings = None
    self.layers = nnx.List([VisionLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    self.final_norm = None if cfg.use_mean_pooling else LayerNorm(d, cfg.layer_norm_eps, names=("embed",), **kw)
    self.remat, self.mesh, self.rules = remat, mesh, rules

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config
    n, c, h, w = pixel_values.shape
    if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size):
      raise ValueError(
          f"pixel_values tiles are {(c, h, w)}, the vision tower takes {(cfg.num_channels,) + (cfg.image_size,) * 2}"
      )
    g, p = cfg.grid, cfg.patch_size
    patches = pixel_values.astype(self.dtype).reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    x = self.patch_embed(patches.reshape(n, g * g, c, p, p))  # [N, g*g, D], row-major patches like the conv
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    if self.position_embeddings is not None:
      x = x + self.position_embeddings[...].astype(self.dtype)
    return x

  def __call__(self, pixel_values: jax.Array, feature_layer: int = -1) -> jax.Array:
    num_layers = self.config.num_hidden_layers
    if feature_layer == -1:
      stop = num_layers
    elif -(num_layers + 1) <= feature_layer <= num_layers:
      stop = feature_layer % (num_layers + 1)
    else:
      raise ValueError(f"vision_feature_layer={feature_layer} is out of range for {num_layers} vision layers")
    x = self.embed(pixel_values)
    for i in range(stop):
      x = shd.constrain(
          call_layer(self.layers[i], self.remat, x), ("batch", "length", "act_embed"), self.mesh, self.rules
      )
    if feature_layer == -1 and self.final_norm is not None:
      x = self.final_norm(x)
    return x
