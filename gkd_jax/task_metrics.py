"""Generation-based task metrics, chosen by `config.eval_metric`: completions (text) against dataset rows.

"math":       exact match of the final answer (GSM8K's "#### 42", else "answer is 42", else the last number)
"arithmetic": the offline arithmetic task's checker (answer and chain accuracy)
"rouge":      ROUGE-1/2/L F1 against the reference completion (rouge-score)
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from gkd_jax import data as data_lib

METRICS = ("none", "math", "arithmetic", "rouge")

_NUMBER = r"-?[\d,]*\.?\d+"


def reference_text(row: dict, index: int = 0) -> str:
  """The reference completion of a dataset row, as text."""
  _, completion = data_lib.split_row(row, index, data_lib.detect_layout(list(row)))
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


def get(name: str) -> Callable[[Sequence[str], Sequence[dict]], dict] | None:
  if name not in METRICS:
    raise ValueError(f"eval_metric {name!r} is invalid: must be one of {METRICS}")
  if name == "none":
    return None
  if name == "arithmetic":
    from gkd_jax.tasks import arithmetic

    return arithmetic.evaluate
  return {"math": math_exact_match, "rouge": rouge}[name]
