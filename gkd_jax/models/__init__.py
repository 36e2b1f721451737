"""Flax NNX decoder-only LMs (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3) with HuggingFace safetensors import/export.

model = from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype=jnp.bfloat16, mesh=mesh)
out = model(input_ids, attention_mask=mask)   # out.logits [B, T, V], out.hidden_states [B, T, H]
cache = model.init_cache(batch, max_len); out = model(ids, mask_S, positions=pos, cache=cache, cache_index=i)

Vision-language (InternVL "-hf" checkpoints): from_pretrained returns an InternVL, called with pixel_values too:
out = model(input_ids, attention_mask=mask, pixel_values=pixels)   # pixels [B, tiles, 3, S, S]
"""

from gkd_jax.models.config import MULTIMODAL_MODEL_TYPES, SUPPORTED_MODEL_TYPES, ModelConfig
from gkd_jax.models.hf_io import (
    build_model,
    checkpoint_dir,
    config_from_hf_dict,
    export_tensors,
    from_pretrained,
    load_config,
    load_tokenizer,
    load_vl_config,
    model_options,
    save_pretrained,
)
from gkd_jax.models.internvl import InternVL, InternVLConfig, check_image_tokens
from gkd_jax.models.transformer import CausalLM, ModelOutput
from gkd_jax.models.vision import VisionConfig, VisionTower

__all__ = [
    "build_model",
    "CausalLM",
    "InternVL",
    "InternVLConfig",
    "MULTIMODAL_MODEL_TYPES",
    "ModelConfig",
    "ModelOutput",
    "SUPPORTED_MODEL_TYPES",
    "VisionConfig",
    "VisionTower",
    "check_image_tokens",
    "checkpoint_dir",
    "config_from_hf_dict",
    "export_tensors",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "load_vl_config",
    "model_options",
    "save_pretrained",
]
