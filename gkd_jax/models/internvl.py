"""InternVL (vision-language): InternViT tower -> pixel shuffle -> MLP projector -> the CausalLM decoder.

Only transformers' native "-hf" checkpoint layout (`InternVLForConditionalGeneration`, model_type "internvl",
as in OpenGVLab/InternVL3-2B-hf) is read and written; the original remote-code layout is not.

    model = from_pretrained("OpenGVLab/InternVL3-2B-hf", dtype=jnp.bfloat16)
    out = model(input_ids, attention_mask, pixel_values=pixels)   # pixels [B, P, 3, S, S]

Each image token (`input_ids == image_token_id`) takes one image feature: the k-th image token of row b gets
row b's k-th feature, i.e. row b's tiles in order, `image_seq_length` features each. Rows may hold different
numbers of tiles: P is the batch's largest (padded) count, padding tiles are all-zero images whose features no
token reads. Inside jit a row with more image tokens than P * image_seq_length silently reads its last feature
again, and one with fewer leaves its remaining features unread: check batches on the host with
`check_image_tokens` (eager calls check it themselves). Without pixel_values the model is the plain LM (the
sampler's decode steps).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax import sharding as shd
from gkd_jax.models.config import ModelConfig, text_config_dict
from gkd_jax.models.layers import Dense, LayerNorm
from gkd_jax.models.transformer import CausalLM, ModelOutput
from gkd_jax.models.vision import VisionConfig, VisionTower, activation

SELECT_STRATEGIES = ("default",)


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  """Frozen (hashable) InternVL architecture: the tower's and the LM's configs plus how they are joined."""

  vision: VisionConfig
  text: ModelConfig
  image_token_id: int
  image_seq_length: int = 256
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  vision_feature_layer: int = -1
  vision_feature_select_strategy: str = "default"
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if not isinstance(self.vision_feature_layer, int):
      raise ValueError(f"vision_feature_layer={self.vision_feature_layer!r}: only a single layer index is supported")
    layers = self.vision.num_hidden_layers
    if not -(layers + 1) <= self.vision_feature_layer <= layers:
      raise ValueError(f"vision_feature_layer={self.vision_feature_layer} is out of range for {layers} vision layers")
    if self.vision_feature_select_strategy != "default":
      # "full" keeps the CLS token: 1 + g*g features cannot be laid out on the g x g grid that pixel shuffle
      # needs (transformers' reshape fails or scrambles features the same way).
      raise ValueError(
          f"vision_feature_select_strategy={self.vision_feature_select_strategy!r} is not supported: only "
          f"'default' (drop CLS) works with InternVL's pixel shuffle, which needs a square grid of patches"
      )
    scale = round(1 / self.downsample_ratio)
    if abs(scale * self.downsample_ratio - 1) > 1e-6 or self.vision.grid % scale:
      raise ValueError(
          f"downsample_ratio={self.downsample_ratio} must be 1/k for an integer k dividing the {self.vision.grid} "
          f"patches per side"
      )
    if self.image_seq_length != (self.vision.grid // scale) ** 2:
      raise ValueError(
          f"image_seq_length={self.image_seq_length}, but a tile gives ({self.vision.grid} // {scale})^2 = "
          f"{(self.vision.grid // scale) ** 2} features (image_size / patch_size * downsample_ratio, squared)"
      )
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id={self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")
    activation(jnp.zeros(()), self.projector_hidden_act)

  @property
  def shuffle_scale(self) -> int:
    """Pixel shuffle's factor: scale x scale patches merge into one feature."""
    return round(1 / self.downsample_ratio)

  @classmethod
  def from_hf_dict(cls, d: dict) -> "InternVLConfig":
    if d.get("model_type") != "internvl":
      raise ValueError(f"model_type={d.get('model_type')!r} is not an InternVL config ('internvl')")
    return cls(
        vision=VisionConfig.from_hf_dict(d.get("vision_config") or {}),
        text=ModelConfig.from_hf_dict(text_config_dict(d)),
        image_token_id=d.get("image_token_id", 151667),
        image_seq_length=d.get("image_seq_length", 256),
        downsample_ratio=d.get("downsample_ratio", 0.5),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        vision_feature_layer=d.get("vision_feature_layer", -1),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        hf_config_json=json.dumps(d, sort_keys=True),
    )

  def to_hf_dict(self) -> dict:
    d = json.loads(self.hf_config_json)
    text = self.text.to_hf_dict()
    text.pop("architectures", None)
    d.update(
        model_type="internvl",
        architectures=["InternVLForConditionalGeneration"],
        vision_config=self.vision.to_hf_dict(),
        text_config=text,
        tie_word_embeddings=self.text.tie_word_embeddings,
        image_token_id=self.image_token_id,
        image_seq_length=self.image_seq_length,
        downsample_ratio=self.downsample_ratio,
        projector_hidden_act=self.projector_hidden_act,
        vision_feature_layer=self.vision_feature_layer,
        vision_feature_select_strategy=self.vision_feature_select_strategy,
    )
    return d


def check_image_tokens(input_ids, num_tiles, image_seq_length: int, image_token_id: int) -> None:
  """Host-side check that row b holds exactly num_tiles[b] * image_seq_length image tokens; raises a
  ValueError naming the first row that does not (its image features would be misplaced)."""
  ids = np.asarray(input_ids)
  counts = (ids == image_token_id).sum(-1)
  expected = np.asarray(num_tiles).reshape(-1) * image_seq_length
  if counts.shape != expected.shape:
    raise ValueError(f"num_tiles has {expected.size} rows, input_ids {counts.size}")
  for row in np.nonzero(counts != expected)[0]:
    raise ValueError(
        f"row {row} holds {counts[row]} image tokens (id {image_token_id}) but its {expected[row] // image_seq_length} tile(s) "
        f"give {expected[row]} image features ({image_seq_length} per tile): each tile needs exactly "
        f"image_seq_length tokens"
    )


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """transformers' InternVLModel.pixel_shuffle: [N, g, g, D] -> [N, g/s, g/s, D*s*s] (same element order)."""
  n, g, _, d = x.shape
  x = x.reshape(n, g, g // scale, d * scale).transpose(0, 2, 1, 3)
  x = x.reshape(n, g // scale, g // scale, d * scale * scale)
  return x.transpose(0, 2, 1, 3)


class Projector(nnx.Module):
  """LayerNorm (eps 1e-5, torch's default) -> Linear -> act -> Linear, vision features -> text hidden size.
  `frozen`: its weights pass no gradient (gradients still flow through it to the tower)."""

  def __init__(self, cfg: InternVLConfig, *, dtype, param_dtype, rngs: nnx.Rngs, mesh=None, rules=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mesh, self.rules = mesh, rules
    d = cfg.vision.hidden_size * cfg.shuffle_scale**2
    h = cfg.text.hidden_size
    self.norm = LayerNorm(d, 1e-5, names=("mlp",), **kw)
    self.linear_1 = Dense((d,), (h,), ("mlp", "embed"), bias=True, **kw)
    self.linear_2 = Dense((h,), (h,), ("mlp", "embed"), bias=True, **kw)
    self.act = cfg.projector_hidden_act

  def __call__(self, x, frozen: bool = False):
    if frozen:
      graphdef, state = nnx.split(self)
      return nnx.merge(graphdef, jax.lax.stop_gradient(state))(x)
    # Activations pinned to batch sharding (hidden dim replicated): left to itself XLA's SPMD partitioner
    # mixed up batch rows between linear_1 and linear_2 on a (2, 2, 2) mesh.
    c = lambda a: shd.constrain(a, ("batch", "length", "act_embed"), self.mesh, self.rules)
    h = c(activation(self.linear_1(self.norm(c(x))), self.act))
    return c(self.linear_2(h))


class InternVL(nnx.Module):
  """Vision tower + projector + `CausalLM`, with the CausalLM's call / cache / head contract.

  `config` is the language model's ModelConfig (what every LM-side caller reads); `vl_config` the
  InternVLConfig. `train_vision_tower` / `train_projector` (static, default False): a part that is not
  trained is behind a stop_gradient (no backward pass runs through a frozen tower). `remat`, `scan_layers`,
  `attention`, `mesh` and `rules` configure the LM as in CausalLM; `remat` also checkpoints the tower's layers.
  """

  def __init__(
      self,
      config: InternVLConfig,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
      remat: bool | str = False,
      mesh=None,
      rules=None,
      scan_layers: bool = False,
      attention: str = "xla",
      train_vision_tower: bool = False,
      train_projector: bool = False,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.vl_config = config
    self.config = config.text
    self.vision_tower = VisionTower(config.vision, remat=remat, mesh=mesh, rules=rules, **kw)
    self.projector = Projector(config, mesh=mesh, rules=rules, **kw)
    self.language_model = CausalLM(
        config.text, remat=remat, mesh=mesh, rules=rules, scan_layers=scan_layers, attention=attention, **kw
    )
    self.train_vision_tower, self.train_projector = bool(train_vision_tower), bool(train_projector)

  # The LM's attributes and head, as CausalLM callers (sampler, train step, fused losses) use them.
  @property
  def dtype(self):
    return self.language_model.dtype

  @property
  def param_dtype(self):
    return self.language_model.param_dtype

  @property
  def scan_layers(self):
    return self.language_model.scan_layers

  @property
  def mesh(self):
    return self.language_model.mesh

  @property
  def rules(self):
    return self.language_model.rules

  @property
  def logit_softcap(self):
    return self.language_model.logit_softcap

  def head(self, vocab_size=None):
    return self.language_model.head(vocab_size)

  def logits(self, hidden, vocab_size=None, *, dtype=None):
    return self.language_model.logits(hidden, vocab_size, dtype=dtype)

  def lm_head_weight(self, vocab_size=None):
    return self.language_model.lm_head_weight(vocab_size)

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    return self.language_model.init_cache(batch_size, max_length, dtype)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values [B, P, C, H, W] -> [B, P * image_seq_length, H_text] in the compute dtype: the tower's
    vision_feature_layer without CLS, pixel-shuffled, projected; tile p's features at [p*S, (p+1)*S)."""
    cfg = self.vl_config
    if pixel_values.ndim != 5:
      raise ValueError(f"pixel_values must be [batch, tiles, channels, height, width], got shape {pixel_values.shape}")
    b, p = pixel_values.shape[:2]
    x = self.vision_tower(pixel_values.reshape(b * p, *pixel_values.shape[2:]), cfg.vision_feature_layer)
    if not self.train_vision_tower:
      x = jax.lax.stop_gradient(x)
    g = cfg.vision.grid
    x = pixel_shuffle(x[:, 1:].reshape(b * p, g, g, -1), cfg.shuffle_scale)
    x = x.reshape(b * p, -1, x.shape[-1])
    if self.train_projector or self.train_vision_tower:
      x = self.projector(x, frozen=not self.train_projector)
    else:  # nothing upstream trains: cut below the projector's output, no backward through it at all
      x = jax.lax.stop_gradient(self.projector(x))
    return x.reshape(b, p * x.shape[1], x.shape[-1])

  def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
    """The LM's input embeddings [B, T, H] with each image token replaced by its image feature."""
    x = self.language_model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    features = shd.constrain(self.image_features(pixel_values), ("batch", "length", "act_embed"), self.mesh, self.rules)
    is_image = input_ids == self.vl_config.image_token_id
    if not isinstance(input_ids, jax.core.Tracer):  # eager: the counts are known, check them
      counts = np.asarray(is_image).sum(-1)
      for row in np.nonzero(counts > features.shape[1])[0]:
        raise ValueError(
            f"row {row} holds {counts[row]} image tokens but pixel_values give at most {features.shape[1]} image "
            f"features per row ({pixel_values.shape[1]} tiles x {self.vl_config.image_seq_length})"
        )
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)  # k-th image token -> feature k
    picked = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], picked.astype(x.dtype), x)

  def __call__(
      self, input_ids, attention_mask=None, *, pixel_values=None, positions=None, cache=None, cache_index=None
  ) -> ModelOutput:
    """As CausalLM.__call__, plus pixel_values [B, P, C, H, W] for the image tokens of input_ids."""
    return self.language_model(
        input_ids,
        attention_mask,
        positions=positions,
        cache=cache,
        cache_index=cache_index,
        inputs_embeds=None if pixel_values is None else self.embed(input_ids, pixel_values),
    )
