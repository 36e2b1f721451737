"""Dataset rows: loading them (files, the hub, save_to_disk), their column layouts, validation, tokenizing.

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

Any layout may add `images` (ms-swift's multimodal rows): a list of images, the k-th shown where the prompt's
k-th `<image>` placeholder stands. Placeholders belong in the prompt's non-assistant turns; a row needs exactly
one per image. With the run's `gkd_jax.images.ImageInputs` each placeholder is expanded to the image's tokens
(`<img>`, `<IMG_CONTEXT>` per tile token, `</img>`) before tokenization, as transformers' InternVLProcessor
does, and the row records each image's tile count; a text-only run (no ImageInputs) rejects rows that have
images. Rows with images take no `teacher_prompt`.

Chat completions are cut out of the rendered conversation (full rendering minus the rendering of the prompt
with the generation prompt), so they end with the template's own end-of-turn token, exactly what a sampler
started from the prompt ids must learn to emit.

`gkd_jax.data` turns the token lists of `tokenize_row` into padded, bucketed batches.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import datasets

from gkd_jax import storage

ACCEPTED_LAYOUTS = (
    "accepted column layouts: 'messages' (chat list of {'role', 'content'}; a final assistant turn is the "
    "completion), 'prompt' + 'completion' (text, or a chat-list prompt with a text or chat-list completion), "
    "'prompt' alone (prompt-only); any of them optionally with 'teacher_prompt' (text or chat list) and with "
    "'images' (a list of images, one per '<image>' placeholder in the prompt)"
)

IMAGES = "images"  # the column of a multimodal row's images

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

  def prompt_budget_source(self) -> str:
    """The settings that make the prompt budget, for messages that tell which to raise."""
    sources = []
    if self.max_prompt_length is not None:
      sources.append(f"max_prompt_length={self.max_prompt_length}")
    if self.max_length is not None and self.max_completion_length is not None:
      sources.append(f"max_length - max_completion_length = {self.max_length} - {self.max_completion_length}")
    return " and ".join(sources) or "no limit"

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


# ------------------------------------------------------------------------------------------------- images


def image_values(row: dict, index: int) -> list:
  """A row's `images` as a list (missing or None: no images)."""
  value = row.get(IMAGES)
  if value is None:
    return []
  if not isinstance(value, (list, tuple)):
    raise BadRow(index, IMAGES, "expected a list of images (one per '<image>' placeholder)", value)
  return list(value)


def _contents(value: str | list[dict] | None) -> list[tuple[str, str]]:
  """(role, text) of a prompt or completion: a text is one user turn."""
  if value is None:
    return []
  if isinstance(value, str):
    return [("user", value)]
  return [(m["role"], m["content"]) for m in value]


def expand_images(
    row: dict, index: int, prompt: str | list[dict], completion: str | list[dict] | None, image_inputs
) -> tuple[str | list[dict], list[int]]:
  """(the prompt with each `<image>` placeholder expanded to its image's tokens, each image's tile count).

  image_inputs: a gkd_jax.images.ImageInputs. Checks the row: placeholders only in non-assistant prompt
  turns, one per image, every image readable, no teacher_prompt; else BadRow naming the row and column."""
  ph = image_inputs.placeholder
  values = image_values(row, index)
  column = "messages" if "messages" in row else "prompt"
  for j, (role, text) in enumerate(_contents(prompt)):
    if role == "assistant" and ph in text:
      raise BadRow(
          index, column, f"message {j} is the assistant's but holds {ph!r}: images belong in the prompt's other turns"
      )
  if any(ph in text for _, text in _contents(completion)):
    raise BadRow(
        index,
        column if column == "messages" else "completion",
        f"the completion holds {ph!r}: images belong in the prompt's non-assistant turns",
    )
  teacher = row.get("teacher_prompt")
  if teacher is not None and (values or ph in str(teacher)):
    raise BadRow(index, "teacher_prompt", "a teacher_prompt is not supported in rows with images")
  found = sum(text.count(ph) for _, text in _contents(prompt))
  if found != len(values):
    raise BadRow(
        index,
        IMAGES,
        f"the prompt holds {found} {ph!r} placeholder(s) but the row has {len(values)} image(s): "
        "each image needs one placeholder, in order",
    )
  tiles = [image_inputs.tiles(image_inputs.open(v, index, IMAGES, k)) for k, v in enumerate(values)]
  if isinstance(prompt, str):
    return image_inputs.expand(prompt, tiles), tiles
  out, k = [], 0
  for m in prompt:
    n = m["content"].count(ph)
    out.append({**m, "content": image_inputs.expand(m["content"], tiles[k : k + n])} if n else m)
    k += n
  return out, tiles


def _check_image_tokens(
    prompt_ids: list[int], completion_ids: list[int] | None, tiles: list[int], image_inputs, index: int, column: str
) -> None:
  """The tokenized prompt holds exactly the expanded images' tokens (no stray image tokens in the text)."""
  start, context, end = image_inputs.token_ids
  want = {start: len(tiles), context: image_inputs.image_seq_length * sum(tiles), end: len(tiles)}
  got = {t: prompt_ids.count(t) for t in want}
  if got != want or any(t in want for t in completion_ids or ()):
    names = {start: image_inputs.start_token, context: image_inputs.context_token, end: image_inputs.end_token}
    raise BadRow(
        index,
        column,
        f"the tokenized row holds image tokens of its own: expected {[(names[t], n) for t, n in want.items()]} "
        f"in the prompt (from its {len(tiles)} image(s)) and none in the completion, got "
        f"{[(names[t], n) for t, n in got.items()]}; use '<image>' placeholders, not image tokens, in the text",
    )


def _check_prompt_cut(prompt_ids: list[int], limits: Limits, image_inputs, index: int) -> None:
  """Truncation keeps a prompt's last tokens; it must never cut into an image."""
  budget = limits.prompt_budget
  if budget is None or len(prompt_ids) <= budget:
    return
  image_ids = set(image_inputs.token_ids)
  first = next((i for i, t in enumerate(prompt_ids) if t in image_ids), None)
  if first is not None and len(prompt_ids) - budget > first:
    raise BadRow(
        index,
        "prompt",
        f"the prompt is {len(prompt_ids)} tokens, images included, over its budget of {budget} tokens "
        f"({limits.prompt_budget_source()}), and truncating it would cut image tokens: raise the prompt budget "
        f"to at least {len(prompt_ids)}",
    )


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
    image_inputs=None,
) -> dict:
  """One row -> {'prompt_ids', 'completion_ids' ([] when prompt-only), 'has_completion', 'prompt_truncated' (tokens
  cut from the prompt's start)[, 'teacher_prompt_ids'][, 'image_tiles' (per image, with image_inputs)]}.

  image_inputs: the run's gkd_jax.images.ImageInputs (None: a text-only run, which rejects rows with images).
  Raises BadRow (a ValueError naming row, column and what is allowed) for unusable rows."""
  end_ids = list(end_token_ids) if end_token_ids is not None else [tokenizer.eos_token_id]
  prompt, completion = split_row(row, index, layout)
  tiles = None
  if image_inputs is not None:
    prompt, tiles = expand_images(row, index, prompt, completion, image_inputs)
  elif image_values(row, index):
    raise BadRow(
        index, IMAGES, "the row has images but this run's model takes none (a text-only checkpoint)", row[IMAGES]
    )
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
  if tiles is not None:
    _check_image_tokens(
        prompt_ids, completion_ids, tiles, image_inputs, index, "messages" if layout == "messages" else "prompt"
    )
    _check_prompt_cut(prompt_ids, limits, image_inputs, index)
  prompt_ids, completion_ids, teacher_ids = truncate(prompt_ids, completion_ids, teacher_ids, limits, index)
  out = {
      "prompt_ids": prompt_ids,
      "completion_ids": completion_ids or [],
      "has_completion": completion is not None,
      "prompt_truncated": full_prompt - len(prompt_ids),  # tokens cut from the prompt's start
  }
  if teacher_ids is not None:
    out["teacher_prompt_ids"] = teacher_ids
  if tiles is not None:
    out["image_tiles"] = tiles
  return out


def rows_from_config(config, source: str, split: str):
  """A run's dataset split (config.dataset_config, dataset_columns, teacher_prompt_template applied)."""
  rows = load_rows(source, split=split, name=config.dataset_config)
  return prepare_columns(
      rows, columns=config.dataset_columns.to_dict() or None, teacher_prompt_template=config.teacher_prompt_template
  )
