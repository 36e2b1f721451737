"""Generation accuracy on a task split: the student samples (or decodes greedily) and a checker scores it.

    model = models.from_pretrained(path); tokenizer = models.load_tokenizer(path)
    completions = generate_completions(model, tokenizer, rows, max_new_tokens=64)            # greedy
    arithmetic.evaluate(completions, rows)          # {'accuracy', 'chain_accuracy', 'count'}
    accuracy(model, tokenizer, rows, max_new_tokens=64, temperature=1.0, seed=0)             # sampled

Prompts are the rows' chat prompts (the assistant turn dropped), rendered and tokenized exactly as the data
pipeline does for training, left-padded to one width and run in fixed-size batches, so each (model, batch,
width) compiles one sampling program however many rows there are.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from gkd_jax import data as data_lib
from gkd_jax import sampling


def encode_prompts(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
  """Token ids of each row's prompt, as the trainer's DataLoader builds them."""
  layout = data_lib.detect_layout(list(rows[0].keys()))
  return [data_lib.encode_prompt(tokenizer, data_lib.split_row(row, i, layout)[0]) for i, row in enumerate(rows)]


def generate_completions(
    model, tokenizer, rows, *, max_new_tokens: int, batch_size: int = 256, temperature: float = 0.0, seed: int = 0
) -> list[str]:
  """One decoded completion per row (text up to and including the first stop token).

  temperature 0 is greedy; otherwise batch i samples with fold_in(key(seed), i), so a call is reproducible.
  The last batch is padded with copies of its first row to keep one compiled shape; those are dropped.
  """
  rows = list(rows)
  if not rows:
    raise ValueError("no rows to evaluate")
  prompts = encode_prompts(tokenizer, rows)
  width = sampling.bucket_length(max(len(p) for p in prompts))
  ids, mask = data_lib.pad(prompts, width, tokenizer.pad_token_id, left=True)
  batch_size = min(batch_size, len(rows))
  stop_ids = sampling.normalize_stop_ids(tokenizer.eos_token_id)
  key = jax.random.key(seed)
  texts = []
  for i, start in enumerate(range(0, len(rows), batch_size)):
    chunk = slice(start, start + batch_size)
    b_ids, b_mask = ids[chunk], mask[chunk]
    real = len(b_ids)
    if real < batch_size:  # filler rows: same shape as every other batch, no recompile
      b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], batch_size - real, 0)])
      b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], batch_size - real, 0)])
    out = sampling.generate(
        model,
        b_ids,
        b_mask,
        key=jax.random.fold_in(key, i),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    )
    out_ids, out_mask = jax.device_get((out.completion_ids, out.completion_mask))
    for row_ids, row_mask in zip(out_ids[:real], out_mask[:real]):
      texts.append(tokenizer.decode(row_ids[row_mask], skip_special_tokens=False))
  return texts


def accuracy(
    model,
    tokenizer,
    rows,
    *,
    max_new_tokens: int,
    evaluate_fn: Callable[[list, list], dict] | None = None,
    batch_size: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
  """evaluate_fn(completions, rows) of the model's completions (default: the arithmetic task's checker)."""
  if evaluate_fn is None:
    from gkd_jax.tasks import arithmetic

    evaluate_fn = arithmetic.evaluate
  rows = list(rows)
  completions = generate_completions(
      model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed
  )
  return evaluate_fn(completions, rows)
