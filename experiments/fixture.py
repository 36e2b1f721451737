"""The benchmark fixture: a BPE tokenizer with a chat template, Qwen2-architecture student (12.3M params,
tied embeddings) and teacher (65M, untied), vocab 32768, and chat rows of addition problems.

Built offline and deterministically with torch + transformers + tokenizers (the `test` extra), cached in a
directory so every benchmark reuses one copy:

    python experiments/fixture.py /tmp/gkd_fixture
"""

import argparse
import json
import os
import random

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    "student": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "teacher": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}


def addition_rows(n, seed):
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    question = f"What is {a} plus {b}? Think step by step."
    answer = f"We add {a} and {b}. The ones give {a % 10 + b % 10}. The answer is {a + b}."
    rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
  return rows


def build(out_dir, vocab_size=32768, num_rows=2048):
  """Writes train.jsonl, tokenizer/, student/ and teacher/ under out_dir (skipped when present)."""
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

  done = os.path.join(out_dir, "DONE")
  if os.path.exists(done):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  torch.manual_seed(0)
  rows = addition_rows(num_rows, 0)
  with open(os.path.join(out_dir, "train.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=1024,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator([m["content"] for r in rows for m in r["messages"]], trainer)
  hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  hf_tok.chat_template = CHAT_TEMPLATE
  hf_tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
  for name, kw in SIZES.items():
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        bos_token_id=None,
        **kw,
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(os.path.join(out_dir, name))
    hf_tok.save_pretrained(os.path.join(out_dir, name))
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
  open(done, "w").close()
  return out_dir


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("out_dir")
  ap.add_argument("--vocab", type=int, default=32768)
  args = ap.parse_args()
  build(args.out_dir, args.vocab)
