"""Runs whose models, data and workdir live in a gs:// bucket, against a local Cloud Storage emulator
(tests/gcs_emulator.py), each scenario driven by tests/gcs_driver.py in a loopback-only network namespace
under strace (tests/gcs_common.py): a test fails if any process connected anywhere but 127.0.0.1."""

import json
import os
import re

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from gcs_common import build_task, losses, outside_connections, run_scenario


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return build_task(tmp_path_factory.mktemp("gcs_task"))


def test_outside_connections_are_found():
  log = (
      '12 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16) = -1\n'
      '13 connect(5, {sa_family=AF_INET, sin_port=htons(4443), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
      '14 connect(6, {sa_family=AF_UNIX, sun_path="/run/x"}, 110) = 0\n'
  )
  assert outside_connections(log) == [log.splitlines()[0].strip()]


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
