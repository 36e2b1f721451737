"""Two jax.distributed hosts that share nothing but an emulated gs:// bucket (tests/gcs_driver.py's
two_hosts scenario, in a loopback-only network namespace under strace: tests/gcs_common.py)."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from gcs_common import build_task, run_scenario


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return build_task(tmp_path_factory.mktemp("gcs_task"))


def test_b_c_two_hosts_share_only_the_bucket(task, tmp_path):
  """(b) two jax.distributed processes (4 CPU devices each) that share nothing but the bucket give the
  losses, logged samples and weights of one 8-device process; per-host local workdirs are refused at start-up
  by every host. (c) on the way, both hosts are killed with SIGKILL after a committed checkpoint and restarted:
  the run resumes from the bucket and logs every step once."""
  result = run_scenario("two_hosts", task, tmp_path)
  codes = result["codes"]
  for host in ("one", "pod0", "pod1"):
    assert codes[host] == 0, result["logs"]
  assert sorted(result["one"]) == [str(s) for s in range(1, 7)]
  assert result["pod"] == pytest.approx(result["one"], rel=1e-5)
  # Process 0 logs samples from its own devices' rows: the global batch's first rows, as in one process.
  assert result["samples"]["pod"] == result["samples"]["one"]
  assert result["samples"]["one"], "no on-policy step logged samples: the comparison would be empty"
  one = load_file(os.path.join(result["weights"]["one"], "model.safetensors"))
  pod = load_file(os.path.join(result["weights"]["pod"], "model.safetensors"))
  for name in one:
    np.testing.assert_allclose(pod[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
  # (c): killed (not exited) after step 2 was committed and before the end; the restart logs every step once.
  assert all(c == -9 for c in result["killed_at"].values()), result["killed_at"]
  assert "2/commit_success.txt" in result["steps_at_kill"] and "6/commit_success.txt" not in result["steps_at_kill"]
  assert result["pod_lines"] == 6  # each step logged once: the restart went on from its last commit
  # Per-host local workdirs: each host stops with the same message; nothing was trained.
  for host in ("local0", "local1"):
    assert codes[host] not in (0, "timeout")
    assert "is not shared by all 2 processes" in result["logs"][host] and "gs://" in result["logs"][host]
  assert result["local_files"] == {"h0": [], "h1": []}  # no file left: the check runs before any output
