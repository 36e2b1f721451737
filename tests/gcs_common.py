"""Shared by tests/test_gcs.py and tests/test_gcs_pod.py: the task in local files, and running one scenario of
tests/gcs_driver.py inside a network namespace that has only loopback, under strace, failing when any
process opened a connection anywhere but 127.0.0.1 (the emulator, and JAX's coordinator between the
processes of a pod)."""

import json
import os
import re
import subprocess
import sys

import torch
import transformers

from gkd_jax.tasks import arithmetic
import tiny_runs

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_driver.py")


def build_task(root) -> str:
  """Tiny student and teacher checkpoints and the task's rows as JSON-lines files (train in two parts)."""
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
    cfg = tiny_runs.qwen2_config(tok, hidden, len(tok) + extra_rows, tied=name == "student")
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
