"""ModelConfig: the architecture fields the Flax decoder needs, read from a HuggingFace config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _hashable(x):
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    return x


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Frozen (hashable, so usable as a static jit argument) decoder-only LM architecture.

    `rope_scaling` is stored as sorted (key, value) pairs; `rope_parameters` gives it back as a dict.
    `eos_token_id` is an int, a tuple of ints (HF lists become tuples), or None.
    `layer_types[i]` is "full_attention" or "sliding_attention".
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
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    final_logit_softcapping: float | None = None
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: int | None = None
    # The config.json this came from (JSON text), so export writes back every field we do not model.
    hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_hidden_layers} layers")

    @property
    def rope_parameters(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        return self.rope_parameters.get("rope_type", "default")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: full attention)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Reads transformers v4 (rope_theta + rope_scaling) and v5 (rope_parameters) style configs."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (only silu)")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        layers = d["num_hidden_layers"]

        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:  # old spelling
            rope["rope_type"] = rope.pop("type")
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", "default")
        if rope["rope_type"] not in ("default", "linear", "dynamic", "llama3", "yarn"):
            raise ValueError(f"unsupported rope type {rope['rope_type']!r}")
        if rope["rope_type"] == "default":
            rope = {}

        # Sliding window: Mistral applies it to every layer when set; Qwen2/3 only with use_sliding_window,
        # to the layers listed in layer_types (v5) or the layers >= max_window_layers (v4).
        window = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            window = None
        layer_types = d.get("layer_types")
        if window is None:
            layer_types = ("full_attention",) * layers
        elif not layer_types:
            if model_type == "mistral":
                layer_types = ("sliding_attention",) * layers
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
            rope_theta=float(rope_theta),
            rope_scaling=_hashable(rope) or None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            layer_types=tuple(layer_types),
            hidden_act="silu",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
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
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """The HF config.json content: the original dict with our fields written over it."""
        d = json.loads(self.hf_config_json)
        d.update(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
                 max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
                 architectures=[_ARCHITECTURES[self.model_type]])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            d[key] = list(value) if isinstance(value, tuple) else value
        rope = {"rope_type": "default", **{k: list(v) if isinstance(v, tuple) else v
                                           for k, v in self.rope_parameters.items()}}
        if "rope_parameters" in d or "rope_theta" not in d:  # keep the source's style (v5 or v4)
            d["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        else:
            d["rope_theta"] = self.rope_theta
            d["rope_scaling"] = rope if self.rope_scaling else None
        if self.model_type in ("llama", "qwen3"):
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.model_type == "mistral":  # window on every layer; layer_types would make HF pick Ministral
                d.pop("layer_types", None)
            else:
                d["layer_types"] = list(self.layer_types)
            if self.model_type in ("qwen2", "qwen3"):
                d["use_sliding_window"] = True
        elif self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = False
        elif self.model_type == "mistral":
            d["sliding_window"] = None
        return d


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
