"""Length bucketing: arrays are padded to one of a few widths so each jitted program compiles once per width
(the data pipeline's prompts and completions, the sampler's prompts)."""

from __future__ import annotations

from typing import Sequence

# Powers of two from 16: few enough shapes to compile (two more than from 64), and short chat rows are not
# padded to 64: at prompt ~30 / completion ~20 tokens that halves the train step's work.
DEFAULT_BUCKETS = tuple(2**k for k in range(4, 17))


def bucket_size(length: int, limit: int | None, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """Smallest allowed width >= length: a bucket below `limit`, or `limit` itself; with no limit, a bucket or
  else the next power of two. Never 0, so prompt-only batches still get a (tiny) completion array."""
  length = max(length, 1)
  sizes = sorted(b for b in buckets if limit is None or b < limit) + ([limit] if limit is not None else [])
  for size in sizes:
    if size >= length:
      return size
  if limit is not None:
    raise ValueError(f"a row of {length} tokens exceeds the limit {limit}")
  return 1 << (length - 1).bit_length()
