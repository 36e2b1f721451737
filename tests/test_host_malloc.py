"""The CPU malloc settings: applied by re-executing the process, skipped where they are not wanted."""

import os
import subprocess
import sys

from gkd_jax import host_malloc

PROBE = "from gkd_jax import host_malloc; host_malloc.reexec_if_wanted(); import os; print(os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('PROBE_ARG'))"


def run_probe(**env):
  base = {k: v for k, v in os.environ.items() if k not in host_malloc.SETTINGS and k != host_malloc.OPT_OUT}
  out = subprocess.run(
      [sys.executable, "-c", PROBE], env={**base, "PROBE_ARG": "kept", **env}, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  return out.stdout.split()


def test_reexec_applies_the_settings_and_keeps_the_environment():
  if not host_malloc.wanted({k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", host_malloc.OPT_OUT)}):
    return  # an accelerator host or another libc: nothing is applied there (see the tests below)
  assert run_probe() == ["1", "kept"]


def test_opt_out_and_other_platforms_are_left_alone():
  assert run_probe(GKD_JAX_MALLOC="system") == ["None", "kept"]
  assert run_probe(JAX_PLATFORMS="tpu") == ["None", "kept"]
  assert not host_malloc.wanted({"GKD_JAX_MALLOC": "system"})
  assert not host_malloc.wanted({"JAX_PLATFORMS": "cuda,cpu"})


def test_applied_needs_every_setting():
  assert host_malloc.applied(dict(host_malloc.SETTINGS))
  assert not host_malloc.applied({**host_malloc.SETTINGS, "MALLOC_MMAP_MAX_": "65536"})


def test_cpu_platform_only_where_jax_platforms_is_unset_and_no_accelerator_or_tpu_env():
  for environ in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "tpu"}, {"TPU_NAME": "v5e"}, {"TPU_WORKER_HOSTNAMES": "h"}):
    before = dict(environ)
    assert not host_malloc.default_platform_to_cpu(environ) and environ == before
  environ = {"PATH": "/bin", "TPU_LIBRARY_PATH": "/x/libtpu.so", "TPU_SKIP_MDS_QUERY": "1"}  # (from `import jax`)
  if host_malloc.accelerator_device():
    assert not host_malloc.default_platform_to_cpu(environ) and "JAX_PLATFORMS" not in environ
  else:
    assert host_malloc.default_platform_to_cpu(environ) and environ["JAX_PLATFORMS"] == "cpu"
