"""Client for a remote teacher: top-k log-probs per position from a vLLM-compatible `/v1/completions` server.

    client = TeacherClient("http://teacher:8000", k=64)
    client.check()                                    # health, model, k accepted: fail at start-up, not step 1
    future = client.submit(ids_next, mask_next)       # overlap step n+1's requests with step n
    values, indices = client.topk_logprobs(ids, mask) # [B, T, k] float32 log-probs, int32 ids
    _, tmask, s_logits, t_vals, t_idx = shift_for_next_token(ids, loss_mask, student_logits, values, indices)
    loss = topk_generalized_jsd_loss(s_logits, t_vals, t_idx, tmask, beta=beta, values_are_logprobs=True)

The arrays are aligned to the LOGITS positions: position t holds the teacher's top-k for predicting token t+1,
exactly like `teacher_topk(teacher_logits, k)` of a local teacher, so both feed `shift_for_next_token` and
`topk_generalized_jsd_loss` the same way. The last real position, padding, and slots the server did not fill
hold -inf (index 0), which the loss treats as "not a teacher candidate".

Works with our `gkd_jax.serve` and with vLLM (`vllm serve MODEL --max-logprobs K`). Only each row's real
tokens are sent (left or right padding both work). Requests run concurrently (at most `max_parallel` in
flight) on a private event loop in a background thread; transient failures (connection errors, timeouts,
HTTP 408/429/5xx) are retried with exponential backoff; anything else, or a response that does not match
what was sent, raises `TeacherServerError` naming the URL and the problem. A server started with an API key
(`gkd_jax.serve --api-key`, `vllm serve --api-key`) needs `api_key=`; HTTP 401 (missing or wrong key) is one
error at `check()`, not retried. The request and response format is `gkd_jax.vllm_format`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import numpy as np

from gkd_jax import vllm_format
from gkd_jax.vllm_format import API_KEY_ENV

RETRY_STATUS = (408, 429, 500, 502, 503, 504)


class TeacherServerError(RuntimeError):
  """The teacher server could not be reached after the retries, refused a request, or answered malformed data."""


def _aiohttp():
  try:
    import aiohttp
  except ImportError as e:  # pragma: no cover
    raise ImportError("the teacher client needs aiohttp: pip install 'aiohttp>=3.9'") from e
  return aiohttp


def real_spans(attention_mask) -> list[tuple[int, int]]:
  """(start, length) of each row's real tokens; they must be one contiguous run (left or right padding)."""
  spans = []
  for row, m in enumerate(np.asarray(attention_mask).astype(bool)):
    where = np.flatnonzero(m)
    start, length = (int(where[0]), len(where)) if len(where) else (0, 0)
    if length and where[-1] - start + 1 != length:
      raise ValueError(f"attention_mask row {row} has gaps; real tokens must be one contiguous run")
    spans.append((start, length))
  return spans


# ------------------------------------------------------------------------------------------------- client


class TeacherClient:
  """Fetches top-k teacher log-probs for token batches from a `/v1/completions` server.

  Args:
    url: server root, e.g. "http://127.0.0.1:8000" (a trailing "/v1" is accepted).
    k: top-k per position; must be ≤ the server's max logprobs (vLLM `--max-logprobs`).
    model: model name to send; default: the first one `/v1/models` lists.
    timeout: seconds per HTTP request (whole request, including the response body).
    max_retries: retries after the first attempt for transient failures.
    backoff: first retry delay in seconds, doubled on each further retry.
    max_parallel: HTTP requests in flight at once.
    rows_per_request: sequences per HTTP request (a list of prompts); 1 lets the server batch freely.
    vocab_size: the student's (tokenizer's) vocabulary; teacher ids at or past it are dropped (-inf slot),
      so the indices are always valid for the student's logits. None: no cut.
    api_key: sent as a Bearer token (vLLM `--api-key`).
  """

  def __init__(
      self,
      url: str,
      k: int,
      *,
      model: str | None = None,
      timeout: float = 120.0,
      max_retries: int = 3,
      backoff: float = 0.5,
      max_parallel: int = 8,
      rows_per_request: int = 1,
      vocab_size: int | None = None,
      api_key: str | None = None,
  ):
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
      raise ValueError(f"k (gkd_logits_topk) must be a positive int for a teacher server, got {k!r}")
    if max_parallel < 1 or rows_per_request < 1 or max_retries < 0:
      raise ValueError("need max_parallel ≥ 1, rows_per_request ≥ 1, max_retries ≥ 0")
    _aiohttp()
    self.url = url.rstrip("/").removesuffix("/v1")
    self.k, self.model, self.timeout = k, model, timeout
    self.max_retries, self.backoff = max_retries, backoff
    self.max_parallel, self.rows_per_request, self.vocab_size = max_parallel, rows_per_request, vocab_size
    self._headers = vllm_format.auth_headers(api_key)
    self._sends_key = bool(api_key)
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
    self._thread.start()
    self._session = None
    self._slots = None
    self._model_lock = None

  # -- public API (blocking or futures; safe to call from any thread)

  def check(self) -> dict:
    """Start-up check: /health, /v1/models (model present, k ≤ its max_logprobs when listed), and one tiny
    request with prompt_logprobs=k that must parse. Returns the model card."""
    return self._run(self._check()).result()

  def submit(self, input_ids, attention_mask=None) -> concurrent.futures.Future:
    """Starts fetching the batch's top-k in the background; `.result()` gives (values, indices)."""
    ids = np.array(input_ids, np.int64, copy=True)  # A copy: the caller may reuse its buffers.
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    mask = np.ones_like(ids, bool) if attention_mask is None else np.array(attention_mask, bool, copy=True)
    if mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}")
    return self._run(self._batch(ids, real_spans(mask)))

  def topk_logprobs(self, input_ids, attention_mask=None):
    """(values [B, T, k] float32 log-probs, indices [B, T, k] int32), aligned to the logits positions."""
    return self.submit(input_ids, attention_mask).result()

  def close(self):
    """Cancels requests still in flight (e.g. a prefetch for a step that will not run), then stops."""
    if self._loop.is_closed():
      return
    self._run(self._shutdown()).result()
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._loop.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- internals (run on the client's event loop)

  async def _shutdown(self):
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
      task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if self._session is not None:
      await self._session.close()

  def _run(self, coro) -> concurrent.futures.Future:
    return asyncio.run_coroutine_threadsafe(coro, self._loop)

  def _error(self, problem: str) -> TeacherServerError:
    return TeacherServerError(f"teacher server {self.url}: {problem}")

  async def _request(self, method: str, path: str, payload=None):
    """JSON request with retries on transient failures; returns the decoded JSON body."""
    aiohttp = _aiohttp()
    if self._session is None:
      self._session = aiohttp.ClientSession(headers=self._headers)
      self._slots = asyncio.Semaphore(self.max_parallel)
    last = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
      try:
        async with self._slots:
          async with self._session.request(
              method, self.url + path, json=payload, timeout=aiohttp.ClientTimeout(total=self.timeout)
          ) as resp:
            body = await resp.read()
            status = resp.status
      except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        continue
      if status == 200:
        try:
          return json.loads(body) if body.strip() else None
        except ValueError as e:
          raise self._error(f"{method} {path} answered malformed JSON ({e}): {body[:200]!r}") from None
      message = body[:500].decode("utf-8", "replace")
      if status == 401:  # Retrying cannot help: say which key is at fault.
        detail = "the key sent was refused" if self._sends_key else "none was sent"
        raise self._error(
            f"{method} {path} was refused with HTTP 401 Unauthorized: the API key is missing or wrong ({detail}); "
            f"give the server's key as api_key= (in training: config.teacher_model_server_api_key or "
            f"${API_KEY_ENV}). Server said: {message}"
        )
      if status in RETRY_STATUS:
        last = f"HTTP {status}: {message}"
        continue
      raise self._error(f"{method} {path} was refused with HTTP {status}: {message}")
    raise self._error(f"{method} {path} failed after {self.max_retries + 1} attempts; last error: {last}")

  async def _model_card(self) -> dict:
    try:
      cards = vllm_format.parse_models(await self._request("GET", vllm_format.MODELS))
    except ValueError as e:
      raise self._error(str(e)) from None
    if self.model is None:
      return cards[0]
    for card in cards:
      if card["id"] == self.model:
        return card
    raise self._error(f"model {self.model!r} is not served; served: {[c['id'] for c in cards]}")

  async def _ensure_model(self):
    if self._model_lock is None:
      self._model_lock = asyncio.Lock()
    async with self._model_lock:
      if self.model is None:
        self.model = (await self._model_card())["id"]

  async def _check(self) -> dict:
    await self._request("GET", vllm_format.HEALTH)
    card = await self._model_card()
    self.model = card["id"]
    max_lp = vllm_format.card_max_logprobs(card)  # None from vLLM: the probe below covers it.
    if max_lp is not None and self.k > max_lp:
      raise self._error(f"k={self.k} exceeds the server's max_logprobs={max_lp}")
    await self._score([[0, 0]])
    return card

  async def _score(self, prompts: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sends prompts in one request; returns each one's parsed (values [n, k], indices [n, k])."""
    await self._ensure_model()
    payload = vllm_format.completions_request(self.model, prompts, self.k)
    response = await self._request("POST", vllm_format.COMPLETIONS, payload)
    try:
      return vllm_format.parse_completion(response, prompts, self.k, vocab_size=self.vocab_size)
    except ValueError as e:
      raise self._error(str(e)) from None

  async def _batch(self, ids: np.ndarray, spans: list[tuple[int, int]]):
    b, t = ids.shape
    values = np.full((b, t, self.k), -np.inf, np.float32)
    indices = np.zeros((b, t, self.k), np.int32)
    rows = [r for r, (_, n) in enumerate(spans) if n > 0]
    groups = [rows[i : i + self.rows_per_request] for i in range(0, len(rows), self.rows_per_request)]
    prompts = lambda g: [ids[r, spans[r][0] : spans[r][0] + spans[r][1]].tolist() for r in g]
    tasks = [asyncio.ensure_future(self._score(prompts(g))) for g in groups]
    try:
      results = await asyncio.gather(*tasks)
    except BaseException:
      for task in tasks:  # One failure fails the batch: stop sending the rest.
        task.cancel()
      raise
    for g, res in zip(groups, results):
      for r, (v, i) in zip(g, res):
        start, n = spans[r]
        values[r, start : start + n], indices[r, start : start + n] = v, i
    return values, indices
