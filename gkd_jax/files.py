"""Run outputs: one clear error for a full disk or a path of the wrong kind, and output directories replaced
whole, so a directory never ends up holding parts of two models: locally written beside and renamed in; on
object storage (no rename there) uploaded with config.json last, the commit marker of an HF checkpoint."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Callable, Iterator

from gkd_jax import storage

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
  """No space (or quota) left while writing a run output; the message names the path."""


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` or an exception it was raised from / during is ENOSPC or EDQUOT (libraries often wrap it)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _FULL:
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def writing(path: str, what: str, intact: str = "") -> Iterator[None]:
  """Turns a full disk inside the block into one DiskFullError, and (for a URL) any failure into one
  StorageError, naming `what`, `path` and what is `intact`."""
  try:
    yield
  except (DiskFullError, storage.StorageError):
    raise
  except Exception as e:
    if is_disk_full(e):
      raise DiskFullError(
          errno.ENOSPC,
          f"no space left on the device while writing {what} to {path}; stopped here"
          f"{'; ' + intact if intact else ''}. Free space (or point the output elsewhere) and rerun",
      ) from e
    if storage.is_url(path):
      raise storage.StorageError(
          f"could not write {what} to {path}: {storage.short(e)}{'; ' + intact if intact else ''}"
      ) from e
    raise


def require_directory(path: str, what: str) -> None:
  """Fails when `path` exists but is not a directory (e.g. a file where a workdir should be)."""
  if storage.is_url(path):
    if storage.isfile(path):
      raise NotADirectoryError(f"{what}={path} is an object, not a prefix: give a new or existing directory")
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{what}={path} is a file, not a directory: give a new or existing directory")


def check_output_directory(out_dir: str, *, overwrite: bool, what: str = "--out") -> None:
  """Fails, touching nothing, when `out_dir` is a file, or holds files and `overwrite` is off."""
  require_directory(out_dir, what)
  held = storage.listdir(out_dir)
  if held and not overwrite:
    raise FileExistsError(
        f"{what}={out_dir} already holds files ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
        f"pass overwrite (--overwrite) to replace them, or choose a new directory"
    )


def replace_directory(out_dir: str, write: Callable[[str], None], *, overwrite: bool, what: str = "--out") -> str:
  """Runs `write(tmp)` into a fresh directory beside `out_dir`, then renames it to `out_dir`.

  `out_dir` may be missing or empty; one that holds files is replaced only with `overwrite` (the old
  content is moved aside, the new one renamed in, then the old one deleted), else refused untouched. A
  failed write leaves `out_dir` as it was and removes the temporary directory.
  """
  check_output_directory(out_dir, overwrite=overwrite, what=what)
  if storage.is_url(out_dir):
    _replace_prefix(out_dir, write)
    return out_dir
  out = os.path.abspath(out_dir)
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the result private
    with writing(out, what):
      write(tmp)
    if os.path.isdir(out):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(out, os.path.join(old, name))
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


COMMIT_FILE = "config.json"  # what marks an HF checkpoint complete: transformers and gkd_jax load none without it


def _replace_prefix(url: str, write: Callable[[str], None]) -> None:
  """replace_directory on object storage: `write` fills a local staging directory; then the old objects go
  (config.json first), the new ones are uploaded, config.json last. A reader never finds a config.json
  beside a partial or mixed set of files."""
  with tempfile.TemporaryDirectory(prefix="gkd_jax_out-") as tmp:
    write(tmp)
    names = storage.walk_files(tmp)
    storage.remove(storage.join(url, COMMIT_FILE))
    storage.rmtree(url)
    for name in sorted(names, key=lambda n: n == COMMIT_FILE):
      storage.upload(os.path.join(tmp, name), storage.join(url, name))
