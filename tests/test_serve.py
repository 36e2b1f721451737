"""Teacher server + client on loopback: values vs a direct JAX forward, loss vs the local top-k teacher,
batching, validation (400), overload (503), API keys (401), client disconnects, retries, unreachable /
malformed servers, vLLM-format parsing."""

import concurrent.futures
import gc
import hmac
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from gkd_jax import losses  # noqa: E402
from gkd_jax import serve  # noqa: E402
from gkd_jax.models import from_pretrained  # noqa: E402
from gkd_jax.teacher_client import TeacherClient, TeacherServerError  # noqa: E402
from gkd_jax.vllm_format import API_KEY_ENV, parse_prompt_logprobs  # noqa: E402

V, K_MAX, MAX_LEN, NAME = 128, 16, 32, "tiny-teacher"
KEY = "sk-test-Key_42"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=V,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=False,
  )
  directory = str(tmp_path_factory.mktemp("teacher"))
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    model.lm_head.weight.mul_(20.0)  # Sharper logits than HF's tiny init: top-k ranks far from ties.
  model.save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def engine(ckpt):
  return serve.build_engine(
      ckpt, dtype="float32", tokenizer=None, max_logprobs=K_MAX, max_seq_len=MAX_LEN, max_batch_size=8
  )


@pytest.fixture(scope="module")
def local_logits(ckpt):
  """The teacher as a local, directly jitted forward: (ids, mask) -> logits."""
  model = from_pretrained(ckpt, dtype=jnp.float32)
  return jax.jit(lambda ids, mask: model(ids, attention_mask=mask).logits)


@pytest.fixture(scope="module")
def local_logp(local_logits):
  """log_softmax of a direct forward of one prompt (right-padded to MAX_LEN: one compile)."""
  forward = lambda ids, mask: jax.nn.log_softmax(local_logits(ids, mask)[0], axis=-1)

  def logp(prompt):
    ids, mask = np.zeros((1, MAX_LEN), np.int32), np.arange(MAX_LEN)[None] < len(prompt)
    ids[0, : len(prompt)] = prompt
    return np.asarray(forward(ids, mask))[: len(prompt)]

  return logp


@pytest.fixture(scope="module")
def server(engine):
  with serve.ServerThread(serve.make_app(engine, NAME, max_queue=64, batch_wait_s=0.02)) as s:
    yield s


@pytest.fixture(scope="module")
def keyed(engine):
  """The same engine behind a server that needs KEY."""
  with serve.ServerThread(serve.make_app(engine, NAME, batch_wait_s=0.002, api_key=KEY)) as s:
    yield s


def call(url, path, body=None, headers=(), timeout=30):
  """(status, JSON answer, response headers) of a GET (body None) or POST."""
  data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **dict(headers)})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as resp:
      return resp.status, json.loads(resp.read()), resp.headers
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read()), e.headers


def post(url, body, timeout=30):
  return call(url, "/v1/completions", body, timeout=timeout)[:2]


def get(url, path):
  with urllib.request.urlopen(url + path, timeout=10) as resp:
    return json.loads(resp.read())


def prompts_of(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, V, n).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------- server values


def test_prompt_logprobs_match_direct_forward_and_requests_batch(server, local_logp):
  prompts, k = prompts_of((2, 5, 9, 17, 32, 3, 12, 7)), 5
  before = get(server.url, "/stats")["forwards"]
  with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
    answers = list(
        pool.map(
            lambda p: post(server.url, {"model": NAME, "prompt": p, "max_tokens": 1, "prompt_logprobs": k}), prompts
        )
    )
  for p, (status, body) in zip(prompts, answers):
    assert status == 200, body
    plp = body["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(p) and plp[0] is None
    ref = local_logp(p)
    for t in range(1, len(p)):
      order = np.argsort(-ref[t - 1])
      expected = {int(i): r + 1 for r, i in enumerate(order[:k])}
      expected.setdefault(p[t], int(np.sum(ref[t - 1] >= ref[t - 1, p[t]])))  # The actual token, any rank.
      got = {int(key): info for key, info in plp[t].items()}
      assert set(got) == set(expected)
      for tok, info in got.items():
        assert info["rank"] == expected[tok]
        np.testing.assert_allclose(info["logprob"], ref[t - 1, tok], atol=2e-5)
    assert body["usage"]["prompt_tokens"] == len(p)
    assert body["choices"][0]["finish_reason"] == "length"
  stats = get(server.url, "/stats")
  assert stats["forwards"] - before < len(prompts), stats  # Separate requests shared a forward.
  assert all(b in (1, 2, 4, 8) and t in (16, 32) for b, t in stats["compiled_shapes"])  # Bucketed shapes.


def test_list_of_prompts_one_choice_each_and_no_logprobs(server, local_logp):
  prompts = prompts_of((4, 1, 6), seed=1)
  status, body = post(server.url, {"prompt": prompts, "max_tokens": 0, "prompt_logprobs": 0})
  assert status == 200, body
  assert [c["index"] for c in body["choices"]] == [0, 1, 2]
  assert body["choices"][1]["prompt_logprobs"] == [None]
  entry = body["choices"][0]["prompt_logprobs"][2]
  assert list(entry) == [str(prompts[0][2])]  # k=0: only the actual token, like vLLM.
  np.testing.assert_allclose(entry[str(prompts[0][2])]["logprob"], local_logp(prompts[0])[1, prompts[0][2]], atol=2e-5)
  status, body = post(server.url, {"prompt": prompts[0]})
  assert status == 200 and body["choices"][0]["prompt_logprobs"] is None
  assert post(server.url, {"prompt": prompts[0], "echo": False})[0] == 200  # vLLM's default, said explicitly
  assert get(server.url, "/health") == {"status": "ok"}
  card = get(server.url, "/v1/models")["data"][0]
  assert card["id"] == NAME and card["max_logprobs"] == K_MAX


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2, 3], 400, "JSON object"),
        ({"prompt_logprobs": 2}, 400, "missing field 'prompt'"),
        ({"prompt": "hello"}, 400, "text prompts"),
        ({"prompt": []}, 400, "non-empty"),
        ({"prompt": [[1, 2], []]}, 400, "'prompt[1]' must be a non-empty"),
        ({"prompt": [1, V]}, 400, f"'prompt[1]' = {V} is outside the vocabulary [0, {V})"),
        ({"prompt": [[3], [1, -1]]}, 400, "'prompt[1][1]' = -1 is outside"),
        ({"prompt": [1, 2.5]}, 400, "'prompt[1]' must be an integer"),
        ({"prompt": [1, True]}, 400, "'prompt[1]' must be an integer"),
        ({"prompt": [1] * (MAX_LEN + 1)}, 400, "max_seq_len"),
        (
            {"prompt": [1, 2], "prompt_logprobs": K_MAX + 1},
            400,
            f"'prompt_logprobs' must be an integer in [0, {K_MAX}]",
        ),
        ({"prompt": [1, 2], "prompt_logprobs": "5"}, 400, "'prompt_logprobs'"),
        ({"prompt": [1, 2], "max_tokens": 16}, 400, "'max_tokens' must be 0 or 1"),
        ({"prompt": [1, 2], "model": "other"}, 400, "'other' is not served"),
        ({"prompt": [1, 2], "stream": True}, 400, "'stream'"),
        (b'{"prompt": [1], "prompt": [2]}', 400, "key 'prompt' appears more than once"),
        (b'{"prompt": [1, 2], "max_tokens": 1, "max_tokens": 0}', 400, "key 'max_tokens' appears more than once"),
        (b'{"prompt": [1, 2], "extra_body": {"a": 1, "a": 1}}', 400, "key 'a' appears more than once"),
        ({"prompt": [1, 2], "echo": True}, 400, "'echo' must be false or absent, got True: this server does not echo"),
        ({"prompt": [1, 2], "echo": 1}, 400, "'echo' must be false or absent"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, status, words):
  code, answer = post(server.url, body)
  assert code == status and words in answer["message"], answer


def test_overload_answers_503_and_keeps_serving(engine):
  app = serve.make_app(engine, NAME, max_queue=3, batch_wait_s=0.3, max_body_bytes=4096)
  with serve.ServerThread(app) as s:
    code, answer = post(s.url, {"prompt": [[1, 2]] * 4})  # More prompts than the whole queue.
    assert code == 503 and "queue full" in answer["message"]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      codes = [
          c
          for c, _ in pool.map(lambda p: post(s.url, {"prompt": p, "prompt_logprobs": 2}), prompts_of([6] * 12, seed=3))
      ]
    assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
    code, answer = post(s.url, b'{"prompt": [' + b"1," * 3000 + b"1]}")
    assert code == 413, answer
    assert post(s.url, {"prompt": [5, 6, 7], "prompt_logprobs": 1})[0] == 200  # Still alive.
    assert get(s.url, "/stats")["rejected"] >= 1


class SlowEngine:
  """The real engine with a slow (or failing) forward."""

  def __init__(self, engine, delay, fail=False):
    self.engine, self.delay, self.fail = engine, delay, fail

  def __getattr__(self, name):
    return getattr(self.engine, name)

  def score(self, prompts):
    time.sleep(self.delay)
    if self.fail:
      raise FloatingPointError("the teacher forward produced NaN log-probabilities")
    return self.engine.score(prompts)


def test_event_loop_answers_during_a_forward_and_forward_errors_are_500(engine):
  with serve.ServerThread(serve.make_app(SlowEngine(engine, delay=1.5), NAME)) as s:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      slow = pool.submit(post, s.url, {"prompt": [1, 2, 3], "prompt_logprobs": 1})
      time.sleep(0.3)
      t0 = time.perf_counter()
      assert get(s.url, "/health") == {"status": "ok"} and get(s.url, "/stats")["queued"] == 0
      assert time.perf_counter() - t0 < 0.5  # Not stuck behind the 1.5 s forward.
      assert slow.result()[0] == 200
  with serve.ServerThread(serve.make_app(SlowEngine(engine, delay=0, fail=True), NAME)) as s:
    code, answer = post(s.url, {"prompt": [1, 2, 3]})
    assert code == 500 and "NaN" in answer["message"]
    with TeacherClient(s.url, k=1, max_retries=1, backoff=0.01) as client:
      with pytest.raises(TeacherServerError, match="failed after 2 attempts; last error: HTTP 500.*NaN"):
        client.topk_logprobs(np.array([[1, 2, 3]]))


def send_raw(port, body: bytes, *, extra_length=0) -> socket.socket:
  """A POST /v1/completions written on a raw socket (Content-Length `extra_length` more than sent)."""
  sock = socket.create_connection(("127.0.0.1", port), timeout=10)
  head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
  sock.sendall(f"{head}Content-Length: {len(body) + extra_length}\r\n\r\n".encode() + body)
  return sock


def test_client_disconnects_are_counted_without_tracebacks(engine, caplog):
  caplog.set_level(logging.DEBUG)
  with serve.ServerThread(serve.make_app(SlowEngine(engine, delay=0.4), NAME)) as s:
    body = json.dumps({"prompt": [1, 2, 3], "prompt_logprobs": 2}).encode()
    queued = [send_raw(s.port, body) for _ in range(12)]  # Whole requests, waiting behind a 0.4 s forward...
    half = [send_raw(s.port, body[:10], extra_length=len(body) - 10) for _ in range(4)]  # ...and half-sent ones.
    time.sleep(0.1)
    for sock in queued + half:
      sock.close()  # Before any answer.
    for _ in range(100):
      stats = get(s.url, "/stats")
      if stats["disconnects"] == 16:
        break
      time.sleep(0.05)
    assert stats["disconnects"] == 16 and stats["requests"] == 12, stats
    assert post(s.url, {"prompt": [5, 6, 7], "prompt_logprobs": 1})[0] == 200  # Still serving.
    assert get(s.url, "/stats")["disconnects"] == 16  # An answered request is no disconnect.
  gc.collect()  # asyncio reports a never-retrieved exception when its future is collected.
  loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert not loud, [r.getMessage() for r in loud]
  gone = [r.getMessage() for r in caplog.records if r.name == "gkd_jax.serve" and "went away" in r.getMessage()]
  assert len(gone) == 16 and all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "gkd_jax.serve")
  assert sum("before its answer" in m for m in gone) == 12 and sum("while sending" in m for m in gone) == 4


# ------------------------------------------------------------------------------------------------ API key


def test_api_key_401_unless_the_bearer_key_matches_health_stays_open(keyed):
  auth = lambda key: {"Authorization": f"Bearer {key}"}
  good = {"prompt": [1, 2, 3], "prompt_logprobs": 2}
  before = call(keyed.url, "/stats", None, auth(KEY))[1]
  for path, body in (("/v1/completions", good), ("/v1/models", None), ("/stats", None), ("/v1/nothing", None)):
    for headers, problem in (
        ({}, "no API key was sent"),
        (auth(KEY + "x"), "the API key sent is wrong"),
        (auth(KEY[:-1]), "the API key sent is wrong"),
        ({"Authorization": KEY}, "no API key was sent"),  # not a Bearer token
        (auth(""), "no API key was sent"),
    ):
      status, answer, response_headers = call(keyed.url, path, body, headers)
      assert status == 401 and answer["type"] == "AuthenticationError" and answer["code"] == 401, (path, answer)
      assert problem in answer["message"] and "Authorization: Bearer <key>" in answer["message"]
      assert KEY not in json.dumps(answer) and response_headers["WWW-Authenticate"] == "Bearer"
  for headers in (auth(KEY), {"Authorization": f"bearer  {KEY} "}):  # The scheme is case-insensitive.
    status, answer, _ = call(keyed.url, "/v1/completions", good, headers)
    assert status == 200 and len(answer["choices"][0]["prompt_logprobs"]) == 3
    assert call(keyed.url, "/v1/models", None, headers)[1]["data"][0]["id"] == NAME
  status, answer, _ = call(keyed.url, "/stats", None, auth(KEY))
  assert status == 200 and answer["unauthorized"] - before["unauthorized"] == 20
  assert answer["requests"] - before["requests"] == 2  # Refused ones never reached the queue.
  assert call(keyed.url, "/health", None)[:2] == (200, {"status": "ok"})  # For load balancers: no key.
  assert call(keyed.url, "/health", None, auth("wrong"))[0] == 200


def test_api_key_is_compared_in_constant_time(keyed, monkeypatch):
  calls = []

  def spy(a, b):
    calls.append((a, b))
    return hmac_compare(a, b)

  hmac_compare = hmac.compare_digest
  monkeypatch.setattr(hmac, "compare_digest", spy)
  assert call(keyed.url, "/v1/models", None, {"Authorization": "Bearer nope"})[0] == 401
  assert call(keyed.url, "/v1/models", None, {"Authorization": f"Bearer {KEY}"})[0] == 200
  assert call(keyed.url, "/v1/models", None)[0] == 401
  assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode()), (b"", KEY.encode())]
  with pytest.raises(ValueError, match="api_key is empty"):
    serve.make_app(None, NAME, api_key="")


def test_client_with_the_key_works_without_it_one_clear_401_not_retried(keyed):
  stats = lambda: call(keyed.url, "/stats", None, {"Authorization": f"Bearer {KEY}"})[1]
  with TeacherClient(keyed.url, k=2, api_key=KEY) as client:
    assert client.check()["id"] == NAME
    assert client.topk_logprobs(np.array([[1, 2, 3]]))[1].shape == (1, 3, 2)
  for api_key, detail in ((None, "none was sent"), ("sk-not-it", "the key sent was refused")):
    before = stats()["unauthorized"]
    with TeacherClient(keyed.url, k=2, api_key=api_key, max_retries=3, backoff=0.01) as client:
      with pytest.raises(TeacherServerError) as e:
        client.check()
    message = str(e.value)
    assert message.startswith(f"teacher server {keyed.url}: GET /v1/models was refused with HTTP 401 Unauthorized")
    assert f"the API key is missing or wrong ({detail})" in message and API_KEY_ENV in message
    assert "sk-not-it" not in message  # The key is never echoed.
    assert stats()["unauthorized"] == before + 1  # Not retried.


def test_trainer_client_takes_the_key_from_config_else_from_the_environment(keyed, monkeypatch):
  from gkd_jax import config as config_lib
  from gkd_jax import trainer

  c = config_lib.base_config()
  c.teacher_model_server, c.gkd_logits_topk = keyed.url, 2
  monkeypatch.delenv(API_KEY_ENV, raising=False)
  with pytest.raises(TeacherServerError, match=rf"{keyed.url}: .*HTTP 401.*missing or wrong \(none was sent\)"):
    trainer.teacher_server_client(c, V)
  for config_key, env_key in ((KEY, None), (None, KEY), (KEY, "stale"), ("", KEY)):
    c.teacher_model_server_api_key = config_key
    if env_key is None:
      monkeypatch.delenv(API_KEY_ENV, raising=False)
    else:
      monkeypatch.setenv(API_KEY_ENV, env_key)
    if config_key == "":  # set, but empty: no key sent (the environment is only read when the field is None)
      with pytest.raises(TeacherServerError, match="none was sent"):
        trainer.teacher_server_client(c, V)
      continue
    client = trainer.teacher_server_client(c, V)
    try:
      assert client.model == NAME and client.topk_logprobs(np.array([[4, 5]]))[1].shape == (1, 2, 2)
    finally:
      client.close()
  c.teacher_model_server_api_key = "wrong"  # The config's key wins over the environment's.
  with pytest.raises(TeacherServerError, match=r"missing or wrong \(the key sent was refused\)"):
    trainer.teacher_server_client(c, V)


def test_cli_key_from_flag_or_environment_and_a_warning_when_open_beyond_loopback(engine, monkeypatch, caplog):
  apps = []
  monkeypatch.setattr(serve, "build_engine", lambda *args, **kw: engine)
  monkeypatch.setattr(web, "run_app", lambda app, host, port, **kw: apps.append((app, host)))

  def main(*flags, env=None):
    if env is None:
      monkeypatch.delenv(API_KEY_ENV, raising=False)
    else:
      monkeypatch.setenv(API_KEY_ENV, env)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gkd_jax.serve"):
      serve.main(["--model", "m", "--warmup", "none", *flags])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    with serve.ServerThread(apps[-1][0]) as s:
      open_ = call(s.url, "/v1/models", None)[0] == 200
      keys = [
          k for k in (KEY, "env-key") if call(s.url, "/v1/models", None, {"Authorization": f"Bearer {k}"})[0] == 200
      ]
    return open_, keys, warnings

  open_, keys, warnings = main("--host", "0.0.0.0")
  assert (
      open_ and len(warnings) == 1 and "--host 0.0.0.0 without an API key" in warnings[0] and API_KEY_ENV in warnings[0]
  )
  assert main("--host", "127.0.0.1") == (True, [KEY, "env-key"], [])  # Open, quietly: loopback only.
  assert main("--host", "localhost")[2] == [] and main("--host", "::1")[2] == []
  assert main("--host", "0.0.0.0", env="env-key") == (False, ["env-key"], [])
  assert main("--host", "0.0.0.0", "--api-key", KEY, env="env-key") == (False, [KEY], [])  # The flag wins.
  assert main("--host", "0.0.0.0", env="")[2] != []  # An empty variable is no key.
  with pytest.raises(SystemExit):
    serve.main(["--model", "m", "--api-key", ""])


def test_cli_serves_a_checkpoint(ckpt):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  cmd = [
      sys.executable,
      "-m",
      "gkd_jax.serve",
      "--model",
      ckpt,
      "--port",
      str(port),
      "--max-logprobs",
      "4",
      "--max-seq-len",
      "16",
      "--max-batch-size",
      "2",
      "--dtype",
      "float32",
      "--warmup",
      "none",
  ]
  env = dict(os.environ, XLA_FLAGS="", GKD_JAX_API_KEY=KEY)  # One CPU device is enough for the server process.
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):  # Up to 60 s for the import and the load.
      try:
        get(url, "/health")
        break
      except OSError:
        assert proc.poll() is None, proc.communicate()[0].decode()
        time.sleep(0.25)
    assert call(url, "/v1/models", None)[0] == 401  # The key came from $GKD_JAX_API_KEY.
    with TeacherClient(url, k=4, api_key=KEY) as client:
      card = client.check()
      assert card["id"] == ckpt and card["max_logprobs"] == 4
      values, indices = client.topk_logprobs(np.array([[3, 4, 5, 6]]))
      assert values.shape == (1, 4, 4) and np.isfinite(values[0, :3]).all() and np.isneginf(values[0, 3]).all()
  finally:
    proc.terminate()
    out = proc.communicate(timeout=30)[0].decode()
  assert "serving" in out and "API key required" in out, out


# ---------------------------------------------------------------------------------------------- client


def test_client_loss_equals_local_topk_teacher(local_logits, server):
  k, b, t = 6, 4, 24
  rng = np.random.RandomState(0)
  ids = rng.randint(0, V, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, :9] = False  # left-padded
  mask[2, 17:] = False  # right-padded
  mask[3, :20] = False  # short
  ids[~mask] = 0
  loss_mask = mask & (np.arange(t) >= 12)  # "completion" tokens...
  loss_mask[:, 1:] &= mask[:, :-1]  # ...each predicted from a real token (row 3's first one is not)
  teacher_logits = local_logits(ids, mask)
  student_logits = jnp.asarray(rng.randn(b, t, V).astype(np.float32) * 3)

  with TeacherClient(server.url, k, max_parallel=3) as client:
    assert client.check()["id"] == NAME and client.model == NAME
    values, indices = client.submit(ids, mask).result(timeout=60)
  assert values.dtype == np.float32 and indices.dtype == np.int32 and values.shape == (b, t, k)
  # Aligned to the logits: position t holds the top-k for token t+1; the last real token and padding hold -inf.
  last = np.array([t - 1, t - 1, 16, t - 1])
  assert np.isneginf(values[np.arange(b), last]).all() and np.isneginf(values[~mask]).all()
  local_v, local_i = losses.teacher_topk(teacher_logits, k)
  predicts = mask & np.roll(mask, -1, axis=1)
  predicts[:, -1] = False
  np.testing.assert_array_equal(indices[predicts], np.asarray(local_i)[predicts])
  local_logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(teacher_logits)), np.asarray(local_i), -1)
  np.testing.assert_allclose(values[predicts], local_logp[predicts], atol=2e-5)

  for beta in (0.0, 0.5, 1.0):

    def loss(v, i):
      _, tmask, s, tv, ti = losses.shift_for_next_token(
          jnp.asarray(ids), jnp.asarray(loss_mask), student_logits, jnp.asarray(v), jnp.asarray(i)
      )
      return losses.topk_generalized_jsd_loss(s, tv, ti, tmask, beta=beta, temperature=0.9)

    remote, local = loss(values, indices), loss(local_v, local_i)
    assert abs(float(remote) - float(local)) <= 1e-5, (beta, remote, local)
    shifted = loss(np.roll(values, 1, axis=1), np.roll(indices, 1, axis=1))  # An off-by-one would show.
    assert abs(float(shifted) - float(local)) > 1e-3


def test_load_8_clients_x_50_requests_each_matched(server, engine, local_logp):
  k, clients, per = 4, 8, 50
  engine.warmup("all")  # Time serving, not compiling.
  prompts = prompts_of(np.random.RandomState(5).randint(2, 20, clients * per), seed=6)
  latencies = []

  def run(c):
    with TeacherClient(server.url, k, model=NAME, max_parallel=1) as client:
      out = []
      for p in prompts[c * per : (c + 1) * per]:
        t0 = time.perf_counter()
        out.append(client.topk_logprobs(np.array([p])))
        latencies.append(time.perf_counter() - t0)
      return out

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [r for rs in pool.map(run, range(clients)) for r in rs]
  wall = time.perf_counter() - t0
  for p, (v, i) in zip(prompts[::23], results[::23]):  # Spot-check values; the parser checked every token.
    ref = local_logp(p)
    np.testing.assert_allclose(v[0, :-1], np.take_along_axis(ref[:-1], i[0, :-1], -1), atol=2e-5)
    np.testing.assert_array_equal(i[0, :-1, 0], ref[:-1].argmax(-1))
  print(
      f"\nload: {len(prompts)} requests, {len(prompts) / wall:.0f} req/s, p50 {1e3 * np.median(latencies):.1f} ms, "
      f"p99 {1e3 * np.quantile(latencies, 0.99):.1f} ms; stats {get(server.url, '/stats')['batch_sizes']}"
  )


# ----------------------------------------------------------------------------------- fake / broken servers

# Hand-written in vLLM's format: string token-id keys, null first entry, the actual token added as an extra
# entry (k+1 entries) when it is outside the top-k, and listed first.
VLLM_RESPONSE = """{"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "teacher",
 "choices": [{"index": 0, "text": "!", "logprobs": null, "finish_reason": "length", "stop_reason": null,
  "prompt_logprobs": [null,
    {"9": {"logprob": -0.25, "rank": 1, "decoded_token": " b"}, "4": {"logprob": -1.75, "rank": 2, "decoded_token": "x"}},
    {"3": {"logprob": -6.5, "rank": 7, "decoded_token": "c"}, "8": {"logprob": -0.5, "rank": 1, "decoded_token": "y"},
     "1": {"logprob": -1.5, "rank": 2, "decoded_token": "z"}},
    {"7": {"logprob": -0.125, "rank": 1, "decoded_token": "d"}}]}],
 "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}"""
VLLM_PROMPT = [5, 9, 3, 7]


def test_parse_vllm_format():
  plp = json.loads(VLLM_RESPONSE)["choices"][0]["prompt_logprobs"]
  values, indices = parse_prompt_logprobs(plp, VLLM_PROMPT, 2)
  np.testing.assert_array_equal(values, [[-0.25, -1.75], [-0.5, -1.5], [-0.125, -np.inf], [-np.inf, -np.inf]])
  np.testing.assert_array_equal(indices, [[9, 4], [8, 1], [7, 0], [0, 0]])
  values, indices = parse_prompt_logprobs(plp, VLLM_PROMPT, 2, vocab_size=8)  # Cut to the student's vocab.
  np.testing.assert_array_equal(indices[:2], [[4, 0], [1, 0]])
  assert np.isneginf(values[:2, 1]).all()
  with pytest.raises(ValueError, match="lacks the prompt token 6"):
    parse_prompt_logprobs(plp, [5, 9, 6, 7], 2)
  with pytest.raises(ValueError, match="list of 3 entries"):
    parse_prompt_logprobs(plp, [5, 9, 3], 2)


class Fake:
  """A tiny aiohttp server: /v1/models, and /v1/completions answering from a list of canned replies."""

  def __init__(self, replies):
    self.replies, self.calls = list(replies), 0
    app = web.Application()
    app.router.add_get("/v1/models", self.models)
    app.router.add_post("/v1/completions", self.completions)
    self.server = serve.ServerThread(app)

  async def models(self, _):
    return web.json_response({"data": [{"id": "teacher"}]})

  async def completions(self, request):
    await request.read()
    self.calls += 1
    status, text = self.replies[min(self.calls, len(self.replies)) - 1]
    return web.Response(status=status, text=text, content_type="application/json")

  def __enter__(self):
    self.url = self.server.start().url
    return self

  def __exit__(self, *exc):
    self.server.stop()


def test_client_retries_then_succeeds_and_aligns_padding():
  with Fake([(503, '{"message": "busy"}'), (500, "oops"), (200, VLLM_RESPONSE)]) as fake:
    with TeacherClient(fake.url + "/v1", k=2, max_retries=3, backoff=0.01) as client:
      ids = np.array([[0, 0] + VLLM_PROMPT])
      values, indices = client.topk_logprobs(ids, ids != 0)  # left-padded by 2
  assert fake.calls == 3
  np.testing.assert_array_equal(indices[0, :, 0], [0, 0, 9, 8, 7, 0])
  assert np.isneginf(values[0, :2]).all() and values[0, 2, 0] == -0.25


@pytest.mark.parametrize(
    "replies, words, calls",
    [
        ([(200, "{not json")], "malformed JSON", 1),
        ([(200, '{"choices": []}')], "should answer 1 choices", 1),
        ([(200, VLLM_RESPONSE.replace('"7": {', '"x7": {'))], "malformed /v1/completions response", 1),
        ([(400, '{"message": "k too big"}')], 'refused with HTTP 400: {"message": "k too big"}', 1),
        ([(503, '{"message": "busy"}')], "failed after 3 attempts; last error: HTTP 503", 3),
    ],
)
def test_client_clear_errors_from_a_bad_server(replies, words, calls):
  with Fake(replies) as fake:
    with TeacherClient(fake.url, k=2, max_retries=2, backoff=0.01) as client:
      with pytest.raises(TeacherServerError) as e:
        client.topk_logprobs(np.array([VLLM_PROMPT]))
  assert fake.url in str(e.value) and words in str(e.value) and fake.calls == calls


def test_client_unreachable_after_retries_and_server_stopped_mid_run(engine, server):
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # Nothing listens here once closed.
  t0 = time.perf_counter()
  with TeacherClient(url, k=2, max_retries=2, backoff=0.05, timeout=5) as client:
    with pytest.raises(TeacherServerError, match="failed after 3 attempts; last error: ClientConnectorError"):
      client.topk_logprobs(np.array([[1, 2, 3]]))
    with pytest.raises(TeacherServerError, match=url):
      client.check()
  assert time.perf_counter() - t0 >= 0.05 + 0.1  # Backed off 0.05 s, then 0.1 s.
  stopping = serve.ServerThread(serve.make_app(engine, NAME)).start()
  with TeacherClient(stopping.url, k=2, max_retries=2, backoff=0.01) as client:
    assert client.topk_logprobs(np.array([[1, 2, 3]]))[1].shape == (1, 3, 2)
    stopping.stop()  # Mid-run: the next batch retries on a dead port, then fails loudly.
    with pytest.raises(TeacherServerError, match=f"{stopping.url}: POST /v1/completions failed after 3 attempts"):
      client.topk_logprobs(np.array([[1, 2, 3]]))
  with TeacherClient(server.url, k=K_MAX + 1) as client:
    with pytest.raises(TeacherServerError, match=f"exceeds the server's max_logprobs={K_MAX}"):
      client.check()
  with pytest.raises(ValueError, match="gkd_logits_topk"):
    TeacherClient(server.url, k=None)
