"""Flax NNX decoder-only LMs (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3) with HuggingFace safetensors import/export.

model = from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", dtype=jnp.bfloat16, mesh=mesh)
out = model(input_ids, attention_mask=mask)   # out.logits [B, T, V], out.hidden_states [B, T, H]
cache = model.init_cache(batch, max_len); out = model(ids, mask_S, positions=pos, cache=cache, cache_index=i)
"""

from gkd_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from gkd_jax.models.hf_io import export_tensors, from_pretrained, load_config, load_tokenizer, model_options, save_pretrained
from gkd_jax.models.transformer import CausalLM, ModelOutput

__all__ = [
    "CausalLM",
    "ModelConfig",
    "ModelOutput",
    "SUPPORTED_MODEL_TYPES",
    "export_tensors",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "model_options",
    "save_pretrained",
]
