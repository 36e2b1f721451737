"""Data pipeline: exact token ids against a hand oracle, padding, truncation, buckets, order, shards, resume,
bad rows, and loading from files. Offline: a word-level tokenizer whose ids can be read off its vocabulary."""

import json
import re

import datasets
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gkd_jax import data
from gkd_jax import rows as rows_lib

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = [
    "user",
    "assistant",
    "system",
    "\n",
    " ",
    ":",
    "?",
    ".",
    "What",
    "is",
    "plus",
    "Be",
    "brief",
    "Hint",
    "The",
    "answer",
] + [str(i) for i in range(200)]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
PAD, IM_START, IM_END = 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def ids(text):
  """The hand oracle: split like the tokenizer (specials, single whitespace, words, single punctuation)."""
  return [VOCAB[t] for t in re.findall(r"<\|\w+\|>|\s|\w+|[^\w\s]", text)]


def make_tokenizer(template=CHAT_TEMPLATE):
  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
  tok.add_special_tokens(SPECIALS)
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
  )
  hf.chat_template = template
  return hf


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


def chat(i, answer=True):
  msgs = [{"role": "user", "content": f"What is {i} plus {i}?"}]
  return msgs + [{"role": "assistant", "content": f"The answer is {2 * i}."}] if answer else msgs


def loader(rows, tok, **kw):
  kw = {"batch_size": 4, "process_index": 0, "process_count": 1, **kw}
  return data.DataLoader(rows, tok, **kw)


# --------------------------------------------------------------------------------------- row -> tokens


def test_messages_row_exact_ids(tok):
  row = {"messages": [{"role": "system", "content": "Be brief."}] + chat(2)}
  out = rows_lib.tokenize_row(row, 0, tok, "messages")
  literal = [
      "<|im_start|>",
      "system",
      "\n",
      "Be",
      " ",
      "brief",
      ".",
      "<|im_end|>",
      "\n",
      "<|im_start|>",
      "user",
      "\n",
      "What",
      " ",
      "is",
      " ",
      "2",
      " ",
      "plus",
      " ",
      "2",
      "?",
      "<|im_end|>",
      "\n",
      "<|im_start|>",
      "assistant",
      "\n",
  ]
  assert out["prompt_ids"] == [VOCAB[t] for t in literal]
  # The template's "\n" after <|im_end|> is not part of the completion: generation stops at EOS.
  assert out["completion_ids"] == [VOCAB[t] for t in ["The", " ", "answer", " ", "is", " ", "4", ".", "<|im_end|>"]]
  assert out["has_completion"] is True
  # Together they are the template's own tokenization of the conversation, minus its trailing "\n".
  full = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
  assert out["prompt_ids"] + out["completion_ids"] + [VOCAB["\n"]] == full


def test_prompt_completion_text_row_exact_ids(tok):
  out = rows_lib.tokenize_row({"prompt": "What is 3 plus 4?", "completion": " 7"}, 0, tok, "prompt_completion")
  assert out["prompt_ids"] == ids("What is 3 plus 4?")
  assert out["completion_ids"] == ids(" 7") + [IM_END]  # text completions get EOS appended


def test_chat_prompt_with_text_or_chat_completion_matches_messages(tok):
  want = rows_lib.tokenize_row({"messages": chat(5)}, 0, tok, "messages")
  for completion in ["The answer is 10.", chat(5)[1:]]:
    got = rows_lib.tokenize_row(
        {"prompt": chat(5, answer=False), "completion": completion}, 0, tok, "prompt_completion"
    )
    assert got == want


def test_template_without_eos_gets_eos_appended():
  plain = make_tokenizer(
      "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}assistant: {% endif %}"
  )
  out = rows_lib.tokenize_row({"messages": chat(1)}, 0, plain, "messages")
  assert out["prompt_ids"] == ids("user: What is 1 plus 1?\nassistant: ")
  assert out["completion_ids"] == ids("The answer is 2.\n") + [IM_END]


def test_template_whose_prompt_is_not_a_prefix_fails_clearly():
  odd = make_tokenizer(
      "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
      "{% if add_generation_prompt %}assistant:\n{% endif %}"
  )
  with pytest.raises(rows_lib.BadRow, match=r"row 3, column 'messages': the chat template does not render"):
    rows_lib.tokenize_row({"messages": chat(1)}, 3, odd, "messages")


def test_prompt_only_rows(tok):
  for row, layout in [({"messages": chat(1, answer=False)}, "messages"), ({"prompt": "What is 1?"}, "prompt")]:
    out = rows_lib.tokenize_row(row, 0, tok, layout)
    assert out["completion_ids"] == [] and out["has_completion"] is False
  assert rows_lib.tokenize_row({"prompt": "What is 1?"}, 0, tok, "prompt")["prompt_ids"] == ids("What is 1?")


def test_teacher_prompt_tokenized_like_a_prompt_with_same_completion(tok):
  hint = [{"role": "system", "content": "Hint: 6"}] + chat(3, answer=False)
  row = {"prompt": chat(3, answer=False), "completion": "The answer is 6.", "teacher_prompt": hint}
  out = rows_lib.tokenize_row(row, 0, tok, "prompt_completion")
  assert out["teacher_prompt_ids"] == ids("<|im_start|>system\nHint: 6<|im_end|>\n") + out["prompt_ids"]
  assert out["completion_ids"] == ids("The answer is 6.<|im_end|>")
  text = rows_lib.tokenize_row(
      {"prompt": "What is 3?", "completion": " 3", "teacher_prompt": "Hint: 3. What is 3?"}, 0, tok, "prompt_completion"
  )
  assert text["teacher_prompt_ids"] == ids("Hint: 3. What is 3?")


# ----------------------------------------------------------------------------------------- truncation


def test_prompt_truncated_from_left_completion_from_right(tok):
  row = {"prompt": "1 2 3 4 5", "completion": "6 7 8 9"}  # prompt 9 tokens, completion 7 + EOS
  out = rows_lib.tokenize_row(row, 0, tok, "prompt_completion", rows_lib.Limits(max_length=8, max_prompt_length=5))
  assert out["prompt_ids"] == ids("3 4 5")  # the last 5 tokens
  assert out["completion_ids"] == ids("6 7")  # the first 8 - 5 tokens; EOS cut off too
  # max_completion_length also reserves room in the prompt budget for sampled completions.
  out = rows_lib.tokenize_row(row, 0, tok, "prompt_completion", rows_lib.Limits(max_length=6, max_completion_length=4))
  assert out["prompt_ids"] == ids(" 5") and out["completion_ids"] == ids("6 7 ")


def test_error_when_nothing_of_a_prompt_or_completion_remains(tok):
  row = {"prompt": "1 2 3", "completion": "4"}
  with pytest.raises(ValueError, match=r"row 7, column 'prompt': nothing of the prompt would remain"):
    rows_lib.tokenize_row(row, 7, tok, "prompt_completion", rows_lib.Limits(max_prompt_length=0))
  with pytest.raises(ValueError, match=r"row 7, column 'completion': no room left: the prompt takes 5 tokens"):
    rows_lib.tokenize_row(row, 7, tok, "prompt_completion", rows_lib.Limits(max_length=5))
  with pytest.raises(ValueError, match="nothing of any prompt would remain"):
    rows_lib.Limits(max_length=8, max_completion_length=8).check()
  with pytest.raises(ValueError, match="nothing of any prompt would remain"):
    loader([row] * 4, tok, max_prompt_length=0)


# ------------------------------------------------------------------------------------ padding, buckets


def test_collate_pads_prompts_left_completions_right():
  rows = [
      {"prompt_ids": [5, 6, 7], "completion_ids": [8], "has_completion": True, "teacher_prompt_ids": [9]},
      {"prompt_ids": [5], "completion_ids": [], "has_completion": False, "teacher_prompt_ids": [9, 10]},
      None,
  ]
  b = data.collate(rows, pad_id=0, prompt_width=4, completion_width=2, teacher_width=2)
  np.testing.assert_array_equal(b["prompt_ids"], [[0, 5, 6, 7], [0, 0, 0, 5], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["prompt_mask"], [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
  np.testing.assert_array_equal(b["completion_ids"], [[8, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(b["completion_mask"], [[1, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(b["teacher_prompt_ids"], [[0, 9], [9, 10], [0, 0]])
  np.testing.assert_array_equal(b["has_completion"], [True, False, False])
  np.testing.assert_array_equal(b["row_mask"], [True, True, False])
  assert b["prompt_ids"].dtype == np.int32 and b["prompt_mask"].dtype == bool


def test_bucket_size():
  assert data.bucket_size(0, 100, (8, 16)) == 8
  assert data.bucket_size(8, 100, (8, 16)) == 8
  assert data.bucket_size(9, 100, (8, 16)) == 16
  assert data.bucket_size(17, 100, (8, 16)) == 100  # the limit is always a bucket
  assert data.bucket_size(9, 12, (8, 16)) == 12  # buckets above the limit are ignored
  assert data.bucket_size(40, None, (8, 16)) == 64  # no limit: next power of two
  with pytest.raises(ValueError, match="exceeds the limit 12"):
    data.bucket_size(13, 12, (8, 16))


def test_loader_picks_widths_from_buckets(tok):
  rows = [{"prompt": " ".join(["1"] * n), "completion": " ".join(["2"] * n)} for n in (1, 2, 3, 9)]
  # n words -> 2n-1 prompt tokens, 2n-1 completion tokens + EOS; the longest row (n=9) gives 17 and 18.
  b = loader(rows, tok, buckets=(4, 8, 16, 32), max_prompt_length=20, shuffle=False).batch(0)
  assert b["prompt_ids"].shape == (4, 20) and b["completion_ids"].shape == (4, 32)
  b = loader(rows[:3], tok, batch_size=3, buckets=(4, 8, 16, 32), shuffle=False).batch(0)
  assert b["prompt_ids"].shape == (3, 8) and b["completion_ids"].shape == (3, 8)
  np.testing.assert_array_equal(b["prompt_ids"][0], [PAD] * 7 + ids("1"))
  np.testing.assert_array_equal(b["completion_mask"].sum(1), [2, 4, 6])


# -------------------------------------------------------------------------------- order, shards, resume


@pytest.fixture(scope="module")
def rows20():
  return [{"messages": chat(i)} for i in range(20)]


def test_shuffle_deterministic_by_seed_and_epoch(tok, rows20):
  a, b, c = loader(rows20, tok, seed=1), loader(rows20, tok, seed=1), loader(rows20, tok, seed=2)
  assert a.steps_per_epoch == 5
  epoch0 = np.concatenate([a.global_rows(s) for s in range(5)])
  epoch1 = np.concatenate([a.global_rows(s) for s in range(5, 10)])
  assert sorted(epoch0) == sorted(epoch1) == list(range(20))  # each epoch visits every row once
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(epoch0, np.concatenate([c.global_rows(s) for s in range(5)]))
  for s in (0, 7):
    for k, v in a.batch(s).items():
      np.testing.assert_array_equal(v, b.batch(s)[k])
  unshuffled = loader(rows20, tok, shuffle=False)
  np.testing.assert_array_equal(unshuffled.global_rows(6), [4, 5, 6, 7])


def test_host_shards_disjoint_and_cover_global_batch(tok, rows20):
  whole = loader(rows20, tok, batch_size=8, seed=3)
  hosts = [loader(rows20, tok, batch_size=8, seed=3, process_index=h, process_count=4) for h in range(4)]
  for step in (0, 1, 4):
    shards = [h.batch(step) for h in hosts]
    assert all(s["prompt_ids"].shape[0] == 2 for s in shards)
    for k, v in whole.batch(step).items():
      np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), v)
    # Disjoint rows: every prompt differs (each row asks about a different number).
    prompts = {tuple(r) for s in shards for r in s["prompt_ids"]}
    assert len(prompts) == 8


def test_resume_gives_same_batches(tok, rows20):
  first = loader(rows20, tok, seed=5)
  through = [first.batch(step) for step in range(12)]
  restarted = loader(rows20, tok, seed=5)
  start = restarted.resume_step(restarted.state(7))
  for want, got in zip(through[7:], (restarted.batch(step) for step in range(start, 12)), strict=True):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  with pytest.raises(ValueError, match="cannot resume.*seed"):
    loader(rows20, tok, seed=6).resume_step(restarted.state(7))


def test_drop_remainder(tok, rows20):
  assert loader(rows20[:10], tok).steps_per_epoch == 2
  keep = loader(rows20[:10], tok, drop_remainder=False, shuffle=False)
  assert keep.steps_per_epoch == 3
  last = keep.batch(2)
  np.testing.assert_array_equal(last["row_mask"], [True, True, False, False])
  assert not last["prompt_mask"][2:].any() and not last["completion_mask"][2:].any()
  np.testing.assert_array_equal(keep.batch(3)["prompt_ids"], keep.batch(0)["prompt_ids"])  # next epoch


def test_loader_teacher_prompt_and_prompt_only(tok):
  rows = [
      {
          "prompt": chat(i, answer=False),
          "teacher_prompt": [{"role": "system", "content": f"Hint: {2 * i}"}] + chat(i, answer=False),
      }
      for i in range(4)
  ]
  b = loader(rows, tok, shuffle=False, buckets=(64,)).batch(0)
  assert not b["has_completion"].any() and not b["completion_mask"].any()
  want = rows_lib.tokenize_row(rows[1], 1, tok, "prompt")["teacher_prompt_ids"]
  np.testing.assert_array_equal(b["teacher_prompt_ids"][1][b["teacher_prompt_mask"][1]], want)
  assert b["teacher_prompt_ids"].shape == (4, 64)


# ------------------------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "row, layout, column, message",
    [
        ({"prompt": "What is 1?", "completion": None}, "prompt_completion", "completion", "missing"),
        ({"prompt": "What is 1?", "completion": "  "}, "prompt_completion", "completion", "empty completion"),
        ({"prompt": 17, "completion": "1"}, "prompt_completion", "prompt", r"expected text or a chat list \(got 17\)"),
        ({"prompt": "", "completion": "1"}, "prompt_completion", "prompt", "empty prompt"),
        (
            {"prompt": "What is 1?", "completion": [{"role": "assistant", "content": "1"}]},
            "prompt_completion",
            "completion",
            "needs a chat-list prompt",
        ),
        (
            {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": ""}]},
            "messages",
            "messages",
            "empty completion",
        ),
        ({"messages": [{"role": "user", "content": 1}]}, "messages", "messages", "message 0 must be a dict"),
        ({"messages": "What is 1?"}, "messages", "messages", "expected a non-empty chat list"),
        ({"prompt": "What is 1?", "teacher_prompt": None}, "prompt", "teacher_prompt", "missing"),
    ],
)
def test_bad_row_names_index_and_column(tok, row, layout, column, message):
  with pytest.raises(rows_lib.BadRow, match=rf"row 12, column '{column}': .*{message}"):
    rows_lib.tokenize_row(row, 12, tok, layout)


def test_require_completion_rejects_prompt_only_messages(tok):
  with pytest.raises(ValueError, match=r"row 4, column 'messages': no completion"):
    rows_lib.tokenize_row({"messages": chat(1, answer=False)}, 4, tok, "messages", require_completion=True)


def test_unknown_layout_lists_accepted_ones():
  with pytest.raises(
      ValueError,
      match=r"unknown row layout: columns \['answer', 'question'\]; accepted column "
      r"layouts: 'messages'.*'prompt' \+ 'completion'.*'teacher_prompt'",
  ):
    rows_lib.detect_layout(["question", "answer"])


def test_bad_rows_fail_or_are_skipped_and_counted(tok, caplog):
  rows = [{"prompt": f"What is {i}?", "completion": "" if i in (2, 5) else f" {i}"} for i in range(10)]
  with pytest.raises(ValueError, match=r"row 2, column 'completion': empty completion"):
    loader(rows, tok)
  with caplog.at_level("WARNING"):
    dl = loader(rows, tok, skip_bad_rows=True, shuffle=False)
  assert len(dl.skipped) == 2 and dl.num_rows == 8
  assert [s.split(",")[0] for s in dl.skipped] == ["row 2", "row 5"]
  assert "skipped 2 of 10 bad rows" in caplog.text
  b = dl.batch(0)  # rows 0, 1, 3, 4
  np.testing.assert_array_equal(b["completion_ids"][2][b["completion_mask"][2]], ids(" 3") + [IM_END])


# -------------------------------------------------------------------------------------------- loading


def test_load_rows_from_files(tmp_path, tok):
  rows = [{"messages": chat(i)} for i in range(6)]
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "rows.json").write_text(json.dumps(rows))
  ds = datasets.Dataset.from_list(rows)
  ds.to_parquet(str(tmp_path / "rows.parquet"))
  ds.save_to_disk(str(tmp_path / "saved"))
  datasets.DatasetDict(test=ds).save_to_disk(str(tmp_path / "saved_dict"))
  arrow = next((tmp_path / "saved").glob("*.arrow"))
  sources = ["rows.jsonl", "rows.json", "rows.parquet", "saved", "saved_dict", str(arrow)]
  for source in sources:
    loaded = rows_lib.load_rows(str(tmp_path / source), split="test" if source == "saved_dict" else "train")
    assert loaded.to_list() == rows, source
  first = loader(rows_lib.load_rows(str(tmp_path / "rows.jsonl")), tok, batch_size=2, shuffle=False).batch(0)
  want = rows_lib.tokenize_row(rows[0], 0, tok, "messages")
  np.testing.assert_array_equal(first["completion_ids"][0][first["completion_mask"][0]], want["completion_ids"])


def test_prepare_columns_renames_and_builds_opsd_teacher_prompts():
  import datasets as hf_datasets
  from gkd_jax.rows import prepare_columns

  gsm = hf_datasets.Dataset.from_list([{"question": "1+1?", "answer": "2"}])
  rows = prepare_columns(
      gsm,
      columns={"question": "prompt", "answer": "completion"},
      teacher_prompt_template="{prompt} [ref: {completion}]",
  )
  assert rows[0] == {"prompt": "1+1?", "completion": "2", "teacher_prompt": "1+1? [ref: 2]"}
  chat = hf_datasets.Dataset.from_list(
      [
          {
              "messages": [
                  {"role": "system", "content": "be brief"},
                  {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"},
              ]
          }
      ]
  )
  out = prepare_columns(chat, teacher_prompt_template="{prompt} [ref: {completion}]")[0]["teacher_prompt"]
  assert out == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2? [ref: 4]"}]
  with pytest.raises(ValueError, match=r"dataset_columns renames \['query'\], but the dataset's columns are"):
    prepare_columns(gsm, columns={"query": "prompt"})
