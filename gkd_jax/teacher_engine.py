"""The teacher server's model side: one jitted top-k scoring function over bucketed batches (`TeacherEngine`),
and the queue that batches prompts of concurrent requests into it (`Batcher`). `gkd_jax.serve` puts HTTP in
front of them.

Batches are right-padded to bucketed shapes (powers of two in batch and length, within max_batch_tokens) so
the number of compilations stays bounded; the forward runs in one worker thread so the server's event loop
keeps answering.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The server's logger: a failed forward is the server's error, wherever the batcher lives.
log = logging.getLogger("gkd_jax.serve")


def _bucket(n: int, lo: int, hi: int) -> int:
  """Smallest power of two ≥ n, clipped to [lo, hi]."""
  return min(max(lo, 1 << max(0, n - 1).bit_length()), hi)


# ---------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Scored:
  """One prompt's result (numpy, length n = number of prompt tokens). Row t is the distribution that
  predicts token t+1, so `token_logprob[t]` / `token_rank[t]` refer to prompt token t+1."""

  top_logprobs: np.ndarray  # [n, K] float32, descending
  top_ids: np.ndarray  # [n, K] int32
  token_logprob: np.ndarray  # [n-1] float32
  token_rank: np.ndarray  # [n-1] int32, 1 = most likely


class TeacherEngine:
  """A CausalLM behind one jitted scoring function over right-padded, bucketed batches.

  `score(prompts)` is blocking and not thread-safe; the server calls it from a single worker thread.
  """

  def __init__(
      self,
      model,
      *,
      max_logprobs: int,
      max_seq_len: int,
      max_batch_size: int,
      max_batch_tokens: int | None = None,
      min_len_bucket: int = 16,
      tokenizer=None,
  ):
    self.vocab_size = int(model.config.vocab_size)
    if not 1 <= max_logprobs <= self.vocab_size:
      raise ValueError(f"max_logprobs must be in [1, {self.vocab_size}] (the vocabulary), got {max_logprobs}")
    if max_seq_len < 2 or max_batch_size < 1:
      raise ValueError(f"need max_seq_len ≥ 2 and max_batch_size ≥ 1, got {max_seq_len}, {max_batch_size}")
    self.max_logprobs, self.max_seq_len, self.max_batch_size = max_logprobs, max_seq_len, max_batch_size
    self.max_batch_tokens = max_batch_tokens or max_seq_len * max_batch_size
    if self.max_batch_tokens < max_seq_len:
      raise ValueError(
          f"max_batch_tokens {self.max_batch_tokens} < max_seq_len {max_seq_len}: a longest "
          "prompt would never fit in a batch"
      )
    self.min_len_bucket = min(min_len_bucket, max_seq_len)
    self.tokenizer = tokenizer
    self._decoded: dict[int, str] = {}
    self.compiled_shapes: set[tuple[int, int]] = set()
    graphdef, state = nnx.split(model)
    self._state = state
    k = max_logprobs

    @jax.jit
    def score(state, ids, mask):
      # Top-K at the server's maximum: one compilation serves every requested k ≤ K.
      logits = nnx.merge(graphdef, state)(ids, attention_mask=mask).logits
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      top_v, top_i = jax.lax.top_k(logp, k)
      token_logp = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)
      # vLLM's rank: how many tokens are at least as likely as the actual one (itself included).
      rank = jnp.sum(logp[:, :-1] >= token_logp, axis=-1)
      return top_v, top_i, token_logp[..., 0], rank

    self._score = score

  def batch_bucket(self, n: int) -> int:
    return _bucket(n, 1, self.max_batch_size)

  def len_bucket(self, n: int) -> int:
    return _bucket(n, self.min_len_bucket, self.max_seq_len)

  def score(self, prompts: list[list[int]]) -> list[Scored]:
    """Scores up to max_batch_size prompts (each 1..max_seq_len valid ids) in one forward."""
    b, t = self.batch_bucket(len(prompts)), self.len_bucket(max(len(p) for p in prompts))
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    mask[len(prompts) :, 0] = 1  # Filler rows get one real token so no row attends to nothing.
    for row, p in enumerate(prompts):
      ids[row, : len(p)] = p
      mask[row, : len(p)] = 1  # Right padding: causal attention keeps real positions exact.
    self.compiled_shapes.add((b, t))
    top_v, top_i, tok_lp, rank = jax.device_get(self._score(self._state, ids, mask))
    if np.isnan(top_v[: len(prompts)]).any():
      raise FloatingPointError("the teacher forward produced NaN log-probabilities")
    # Strict JSON has no -inf; vLLM clamps the same way.
    top_v, tok_lp = np.maximum(top_v, -9999.0), np.maximum(tok_lp, -9999.0)
    return [
        Scored(top_v[r, : len(p)], top_i[r, : len(p)], tok_lp[r, : len(p) - 1], rank[r, : len(p) - 1])
        for r, p in enumerate(prompts)
    ]

  def decode(self, token_id: int) -> str | None:
    """The token's text (vLLM's decoded_token); None without a tokenizer. Cached per id."""
    if self.tokenizer is None:
      return None
    text = self._decoded.get(token_id)
    if text is None:
      text = self.tokenizer.decode([token_id])  # ids past the tokenizer (a padded embedding) decode to ""
      self._decoded[token_id] = text
    return text

  def buckets(self) -> list[tuple[int, int]]:
    """Every (batch, length) shape the server can compile, within max_batch_tokens."""
    sizes = lambda lo, hi: sorted({_bucket(1 << i, lo, hi) for i in range(hi.bit_length() + 1)})
    return [
        (b, t)
        for b in sizes(1, self.max_batch_size)
        for t in sizes(self.min_len_bucket, self.max_seq_len)
        if b == 1 or b * t <= self.max_batch_tokens
    ]

  def warmup(self, which: str = "largest"):
    """Compiles before serving: "largest" (the biggest and the smallest shapes), "all" buckets, or "none"."""
    shapes = {"all": self.buckets(), "none": []}.get(which)
    if shapes is None:
      shapes = [max(self.buckets(), key=lambda s: (s[0] * s[1], s)), (1, self.min_len_bucket)]
    for b, t in shapes:
      self.score([[0] * t] * b)


# ------------------------------------------------------------------------------------------ the batcher


class Overloaded(Exception):
  pass


class Batcher:
  """Queues prompts from concurrent requests and runs them through the engine in batches.

  One asyncio task takes up to max_batch_size queued prompts (fewer if their padded length would exceed
  max_batch_tokens) and runs the forward in a single worker thread; prompts that arrive meanwhile form the
  next batch. The queue is bounded: a request whose prompts do not fit is refused whole (`Overloaded`).
  """

  def __init__(self, engine: TeacherEngine, *, max_queue: int, batch_wait_s: float = 0.002):
    self.engine, self.max_queue, self.batch_wait_s = engine, max_queue, batch_wait_s
    self._pending: collections.deque = collections.deque()
    self._wake: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")
    self.stats = dict(
        requests=0,
        prompts=0,
        tokens=0,
        forwards=0,
        max_batch=0,
        rejected=0,
        errors=0,
        cancelled=0,
        disconnects=0,
        unauthorized=0,
        batch_sizes=collections.Counter(),
    )

  async def start(self):
    self._wake = asyncio.Event()
    self._task = asyncio.create_task(self._loop())

  async def stop(self):
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    for _, fut in self._pending:
      if not fut.done():
        fut.set_exception(Overloaded("server shutting down"))
    self._worker.shutdown(wait=True)

  def submit(self, prompts: list[list[int]]) -> list[asyncio.Future]:
    if len(self._pending) + len(prompts) > self.max_queue:
      self.stats["rejected"] += 1
      raise Overloaded(f"queue full ({len(self._pending)} prompts waiting, limit {self.max_queue}); retry later")
    loop = asyncio.get_running_loop()
    futures = []
    for p in prompts:
      futures.append(loop.create_future())
      self._pending.append((p, futures[-1]))
    self.stats["requests"] += 1
    self._wake.set()
    return futures

  def cancel(self, futures: list[asyncio.Future]) -> int:
    """Drops a gone client's prompts from the queue (a batch already in the forward finishes); returns how
    many were still waiting."""
    mine = {id(f) for f in futures}
    for f in futures:
      f.cancel()
    before = len(self._pending)
    self._pending = collections.deque(item for item in self._pending if id(item[1]) not in mine)
    self.stats["cancelled"] += before - len(self._pending)
    return before - len(self._pending)

  def _take_batch(self):
    batch, longest = [], 0
    while self._pending and len(batch) < self.engine.max_batch_size:
      if self._pending[0][1].done():  # Its request was cancelled (client gone): drop it.
        self._pending.popleft()
        continue
      n = len(self._pending[0][0])
      padded = self.engine.len_bucket(max(longest, n)) * self.engine.batch_bucket(len(batch) + 1)
      if batch and padded > self.engine.max_batch_tokens:
        break
      batch.append(self._pending.popleft())
      longest = max(longest, n)
    return batch

  async def _loop(self):
    loop = asyncio.get_running_loop()
    while True:
      await self._wake.wait()
      if len(self._pending) < self.engine.max_batch_size and self.batch_wait_s > 0:
        await asyncio.sleep(self.batch_wait_s)  # Let requests sent together arrive together.
      batch = self._take_batch()
      if not self._pending:
        self._wake.clear()
      if not batch:
        continue
      prompts = [p for p, _ in batch]
      try:
        results = await loop.run_in_executor(self._worker, self.engine.score, prompts)
      except Exception as e:  # A failed forward fails its requests (500), never the server.
        log.exception("teacher forward failed for a batch of %d", len(batch))
        self.stats["errors"] += 1
        results = [e] * len(batch)
      self.stats["forwards"] += 1
      self.stats["prompts"] += len(batch)
      self.stats["tokens"] += sum(map(len, prompts))
      self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
      self.stats["batch_sizes"][len(batch)] += 1
      for (_, fut), res in zip(batch, results):
        if fut.done():  # The client went away.
          continue
        if isinstance(res, Exception):
          fut.set_exception(res)
        else:
          fut.set_result(res)
