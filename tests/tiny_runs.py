"""Shared by the tests that train tiny models: a one-layer Qwen2 config over the arithmetic task's tokenizer,
and a config file for the CLI whose fields come as JSON."""

import transformers

CONFIG_FILE = """
import json
from gkd_jax import config as config_lib

def get_config(arg=None):
  c = config_lib.base_config()
  c.job = "train"
  c.update(json.loads({overrides!r}))
  return c
"""


def qwen2_config(tok, hidden: int, vocab_size: int, tied: bool) -> transformers.Qwen2Config:
  """One decoder layer, 4 query / 2 KV heads, `hidden` wide, over `vocab_size` rows (≥ len(tok))."""
  return transformers.Qwen2Config(
      vocab_size=vocab_size,
      hidden_size=hidden,
      intermediate_size=2 * hidden,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
      tie_word_embeddings=tied,
  )
