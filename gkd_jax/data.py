"""Data pipeline: dataset rows -> fixed-format numpy token batches for the trainer.

Row layouts (one per dataset, detected from its columns):

  messages              chat list of {role, content}. When the last turn is the assistant's it is the
                        completion and everything before it the prompt; otherwise the whole list is the
                        prompt of a prompt-only row.
  prompt + completion   plain text (tokenized as is; the completion gets EOS appended), or a chat-list
                        prompt (rendered with the tokenizer's chat template) with a text or chat-list
                        completion.
  prompt                prompt-only rows (text or chat list); completions come from the sampler.

Any layout may add `teacher_prompt` (text or chat list): the teacher's privileged context for OPSD, tokenized
like a prompt and paired with the same completion.

Chat completions are cut out of the rendered conversation (full rendering minus the rendering of the prompt
with the generation prompt), so they end with the template's own end-of-turn token, exactly what a sampler
started from the prompt ids must learn to emit.

A batch (this host's rows of one global batch) is a dict of numpy arrays:

  prompt_ids          int32 [B, P]   left-padded with pad_token_id, so every prompt ends at column P-1
  prompt_mask         bool  [B, P]
  completion_ids      int32 [B, C]   right-padded
  completion_mask     bool  [B, C]   all False on prompt-only rows
  has_completion      bool  [B]
  row_mask            bool  [B]      False only on filler rows of a final partial batch (drop_remainder=False)
  teacher_prompt_ids  int32 [B, Pt]  and teacher_prompt_mask, when the dataset has `teacher_prompt`

P, C and Pt are picked per global batch as the smallest allowed bucket >= the longest row, so a jitted step
compiles once per bucket combination, not once per batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Sequence

import datasets
import numpy as np

from gkd_jax.buckets import DEFAULT_BUCKETS, bucket_size  # noqa: F401 (part of this module's API)
from gkd_jax import storage

logger = logging.getLogger(__name__)

ACCEPTED_LAYOUTS = (
    "accepted column layouts: 'messages' (chat list of {'role', 'content'}; a final assistant turn is the "
    "completion), 'prompt' + 'completion' (text, or a chat-list prompt with a text or chat-list completion), "
    "'prompt' alone (prompt-only); any of them optionally with 'teacher_prompt' (text or chat list)"
)

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


# ----------------------------------------------------------------------------------------------- loading


def load_rows(
    source: str | Sequence[str] | datasets.Dataset,
    split: str = "train",
    *,
    name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
  """Rows from a hub dataset name, local json/jsonl/parquet/arrow/csv file(s) or glob, or a save_to_disk dir."""
  if isinstance(source, datasets.Dataset):
    return source
  files = [source] if isinstance(source, str) else list(source)
  files = [storage.local_copy(f) for f in files]  # gs://... files, globs and directories: a local copy
  first = files[0]
  if len(files) == 1 and os.path.isdir(first):
    if any(os.path.exists(os.path.join(first, f)) for f in ("state.json", "dataset_dict.json")):
      ds = datasets.load_from_disk(first)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise ValueError(f"split {split!r} is not in the dataset {source}: its splits are {sorted(ds)}")
        return ds[split]
      return ds
    return datasets.load_dataset(first, name, split=split, cache_dir=cache_dir)
  ext = _extension(first)
  for f in files:
    check_data_file(f)
  if ext in _FILE_BUILDERS:
    # Files carry no split names: whatever split is asked for is these files.
    try:
      return datasets.load_dataset(_FILE_BUILDERS[ext], data_files={split: files}, split=split, cache_dir=cache_dir)
    except StopIteration as e:  # what the json builder raises on a file with no rows
      raise ValueError(f"dataset file(s) {files} hold no rows") from e
  if len(files) != 1:
    raise ValueError(f"cannot load {files}: several sources must be files ending in {sorted(_FILE_BUILDERS)}")
  return datasets.load_dataset(first, name, split=split, cache_dir=cache_dir)


def is_data_files(source) -> bool:
  """Whether `source` names json/jsonl/parquet/arrow/csv file(s) or a glob of them (local or gs://): rows
  that carry no split names, so any split asked of them is these same rows."""
  sources = [source] if isinstance(source, str) else list(source)
  return bool(sources) and all(isinstance(s, str) and _extension(s) in _FILE_BUILDERS for s in sources)


def _extension(path: str) -> str:
  return os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()


def check_data_file(path: str) -> None:
  """An existing local file must have a supported extension and hold something (globs and hub names pass)."""
  if not os.path.isfile(path):
    return
  if _extension(path) not in _FILE_BUILDERS:
    raise ValueError(
        f"dataset file {path} has the unsupported extension {_extension(path) or '(none)'!r}: "
        f"allowed are {sorted(_FILE_BUILDERS)} (optionally .gz)"
    )
  size = os.path.getsize(path)
  blank = size == 0
  if not blank and size <= 4096 and not path.endswith(".gz"):
    with open(path, "rb") as f:
      blank = not f.read().strip()
  if blank:
    raise ValueError(f"dataset file {path} is empty ({size} bytes): it holds no rows")


def prepare_columns(
    rows: datasets.Dataset, *, columns: dict | None = None, teacher_prompt_template: str | None = None
) -> datasets.Dataset:
  """Maps a dataset onto the accepted layouts before tokenization.

  columns: renames, e.g. GSM8K's {"question": "prompt", "answer": "completion"}; a missing source column
    is an error naming it and the columns that exist.
  teacher_prompt_template: builds OPSD's `teacher_prompt` from each row with str.format fields {prompt}
    (the last user turn's text) and {completion} (the reference answer), e.g.
    "{prompt}\n\nReference solution:\n{completion}\n\nNow solve it in your own words." For chat rows the
    teacher prompt is the same conversation with that last user turn replaced.
  """
  if columns:
    missing = sorted(set(columns) - set(rows.column_names))
    if missing:
      raise ValueError(f"dataset_columns renames {missing}, but the dataset's columns are {rows.column_names}")
    rows = rows.rename_columns(dict(columns))
  if not teacher_prompt_template:
    return rows
  layout = detect_layout(rows.column_names)

  def add_teacher_prompt(row: dict, index: int) -> dict:
    prompt, completion = split_row(row, index, layout)
    if completion is None:
      raise BadRow(index, "completion", "teacher_prompt_template needs a reference completion", None)
    answer = completion if isinstance(completion, str) else completion[-1]["content"]
    if isinstance(prompt, str):
      return {"teacher_prompt": teacher_prompt_template.format(prompt=prompt, completion=answer)}
    last_user = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    text = teacher_prompt_template.format(prompt=prompt[last_user]["content"], completion=answer)
    return {"teacher_prompt": [*prompt[:last_user], {"role": "user", "content": text}, *prompt[last_user + 1 :]]}

  return rows.map(add_teacher_prompt, with_indices=True, desc="teacher prompts")


def detect_layout(columns: Sequence[str]) -> str:
  """'messages', 'prompt_completion' or 'prompt', from a dataset's column names."""
  cols = set(columns)
  if "messages" in cols and cols & {"prompt", "completion"}:
    raise ValueError(
        f"ambiguous row layout: columns {sorted(cols)} hold both 'messages' and "
        f"'prompt'/'completion'; drop one. {ACCEPTED_LAYOUTS}"
    )
  if "messages" in cols:
    return "messages"
  if "prompt" in cols:
    return "prompt_completion" if "completion" in cols else "prompt"
  raise ValueError(f"unknown row layout: columns {sorted(cols)}; {ACCEPTED_LAYOUTS}")


# ---------------------------------------------------------------------------------- row -> token lists


class BadRow(ValueError):
  """A row that cannot be used; the message names the row index, the column and what is allowed."""

  def __init__(self, index: int, column: str, problem: str, *value: Any):
    got = f" (got {_short(value[0])})" if value else ""
    super().__init__(f"row {index}, column {column!r}: {problem}{got}")
    self.index, self.column = index, column


def _short(value: Any, limit: int = 120) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass(frozen=True)
class Limits:
  """Token budgets (None = unlimited).

  Prompts keep their LAST tokens (a chat prompt ends with the question and the generation prompt);
  completions keep their first tokens and get whatever `max_length` leaves after the prompt. With
  `max_completion_length` set, prompts are also held to `max_length - max_completion_length` so a sampled
  completion of full length always fits. The teacher prompt (OPSD) has its own budget, by default the
  student prompt's.
  """

  max_length: int | None = None
  max_prompt_length: int | None = None
  max_completion_length: int | None = None
  max_teacher_prompt_length: int | None = None

  @property
  def prompt_budget(self) -> int | None:
    budgets = [self.max_prompt_length]
    if self.max_length is not None and self.max_completion_length is not None:
      budgets.append(self.max_length - self.max_completion_length)
    budgets = [b for b in budgets if b is not None]
    return min(budgets) if budgets else None

  @property
  def teacher_prompt_budget(self) -> int | None:
    return self.max_teacher_prompt_length if self.max_teacher_prompt_length is not None else self.prompt_budget

  def check(self) -> None:
    """Fails before any row is read when the budgets leave no room at all."""
    for name in ("max_length", "max_completion_length"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be positive")
    for name, budget in (("prompt", self.prompt_budget), ("teacher prompt", self.teacher_prompt_budget)):
      if budget is not None and budget <= 0:
        raise ValueError(f"nothing of any {name} would remain: its budget is {budget} tokens ({self})")


def _messages(value: Any, index: int, column: str) -> list[dict]:
  if not isinstance(value, list) or not value:
    raise BadRow(index, column, "expected a non-empty chat list of {'role': str, 'content': str}", value)
  out = []
  for j, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise BadRow(index, column, f"message {j} must be a dict with string 'role' and 'content'", m)
    # Arrow gives every message every key seen in the column; drop the None fillers it adds.
    out.append({k: v for k, v in m.items() if v is not None})
  return out


def _prompt(value: Any, index: int, column: str) -> str | list[dict]:
  if isinstance(value, str):
    if not value:
      raise BadRow(index, column, "empty prompt", value)
    return value
  if isinstance(value, list):
    return _messages(value, index, column)
  raise BadRow(index, column, "missing" if value is None else "expected text or a chat list", value)


def split_row(row: dict, index: int, layout: str) -> tuple[str | list[dict], str | list[dict] | None]:
  """Validated (prompt, completion); completion is None for prompt-only rows, a chat list for chat prompts."""
  if layout == "messages":
    msgs = _messages(row.get("messages"), index, "messages")
    if msgs[-1]["role"] != "assistant":
      return msgs, None
    if len(msgs) == 1:
      raise BadRow(index, "messages", "an assistant turn with no prompt before it", row["messages"])
    if not msgs[-1]["content"].strip():
      raise BadRow(index, "messages", "empty completion: the final assistant turn has no content", msgs[-1])
    return msgs[:-1], msgs[-1:]
  prompt = _prompt(row.get("prompt"), index, "prompt")
  if layout == "prompt":
    return prompt, None
  value = row.get("completion")
  if isinstance(value, str):
    if not value.strip():
      raise BadRow(index, "completion", "empty completion", value)
    return prompt, [{"role": "assistant", "content": value}] if isinstance(prompt, list) else value
  if isinstance(value, list):
    if not isinstance(prompt, list):
      raise BadRow(index, "completion", "a chat-list completion needs a chat-list prompt", value)
    msgs = _messages(value, index, "completion")
    if not msgs[-1]["content"].strip():
      raise BadRow(index, "completion", "empty completion: the last message has no content", msgs[-1])
    return prompt, msgs
  raise BadRow(index, "completion", "missing" if value is None else "expected text or a chat list", value)


def _encode(tokenizer, text: str, special_tokens: bool) -> list[int]:
  return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
  """Text: the tokenizer's own special tokens (e.g. BOS) added. Chat list: the chat template plus the
  generation prompt (the template supplies any BOS itself)."""
  if isinstance(prompt, str):
    return _encode(tokenizer, prompt, True)
  return _encode(tokenizer, _render(tokenizer, prompt, True), False)


def end_completion(ids: list[int], end_ids: Sequence[int], eos_id: int) -> list[int]:
  """Cuts after the last end-of-turn token (templates put e.g. a newline after it), else appends EOS."""
  last = max((i for i, t in enumerate(ids) if t in end_ids), default=None)
  return ids[: last + 1] if last is not None else ids + [eos_id]


def encode_completion(
    tokenizer, prompt: str | list[dict], completion: str | list[dict], end_ids: Sequence[int], index: int, column: str
) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids). Chat: the completion is the text the full conversation adds after the
  prompt's rendering; the two are tokenized separately, as a sampler continuing the prompt ids would."""
  eos = tokenizer.eos_token_id
  if isinstance(completion, str):
    return encode_prompt(tokenizer, prompt), end_completion(_encode(tokenizer, completion, False), end_ids, eos)
  prompt_text = _render(tokenizer, prompt, True)
  full_text = _render(tokenizer, prompt + completion, False)
  if not full_text.startswith(prompt_text):
    k = next(i for i, (a, b) in enumerate(zip(prompt_text + "\0", full_text)) if a != b)
    raise BadRow(
        index,
        column,
        f"the chat template does not render the conversation as prompt + completion: from "
        f"character {k} the prompt renders {prompt_text[k:k + 30]!r} but the conversation "
        f"{full_text[k:k + 30]!r}; use text prompt/completion columns for such a template",
    )
  completion_ids = _encode(tokenizer, full_text[len(prompt_text) :], False)
  return _encode(tokenizer, prompt_text, False), end_completion(completion_ids, end_ids, eos)


def truncate(
    prompt: list[int], completion: list[int] | None, teacher: list[int] | None, limits: Limits, index: int
) -> tuple[list[int], list[int] | None, list[int] | None]:
  """Applies `limits` (see Limits); fails naming the row when nothing of a prompt or completion remains."""
  budget = limits.prompt_budget
  if budget is not None:
    if budget <= 0:
      raise BadRow(index, "prompt", f"nothing of the prompt would remain: its budget is {budget} ({limits})")
    prompt = prompt[-budget:]
  if completion is not None:
    room = [
        b
        for b in (limits.max_completion_length, None if limits.max_length is None else limits.max_length - len(prompt))
        if b is not None
    ]
    if room and min(room) <= 0:
      raise BadRow(
          index,
          "completion",
          f"no room left: the prompt takes {len(prompt)} tokens of "
          f"max_length={limits.max_length}; lower max_prompt_length",
      )
    completion = completion[: min(room)] if room else completion
  if teacher is not None and limits.teacher_prompt_budget is not None:
    if limits.teacher_prompt_budget <= 0:
      raise BadRow(index, "teacher_prompt", f"nothing of the teacher prompt would remain ({limits})")
    teacher = teacher[-limits.teacher_prompt_budget :]
  return prompt, completion, teacher


def tokenize_row(
    row: dict,
    index: int,
    tokenizer,
    layout: str,
    limits: Limits = Limits(),
    *,
    require_completion: bool = False,
    end_token_ids: Sequence[int] | None = None,
) -> dict:
  """One row -> {'prompt_ids', 'completion_ids' ([] when prompt-only), 'has_completion', 'prompt_truncated' (tokens
  cut from the prompt's start)[, 'teacher_prompt_ids']}.

  Raises BadRow (a ValueError naming row, column and what is allowed) for unusable rows."""
  end_ids = list(end_token_ids) if end_token_ids is not None else [tokenizer.eos_token_id]
  prompt, completion = split_row(row, index, layout)
  if completion is None:
    if require_completion:
      column = "messages" if layout == "messages" else "prompt"
      raise BadRow(
          index,
          column,
          "no completion, but this run needs dataset completions (a 'completion' "
          "column, or messages ending with an assistant turn)",
          row.get(column),
      )
    prompt_ids, completion_ids = encode_prompt(tokenizer, prompt), None
  else:
    prompt_ids, completion_ids = encode_completion(
        tokenizer, prompt, completion, end_ids, index, "messages" if layout == "messages" else "completion"
    )
  if not prompt_ids:
    raise BadRow(index, "prompt", "the prompt tokenizes to nothing", row.get("prompt", row.get("messages")))
  teacher_ids = None
  if "teacher_prompt" in row:
    teacher_ids = encode_prompt(tokenizer, _prompt(row["teacher_prompt"], index, "teacher_prompt"))
  full_prompt = len(prompt_ids)
  prompt_ids, completion_ids, teacher_ids = truncate(prompt_ids, completion_ids, teacher_ids, limits, index)
  out = {
      "prompt_ids": prompt_ids,
      "completion_ids": completion_ids or [],
      "has_completion": completion is not None,
      "prompt_truncated": full_prompt - len(prompt_ids),  # tokens cut from the prompt's start
  }
  if teacher_ids is not None:
    out["teacher_prompt_ids"] = teacher_ids
  return out


# ------------------------------------------------------------------------ token lists -> padded arrays


def pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [N, width], mask bool [N, width]); left padding right-aligns every sequence."""
  ids = np.full((len(seqs), width), pad_id, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, seq in enumerate(seqs):
    if len(seq) > width:
      raise ValueError(f"sequence of {len(seq)} tokens does not fit width {width}")
    cols = slice(width - len(seq), width) if left else slice(0, len(seq))
    ids[i, cols] = seq
    mask[i, cols] = True
  return ids, mask


def collate(
    rows: Sequence[dict | None], pad_id: int, prompt_width: int, completion_width: int, teacher_width: int | None = None
) -> dict[str, np.ndarray]:
  """Tokenized rows (None = filler row) -> the batch dict described in the module docstring."""
  real = [
      r
      if r is not None
      else {"prompt_ids": [], "completion_ids": [], "has_completion": False, "teacher_prompt_ids": []}
      for r in rows
  ]
  batch = {}
  batch["prompt_ids"], batch["prompt_mask"] = pad([r["prompt_ids"] for r in real], prompt_width, pad_id, True)
  batch["completion_ids"], batch["completion_mask"] = pad(
      [r["completion_ids"] for r in real], completion_width, pad_id, False
  )
  batch["has_completion"] = np.array([bool(r["has_completion"]) for r in real], bool)
  batch["row_mask"] = np.array([r is not None for r in rows], bool)
  if teacher_width is not None:
    batch["teacher_prompt_ids"], batch["teacher_prompt_mask"] = pad(
        [r["teacher_prompt_ids"] for r in real], teacher_width, pad_id, True
    )
  return batch


# ------------------------------------------------------------------------------------------ iteration


class DataLoader:
  """Tokenizes a dataset once, then serves this host's share of each global batch, addressed by step.

  Batch `step` is a pure function of (rows, seed, step): epoch = step // steps_per_epoch is shuffled with a
  generator seeded by (seed, epoch), and host h takes rows [h*b, (h+1)*b) of the global batch, b =
  batch_size / process_count. So a restarted run resumes with `batches(start_step=k)`, and the global
  batches do not depend on the number of hosts. Every host tokenizes the whole dataset (cached by
  `datasets` for file and hub sources) so that all hosts agree on bad rows and bucket widths.
  """

  def __init__(
      self,
      rows: datasets.Dataset | Sequence[dict],
      tokenizer,
      *,
      batch_size: int,
      seed: int = 0,
      max_length: int | None = None,
      max_prompt_length: int | None = None,
      max_completion_length: int | None = None,
      max_teacher_prompt_length: int | None = None,
      buckets: Sequence[int] = DEFAULT_BUCKETS,
      shuffle: bool = True,
      drop_remainder: bool = True,
      require_completion: bool = False,
      skip_bad_rows: bool = False,
      end_token_ids: Sequence[int] | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
      num_proc: int | None = None,
  ):
    if process_index is None or process_count is None:
      import jax  # only here: the pure functions above need no JAX

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    for name in ("pad_token_id", "eos_token_id"):
      if getattr(tokenizer, name) is None:
        raise ValueError(f"the tokenizer has no {name}; set tokenizer.{name[:-3]} before loading data")
    self.limits = Limits(max_length, max_prompt_length, max_completion_length, max_teacher_prompt_length)
    self.limits.check()
    self.batch_size, self.seed, self.shuffle, self.drop_remainder = batch_size, seed, shuffle, drop_remainder
    self.buckets, self.pad_id = tuple(buckets), tokenizer.pad_token_id
    self.process_index, self.local_batch_size = process_index, batch_size // process_count

    rows = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
    self.layout = detect_layout(rows.column_names)
    self.has_teacher = "teacher_prompt" in rows.column_names
    self._tokens, self.skipped = self._tokenize(
        rows, tokenizer, require_completion, skip_bad_rows, end_token_ids, num_proc
    )
    if self.skipped:
      logger.warning("skipped %d of %d bad rows; first: %s", len(self.skipped), len(rows), self.skipped[0])
    cut = np.asarray(self._tokens.with_format("numpy")["prompt_truncated"]) if len(self._tokens) else np.zeros(0)
    self.num_truncated_prompts = int((cut > 0).sum())
    if self.num_truncated_prompts:
      budget, sources = self.limits.prompt_budget, []
      if max_prompt_length is not None:
        sources.append(f"max_prompt_length={max_prompt_length}")
      if max_length is not None and max_completion_length is not None:
        sources.append(f"max_length - max_completion_length = {max_length} - {max_completion_length}")
      logger.warning(
          "%d of %d rows have prompts longer than the prompt budget of %d tokens (%s): each keeps its last %d "
          "tokens (the longest had %d)",
          self.num_truncated_prompts,
          len(self._tokens),
          budget,
          " and ".join(sources),
          budget,
          budget + int(cut.max()),
      )
    self.num_rows = len(self._tokens)
    if self.num_rows == 0:
      raise ValueError(
          f"no usable rows: {len(self.skipped)} of {len(rows)} were bad; first: "
          f"{self.skipped[0] if self.skipped else 'the dataset is empty'}"
      )
    self.steps_per_epoch = self.num_rows // batch_size if drop_remainder else -(-self.num_rows // batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"{self.num_rows} usable rows do not fill one batch of {batch_size} "
          f"(use drop_remainder=False or a smaller batch)"
      )
    lengths = self._tokens.with_format("numpy")
    self._lengths = {
        k: np.asarray(lengths[k])
        for k in ("prompt_len", "completion_len", "teacher_prompt_len")
        if k in self._tokens.column_names
    }
    self._perm_epoch, self._perm = None, None

  def _tokenize(self, rows, tokenizer, require_completion, skip_bad_rows, end_token_ids, num_proc):
    """Dataset of token columns for the good rows, and the messages of the skipped ones."""
    layout, limits, with_teacher = self.layout, self.limits, self.has_teacher

    def tokenize_batch(batch: dict, indices: list[int]) -> dict:
      out = {k: [] for k in ("prompt_ids", "completion_ids", "has_completion", "prompt_truncated", "error")}
      for index, values in zip(indices, zip(*batch.values())):
        try:
          tokens = tokenize_row(
              dict(zip(batch, values)),
              index,
              tokenizer,
              layout,
              limits,
              require_completion=require_completion,
              end_token_ids=end_token_ids,
          )
          error = ""
        except BadRow as e:
          if not skip_bad_rows:
            raise
          tokens, error = {"prompt_ids": [], "completion_ids": [], "has_completion": False, "prompt_truncated": 0}, str(
              e
          )
        for k in ("prompt_ids", "completion_ids", "has_completion", "prompt_truncated"):
          out[k].append(tokens[k])
        out["error"].append(error)
        if with_teacher:
          out.setdefault("teacher_prompt_ids", []).append(tokens.get("teacher_prompt_ids", []))
      for k in ("prompt_ids", "completion_ids", "teacher_prompt_ids"):
        if k in out:
          out[k.replace("_ids", "_len")] = [len(x) for x in out[k]]
      return out

    ids, length = datasets.Sequence(datasets.Value("int32")), datasets.Value("int32")
    features = {
        "prompt_ids": ids,
        "completion_ids": ids,
        "has_completion": datasets.Value("bool"),
        "prompt_truncated": length,
        "error": datasets.Value("string"),
        "prompt_len": length,
        "completion_len": length,
    }
    if with_teacher:
      features.update(teacher_prompt_ids=ids, teacher_prompt_len=length)
    tokens = rows.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        features=datasets.Features(features),
        num_proc=num_proc,
        desc="tokenizing",
    )
    errors = np.asarray(tokens.with_format("numpy")["error"]).astype(str)
    bad = np.flatnonzero(errors != "")
    if len(bad):
      tokens = tokens.select(np.flatnonzero(errors == ""))
    return tokens, [str(errors[i]) for i in bad]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Row order of an epoch: a permutation seeded by (seed, epoch), the same on every host and run."""
    if self._perm_epoch != epoch:
      self._perm_epoch = epoch
      self._perm = (
          np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
          if self.shuffle
          else np.arange(self.num_rows)
      )
    return self._perm

  def global_rows(self, step: int) -> np.ndarray:
    """Row positions (into the usable rows) of global batch `step`; -1 marks filler of a partial batch."""
    epoch, k = divmod(step, self.steps_per_epoch)
    idx = self.epoch_order(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
    return np.concatenate([idx, np.full(self.batch_size - len(idx), -1, idx.dtype)])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's share of global batch `step`; widths are bucketed over the whole global batch so that
    all hosts build arrays of one shape."""
    rows = self.global_rows(step)
    widths = self._widths(rows[rows >= 0])
    local = rows[self.process_index * self.local_batch_size : (self.process_index + 1) * self.local_batch_size]
    picked = local[local >= 0].tolist()
    columns = self._tokens[picked] if picked else {}
    tokenized = [dict(zip(columns, values)) for values in zip(*columns.values())]
    tokenized += [None] * (len(local) - len(picked))  # filler rows sit at the end of the global batch
    return collate(tokenized, self.pad_id, *widths)

  def _widths(self, rows: np.ndarray) -> tuple[int, int, int | None]:
    """(prompt, completion, teacher prompt) widths: the smallest buckets that fit the longest rows."""
    lim = self.limits
    completion_limit = min((x for x in (lim.max_completion_length, lim.max_length) if x is not None), default=None)
    width = lambda key, limit: bucket_size(int(self._lengths[key][rows].max()), limit, self.buckets)
    return (
        width("prompt_len", lim.prompt_budget),
        width("completion_len", completion_limit),
        width("teacher_prompt_len", lim.teacher_prompt_budget) if self.has_teacher else None,
    )

  def batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches start_step, start_step + 1, ... (endless unless num_steps); resume with the next step."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.batches()

  def state(self, step: int) -> dict:
    """What a checkpoint stores to resume at `step`, with what must match for the order to be the same."""
    return {
        "step": step,
        "seed": self.seed,
        "num_rows": self.num_rows,
        "batch_size": self.batch_size,
        "shuffle": self.shuffle,
        "drop_remainder": self.drop_remainder,
    }

  def resume_step(self, state: dict) -> int:
    """The step to pass to batches(); fails when the data or its order changed since the checkpoint."""
    now = self.state(state["step"])
    changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
    if changed:
      raise ValueError(
          f"cannot resume the data position: {changed} (checkpoint vs now) changed, so the " f"batch order would differ"
      )
    return int(state["step"])


def rows_from_config(config, source: str, split: str):
  """A run's dataset split (config.dataset_config, dataset_columns, teacher_prompt_template applied)."""
  rows = load_rows(source, split=split, name=config.dataset_config)
  return prepare_columns(
      rows, columns=config.dataset_columns.to_dict() or None, teacher_prompt_template=config.teacher_prompt_template
  )


def loader_from_config(config, tokenizer, rows, batch_size: int, **kw) -> DataLoader:
  """A DataLoader over `rows` with the run's seed, length limits and buckets; `kw` go to DataLoader."""
  return DataLoader(
      rows,
      tokenizer,
      batch_size=batch_size,
      seed=config.seed,
      max_length=config.max_length,
      buckets=tuple(config.get("length_buckets") or DEFAULT_BUCKETS),
      max_prompt_length=config.max_prompt_length,
      max_completion_length=config.max_completion_length,
      **kw,
  )
