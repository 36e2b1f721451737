"""Runs whose models, data and workdir live in a gs:// bucket, against a local Cloud Storage emulator
(tests/gcs_emulator.py), each scenario driven by tests/gcs_driver.py inside a network namespace that has only
loopback, under strace: a test fails if any process opened a connection anywhere but 127.0.0.1 (the
emulator, and JAX's coordinator between the processes of a pod)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from gkd_jax import checkpoints
from gkd_jax.tasks import arithmetic

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_driver.py")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """Tiny student and teacher checkpoints and the task's rows as JSON-lines files (train in two parts)."""
  root = tmp_path_factory.mktemp("gcs_task")
  paths = arithmetic.make_task(str(root / "task"), seed=0, num_train=64, num_test=8)
  rows = arithmetic.load_task(str(root / "task"))
  data = root / "data"
  data.mkdir()
  rows["train"].select(range(32)).to_json(str(data / "train-00000.jsonl"), lines=True)
  rows["train"].select(range(32, 64)).to_json(str(data / "train-00001.jsonl"), lines=True)
  rows["test"].to_json(str(data / "test.jsonl"), lines=True)
  tok = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
  models = {}
  for name, hidden, extra_rows in (("student", 32, 0), ("teacher", 48, 3)):
    torch.manual_seed(hidden)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok) + extra_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=name == "student",
    )
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(root / name)
    tok.save_pretrained(root / name)
    models[name] = str(root / name)
  spec = root / "task.json"
  spec.write_text(json.dumps({**models, "data_dir": str(data)}))
  return str(spec)


_CONNECT = re.compile(r"connect\(\d+, \{sa_family=(AF_\w+)(.*?)\}")
_LOOPBACK = ('inet_addr("127.0.0.1")', 'inet_pton(AF_INET6, "::1"', 'inet_pton(AF_INET6, "::ffff:127.0.0.1"')


def outside_connections(strace_log: str) -> list[str]:
  """The connect() calls of the strace log that aim anywhere but loopback (AF_UNIX / netlink are local)."""
  bad = []
  for line in strace_log.splitlines():
    match = _CONNECT.search(line)
    if match and match.group(1) in ("AF_INET", "AF_INET6") and not any(a in match.group(2) for a in _LOOPBACK):
      bad.append(line.strip())
  return bad


def test_outside_connections_are_found():
  log = (
      '12 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1\n'
      '13 connect(5, {sa_family=AF_INET, sin_port=htons(4443), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
      '14 connect(6, {sa_family=AF_UNIX, sun_path="/run/x"}, 110) = 0\n'
  )
  assert outside_connections(log) == [log.splitlines()[0].strip()]


def run_scenario(scenario: str, task: str, work) -> dict:
  """Runs the driver in a loopback-only network namespace under strace; returns its result.json."""
  work.mkdir(exist_ok=True)
  trace = work / "connect.strace"
  namespace = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
  inner = 'ip link set lo up && exec strace -f --seccomp-bpf -qq -e trace=connect -e signal=none -o "$0" "$@"'
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run(
      namespace + ["sh", "-c", inner, str(trace), sys.executable, DRIVER, scenario, str(work), task],
      env=env,
      capture_output=True,
      text=True,
      timeout=1500,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  bad = outside_connections(trace.read_text())
  assert not bad, f"connections outside loopback: {bad[:5]}"
  assert "127.0.0.1" in trace.read_text()  # the trace did see the emulator traffic
  return json.loads((work / "result.json").read_text())


def losses(text: str) -> dict:
  return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())}


def test_a_run_in_the_bucket(task, tmp_path):
  """(a) models, data (a glob of JSON-lines objects) and workdir in the bucket: the run writes everything
  there, logs the same losses as the same run from local files, and its export, copied out, loads in
  transformers with the logits gkd_jax computes; the export CLI and the server's loader take gs:// too."""
  result = run_scenario("bucket_run", task, tmp_path)
  assert result["codes"] == {"remote": 0, "local": 0, "export": 0, "serve": 0}, result["logs"]
  objects = result["objects"]
  for name in ("config.json", "metrics.jsonl", "eval.jsonl", "samples.jsonl", "export/config.json"):
    assert name in objects, objects
  assert "export/model.safetensors" in objects
  assert {"checkpoints/2/commit_success.txt", "checkpoints/4/commit_success.txt"} <= set(objects)
  assert any(n.startswith("tensorboard/events.out.tfevents") for n in objects)
  assert not any(".tmp" in n for n in objects)
  assert result["stray"] == []  # nothing written into the host's cwd (no local "gs:" directory)
  local = result["local_run"]
  with open(os.path.join(local, "metrics.jsonl")) as f:
    assert losses(result["remote_metrics"]) == losses(f.read())  # bitwise: storage changes nothing
  assert [json.loads(l)["step"] for l in result["remote_eval"].splitlines()] == [2, 4]
  assert len(result["remote_samples"].splitlines()) >= 2
  ours, theirs = load_file(os.path.join(result["run_export"], "model.safetensors")), load_file(
      os.path.join(local, "export", "model.safetensors")
  )
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  cli = load_file(os.path.join(result["cli_export"], "model.safetensors"))
  for name in ours:
    np.testing.assert_array_equal(cli[name], ours[name], err_msg=name)
  from gkd_jax.models import from_pretrained

  ids = np.array([[1, 9, 12, 7, 5, 2, 11]])
  torch_logits = transformers.AutoModelForCausalLM.from_pretrained(result["run_export"])(torch.from_numpy(ids))
  ours_logits = np.asarray(from_pretrained(result["run_export"])(ids).logits)
  np.testing.assert_allclose(torch_logits.logits.detach().numpy(), ours_logits, atol=1e-4)
  assert result["serve"]["vocab"] > 0


def test_b_c_two_hosts_share_only_the_bucket(task, tmp_path):
  """(b) two jax.distributed processes (4 CPU devices each) that share nothing but the bucket give the
  losses and weights of one 8-device process; per-host local workdirs are refused at start-up by every
  host. (c) both hosts killed with SIGKILL after a committed checkpoint, then restarted: the run resumes
  from the bucket with bitwise the losses of the uninterrupted two-host run."""
  result = run_scenario("two_hosts", task, tmp_path)
  codes = result["codes"]
  for host in ("one", "pod0", "pod1", "restart_kill0", "restart_kill1"):
    assert codes[host] == 0, result["logs"]
  assert sorted(result["one"]) == [str(s) for s in range(1, 7)]
  assert result["pod"] == pytest.approx(result["one"], rel=1e-5)
  one = load_file(os.path.join(result["weights"]["one"], "model.safetensors"))
  pod = load_file(os.path.join(result["weights"]["pod"], "model.safetensors"))
  for name in one:
    np.testing.assert_allclose(pod[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
  # (c): killed (not exited) after step 2 was committed and before the end; the restart logs every step once.
  assert all(c == -9 for c in result["killed_at"].values()), result["killed_at"]
  assert "2/commit_success.txt" in result["steps_at_kill"] and "6/commit_success.txt" not in result["steps_at_kill"]
  assert result["killed"] == result["pod"]  # bitwise
  killed = load_file(os.path.join(result["weights"]["killed"], "model.safetensors"))
  pod_weights = pod
  for name in pod_weights:
    np.testing.assert_array_equal(killed[name], pod_weights[name], err_msg=name)
  # Per-host local workdirs: each host stops with the same message; nothing was trained.
  for host in ("local0", "local1"):
    assert codes[host] not in (0, "timeout")
    assert "is not shared by all 2 processes" in result["logs"][host] and "gs://" in result["logs"][host]
  assert "checkpoints" not in result["local_dirs"]["local1"]


def test_d_storage_lost_mid_run(task, tmp_path):
  """(d) the emulator stops mid-run: the run fails at once with one error naming the gs:// URL, and the
  last committed checkpoint is intact: once storage is back, the run resumes from it."""
  result = run_scenario("emulator_stops", task, tmp_path)
  codes, log = result["codes"], result["logs"]["run"]
  assert codes["run"] == 1, log
  errors = [l for l in log.splitlines() if re.search(r"\] could not (write|read|list|check)", l)]
  assert len(errors) == 1 and "gs://bkt/run" in errors[0], log  # one error line, naming the URL
  assert result["seconds_to_fail"] < 120  # not minutes of background retries
  committed, losses = result["committed"], result["losses"]
  assert committed and committed[-1] >= 4
  assert codes["resume"] == 0, result["logs"]["resume"]
  assert sorted(int(s) for s in losses) == list(range(1, committed[-1] + 3))
