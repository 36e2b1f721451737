"""The vLLM wire format of top-k prompt log-probs: what `gkd_jax.serve` reads and answers, and what
`gkd_jax.teacher_client` sends and reads, in one place so the two cannot drift apart.

    POST /v1/completions {"prompt": [ids] | [[ids], ...], "max_tokens": 0 | 1, "prompt_logprobs": k}
      -> {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]}]}
    GET /v1/models -> {"object": "list", "data": [{"id": name, ..., "max_logprobs": K}]}
    errors -> {"object": "error", "message", "type", "code"}

Entry t ≥ 1 of `prompt_logprobs` holds the teacher's top-k log-probabilities for token t given tokens < t,
plus the actual prompt token t (so k or k+1 entries, as vLLM). Authentication is vLLM's: the header
`Authorization: Bearer KEY`.

Requests: `completions_request` builds one, `parse_request` validates one (raising `BadRequest`, which names the
field). Responses: `completion_json` / `models_json` / `error_json` build them, `parse_completion` /
`parse_models` / `parse_prompt_logprobs` read them (raising ValueError with what is wrong).
"""

from __future__ import annotations

import math
import time
import uuid

import numpy as np

HEALTH = "/health"
MODELS = "/v1/models"
COMPLETIONS = "/v1/completions"
# The environment variable that holds the teacher server's API key: read by `python -m gkd_jax.serve` and by
# the trainer when config.teacher_model_server_api_key is None (vLLM's is VLLM_API_KEY).
API_KEY_ENV = "GKD_JAX_API_KEY"


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------ authentication


def auth_headers(api_key: str | None) -> dict:
  """The headers that carry `api_key` (none without one)."""
  return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def bearer_token(header: str) -> str:
  """The key of an `Authorization: Bearer KEY` header ("" when it holds none)."""
  return header[7:].strip() if header[:7].lower() == "bearer " else ""


# ----------------------------------------------------------------------------------------------- requests


class BadRequest(ValueError):
  pass


def completions_request(model: str, prompts: list[list[int]], k: int) -> dict:
  """The /v1/completions body asking for the top-k prompt log-probs of token-id prompts (one prompt is sent
  bare, as vLLM expects of a single prompt)."""
  return {
      "model": model,
      "prompt": prompts if len(prompts) > 1 else prompts[0],
      "max_tokens": 1,
      "temperature": 0.0,
      "prompt_logprobs": k,
  }


def no_duplicate_keys(pairs):
  """json.loads' object_pairs_hook: a key given twice in one object is refused, not silently overwritten."""
  obj = {}
  for key, value in pairs:
    if key in obj:
      raise BadRequest(f"key {key!r} appears more than once in a JSON object of the request body; give each field once")
    obj[key] = value
  return obj


def parse_request(
    body, *, vocab_size: int, max_logprobs: int, max_seq_len: int, max_prompts: int, model_names: tuple[str, ...]
):
  """Validates a /v1/completions body -> (prompts, k or None, max_tokens). Raises BadRequest naming the field."""
  if not isinstance(body, dict):
    raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
  model = body.get("model")
  if model is not None and model not in model_names:
    raise BadRequest(f"model {model!r} is not served here; served: {list(model_names)}")
  if "prompt" not in body:
    raise BadRequest("missing field 'prompt' (a list of token ids, or a list of such lists)")
  prompt = body["prompt"]
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
    raise BadRequest("'prompt' must be token ids: text prompts are not supported by this server")
  if not isinstance(prompt, list) or not prompt:
    raise BadRequest(f"'prompt' must be a non-empty list of token ids or of lists of token ids, got {prompt!r:.80}")
  prompts = prompt if isinstance(prompt[0], list) else [prompt]
  if len(prompts) > max_prompts:
    raise BadRequest(f"'prompt' holds {len(prompts)} prompts; at most {max_prompts} per request")
  for i, p in enumerate(prompts):
    name = f"prompt[{i}]" if prompts is prompt else "prompt"
    if not isinstance(p, list) or not p:
      raise BadRequest(f"'{name}' must be a non-empty list of token ids, got {p!r:.80}")
    if len(p) > max_seq_len:
      raise BadRequest(f"'{name}' has {len(p)} tokens; this server's max_seq_len is {max_seq_len}")
    for j, tok in enumerate(p):
      if not _is_int(tok):
        raise BadRequest(f"'{name}[{j}]' must be an integer token id, got {tok!r:.40}")
      if not 0 <= tok < vocab_size:
        raise BadRequest(f"'{name}[{j}]' = {tok} is outside the vocabulary [0, {vocab_size})")
  k = body.get("prompt_logprobs")
  if k is not None and (not _is_int(k) or not 0 <= k <= max_logprobs):
    raise BadRequest(
        f"'prompt_logprobs' must be an integer in [0, {max_logprobs}] (the server's " f"--max-logprobs), got {k!r}"
    )
  max_tokens = body.get("max_tokens")
  max_tokens = 1 if max_tokens is None else max_tokens  # OpenAI's "as many as allowed": one here.
  if not _is_int(max_tokens) or max_tokens not in (0, 1):
    raise BadRequest(
        f"'max_tokens' must be 0 or 1 (this server scores prompts, it does not generate), " f"got {max_tokens!r}"
    )
  if body.get("stream"):
    raise BadRequest("'stream' is not supported")
  if body.get("n", 1) != 1 or body.get("best_of") not in (None, 1):
    raise BadRequest("'n' and 'best_of' must be 1")
  if body.get("logprobs") is not None:
    raise BadRequest("'logprobs' (of generated tokens) is not supported; use 'prompt_logprobs'")
  if body.get("echo") not in (None, False):
    raise BadRequest(
        f"'echo' must be false or absent, got {body['echo']!r:.40}: this server does not echo the prompt into the "
        "completion; use 'prompt_logprobs' for the prompt tokens' log-probs"
    )
  return prompts, k, max_tokens


# ---------------------------------------------------------------------------------------------- responses
#
# A scored prompt (`gkd_jax.teacher_engine.Scored`) has, for its n tokens, top_logprobs / top_ids [n, K]
# (row t predicts token t+1, descending) and token_logprob / token_rank [n-1] (of prompt tokens 1..n-1).
# `decode` maps a token id to vLLM's decoded_token (text, or None without a tokenizer).


def prompt_logprobs_json(prompt: list[int], res, k: int, decode) -> list:
  """vLLM's `prompt_logprobs`: None, then per token t ≥ 1 {str(id): {logprob, rank, decoded_token}}."""
  out: list = [None]
  top_v, top_i = res.top_logprobs[:, :k].tolist(), res.top_ids[:, :k].tolist()
  tok_lp, tok_rank = res.token_logprob.tolist(), res.token_rank.tolist()
  for t in range(1, len(prompt)):
    # The actual token first (vLLM's order); a top-k duplicate keeps its top-k entry, which is identical.
    entry = {str(prompt[t]): {"logprob": tok_lp[t - 1], "rank": tok_rank[t - 1], "decoded_token": decode(prompt[t])}}
    for r, (v, i) in enumerate(zip(top_v[t - 1], top_i[t - 1])):
      entry[str(i)] = {"logprob": v, "rank": r + 1, "decoded_token": decode(i)}
    out.append(entry)
  return out


def completion_json(model_name, prompts, results, k, max_tokens, decode) -> dict:
  """The /v1/completions answer for scored prompts; with max_tokens 1 each completion is the greedy token."""
  choices = []
  for i, (p, res) in enumerate(zip(prompts, results)):
    text = ""
    if max_tokens:
      text = decode(int(res.top_ids[-1, 0])) or ""  # Greedy next token.
    choices.append(
        {
            "index": i,
            "text": text,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
            "prompt_logprobs": None if k is None else prompt_logprobs_json(p, res, k, decode),
        }
    )
  n_prompt = sum(map(len, prompts))
  return {
      "id": f"cmpl-{uuid.uuid4().hex}",
      "object": "text_completion",
      "created": int(time.time()),
      "model": model_name,
      "choices": choices,
      "usage": {
          "prompt_tokens": n_prompt,
          "completion_tokens": max_tokens * len(prompts),
          "total_tokens": n_prompt + max_tokens * len(prompts),
      },
  }


def models_json(model_name: str, *, created: int, max_model_len: int, max_logprobs: int, vocab_size: int) -> dict:
  """The /v1/models answer: vLLM's model card, plus the max_logprobs and vocab_size a client checks k against."""
  card = {
      "id": model_name,
      "object": "model",
      "created": created,
      "owned_by": "gkd_jax",
      "root": model_name,
      "parent": None,
      "max_model_len": max_model_len,
      "max_logprobs": max_logprobs,
      "vocab_size": vocab_size,
  }
  return {"object": "list", "data": [card]}


def error_json(status: int, message: str, kind: str) -> dict:
  return {"object": "error", "message": message, "type": kind, "code": status}


def parse_models(listing) -> list[dict]:
  """The model cards of a /v1/models answer (each with an "id")."""
  cards = listing.get("data") if isinstance(listing, dict) else None
  if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) and "id" in c for c in cards):
    raise ValueError(f"GET /v1/models answered no model list: {str(listing)[:200]}")
  return cards


def card_max_logprobs(card: dict):
  """The largest k a model card says its server accepts, or None: our server lists it, vLLM does not."""
  value = card.get("max_logprobs")
  return value if _is_number(value) else None


def parse_completion(response, prompts: list[list[int]], k: int, *, vocab_size: int | None = None) -> list:
  """A /v1/completions answer to `completions_request(model, prompts, k)` -> each prompt's parsed
  (values [n, k], indices [n, k]) (see parse_prompt_logprobs); ValueError when it does not match the request."""
  choices = response.get("choices") if isinstance(response, dict) else None
  if not isinstance(choices, list) or len(choices) != len(prompts):
    raise ValueError(f"/v1/completions should answer {len(prompts)} choices, got {str(response)[:200]}")
  if len(choices) > 1:
    choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
  out = []
  for i, (p, choice) in enumerate(zip(prompts, choices)):
    try:
      if not isinstance(choice, dict):
        raise ValueError(f"choices[{i}] is not an object")
      out.append(
          parse_prompt_logprobs(choice.get("prompt_logprobs"), p, k, vocab_size=vocab_size, where=f"choices[{i}]")
      )
    except ValueError as e:
      raise ValueError(f"malformed /v1/completions response: {e}") from None
  return out


def parse_prompt_logprobs(
    prompt_logprobs, token_ids, k: int, *, vocab_size: int | None = None, where: str = "response"
):
  """One row's vLLM `prompt_logprobs` -> (values [n, k] float32, indices [n, k] int32) for its n tokens.

  Row t is the teacher's top-k for token t+1 (the server's entry t+1), sorted by log-prob; the last row and
  slots beyond what the server returned are -inf with index 0. The server's extra entry for the actual
  prompt token (present when it is outside the top-k: k+1 entries) is dropped, but its presence is checked:
  it proves the server scored exactly the tokens we sent. Ids ≥ vocab_size (embedding rows past the
  tokenizer's vocabulary) are dropped, which cuts the teacher to that vocabulary like `losses.align_vocab`.
  """
  n = len(token_ids)
  if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) != n:
    got = f"a list of {len(prompt_logprobs)}" if isinstance(prompt_logprobs, list) else repr(prompt_logprobs)[:60]
    raise ValueError(f"{where}: prompt_logprobs should be a list of {n} entries (one per prompt token), got {got}")
  if n and prompt_logprobs[0] is not None:
    raise ValueError(f"{where}: prompt_logprobs[0] should be null (nothing predicts the first token)")
  values = np.full((n, k), -np.inf, np.float32)
  indices = np.zeros((n, k), np.int32)
  for t in range(1, n):
    entry = prompt_logprobs[t]
    if not isinstance(entry, dict):
      raise ValueError(
          f"{where}: prompt_logprobs[{t}] should be an object token-id -> logprob info, " f"got {repr(entry)[:60]}"
      )
    if str(token_ids[t]) not in entry:
      raise ValueError(
          f"{where}: prompt_logprobs[{t}] lacks the prompt token {token_ids[t]}: the server did not "
          "score the tokens that were sent"
      )
    items = []
    for key, info in entry.items():
      try:
        tok = int(key)
      except (TypeError, ValueError):
        tok = -1
      lp = info.get("logprob") if isinstance(info, dict) else None
      if tok < 0 or not _is_number(lp) or math.isnan(lp) or lp > 1e-3:
        raise ValueError(
            f"{where}: prompt_logprobs[{t}][{key!r}] = {repr(info)[:80]} is not a token id with a "
            "log-probability ≤ 0"
        )
      rank = info.get("rank")
      items.append((lp, tok, rank if _is_number(rank) else None))
    if len(items) > k:
      # vLLM ranks: the top-k are 1..k; without ranks, the k most likely are the top-k.
      if all(r is not None for _, _, r in items):
        items = [it for it in items if it[2] <= k]
      items = sorted(items, key=lambda it: -it[0])[:k]
    else:
      items.sort(key=lambda it: -it[0])
    if vocab_size is not None:
      items = [it for it in items if it[1] < vocab_size]
    for j, (lp, tok, _) in enumerate(items):
      values[t - 1, j], indices[t - 1, j] = lp, tok
  return values, indices
