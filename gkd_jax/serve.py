"""Teacher server: top-k prompt log-probabilities over HTTP, in the vLLM format.

    python -m gkd_jax.serve --model PATH_OR_ID --port 8000 --max-logprobs 64

Implements the part of the OpenAI-compatible `/v1/completions` API that distillation clients use with vLLM
(ms-swift's `--teacher_model_server`, our `gkd_jax.teacher_client`):

    POST /v1/completions {"prompt": [ids] | [[ids], ...], "max_tokens": 0 | 1, "prompt_logprobs": k}
      -> {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]}]}

Entry t ≥ 1 of `prompt_logprobs` holds the teacher's top-k log-probabilities for token t given tokens < t,
plus the actual prompt token t (so k or k+1 entries, as vLLM). Log-probs are the model's full softmax at
temperature 1 (vLLM's raw prompt log-probs); request fields such as `temperature` do not change them. With
`max_tokens: 1` the completion is the greedy next token. Also `GET /health`, `GET /v1/models`, `GET /stats`
(counters: requests, forwards, batch sizes, rejected, cancelled prompts, client disconnects, ...).

Authentication, as vLLM's `--api-key` / `VLLM_API_KEY`: with `--api-key KEY` (or the environment variable
`GKD_JAX_API_KEY`; the flag wins) every endpoint except `GET /health` answers HTTP 401 unless the request
carries `Authorization: Bearer KEY` (compared in constant time). Without a key the server is open, as vLLM's,
and says so in a warning at start-up when `--host` is not a loopback address. The trainer sends the key of
`config.teacher_model_server_api_key`, or of `GKD_JAX_API_KEY` when that is None.

Concurrent requests are queued and batched into one jitted forward, padded to bucketed shapes (powers of two
in batch and length) so the number of compilations stays bounded. The forward runs in a worker thread so the
event loop keeps answering. Bad requests get HTTP 400 with a message naming the field (also a key given
twice in one JSON object, and `echo: true`: prompts are not echoed); a full queue gets 503. A client that
disconnects before its answer has its queued prompts dropped and is counted in `/stats` as a disconnect.

The request and response format is `gkd_jax.vllm_format`'s (shared with the client), the model and its
batching are `gkd_jax.teacher_engine`'s; this module is the HTTP front (routes, authentication, status codes,
disconnects), `ServerThread` and the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import threading
import time

import jax.numpy as jnp

from gkd_jax import host_malloc, vllm_format
from gkd_jax.teacher_engine import Batcher, Overloaded, TeacherEngine
from gkd_jax.vllm_format import API_KEY_ENV, BadRequest

log = logging.getLogger("gkd_jax.serve")


def _aiohttp_web():
  # aiohttp is only needed to serve; importing it here keeps `import gkd_jax` free of it.
  try:
    from aiohttp import web
  except ImportError as e:  # pragma: no cover
    raise ImportError("the teacher server needs aiohttp: pip install 'aiohttp>=3.9'") from e
  return web


# ---------------------------------------------------------------------------------------- client gone


class ClientGone(Exception):
  """The client closed its connection while its prompts were queued."""


async def _unless_client_gone(request, awaitable, poll_s: float = 0.02):
  """Awaits `awaitable`, or raises ClientGone (cancelling it) once the request's connection has closed.
  aiohttp does not cancel handlers on disconnect by default, so without this a gone client's prompts
  would still be computed and hold queue slots that later requests wait behind."""
  task = asyncio.ensure_future(awaitable)
  try:
    while True:
      done, _ = await asyncio.wait({task}, timeout=poll_s)
      if done:
        return task.result()
      transport = request.transport
      if transport is None or transport.is_closing():
        raise ClientGone()
  finally:
    if not task.done():
      task.cancel()
    # A gather whose futures were cancelled (the client went away) ends with a CancelledError nobody awaits;
    # retrieve it, or asyncio logs "exception was never retrieved" with a traceback for every disconnect.
    task.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future):
  if not future.cancelled():
    future.exception()


# --------------------------------------------------------------------------------------------- the app


def make_app(
    engine: TeacherEngine,
    model_name: str,
    *,
    max_queue: int = 256,
    max_prompts: int = 64,
    max_body_bytes: int = 64 << 20,
    batch_wait_s: float = 0.002,
    api_key: str | None = None,
):
  """The aiohttp application. The batcher starts and stops with the app. With `api_key`, every endpoint but
  GET /health needs the header `Authorization: Bearer <api_key>` (else HTTP 401)."""
  web = _aiohttp_web()
  if api_key is not None and not api_key:
    raise ValueError("api_key is empty: give a key, or None for a server without authentication")
  key = None if api_key is None else api_key.encode()
  batcher = Batcher(engine, max_queue=max_queue, batch_wait_s=batch_wait_s)

  def error(status, message, kind, headers=None):
    return web.json_response(vllm_format.error_json(status, message, kind), status=status, headers=headers)

  @web.middleware
  async def authenticate(request, handler):
    if key is None or (request.path == vllm_format.HEALTH and request.method in ("GET", "HEAD")):
      return await handler(request)
    token = vllm_format.bearer_token(request.headers.get("Authorization", ""))
    # Constant time: how long the comparison takes says nothing about how much of the key was right.
    if hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key):
      return await handler(request)
    batcher.stats["unauthorized"] += 1
    problem = "no API key was sent" if not token else "the API key sent is wrong"
    return error(
        401,
        f"{problem}: this server needs the header 'Authorization: Bearer <key>' with its --api-key "
        f"(or ${API_KEY_ENV})",
        "AuthenticationError",
        headers={"WWW-Authenticate": "Bearer"},
    )

  app = web.Application(client_max_size=max_body_bytes, middlewares=[authenticate])
  created = int(time.time())

  def client_gone(request, when: str, dropped: str = ""):
    """A client that closed its connection before its answer: counted, one debug line, no traceback."""
    batcher.stats["disconnects"] += 1
    log.debug("client %s went away %s%s", request.remote, when, dropped)
    return web.Response(status=499, text="client closed the connection")  # Nobody reads it; aiohttp drops it.

  async def health(_):
    return web.json_response({"status": "ok"})

  async def models(_):
    return web.json_response(
        vllm_format.models_json(
            model_name,
            created=created,
            max_model_len=engine.max_seq_len,
            max_logprobs=engine.max_logprobs,
            vocab_size=engine.vocab_size,
        )
    )

  async def stats(_):
    s = dict(
        batcher.stats,
        batch_sizes={str(b): c for b, c in sorted(batcher.stats["batch_sizes"].items())},
        queued=len(batcher._pending),
        compiled_shapes=sorted(engine.compiled_shapes),
    )
    return web.json_response(s)

  async def completions(request):
    try:
      raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
      return error(413, f"request body too large: {e.text}", "BadRequestError")
    except ConnectionError:  # aiohttp's ClientConnectionResetError: the connection closed mid-body
      return client_gone(request, "while sending its request")
    try:
      body = json.loads(raw, object_pairs_hook=vllm_format.no_duplicate_keys)
    except BadRequest as e:
      return error(400, str(e), "BadRequestError")
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
      return error(400, f"request body is not valid JSON: {e}", "BadRequestError")
    try:
      prompts, k, max_tokens = vllm_format.parse_request(
          body,
          vocab_size=engine.vocab_size,
          max_logprobs=engine.max_logprobs,
          max_seq_len=engine.max_seq_len,
          max_prompts=max_prompts,
          model_names=(model_name,),
      )
    except BadRequest as e:
      return error(400, str(e), "BadRequestError")
    try:
      futures = batcher.submit(prompts)
    except Overloaded as e:
      return error(503, str(e), "ServiceUnavailableError")
    try:
      results = await _unless_client_gone(request, asyncio.gather(*futures))
    except ClientGone:
      dropped = batcher.cancel(futures)
      return client_gone(request, "before its answer", f" (dropped {dropped} of its {len(futures)} queued prompts)")
    except Overloaded as e:
      return error(503, str(e), "ServiceUnavailableError")
    except Exception as e:
      return error(500, f"teacher forward failed: {type(e).__name__}: {e}", "InternalServerError")
    finally:
      for f in futures:
        f.cancel()  # No-op when done; frees queue slots of a request that was cancelled mid-way.
    # Building and encoding the JSON is the other heavy part: keep it off the event loop too.
    text = await asyncio.get_running_loop().run_in_executor(
        None,
        lambda: json.dumps(vllm_format.completion_json(model_name, prompts, results, k, max_tokens, engine.decode)),
    )
    response = web.Response(text=text, content_type="application/json")
    try:  # Sent here, not by aiohttp, to count a client that left while its answer was being built or sent.
      await response.prepare(request)
      await response.write_eof()
    except ConnectionError:
      client_gone(request, "while its answer was sent")
    return response

  async def on_startup(_):
    await batcher.start()

  async def on_cleanup(_):
    await batcher.stop()

  app.router.add_get(vllm_format.HEALTH, health)
  app.router.add_get(vllm_format.MODELS, models)
  app.router.add_get("/stats", stats)
  app.router.add_post(vllm_format.COMPLETIONS, completions)
  app.on_startup.append(on_startup)
  app.on_cleanup.append(on_cleanup)
  return app


class ServerThread:
  """Runs an app on host:port (0 = a free port) in a background thread: tests, notebooks, one-process setups.

  with ServerThread(app) as server:
    client = TeacherClient(server.url, k=8)
  """

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
    self.app, self.host, self.port = app, host, port
    self.url: str | None = None
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-server", daemon=True)
    self._runner = None

  def start(self) -> "ServerThread":
    web = _aiohttp_web()
    self._thread.start()

    async def up():
      self._runner = web.AppRunner(self.app, access_log=None)
      await self._runner.setup()
      site = web.TCPSite(self._runner, self.host, self.port)
      await site.start()
      return self._runner.addresses[0][1]

    try:
      self.port = asyncio.run_coroutine_threadsafe(up(), self._loop).result()
    except BaseException:
      self.stop()
      raise
    self.url = f"http://{self.host}:{self.port}"
    return self

  def stop(self):
    if self._loop.is_closed():
      return
    if self._runner is not None:
      asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
      self._runner = None
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join()
    self._loop.close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


# ---------------------------------------------------------------------------------------------- the CLI


def is_loopback(host: str) -> bool:
  """Whether a bind address only accepts connections from this machine ("localhost", 127.x.y.z, ::1)."""
  if host.lower() == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:  # "0.0.0.0" is an address (not loopback); a host name may resolve to anything
    return False


def resolve_api_key(flag: str | None) -> str | None:
  """The server's key: --api-key, else $GKD_JAX_API_KEY (empty = unset), else None (no authentication)."""
  if flag is not None:
    if not flag:
      raise ValueError("--api-key is empty: give a key, or leave the flag out for a server without one")
    return flag
  return os.environ.get(API_KEY_ENV) or None


def warn_if_open(host: str, api_key: str | None) -> bool:
  """Logs one warning when the server takes requests from other machines without a key; returns whether."""
  if api_key is not None or is_loopback(host):
    return False
  log.warning(
      "serving on --host %s without an API key: anyone who can reach this port can use the teacher; set "
      "--api-key KEY or $%s (clients then send 'Authorization: Bearer KEY')",
      host,
      API_KEY_ENV,
  )
  return True


def build_engine(
    model_path: str, *, dtype: str = "bfloat16", mesh: str | None = None, tokenizer: str | None = "", **engine_kw
) -> TeacherEngine:
  """Loads the checkpoint (and its tokenizer, for decoded_token; "" = the model's own, None = none)."""
  from gkd_jax import sharding
  from gkd_jax.models import from_pretrained, load_tokenizer

  jax_mesh = None
  if mesh:
    sizes = [int(s) for s in mesh.split(",")]
    jax_mesh = sharding.make_mesh(*sizes)
  dt = jnp.dtype(dtype)
  model = from_pretrained(model_path, dtype=dt, param_dtype=dt, mesh=jax_mesh)
  tok = None
  if tokenizer is not None:
    try:
      tok = load_tokenizer(tokenizer or model_path)
    except Exception as e:  # decoded_token is informational only; say so once and serve without it.
      log.warning("no tokenizer loaded from %s (%s): decoded_token will be null", tokenizer or model_path, e)
  return TeacherEngine(model, tokenizer=tok, **engine_kw)


def main(argv=None):
  host_malloc.default_platform_to_cpu()  # CPU hosts: no TPU probe by libtpu (its start-up error lines)
  p = argparse.ArgumentParser(prog="python -m gkd_jax.serve", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="HF checkpoint directory (local or gs://) or hub id")
  p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
  p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument(
      "--api-key",
      default=None,
      help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV}, else none)",
  )
  p.add_argument("--max-logprobs", type=int, default=64, help="largest prompt_logprobs k accepted")
  p.add_argument("--max-seq-len", type=int, default=4096, help="longest prompt in tokens")
  p.add_argument("--max-batch-size", type=int, default=32, help="prompts per forward")
  p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward (memory bound)")
  p.add_argument("--max-queue", type=int, default=512, help="queued prompts before answering 503")
  p.add_argument("--max-prompts-per-request", type=int, default=64)
  p.add_argument("--max-body-mb", type=float, default=64.0)
  p.add_argument("--batch-wait-ms", type=float, default=2.0, help="wait for more requests before a forward")
  p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype (float32 for exactness)")
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,-1,1 (default: one device)")
  p.add_argument("--tokenizer", default="", help="for decoded_token (default: the model's)")
  p.add_argument(
      "--warmup",
      default="largest",
      choices=("largest", "all", "none"),
      help="shapes to compile before serving: all buckets avoids compile stalls mid-run",
  )
  args = p.parse_args(argv)
  try:
    api_key = resolve_api_key(args.api_key)
  except ValueError as e:
    p.error(str(e))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

  engine = build_engine(
      args.model,
      dtype=args.dtype,
      mesh=args.mesh,
      tokenizer=args.tokenizer,
      max_logprobs=args.max_logprobs,
      max_seq_len=args.max_seq_len,
      max_batch_size=args.max_batch_size,
      max_batch_tokens=args.max_batch_tokens,
  )
  t0 = time.time()
  engine.warmup(args.warmup)
  log.info("warm-up (%s) compiled in %.1fs", args.warmup, time.time() - t0)
  app = make_app(
      engine,
      args.served_model_name or args.model,
      max_queue=args.max_queue,
      max_prompts=args.max_prompts_per_request,
      max_body_bytes=int(args.max_body_mb * 2**20),
      batch_wait_s=args.batch_wait_ms / 1000,
      api_key=api_key,
  )
  warn_if_open(args.host, api_key)
  log.info(
      "serving %s on http://%s:%d (max_logprobs=%d, vocab=%d, %s)",
      args.model,
      args.host,
      args.port,
      engine.max_logprobs,
      engine.vocab_size,
      "API key required" if api_key else "no API key",
  )
  _aiohttp_web().run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
  main()
