"""glibc malloc settings for CPU runs, applied by re-executing the process before any work starts.

XLA:CPU allocates every intermediate of a step afresh. glibc serves allocations above 32 MiB (and any
allocation from a worker thread's arena above 64 MiB) with a new mmap, and returns it to the kernel on free,
so each step page-faults all of its large buffers again: a [512, 32768] f32 `x + 1` takes 20 ms instead of
4 ms (16,385 page faults per call), and a train step at a 32k vocabulary spends a large part of its time in
the kernel. One arena, no mmap'd chunks and no trimming keep freed memory for the next step (the process
keeps its peak resident size, which it reaches every step anyway). The settings are environment variables
read at process start, hence the re-exec.

Applied only on hosts without an accelerator device (no /dev/nvidia*, /dev/accel*, /dev/vfio) and only when
JAX_PLATFORMS does not name another platform; GKD_JAX_MALLOC=system turns it off.

On such a host the entry points also set JAX_PLATFORMS=cpu when it is unset (`default_platform_to_cpu`): with
libtpu installed (the test extra), JAX would otherwise probe the TPU backend at start-up, and libtpu prints
several `E0000 ... unexpected worker hostname` error lines on every CPU run. A TPU VM (a /dev/accel* or
/dev/vfio device, or TPU_* environment variables), a GPU host, or an explicit JAX_PLATFORMS (even empty:
`JAX_PLATFORMS=` keeps JAX's own probing) is left alone.
"""

from __future__ import annotations

import glob
import os
import sys

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
OPT_OUT = "GKD_JAX_MALLOC"
# NVIDIA GPUs, TPU chips (v2-v4: accel, v5 and later: vfio), AMD GPUs (ROCm), GPUs under WSL2.
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel*", "/dev/vfio/[0-9]*", "/dev/kfd", "/dev/dxg")
TPU_ENV_PREFIXES = ("TPU_", "CLOUD_TPU", "COLAB_TPU")
# Set by `import jax` itself wherever libtpu is installed: no sign of a TPU host.
TPU_ENV_FROM_IMPORT = ("TPU_LIBRARY_PATH", "TPU_SKIP_MDS_QUERY", "TPU_ML_PLATFORM", "TPU_ML_PLATFORM_VERSION")


def accelerator_device() -> bool:
  return any(glob.glob(p) for p in ACCELERATOR_DEVICES)


def default_platform_to_cpu(environ=os.environ) -> bool:
  """Sets JAX_PLATFORMS=cpu on a Linux host with no accelerator device and no TPU environment, when
  JAX_PLATFORMS is not set at all; returns whether it did. Call it before JAX initializes a backend (JAX reads
  the variable at import, so an already imported jax gets the same setting through its config)."""
  if "JAX_PLATFORMS" in environ or not sys.platform.startswith("linux"):
    return False
  if any(k.startswith(TPU_ENV_PREFIXES) and k not in TPU_ENV_FROM_IMPORT for k in environ) or accelerator_device():
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  if environ is os.environ and "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return True


def wanted(environ=os.environ) -> bool:
  """Whether this process should run with SETTINGS: a glibc Linux CPU host that did not opt out."""
  if environ.get(OPT_OUT, "") == "system" or not sys.platform.startswith("linux"):
    return False
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and set(platforms.split(",")) - {"cpu"}:
    return False
  if accelerator_device():
    return False
  import platform

  return platform.libc_ver()[0] == "glibc"


def applied(environ=os.environ) -> bool:
  return all(environ.get(k) == v for k, v in SETTINGS.items())


def reexec_if_wanted() -> None:
  """Replaces this process with the same command line under SETTINGS when they are wanted and not yet set.
  Call it first thing in an entry point: nothing done before it survives."""
  if applied() or not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **SETTINGS})


def release() -> None:
  """Returns the heap's free memory to the kernel (glibc malloc_trim): under SETTINGS nothing else does, so
  call it when a phase that peaked is over and something else (another process) needs the memory."""
  if applied():
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
