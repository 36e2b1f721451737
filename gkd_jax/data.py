"""Data pipeline: tokenized dataset rows -> fixed-format numpy token batches for the trainer.

Rows are loaded, laid out and tokenized by `gkd_jax.rows` (its docstring lists the accepted layouts).

A batch (this host's rows of one global batch) is a dict of numpy arrays:

  prompt_ids          int32 [B, P]   left-padded with pad_token_id, so every prompt ends at column P-1
  prompt_mask         bool  [B, P]
  completion_ids      int32 [B, C]   right-padded
  completion_mask     bool  [B, C]   all False on prompt-only rows
  has_completion      bool  [B]
  row_mask            bool  [B]      False only on filler rows of a final partial batch (drop_remainder=False)
  teacher_prompt_ids  int32 [B, Pt]  and teacher_prompt_mask, when the dataset has `teacher_prompt`

and, when the loader has ImageInputs and the dataset an `images` column (`gkd_jax.rows`), a batch of images:

  pixel_values        float32 [B, T, 3, S, S]  each row's tiles, its images' in order, then all-zero padding
                                               tiles (all zeros on text-only and filler rows)
  num_tiles           int32   [B]              real tiles per row

P, C and Pt are picked per global batch as the smallest allowed bucket >= the longest row, so a jitted step
compiles once per bucket combination, not once per batch; T likewise is the global batch's largest tile count
rounded up to a power of two (at least 1). Images are read and preprocessed per batch, only that batch's
(tokenization opened each one once to count its tiles), so a dataset's pixels never sit in memory at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Sequence

import datasets
import numpy as np

from gkd_jax import images as images_lib
from gkd_jax.buckets import DEFAULT_BUCKETS, bucket_size  # noqa: F401 (part of this module's API)
from gkd_jax.rows import IMAGES, BadRow, Limits, detect_layout, image_values, tokenize_row

logger = logging.getLogger(__name__)


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
  batch_size / process_count. So a restarted run resumes with `batch(k)`, `batch(k + 1)`, ..., and the global
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
      image_inputs: images_lib.ImageInputs | None = None,
      image_workers: int | None = None,
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
    self.image_inputs = image_inputs
    self.image_workers = image_workers or min(8, os.cpu_count() or 1)  # threads reading a batch's images
    self.has_images = image_inputs is not None and IMAGES in rows.column_names
    # Only the images column is kept, read row by row when a batch needs its pixels.
    self._image_rows = rows.select_columns([IMAGES]) if self.has_images else None
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
        for k in ("prompt_len", "completion_len", "teacher_prompt_len", "num_tiles")
        if k in self._tokens.column_names
    }
    self._perm_epoch, self._perm = None, None

  def _tokenize(self, rows, tokenizer, require_completion, skip_bad_rows, end_token_ids, num_proc):
    """Dataset of token columns for the good rows, and the messages of the skipped ones."""
    layout, limits, with_teacher = self.layout, self.limits, self.has_teacher
    image_inputs, with_images = self.image_inputs, self.has_images

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
              image_inputs=image_inputs,
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
        if with_images:
          out.setdefault("image_tiles", []).append(tokens.get("image_tiles", []))
          out.setdefault("num_tiles", []).append(sum(tokens.get("image_tiles", [])))
          out.setdefault("row_index", []).append(index)
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
    if with_images:
      features.update(image_tiles=ids, num_tiles=length, row_index=datasets.Value("int64"))
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
    batch = collate(tokenized, self.pad_id, *widths)
    if self.has_images:
      tiles = int(self._lengths["num_tiles"][rows[rows >= 0]].max())
      batch["pixel_values"], batch["num_tiles"] = self.pixels(tokenized, images_lib.bucket_tiles(tiles))
    return batch

  def pixels(self, tokenized: Sequence[dict | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values float32 [B, width, 3, S, S], num_tiles int32 [B]) of tokenized rows (None = filler):
    their images read and preprocessed now."""
    todo = [b for b, row in enumerate(tokenized) if row is not None and row["image_tiles"]]
    rows = {b: self._image_rows[int(tokenized[b]["row_index"])] for b in todo}  # Arrow reads: one thread

    def load(b: int) -> np.ndarray:  # PIL and NumPy release the GIL for the heavy parts, so threads overlap rows
      index, want = int(tokenized[b]["row_index"]), sum(tokenized[b]["image_tiles"])
      tiles = self.image_inputs.load_pixels(image_values(rows[b], index), index, IMAGES)
      if len(tiles) != want:
        raise ValueError(
            f"row {index}: its images now give {len(tiles)} tiles, but {want} when the dataset was tokenized; "
            f"did the image files change? (clear the datasets cache to tokenize again)"
        )
      return tiles

    if len(todo) > 1 and self.image_workers > 1:
      with concurrent.futures.ThreadPoolExecutor(min(self.image_workers, len(todo))) as pool:
        loaded = dict(zip(todo, pool.map(load, todo)))
    else:
      loaded = {b: load(b) for b in todo}
    return self.image_inputs.stack([loaded.get(b) for b in range(len(tokenized))], width)

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
    """The step to pass to batch(); fails when the data or its order changed since the checkpoint."""
    now = self.state(state["step"])
    changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
    if changed:
      raise ValueError(
          f"cannot resume the data position: {changed} (checkpoint vs now) changed, so the " f"batch order would differ"
      )
    return int(state["step"])


def loader_from_config(
    config, tokenizer, rows, batch_size: int, *, image_inputs: images_lib.ImageInputs | None = None, **kw
) -> DataLoader:
  """A DataLoader over `rows` with the run's seed, length limits and buckets (and the model's ImageInputs for
  a vision-language model); `kw` go to DataLoader."""
  return DataLoader(
      rows,
      tokenizer,
      batch_size=batch_size,
      seed=config.seed,
      max_length=config.max_length,
      buckets=tuple(config.get("length_buckets") or DEFAULT_BUCKETS),
      max_prompt_length=config.max_prompt_length,
      max_completion_length=config.max_completion_length,
      image_inputs=image_inputs,
      **kw,
  )
