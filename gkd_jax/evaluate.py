"""Evaluation: completions generated from a task split, scored by a named metric; and the held-out
evaluation a training run does (teacher-forced divergences + the generation metric).

    model = models.from_pretrained(path); tokenizer = models.load_tokenizer(path)
    completions = generate_completions(model, tokenizer, rows, max_new_tokens=64)            # greedy
    metric("arithmetic")(completions, rows)          # {'accuracy', 'chain_accuracy', 'count'}
    accuracy(model, tokenizer, rows, max_new_tokens=64, temperature=1.0, seed=0)             # sampled

Prompts are the rows' chat prompts (the assistant turn dropped), rendered and tokenized exactly as the data
pipeline does for training, left-padded to one width and run in fixed-size batches, so each (model, batch,
width) compiles one sampling program however many rows there are.

Metrics (`config.eval_metric`; the names are config.EVAL_METRICS), completions (text) against dataset rows:
"math":       exact match of the final answer (GSM8K's "#### 42", else "answer is 42", else the last number)
"arithmetic": the offline arithmetic task's checker (answer and chain accuracy)
"rouge":      ROUGE-1/2/L F1 against the reference completion (rouge-score)
"shapes":     the offline shapes-picture task's checker (exact one-word answers; gkd_jax.tasks.shapes)
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from gkd_jax import data as data_lib
from gkd_jax import images as images_lib
from gkd_jax import rows as rows_lib
from gkd_jax import config as config_lib
from gkd_jax import rollout, sampling, storage
from gkd_jax.tasks import arithmetic, shapes

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ metrics

_NUMBER = r"-?[\d,]*\.?\d+"


def reference_text(row: dict, index: int = 0) -> str:
  """The reference completion of a dataset row, as text."""
  _, completion = rows_lib.split_row(row, index, rows_lib.detect_layout(list(row)))
  if completion is None:
    raise ValueError(f"row {index} has no reference completion to score against")
  return completion if isinstance(completion, str) else completion[-1]["content"]


def extract_answer(text: str) -> str | None:
  """The final numeric answer of a math solution, normalized ("1,234.0" → "1234"); None when there is none."""
  text = re.split(r"<\|", text)[0]  # ignore special tokens after the answer
  for pattern in (rf"####\s*({_NUMBER})", rf"answer is\s*\$?({_NUMBER})", rf"({_NUMBER})(?!.*{_NUMBER})"):
    match = re.search(pattern, text, flags=re.S | re.I)
    if match:
      number = match.group(1).replace(",", "")
      try:
        value = float(number)
      except ValueError:
        return None
      return str(int(value)) if value == int(value) else str(value)
  return None


def math_exact_match(completions: Sequence[str], rows: Sequence[dict]) -> dict:
  hits = [
      extract_answer(c) is not None and extract_answer(c) == extract_answer(reference_text(r, i))
      for i, (c, r) in enumerate(zip(completions, rows))
  ]
  return {"accuracy": sum(hits) / len(hits), "count": len(hits)}


def rouge(completions: Sequence[str], rows: Sequence[dict]) -> dict:
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
  for i, (c, r) in enumerate(zip(completions, rows)):
    scores = scorer.score(reference_text(r, i), re.split(r"<\|", c)[0])
    for name in totals:
      totals[name] += scores[name].fmeasure
  return {**{name: value / len(rows) for name, value in totals.items()}, "count": len(rows)}


def metric(name: str) -> Callable[[Sequence[str], Sequence[dict]], dict] | None:
  """The metric called `name` (one of config.EVAL_METRICS): fn(completions, rows) -> dict; None for "none"."""
  if name not in config_lib.EVAL_METRICS:
    raise ValueError(f"eval_metric {name!r} is invalid: must be one of {config_lib.EVAL_METRICS}")
  if name == "none":
    return None
  return {"math": math_exact_match, "rouge": rouge, "arithmetic": arithmetic.evaluate, "shapes": shapes.evaluate}[name]


# ------------------------------------------------------------------------------------------- generation


def encode_prompts(tokenizer, rows: Sequence[dict], image_inputs=None) -> tuple[list[list[int]], list[list[int]]]:
  """(token ids of each row's prompt, as the trainer's DataLoader builds them; each row's tiles per image).
  With `image_inputs` (a vision-language model's images.ImageInputs) the prompts' `<image>` placeholders are
  expanded to their images' tokens; without, rows have no tiles."""
  layout = rows_lib.detect_layout(list(rows[0].keys()))
  prompts, tiles = [], []
  for i, row in enumerate(rows):
    prompt, completion = rows_lib.split_row(row, i, layout)
    row_tiles = []
    if image_inputs is not None:
      prompt, row_tiles = rows_lib.expand_images(row, i, prompt, completion, image_inputs)
    prompts.append(rows_lib.encode_prompt(tokenizer, prompt))
    tiles.append(row_tiles)
  return prompts, tiles


def generate_completions(
    model,
    tokenizer,
    rows,
    *,
    max_new_tokens: int,
    batch_size: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    image_inputs=None,
) -> list[str]:
  """One decoded completion per row (text up to and including the first stop token).

  temperature 0 is greedy; otherwise batch i samples with fold_in(key(seed), i), so a call is reproducible.
  The last batch is padded with copies of its first row to keep one compiled shape; those are dropped.
  image_inputs: a vision-language model's images.ImageInputs, for rows with images (their pixels are read per
  batch, padded to one tile count for all batches).
  """
  rows = list(rows)
  if not rows:
    raise ValueError("no rows to evaluate")
  prompts, tiles = encode_prompts(tokenizer, rows, image_inputs)
  width = sampling.bucket_length(max(len(p) for p in prompts))
  ids, mask = data_lib.pad(prompts, width, tokenizer.pad_token_id, left=True)
  with_images = any(tiles)
  tile_width = images_lib.bucket_tiles(max(sum(t) for t in tiles)) if with_images else 0
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
    pixels = None
    if with_images:
      per_row = [
          image_inputs.load_pixels(rows_lib.image_values(rows[j], j), j) if tiles[j] else None
          for j in range(start, start + real)
      ]
      pixels, _ = image_inputs.stack(per_row + per_row[:1] * (batch_size - real), tile_width)
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
        pixel_values=pixels,
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
    image_inputs=None,
) -> dict[str, Any]:
  """evaluate_fn(completions, rows) of the model's completions (default: the "arithmetic" metric)."""
  evaluate_fn = evaluate_fn or metric("arithmetic")
  rows = list(rows)
  completions = generate_completions(
      model,
      tokenizer,
      rows,
      max_new_tokens=max_new_tokens,
      batch_size=batch_size,
      temperature=temperature,
      seed=seed,
      image_inputs=image_inputs,
  )
  return evaluate_fn(completions, rows)


# ------------------------------------------------------------------------------------ during training


def held_out(config, tokenizer, image_inputs=None):
  """(rows, loader) of the run's eval split: the first config.eval_rows rows of config.eval_dataset (default:
  the training dataset), every row once, in order (image_inputs: a vision-language model's, for rows with
  images)."""
  rows = rows_lib.rows_from_config(config, config.eval_dataset or config.dataset, config.eval_split)
  rows = rows.select(range(min(config.eval_rows, len(rows))))
  loader = data_lib.loader_from_config(
      config,
      tokenizer,
      rows,
      config.eval_batch_size,
      require_completion=True,
      shuffle=False,
      drop_remainder=False,
      image_inputs=image_inputs,
  )
  return rows, loader


def evaluate(setup, state, workdir: str | None = None) -> dict:
  """Held-out metrics of the student in `state`: teacher-forced divergences (distill loss at the run's β,
  FKL, RKL, entropies, top-1 agreement) and NLL over the eval split, then the generation metric
  (config.eval_metric). The teacher's generation metric is computed once and cached in the workdir."""
  config, loader = setup.config, setup.eval_loader
  totals, tokens = {}, 0
  for step in range(loader.steps_per_epoch):
    batch = loader.batch(step)
    batch["completion_mask"] = batch["completion_mask"] & batch["row_mask"][:, None]
    host = rollout.model_inputs(setup, batch)
    if setup.teacher_client is not None:
      host["teacher_topk_values"], host["teacher_topk_indices"] = rollout.request_teacher_topk(
          setup.teacher_client, host
      ).result()
    out = jax.device_get(
        setup.eval_step(state, {k: rollout.to_global(setup.batch_sharding, v) for k, v in host.items()})
    )
    n = int(out.pop("tokens"))
    tokens += n
    for name, value in out.items():
      totals[name] = totals.get(name, 0.0) + float(value) * n
  result = {name: value / max(tokens, 1) for name, value in totals.items()}
  result["tokens"] = tokens
  score = metric(config.eval_metric)
  if score is not None:
    if jax.process_count() > 1:
      logger.warning(
          "eval_metric=%s: generation-based evaluation runs on single-process runs only; skipped", config.eval_metric
      )
    else:
      rows = list(setup.eval_rows)
      student = (nnx.graphdef(setup.student), rollout.student_weights(state, setup.lora_spec))
      result.update({f"student_{k}": v for k, v in generation_metric(setup, student, rows, score).items()})
      result.update(
          {f"teacher_{k}": v for k, v in teacher_generation_metric(setup, state, rows, score, workdir).items()}
      )
  return result


def generation_metric(setup, model, rows, score) -> dict:
  """score(completions, rows) of `model`'s completions under the run's eval sampling settings."""
  config = setup.config
  completions = generate_completions(
      model,
      setup.tokenizer,
      rows,
      max_new_tokens=config.eval_max_new_tokens,
      batch_size=config.eval_batch_size,
      temperature=config.eval_temperature,
      seed=config.seed,
      image_inputs=setup.image_inputs,
  )
  return {k: v for k, v in score(completions, rows).items() if k != "count"}


def teacher_generation_metric(setup, state, rows, score, workdir) -> dict:
  """Once per workdir: the teacher does not change (a server teacher is not evaluated; OPSD-dynamic's
  teacher is the student)."""
  if setup.teacher is None:
    return {}
  path = None if workdir is None else storage.join(workdir, "teacher_eval.json")
  if path and storage.exists(path):
    return json.loads(storage.read_text(path))
  result = generation_metric(setup, (nnx.graphdef(setup.teacher), state.teacher_params), rows, score)
  if path and jax.process_index() == 0:
    storage.write_text(path, json.dumps(result))
  return result
