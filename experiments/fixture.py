"""Benchmark fixtures: a BPE tokenizer with a chat template, a Qwen2-architecture student and teacher, and
chat rows of addition problems. Two shapes:

  small   student 12.3M params (tied embeddings), teacher 65M (untied), 32,768 embedding rows; rows of
          one problem (prompts 28-30 tokens, completions 17-20).
  qwen4l  the widths of Qwen2.5-0.5B (student, 896 wide, tied) and Qwen2.5-1.5B (teacher, 1536 wide, tied),
          each cut to 4 layers, with the real 151,936-row embedding; rows of several problems (prompts and
          completions up to 128 tokens each).

The BPE tokenizer learns ~1,024 tokens from the rows. With `tokenizer_size` its vocabulary is padded with
entries no text produces (`<|extra_N|>`) up to that size, so that a model's LM head and loss really run over
that many columns, as with a real checkpoint (Qwen2.5: 151,665 tokens over 151,936 rows; Llama 3: all rows).
Without it the tokenizer covers 1,024 of the rows and gkd_jax cuts its heads to those columns.

Built offline and deterministically with torch + transformers + tokenizers (the `test` extra), cached in a
directory so every benchmark reuses one copy:

    python experiments/fixture.py /tmp/gkd_bench_fixture                                  # small, cut
    python experiments/fixture.py /tmp/gkd_bench_fixture_full --tokenizer-size 32768      # small, full
    python experiments/fixture.py /tmp/gkd_bench_qwen4l --shape qwen4l --tokenizer-size 151665

`--internvl` builds the vision-language pair instead (configs/mllm_internvl.py:runlocal): the shapes picture task
(gkd_jax.tasks.shapes), a BPE tokenizer with InternVL's image tokens, and random InternVL student (0.17M params)
and teacher (1.04M) checkpoints in transformers' layout, each with its image processor's settings:

    python experiments/fixture.py /tmp/gkd_fixture_internvl --internvl
"""

import argparse
import json
import os
import random

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SHAPES = {
    "small": dict(
        vocab_size=32768,
        problems=1,
        examples=0,
        student=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        teacher=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        ),
    ),
    "qwen4l": dict(
        vocab_size=151936,
        problems=7,
        examples=4,
        student=dict(  # Qwen2.5-0.5B's widths
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=4,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        teacher=dict(  # Qwen2.5-1.5B's widths
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=4,
            num_attention_heads=12,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
}
# The small shape's two models (the AOT tool's and its test's fixture).
SIZES = {name: SHAPES["small"][name] for name in ("student", "teacher")}


def addition_rows(n, seed, problems=1, examples=0):
  """Chat rows of `problems` additions each (one question, one step-by-step answer per row), the question
  led by `examples` solved ones."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    pairs = [(rng.randint(10, 999), rng.randint(10, 999)) for _ in range(problems)]
    if problems == 1:
      ((a, b),) = pairs
      question = f"What is {a} plus {b}? Think step by step."
      answer = f"We add {a} and {b}. The ones give {a % 10 + b % 10}. The answer is {a + b}."
    else:
      solved = [(rng.randint(10, 999), rng.randint(10, 999)) for _ in range(examples)]
      question = (
          "".join(f"{a} plus {b} is {a + b}. " for a, b in solved)
          + "Add each pair, step by step: "
          + "; ".join(f"{a} plus {b}" for a, b in pairs)
          + "."
      )
      answer = " ".join(
          f"We add {a} and {b}. The ones give {a % 10 + b % 10}. The answer is {a + b}." for a, b in pairs
      )
    rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
  return rows


def _pad_vocabulary(tok, size):
  """The tokenizer with its BPE vocabulary padded to `size` entries that no text produces."""
  from tokenizers import Tokenizer

  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  ids = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}  # special tokens sit in both
  if ids != set(range(len(ids))):
    raise ValueError("the trained tokenizer's ids are not contiguous")
  if size < len(ids):
    raise ValueError(f"tokenizer_size {size} is below the trained tokenizer's {len(ids)} tokens")
  for i in range(size - len(ids)):
    vocab[f"<|extra_{i}|>"] = len(ids) + i
  return Tokenizer.from_str(json.dumps(spec))


def build(out_dir, shape="small", tokenizer_size=None, num_rows=2048, vocab_size=None):
  """Writes train.jsonl, tokenizer/, student/ and teacher/ under out_dir (skipped when present).
  `vocab_size` overrides the shape's embedding rows (tests use a smaller one)."""
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

  done = os.path.join(out_dir, "DONE")
  if os.path.exists(done):
    return out_dir
  spec = dict(SHAPES[shape])
  spec["vocab_size"] = vocab_size or spec["vocab_size"]
  os.makedirs(out_dir, exist_ok=True)
  torch.manual_seed(0)
  rows = addition_rows(num_rows, 0, spec["problems"], spec["examples"])
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
  if tokenizer_size is not None:
    if tokenizer_size > spec["vocab_size"]:
      raise ValueError(f"tokenizer_size {tokenizer_size} exceeds the {spec['vocab_size']} embedding rows")
    tok = _pad_vocabulary(tok, tokenizer_size)
  hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  hf_tok.chat_template = CHAT_TEMPLATE
  hf_tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
  for name in ("student", "teacher"):
    cfg = Qwen2Config(
        vocab_size=spec["vocab_size"],
        max_position_embeddings=2048,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        bos_token_id=None,
        **spec[name],
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(os.path.join(out_dir, name))
    hf_tok.save_pretrained(os.path.join(out_dir, name))
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, tokenizer {len(hf_tok)}")
  open(done, "w").close()
  return out_dir


# The InternVL pair (vision tower, pixel-shuffle projector, Qwen2 LM): 56-px pictures in 14-px patches give 16
# patches, pixel-shuffled into image_seq_length = 4 tokens per picture (one per 2x2 grid cell of the shapes task).
INTERNVL = dict(
    image_size=56,
    student=dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text=dict(
            hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
    ),
    teacher=dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        text=dict(
            hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        ),
    ),
)
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]


def build_internvl(out_dir, num_train=2048, num_test=256):
  """Writes the shapes task (train.jsonl, test.jsonl, images/), tokenizer/, and random InternVL student/ and
  teacher/ checkpoints in transformers' native layout (with the image processor's preprocessor_config.json)
  under out_dir (skipped when present)."""
  import torch
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  from gkd_jax.tasks import shapes

  done = os.path.join(out_dir, "DONE")
  if os.path.exists(done):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  torch.manual_seed(0)
  shapes.write_dataset(out_dir, train=num_train, test=num_test, seed=0, size=INTERNVL["image_size"])
  with open(os.path.join(out_dir, "train.jsonl")) as f:
    texts = [m["content"].replace("<image>", "") for line in f for m in json.loads(line)["messages"]]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=512,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  hf_tok = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      eos_token="<|im_end|>",
      pad_token="<|endoftext|>",
      extra_special_tokens={
          "start_image_token": "<img>",
          "end_image_token": "</img>",
          "context_image_token": "<IMG_CONTEXT>",
      },
  )
  hf_tok.chat_template = CHAT_TEMPLATE
  hf_tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
  size = INTERNVL["image_size"]
  processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False)
  context_id = hf_tok.convert_tokens_to_ids("<IMG_CONTEXT>")
  vocab = -(-len(hf_tok) // 64) * 64  # embedding rows padded to a multiple of 64, as real checkpoints pad
  for name in ("student", "teacher"):
    spec = INTERNVL[name]
    cfg = InternVLConfig(
        vision_config=dict(image_size=size, patch_size=14, **spec["vision"]),
        text_config=dict(
            model_type="qwen2",
            vocab_size=vocab,
            max_position_embeddings=512,
            eos_token_id=hf_tok.eos_token_id,
            pad_token_id=hf_tok.pad_token_id,
            bos_token_id=None,
            tie_word_embeddings=name == "student",
            **spec["text"],
        ),
        image_token_id=context_id,
        image_seq_length=(size // 14) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=name == "student",
    )
    model = InternVLForConditionalGeneration(cfg)
    directory = os.path.join(out_dir, name)
    model.save_pretrained(directory)
    hf_tok.save_pretrained(directory)
    processor.save_pretrained(directory)
    print(f"internvl {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, tokenizer {len(hf_tok)}")
  open(done, "w").close()
  return out_dir


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("out_dir")
  ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
  ap.add_argument("--tokenizer-size", type=int, help="pad the tokenizer's vocabulary to this many tokens")
  ap.add_argument("--internvl", action="store_true", help="the InternVL pair and the shapes task instead")
  args = ap.parse_args()
  if args.internvl:
    build_internvl(args.out_dir)
  else:
    build(args.out_dir, args.shape, args.tokenizer_size)
