"""ModelConfig: the architecture fields the Flax decoder needs, read from a HuggingFace config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
_GEMMA = ("gemma2", "gemma3_text")
MULTIMODAL_MODEL_TYPES = ("internvl",)  # vision-language checkpoints whose text_config is one of the above


def text_config_dict(d: dict) -> dict:
  """The language model's config dict of a multimodal config.json (its "text_config"), with the head tying
  transformers applies: the top-level tie_word_embeddings (default True) decides, not the text config's."""
  text = dict(d.get("text_config") or {})
  text.setdefault("model_type", "qwen2")
  text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", True))
  return text


def _hashable(x):
  if isinstance(x, list):
    return tuple(_hashable(v) for v in x)
  if isinstance(x, dict):
    return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
  return x


def _plain(x):
  return [_plain(v) for v in x] if isinstance(x, tuple) else x


def _split_rope(rope: dict | None, default_theta: float) -> tuple[float, tuple | None]:
  """(theta, scaling) from an HF rope dict; scaling None for plain RoPE."""
  rope = dict(rope or {})
  if "type" in rope and "rope_type" not in rope:  # old spelling
    rope["rope_type"] = rope.pop("type")
  theta = float(rope.pop("rope_theta", None) or default_theta)
  rope.setdefault("rope_type", "default")
  if rope["rope_type"] not in _ROPE_TYPES:
    raise ValueError(f"unsupported rope type {rope['rope_type']!r}; supported: {', '.join(_ROPE_TYPES)}")
  return theta, (None if rope["rope_type"] == "default" else _hashable(rope))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Frozen (hashable, so usable as a static jit argument) decoder-only LM architecture.

  `rope_scaling` is stored as sorted (key, value) pairs (None: plain RoPE); `local_rope_*` override it on
  sliding-window layers (Gemma 3). `eos_token_id` is an int, a tuple of ints (HF lists become tuples), or
  None. `layer_types[i]` is "full_attention" or "sliding_attention".
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  local_rope_theta: float | None = None
  local_rope_scaling: tuple | None = None
  max_position_embeddings: int = 2048
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()
  hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (Gemma)
  tie_word_embeddings: bool = False
  # Gemma: RMSNorm scales by (1 + w); embeddings times sqrt(hidden); norms after attention and MLP too.
  norm_offset: bool = False
  embed_scale: bool = False
  sandwich_norm: bool = False
  query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim ** -0.5)
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  bos_token_id: Any = None
  eos_token_id: Any = None
  pad_token_id: int | None = None
  # The config.json this came from (JSON text), so export writes back every field we do not model.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple of "
          f"num_key_value_heads={self.num_key_value_heads}"
      )
    if not self.layer_types:
      object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
    if len(self.layer_types) != self.num_hidden_layers:
      raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")

  def window(self, layer: int) -> int | None:
    """The sliding window of layer `layer` (None: full attention)."""
    return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

  def rope(self, local: bool = False) -> tuple[float, dict]:
    """(theta, scaling dict) of the global (or, with local=True, sliding-window) layers."""
    if local and self.local_rope_theta is not None:
      return self.local_rope_theta, dict(self.local_rope_scaling or ())
    return self.rope_theta, dict(self.rope_scaling or ())

  @property
  def has_local_rope(self) -> bool:
    return self.local_rope_theta is not None and "sliding_attention" in self.layer_types

  @classmethod
  def from_hf_dict(cls, d: dict) -> "ModelConfig":
    """Reads transformers v4 (rope_theta + rope_scaling) and v5 (rope_parameters) style configs. A multimodal
    config (MULTIMODAL_MODEL_TYPES) gives its language model's config (`text_config_dict`)."""
    if d.get("model_type") in MULTIMODAL_MODEL_TYPES:
      d = text_config_dict(d)
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
    act = "silu" if act == "swish" else act
    if act not in ("silu", "gelu_pytorch_tanh"):
      raise ValueError(f"unsupported activation {act!r} (silu or gelu_pytorch_tanh)")
    if d.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention is not supported (decoder-only causal LMs)")
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    layers = d["num_hidden_layers"]
    gemma = model_type in _GEMMA

    rope = d.get("rope_parameters") or d.get("rope_scaling")
    local_theta = local_scaling = None
    if model_type == "gemma3_text":
      if rope and "full_attention" in rope:  # v5: one rope dict per layer type
        theta, scaling = _split_rope(rope["full_attention"], 1e6)
        local_theta, local_scaling = _split_rope(rope.get("sliding_attention"), 1e4)
      else:  # v4: rope_theta (+ rope_scaling) global, rope_local_base_freq local
        theta, scaling = _split_rope(rope, d.get("rope_theta", 1e6))
        local_theta, local_scaling = float(d.get("rope_local_base_freq", 1e4)), None
    else:
      theta, scaling = _split_rope(rope, d.get("rope_theta", 10000.0))

    # Sliding window: Mistral applies it to every layer when set; Qwen2/3 only with use_sliding_window, to
    # the layers listed in layer_types (v5) or the layers >= max_window_layers (v4); Gemma alternates
    # (every `sliding_window_pattern`-th layer is global: 2 for Gemma 2, 6 for Gemma 3).
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
      window = None
    layer_types = d.get("layer_types")
    if window is None:
      layer_types = ("full_attention",) * layers
    elif not layer_types:
      if model_type == "mistral":
        layer_types = ("sliding_attention",) * layers
      elif gemma:
        every = 2 if model_type == "gemma2" else d.get("sliding_window_pattern", 6)
        layer_types = tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers))
      else:
        first = d.get("max_window_layers", layers)
        layer_types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))

    attention_bias = bool(d.get("attention_bias", False))
    return cls(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        sliding_window=window,
        layer_types=tuple(layer_types),
        hidden_act=act,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        norm_offset=gemma,
        embed_scale=gemma,
        sandwich_norm=gemma,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
        attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcapping=d.get("final_logit_softcapping"),
        bos_token_id=_hashable(d.get("bos_token_id")),
        eos_token_id=_hashable(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        hf_config_json=json.dumps(d, sort_keys=True),
    )

  @classmethod
  def from_hf_config(cls, path: str) -> "ModelConfig":
    """From a directory holding config.json, or the config.json file itself."""
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path) as f:
      try:
        d = json.load(f)
      except ValueError as e:  # truncated or garbage: say which file, not just where the JSON broke
        raise ValueError(f"{path} is not valid JSON ({e}): the model's config.json is corrupt or truncated") from e
    if not isinstance(d, dict):
      raise ValueError(f"{path} holds a JSON {type(d).__name__}, not the model config's object")
    return cls.from_hf_dict(d)

  def to_hf_dict(self) -> dict:
    """The HF config.json content: the original dict with our fields written over it."""
    d = json.loads(self.hf_config_json)
    d.update(
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
        architectures=[_ARCHITECTURES[self.model_type]],
        final_logit_softcapping=self.final_logit_softcapping,
    )
    d["hidden_activation" if self.model_type in _GEMMA else "hidden_act"] = self.hidden_act
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      d[key] = _plain(getattr(self, key))
    self._write_rope(d)
    if self.model_type != "qwen2":
      d["attention_bias"] = self.o_bias
    if self.model_type == "llama":
      d["mlp_bias"] = self.mlp_bias
    if self.model_type in _GEMMA:
      d.update(query_pre_attn_scalar=self.query_pre_attn_scalar, attn_logit_softcapping=self.attn_logit_softcapping)
    if self.sliding_window is not None:
      d["sliding_window"] = self.sliding_window
      if self.model_type == "mistral":  # window on every layer; layer_types would make HF pick Ministral
        d.pop("layer_types", None)
      else:
        d["layer_types"] = list(self.layer_types)
    elif self.model_type == "mistral":
      d["sliding_window"] = None
    if self.model_type in ("qwen2", "qwen3"):
      d["use_sliding_window"] = self.sliding_window is not None
    return d

  def _write_rope(self, d: dict) -> None:
    def as_dict(theta, scaling):
      return {"rope_type": "default", **{k: _plain(v) for k, v in (scaling or ())}, "rope_theta": theta}

    full = as_dict(self.rope_theta, self.rope_scaling)
    v5 = "rope_parameters" in d or "rope_theta" not in d  # keep the source's style
    if self.model_type == "gemma3_text":
      local = as_dict(*self.rope(local=True)) if self.local_rope_theta is not None else full
      if v5:
        d["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
      else:
        d.update(rope_theta=self.rope_theta, rope_local_base_freq=local["rope_theta"])
        d["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"} if self.rope_scaling else None
    elif v5:
      d["rope_parameters"] = full
    else:
      d["rope_theta"] = self.rope_theta
      d["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"} if self.rope_scaling else None
