"""Orbax checkpoints of the whole train state, plus a JSON `extra` (data position, host RNG, fingerprint).

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, save_every=100)
    if ckpt.latest_step() is not None:
      state, extra = ckpt.restore(abstract_state, fingerprint=fp)  # arrays land in abstract_state's shardings
    ...
    ckpt.save(step, state, {"data": loader.state(step), "fingerprint": fp})  # async; every save_every steps
    ckpt.close()

Each step directory holds three items: `state` (the arrays, as a nested dict keyed by pytree path, so the
layout is independent of the Python classes that held them), `extra` (the caller's JSON) and `meta` (how to
rebuild typed PRNG keys). Orbax writes into a temporary directory and renames it when complete, so an
interrupted save is never listed as a step. Every process calls save/restore; orbax writes each array shard
from the process that owns it and the JSON items from process 0 only.

A checkpoint that does not fit the caller's abstract state (tree, shapes, dtypes, fingerprint) or cannot be
read raises `CheckpointError` naming the step directory, and nothing on disk is touched: a Checkpointer that
finds checkpoints it has not restored from refuses to save into that directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from gkd_jax import files, storage

_FORMAT = 1


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or incompatible with the state it is restored into."""


# --------------------------------------------------------------------------------------------- pytrees


def _path_str(path) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(tree) -> dict[tuple[str, ...], Any]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = _path_str(path)
    if name in flat:  # e.g. dict keys 0 and "0" side by side: they would share one stored array
      raise ValueError(f"two leaves of the state map to the checkpoint path {_name(name)!r}")
    flat[name] = leaf
  return flat


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  # Plain nested dicts: orbax then stores the same layout whatever classes (nnx.State, dataclasses, optax
  # namedtuples) held the arrays, and empty subtrees (teacher_params=None, EmptyState) need no handling.
  root = {}
  for path, leaf in flat.items():
    node = root
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return root


def _key_data_sharding(sharding):
  # Key data has one trailing (unsharded) axis more than the key array.
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, None))
  return sharding


def _name(path) -> str:
  return "/".join(path)


def _cause(e: Exception, limit: int = 300) -> str:
  """The error's first line, without the JSON spec that tensorstore appends, at most `limit` characters; the
  full chain stays on `__cause__`."""
  text = f"{type(e).__name__}: {e}".strip().split("\n", 1)[0]
  text = text.split(" [tensorstore_spec=", 1)[0].rstrip()
  return text if len(text) <= limit else text[: limit - 4] + " ..."


# ------------------------------------------------------------------------------------------ preemption

# The CLI's exit status after a preemption save: EX_TEMPFAIL of sysexits.h, "temporary failure, try again".
# A supervisor (or `until` loop) reruns the same command on 75 and stops on anything else.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """The run stopped on SIGTERM (or JAX's multi-host preemption notice) after saving `step`: rerun it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
        f"preempted: saved step {step} in {workdir}; rerun the same command to resume from it "
        f"(exit status {PREEMPTED_EXIT_CODE})"
    )
    self.step, self.workdir = step, workdir


# The CLI's exit status after a Ctrl-C save: 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
# (a supervisor does not rerun it: the user asked it to stop).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class Interrupted(KeyboardInterrupt):
  """The run stopped on Ctrl-C (SIGINT) after saving `step`; rerunning the same command resumes it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"interrupted: saved step {step} in {workdir}; rerun the same command to resume")
    self.step, self.workdir = step, workdir

  def __str__(self):
    return self.args[0]


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclasses.dataclass
class PreemptionHandler:
  """A stop flag for the train loop, set by SIGTERM or a first Ctrl-C (SIGINT); a second Ctrl-C raises
  KeyboardInterrupt at once. `uninstall()` restores the previous handlers."""

  callback: Callable[[int], None] | None = None
  _event: threading.Event = dataclasses.field(default_factory=threading.Event)
  _previous: dict = dataclasses.field(default_factory=dict)
  _installed: bool = False
  signum: int | None = None  # the first signal that asked to stop

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  @property
  def interrupted(self) -> bool:
    """Whether the stop was asked by Ctrl-C (SIGINT) rather than SIGTERM."""
    return self.signum == signal.SIGINT

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
    # Only set a flag (and let a light callback run): the train loop saves at the next step boundary,
    # outside the signal handler, where jax and orbax calls are safe.
    if self.signum is None:
      self.signum = signum
    self._event.set()
    if signum == signal.SIGINT:
      os.write(2, b"\ninterrupt: saving at the end of this step, then stopping (Ctrl-C again to stop at once)\n")
    if self.callback is not None:
      self.callback(signum)

  def uninstall(self):
    if self._installed:
      for sig, previous in self._previous.items():
        signal.signal(sig, previous)
      self._installed = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.uninstall()


_ACTIVE: list[PreemptionHandler] = []  # the installed handler (a signal handler is process-wide anyway)


def install_preemption_handler(callback: Callable[[int], None] | None = None) -> PreemptionHandler:
  """SIGTERM or a first Ctrl-C (SIGINT) → `handler.requested` becomes True (and `callback(signum)` runs);
  the process keeps running, and the train loop saves at the next step boundary and stops (`interrupted`
  tells a Ctrl-C from SIGTERM). A second Ctrl-C raises KeyboardInterrupt at once.

  With several processes, JAX's own preemption service (started by `jax.distributed.initialize`) already
  turns SIGTERM into a step that all hosts agree on (`Checkpointer.reached_preemption`); replacing its
  signal handler would break that, and hosts seeing the signal at different steps would deadlock in save.
  So there the handler is not installed (for SIGINT neither: Ctrl-C keeps Python's KeyboardInterrupt) and
  `requested` stays False.
  """
  handler = PreemptionHandler(callback)
  if jax.process_count() > 1:
    return handler
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("install_preemption_handler must be called from the main thread (a Python signal rule)")
  handler._previous = {sig: signal.signal(sig, handler._handle) for sig in _SIGNALS}
  handler._installed = True
  _ACTIVE[:] = [handler]
  return handler


def _preemption_requested() -> bool:
  return any(h._installed and h.requested for h in _ACTIVE)


# ------------------------------------------------------------------------------------- shared workdir


def check_shared_workdir(workdir: str) -> None:
  """With several processes, checks that they all see one workdir: orbax writes a multi-host checkpoint
  as one directory that every process writes its shards into, so per-host local directories would each
  hold a fragment. Process 0 writes a marker, the others look for it after a barrier; every process then
  raises the same error when one did not find it."""
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.random.default_rng().integers(1 << 62, dtype=np.int64)))
  marker = storage.join(workdir, f".gkd_jax-shared-{token:016x}")
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(marker, f"{socket.gethostname()} pid {os.getpid()}\n")
  multihost_utils.sync_global_devices("gkd_jax: workdir marker written")
  seen = multihost_utils.process_allgather(np.array(storage.exists(marker)))
  multihost_utils.sync_global_devices("gkd_jax: workdir marker checked")
  if jax.process_index() == 0:
    storage.remove(marker)
  missing = [i for i, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
  if missing:
    raise RuntimeError(
        f"--workdir={workdir} is not shared by all {jax.process_count()} processes: process(es) {missing} do "
        f"not see the marker process 0 wrote there. Multi-host checkpoints need one location every host "
        f"reaches: on a TPU pod a gs:// bucket (--workdir=gs://BUCKET/run), not a local path"
    )


# ---------------------------------------------------------------------------------------- checkpointer


class Checkpointer:
  """Periodic async saves with keep-N, and validated restores into target shardings."""

  def __init__(
      self,
      directory,
      *,
      max_to_keep: int | None = 3,
      save_every: int = 100,
      async_save: bool = True,
      keep_period: int | None = None,
  ):
    if save_every < 1:
      raise ValueError(f"save_every must be ≥ 1, got {save_every}")
    directory = str(directory)  # orbax wants local paths absolute (a relative --workdir failed at the first save)
    self.directory = epath.Path(directory if storage.is_url(directory) else os.path.abspath(directory))
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        keep_period=keep_period,  # steps that are multiples of it are kept besides the last max_to_keep
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save killed mid-write
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )
    # Steps present before this run: saving next to them without having resumed from one would let keep-N
    # delete another run's checkpoints.
    self._foreign = list(self._manager.all_steps())
    self._preemption = (None, False)  # (step, answer) of the last reached_preemption query

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def set_aside_after(self, step: int) -> tuple[list[int], str | None]:
    """Moves the checkpoints after `step` out of this directory (into DIRECTORY.set-aside-TIMESTAMP, by
    process 0), so that a run resumed from `step` saves its own later steps and keep-N counts only them.
    Returns (the steps moved, where to)."""
    later = sorted(s for s in self._manager.all_steps() if s > step)
    if not later:
      return [], None
    aside = f"{self.directory}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      for s in later:
        storage.move(str(self.step_dir(s)), storage.join(aside, str(s)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("gkd_jax: later checkpoints set aside")
    self._manager.reload()
    return later, aside

  def reached_preemption(self, step: int) -> bool:
    """True once SIGTERM arrived (single process, handler installed) or at JAX's multi-host preemption
    sync point; the train loop saves and exits then. The answer is sampled once per step, so `save(step)`
    and a later `reached_preemption(step)` agree even when the signal lands between the two calls."""
    step = int(step)
    if self._preemption[0] != step:
      self._preemption = (step, _preemption_requested() or self._manager.reached_preemption(step))
    return self._preemption[1]

  def save(self, step: int, state, extra: dict | None = None, *, force: bool = False) -> bool:
    """Starts an async save when `step % save_every == 0`, `force`, or preemption; returns whether it did.
    A step already on disk is never overwritten."""
    step = int(step)
    if not (force or step % self.save_every == 0 or self.reached_preemption(step)):
      return False
    if self._foreign:
      raise CheckpointError(
          f"{self.directory} holds checkpoints at steps {self._foreign} that this run did not restore from; "
          f"restore one (restore() checks compatibility) or use another directory, rather than mixing runs"
      )
    if step in self._manager.all_steps():
      return False
    try:  # fail here, not later in the background thread that writes it
      json.dumps(extra or {})
    except TypeError as e:
      raise TypeError(f"checkpoint extra must be JSON-serializable: {e}") from e
    flat = _flatten(state)
    keys = {
        _name(p): {"impl": str(jax.random.key_impl(x)), "dtype": str(x.dtype)} for p, x in flat.items() if _is_key(x)
    }
    arrays = {p: jax.random.key_data(x) if _is_key(x) else x for p, x in flat.items()}
    with self._writing(self.step_dir(step), f"checkpoint step {step}"):
      return self._manager.save(
          step,
          force=True,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_nest(arrays)),
              extra=ocp.args.JsonSave(dict(extra or {})),
              meta=ocp.args.JsonSave({"format": _FORMAT, "keys": keys}),
          ),
      )

  def _writing(self, path, what):
    # A full disk mid-save: orbax never renamed the partial write into a step, so the last listed step is
    # complete. (An async save's failure surfaces at the next save, wait() or close().)
    try:
      steps = self._manager.all_steps()
    except Exception:  # noqa: BLE001 - the storage may be what failed; the message then names no step
      return files.writing(str(path), what)
    intact = (
        f"the last complete checkpoint, step {max(steps)}, is intact" if steps else "no checkpoint was complete yet"
    )
    return files.writing(str(path), what, intact=intact)

  def restore(self, abstract_state, step: int | None = None, *, fingerprint: Any = None):
    """Loads `step` (default: the latest) into the structure, shapes, dtypes and shardings of
    `abstract_state` (jax.ShapeDtypeStruct leaves, or arrays; typed-key leaves come back as typed keys; a
    leaf without a sharding lands on the first local device). Returns (state, extra). With `fingerprint`, `extra["fingerprint"]` must equal it.
    """
    steps = self._manager.all_steps()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint in {self.directory}")
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (steps: {sorted(steps)})")
    path = self.step_dir(step)
    try:
      info = self._manager.restore(
          step, args=ocp.args.Composite(extra=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
      )
      extra, meta = info["extra"], info["meta"]
      stored = self._manager.item_metadata(step)["state"]
    except Exception as e:  # orbax / tensorstore errors from deep inside: say which checkpoint
      raise CheckpointError(self._corrupt(path, step, steps, "is unreadable", e)) from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or stored is None:
      raise CheckpointError(f"checkpoint {path} was not written by gkd_jax.checkpoints (format {_FORMAT})")
    if fingerprint is not None and extra.get("fingerprint") != fingerprint:
      raise CheckpointError(
          f"checkpoint {path} is from another configuration: fingerprint "
          f"{extra.get('fingerprint')!r} (checkpoint) vs {fingerprint!r} (this run)"
      )

    abstract = _flatten(abstract_state)
    targets = {p: self._target(path, p, x, meta["keys"]) for p, x in abstract.items()}
    self._check(path, targets, _flatten(stored), meta["keys"])
    try:
      arrays = _flatten(
          self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_nest(targets))))["state"]
      )
    except Exception as e:
      raise CheckpointError(self._corrupt(path, step, steps, "could not be restored", e)) from e
    leaves = []
    for p, x in abstract.items():
      value = arrays[p]
      if _is_key(x):
        value = jax.random.wrap_key_data(value, impl=meta["keys"][_name(p)]["impl"])
      leaves.append(value)
    self._foreign = []  # resumed: later saves continue this run
    treedef = jax.tree_util.tree_structure(abstract_state)
    return jax.tree_util.tree_unflatten(treedef, leaves), extra

  @staticmethod
  def _corrupt(path, step, steps, what, e) -> str:
    """One line: which checkpoint is damaged, why (shortened), and how to resume from another one. Nothing
    falls back to an earlier step by itself: the user picks it."""
    others = sorted(int(s) for s in steps if s != step and s >= 1)  # (config.resume_step must be ≥ 1)
    if others:
      earlier = [s for s in others if s < step]
      hint = (
          f"to resume from an earlier step, rerun with --config.resume_step=N (the steps present besides {step}: "
          f"{others}; e.g. --config.resume_step={(earlier or others)[-1]}: the later checkpoints are set aside, "
          f"not deleted)"
      )
    else:
      hint = f"no other checkpoint is present: move {path} aside to start over"
    return f"checkpoint {path} {what} (corrupt or incomplete): {_cause(e)}; {hint}"

  @staticmethod
  def _target(path, p, x, keys) -> jax.ShapeDtypeStruct:
    """The array orbax reads for one abstract leaf (key data for a typed key), in its target sharding."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if not _is_key(x):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    stored = keys.get(_name(p))
    if stored is None or stored["dtype"] != str(x.dtype):
      raise CheckpointError(
          f"checkpoint {path}: leaf {_name(p)!r} is a PRNG key of type {x.dtype} here but "
          f"{stored['dtype'] if stored else 'a plain array'} in the checkpoint"
      )
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=_key_data_sharding(sharding))

  @staticmethod
  def _check(path, targets, stored, keys):
    missing = sorted(_name(p) for p in targets.keys() - stored.keys())
    unexpected = sorted(_name(p) for p in stored.keys() - targets.keys())
    if missing or unexpected:
      raise CheckpointError(
          f"checkpoint {path} has a different tree than the state: missing {missing[:10]}"
          f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
          f"{' ...' if len(unexpected) > 10 else ''}"
      )
    for p, want in targets.items():
      got = stored[p]
      if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
        raise CheckpointError(
            f"checkpoint {path}: leaf {_name(p)!r} is {np.dtype(got.dtype).name}"
            f"{list(got.shape)} in the checkpoint but {np.dtype(want.dtype).name}"
            f"{list(want.shape)} in the state"
            f"{' (a PRNG key in the checkpoint)' if _name(p) in keys else ''}"
        )

  def wait(self):
    """Blocks until pending async saves are on disk (re-raises a failed background save)."""
    with self._writing(self.directory, "a checkpoint"):
      self._manager.wait_until_finished()

  def close(self, wait: bool = True):
    """Waits for pending saves and releases the manager. `wait=False` is for a run stopping because its
    storage is gone: a save still retrying in the background is left to die with the process; without
    its commit it is never listed as a step."""
    if wait:
      with self._writing(self.directory, "a checkpoint"):
        self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
