"""Length bucketing: arrays are padded to one of a few widths so each jitted program compiles once per width
(the data pipeline's prompts and completions, the sampler's prompts)."""

from __future__ import annotations

from typing import Sequence

# Powers of two and 1.5x powers of two from 16 (16, 24, 32, 48, 64, 96, ...): padding wastes at most a third
# of a row's width (a quarter on average) instead of half; each axis compiles at most twice as many shapes.
# All are multiples of 8 (TPU sublanes). On chat rows with ~20-token completions the 24 bucket made the
# off-policy step 15% faster than 32 (experiments/PERF.md).
DEFAULT_BUCKETS = tuple(sorted({2**k for k in range(4, 17)} | {3 * 2 ** (k - 1) for k in range(4, 17)}))


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
