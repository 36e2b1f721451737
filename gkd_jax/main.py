"""Entry point: `python -m gkd_jax.main --config=configs/NAME.py[:arg] --workdir=DIR [--config.key=value]`.

A run stopped by SIGTERM (a preempted spot / queued-resource VM) saves a checkpoint and exits with status
75 (checkpoints.PREEMPTED_EXIT_CODE, "rerun me"); one Ctrl-C saves too and exits with 130 (a second one stops
at once, without saving); rerunning the same command resumes it:

  until python -m gkd_jax.main --config=... --workdir=gs://BUCKET/run; do s=$?; [ $s -eq 75 ] || exit $s; done

`config.job` picks what runs: "train" (the GKD / SFT trainer, gkd_jax.trainer), "demo" (the embedded
offline pipeline of configs/default.py, gkd_jax.demos.arithmetic) or "bigram" (GKD between bigram LMs,
gkd_jax.demos.bigram).

A bad config value, path or input stops the run with one line, `error: <message>`, and exit status 1;
`--verbosity=1` shows its traceback (and the INFO logs). Unexpected errors always show theirs.
"""

import linecache
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gkd_jax import host_malloc

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/NAME.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and exports.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval"],
    "train, or eval: evaluate the workdir's latest checkpoint (or the initial student).",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host run: jax.distributed.initialize() (auto-detects TPU pods, SLURM, ...)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def initialize_distributed():
  """Joins the multi-host runtime when asked: each host then feeds its shard of the global batch and the
  train step runs as one SPMD program over all hosts' devices."""
  import jax

  if _COORDINATOR.value:
    # CPU hosts need a collectives backend for cross-process reductions (ignored on GPU / TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def run(config, workdir, mode="train"):
  job = config.get("job", "train")
  if job in ("demo", "bigram") and "://" in workdir:
    raise ValueError(
        f"--workdir={workdir}: the {job} job is an offline CPU demo and writes a local workdir; give a local path "
        f"(gs:// workdirs are for config.job='train')"
    )
  if job == "demo":
    from gkd_jax.demos import arithmetic

    return arithmetic.run(config, workdir)
  if job == "bigram":
    from gkd_jax.demos import bigram

    return bigram.run(config, workdir)
  if job == "train":
    from gkd_jax import config as config_lib
    from gkd_jax import trainer

    config_lib.validate(config)
    return trainer.train(config, workdir) if mode == "train" else trainer.evaluate_workdir(config, workdir)
  raise ValueError(f"config.job={job!r} is invalid: must be one of ('train', 'demo', 'bigram')")


_GKD_JAX_DIR = os.path.dirname(os.path.abspath(__file__))
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, FileExistsError)


def is_user_error(e: BaseException) -> bool:
  """A known user error whose message is ours: a gkd_jax exception class (CheckpointError, DiskFullError,
  TeacherServerError, ...); a missing / existing path (the message names it); or a ValueError that a `raise`
  statement in gkd_jax raised. A ValueError from inside a library (e.g. a shape error that JAX's traceback
  filtering makes look like it came from our call) keeps its traceback, like any unexpected error
  (TypeError, KeyError, ...)."""
  if type(e).__module__.split(".")[0] == "gkd_jax" or isinstance(e, _PATH_ERRORS):
    return True
  if not isinstance(e, ValueError):
    return False
  tb = e.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  if not filename.startswith(_GKD_JAX_DIR + os.sep):
    return False
  return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def main(argv):
  host_malloc.default_platform_to_cpu()  # CPU hosts: no TPU probe by libtpu (its start-up error lines)
  host_malloc.reexec_if_wanted()  # CPU hosts: malloc settings that keep large buffers between steps
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  # --verbosity=1 (or more): known user errors keep their traceback, and INFO logs stay on.
  verbose = flags.FLAGS["verbosity"].present and logging.get_verbosity() >= 1
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log every checkpoint step at INFO; keep the console to progress bars and warnings.
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  from gkd_jax import checkpoints, storage, workdir_lock  # after the re-exec above, like every jax-importing module

  # gcsfs logs every exhausted retry with a traceback; the run's own error names the URL once.
  std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except checkpoints.Interrupted as e:  # a first Ctrl-C: saved, and says where to resume
    logging.warning("%s", e)
    sys.exit(checkpoints.INTERRUPTED_EXIT_CODE)
  except checkpoints.Preempted as e:
    logging.warning("%s", e)
    sys.exit(checkpoints.PREEMPTED_EXIT_CODE)
  except workdir_lock.WorkdirLocked as e:
    logging.error("%s", e)
    sys.exit(1)
  except storage.StorageError as e:
    logging.error("%s", e)
    # Orbax / tensorstore threads may go on retrying the lost storage for many minutes; nothing they could
    # still finish would count (a checkpoint without its commit marker is never listed), so stop now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a known user error, printed as one line
    if verbose or not is_user_error(e):
      raise
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
