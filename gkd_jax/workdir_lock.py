"""An exclusive lock on a run's workdir, so that two runs never write one workdir at once.

    with workdir_lock.hold(workdir):  # raises WorkdirLocked naming the holder when another run has it
      ...  # the whole run

Process 0 holds WORKDIR/.lock for the whole run; the file holds JSON {host, pid, start_time, token} that the
message of a refused run names. Locally the lock is an fcntl.flock on an open descriptor of that file, so a
process that dies (even by kill -9) releases it with its descriptors: the next run finds the file unlocked,
warns that it takes over the stale lock, and rewrites it. On object storage (gs://) there is no flock: the
lock object is created only if absent (a create-only precondition where the filesystem has one), and an
existing one is stale when it names this host and a pid that is not alive here. A lock is released (the
file removed) when the run ends, whatever way it ends (errors, preemption, Ctrl-C), except by kill -9.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import time
import uuid
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from gkd_jax import storage

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir's lock; the message names the workdir and the holder."""


def _describe(holder: dict | None) -> str:
  if not holder:
    return "an unknown process (the lock file is empty or unreadable)"
  return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('start_time')}"


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  except (TypeError, ValueError, OverflowError):
    return False
  return True


def _parse(text: str) -> dict | None:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


@dataclasses.dataclass
class WorkdirLock:
  """A held lock; `release()` (or leaving the `with` block) removes it."""

  workdir: str
  path: str
  holder: dict
  _fd: int | None = None
  _held: bool = True

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    if self._fd is not None:  # local: remove while still holding the flock, then let it go with the descriptor
      try:
        if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
          os.remove(self.path)
      except FileNotFoundError:
        pass
      finally:
        os.close(self._fd)
        self._fd = None
      return
    try:
      current = _parse(storage.read_text(self.path)) if storage.exists(self.path) else None
      if current and current.get("token") == self.holder["token"]:  # never remove another run's lock
        storage.remove(self.path)
    except Exception as e:  # noqa: BLE001 - releasing must not hide how the run ended
      logger.warning("could not release the workdir lock %s: %s", self.path, storage.short(e))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def acquire(workdir: str) -> WorkdirLock:
  """Takes the workdir's lock for this process, or raises WorkdirLocked naming the workdir and the holder."""
  path = storage.join(workdir, LOCK_FILE)
  me = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "token": uuid.uuid4().hex,
  }
  storage.makedirs(workdir)
  if not storage.is_url(workdir):
    lock = _acquire_flock(workdir, path, me)
    if lock is not None:
      return lock
  return _acquire_object(workdir, path, me)


def _refuse(workdir: str, path: str, holder: dict | None, hint: str = "") -> WorkdirLocked:
  return WorkdirLocked(
      f"--workdir={workdir} is in use by another run: {_describe(holder)} holds its lock {path}. Two runs in "
      f"one workdir would overwrite each other's checkpoints and metrics: wait for that run to end, stop it, "
      f"or use another workdir{hint}"
  )


def _acquire_flock(workdir: str, path: str, me: dict) -> WorkdirLock | None:
  """The local lock (None when this filesystem has no flock: then the lock file alone is the lock)."""
  import fcntl

  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        try:
          holder = _parse(storage.read_text(path))
        except FileNotFoundError:  # released just now: try again
          continue
        raise _refuse(workdir, path, holder) from None
      logger.warning("%s: no flock on this filesystem (%s); locking by the lock file's content alone", path, e)
      return None
    try:  # the holder may have released (removed) the file between our open and flock: lock the current one
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      continue
    previous = os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")
    if previous.strip():  # a lock file nobody holds: its run ended without removing it (killed, crashed)
      logger.warning(
          "taking over the stale lock %s of %s: that process no longer holds it", path, _describe(_parse(previous))
      )
    data = json.dumps(me).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return WorkdirLock(workdir, path, me, _fd=fd)


def _acquire_object(workdir: str, path: str, me: dict) -> WorkdirLock:
  """The lock as a file / object created only if absent (object storage, or local without flock)."""
  text = json.dumps(me)
  for _ in range(3):
    if storage.create_text(path, text):
      return WorkdirLock(workdir, path, me)
    try:
      holder = _parse(storage.read_text(path))
    except FileNotFoundError:  # released meanwhile
      continue
    if holder and holder.get("token") == me["token"]:  # our own create, retried after a lost response
      return WorkdirLock(workdir, path, me)
    if holder and holder.get("host") == me["host"] and not _alive(holder.get("pid")):
      logger.warning("taking over the stale lock %s of %s: that process is gone", path, _describe(holder))
      # Two runs taking over one stale lock at the same moment could both get here; the create-only write
      # below lets one of them win where the storage has a precondition.
      storage.remove(path)
      continue
    raise _refuse(
        workdir,
        path,
        holder,
        f". If that run is gone (its host lost, so its pid cannot be checked from here), delete {path} and rerun",
    )
  raise _refuse(workdir, path, None)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[WorkdirLock | None]:
  """The workdir's lock for the duration of the block, taken by process 0 only (on every process: the
  same WorkdirLocked when process 0 could not take it); released however the block ends."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and error is None:
      error = WorkdirLocked(f"--workdir={workdir} is in use by another run (process 0 could not lock it: see its log)")
  if error is not None:
    raise error
  try:
    yield lock
  except storage.StorageError:
    # The storage is gone: releasing would only retry against it. The lock names this host and a pid that
    # is about to exit, so the next run here takes it over as stale.
    raise
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  else:
    if lock is not None:
      lock.release()
