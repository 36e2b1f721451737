"""Test setup: 8 virtual CPU devices (for mesh tests), no network, and one persistent compilation cache
for the whole session so that the CLI tests' subprocesses reuse each other's compiled programs."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Made by the first process (pytest, or xdist's controller, whose workers inherit it); removed when it exits.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gkd_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# The longest files by their tests' summed time (--durations=0 on 2 cores), longest first. With one file per
# worker at a time, a long file handed out last runs alone on one core while the other idles.
LONGEST_FIRST = (
    "test_trainer.py",
    "test_scan.py",
    "test_gcs_pod.py",
    "test_gcs.py",
    "test_sweep.py",
    "test_mllm.py",
    "test_losses.py",
    "test_demo.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
