"""Evaluation metrics: answer extraction, exact match, ROUGE, the metric registry."""

import pytest

from gkd_jax import evaluate


@pytest.mark.parametrize(
    "text,answer",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("so the answer is 1,234.", "1234"),
        ("The answer is $18.00 total", "18"),
        ("first 3, then 5, finally 12<|im_end|>99", "12"),
        ("no digits here", None),
        ("#### -7", "-7"),
    ],
)
def test_extract_answer(text, answer):
  assert evaluate.extract_answer(text) == answer


def test_math_exact_match_against_rows():
  rows = [
      {"prompt": "q1", "completion": "work\n#### 72"},
      {"prompt": "q2", "completion": "#### 5"},
      {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "#### 10"}]},
  ]
  out = evaluate.math_exact_match(["... 72", "#### 6", "the answer is 10"], rows)
  assert out == {"accuracy": pytest.approx(2 / 3), "count": 3}


def test_rouge_perfect_and_partial():
  rows = [{"prompt": "p", "completion": "the cat sat on the mat"}]
  assert evaluate.rouge(["the cat sat on the mat"], rows)["rougeL"] == pytest.approx(1.0)
  assert 0 < evaluate.rouge(["a cat sat"], rows)["rouge1"] < 1


def test_unknown_metric():
  with pytest.raises(ValueError, match=r"eval_metric 'bleu' is invalid: must be one of"):
    evaluate.metric("bleu")
