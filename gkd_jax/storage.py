"""Paths that may be local or object-storage URLs (`gs://bucket/path`, or any scheme fsspec knows).

On a TPU pod every host runs the same command and the hosts share nothing but a bucket, so a run's workdir,
its models and its data may all live there. Local paths keep their plain `os` behaviour; URLs go through
etils.epath / fsspec (gcsfs for gs://), and the arrays of a checkpoint through orbax's tensorstore driver.

Object storage has no rename and no append, so the write guarantees are kept differently:
- `write_text`: one object per write (an object upload is atomic: readers see the old or the new object);
  locally a sibling temporary file renamed over the target.
- `JsonLines`: an append-only log; on a URL its lines are kept in memory and the whole object is rewritten
  at each `flush` (the trainer flushes at every checkpoint, so the log covers every committed step).
- `local_copy`: models and datasets read from a URL are downloaded once into a local cache directory,
  filled beside its final name and renamed in when complete, then loaded by the local code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from typing import Any

_URL_MARK = "://"


class StorageError(OSError):
  """A read or write of a URL failed (unreachable storage, permissions); the message names the URL."""


def is_url(path: Any) -> bool:
  """Whether `path` is a URL (`gs://...`); hub IDs and local paths are not."""
  return isinstance(path, str) and _URL_MARK in path and not path.startswith("file://")


def _fs(url: str):
  """(filesystem, path) of a URL, with the filesystem's listing cache dropped for it: another host may have
  written there since (gcsfs caches listings per process)."""
  fs, path = _fs_uncached(url)
  fs.invalidate_cache(path)
  return fs, path


def _fs_uncached(url: str):
  try:
    import fsspec
  except ImportError as e:  # pragma: no cover - fsspec comes with datasets
    raise ImportError(f"{url}: URL paths need fsspec") from e
  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    scheme = url.split(_URL_MARK, 1)[0]
    extra = " (pip install -e '.[gcs]', or gcsfs)" if scheme in ("gs", "gcs") else ""
    raise ImportError(f"{url}: no filesystem for {scheme}:// is installed{extra}: {e}") from e


def short(e: BaseException, limit: int = 400) -> str:
  """An exception as one short line (client libraries put whole request dumps in theirs)."""
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _wrap(url: str, what: str, e: Exception) -> StorageError:
  return StorageError(f"could not {what} {url}: {short(e)}")


def _call(url: str, what: str, fn, *args, **kwargs):
  """fn(*args) with every failure except a missing object turned into one StorageError naming the URL."""
  try:
    return fn(*args, **kwargs)
  except FileNotFoundError:
    raise
  except StorageError:
    raise
  except Exception as e:
    raise _wrap(url, what, e) from e


# ---------------------------------------------------------------------------------------------- paths


def join(base: str, *parts: str) -> str:
  """os.path.join for local paths; '/'-joined for URLs."""
  if is_url(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def normalize(path: str) -> str:
  """A form of `path` to compare with others: a local path resolved (os.path.realpath: absolute, symlinks
  followed); a URL with its scheme in lower case (gcs:// as gs://) and no repeated or trailing slashes, `.`
  or `..` segments."""
  if not is_url(path):
    return os.path.realpath(path)
  scheme, rest = path.split(_URL_MARK, 1)
  scheme = scheme.lower()
  scheme = "gs" if scheme == "gcs" else scheme
  return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def within(path: str, directory: str) -> bool:
  """Whether `path` is `directory` or lies under it (compared in their normalized forms)."""
  if is_url(path) != is_url(directory):
    return False
  p, d = normalize(path), normalize(directory)
  return p == d or p.startswith(d.rstrip("/") + "/")


def parents(path: str) -> list[str]:
  """The directories above `path`, nearest first, up to the root (for a URL: up to its bucket)."""
  p, out = normalize(path), []
  if is_url(p):
    scheme, rest = p.split(_URL_MARK, 1)
    parts = rest.split("/")
    return [f"{scheme}://{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
  while os.path.dirname(p) != p:
    p = os.path.dirname(p)
    out.append(p)
  return out


def list_files(path: str) -> list[str]:
  """Relative paths of every file (object) under a directory (prefix), sorted; [] when it does not exist."""
  if not is_url(path):
    return walk_files(path) if os.path.isdir(path) else []
  fs, p = _fs(path)
  if not _call(path, "list", fs.isdir, p):
    return []
  root = p.rstrip("/") + "/"
  return sorted(n[len(root) :] for n in _call(path, "list", fs.find, p) if n.startswith(root))


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return _call(path, "check", fs.exists, p)


def isdir(path: str) -> bool:
  """Locally a directory; on object storage a prefix that holds at least one object."""
  if not is_url(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return _call(path, "list", fs.isdir, p)


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return _call(path, "check", fs.isfile, p)


def listdir(path: str) -> list[str]:
  """Names directly under `path` (empty when it does not exist)."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = _fs(path)
  if not _call(path, "list", fs.isdir, p):
    return []
  return sorted(os.path.basename(e.rstrip("/")) for e in _call(path, "list", fs.ls, p, detail=False))


def makedirs(path: str) -> None:
  """Creates a local directory (and parents); object storage has no directories, so URLs need nothing."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  if not is_url(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  fs, p = _fs(path)
  return _call(path, "read", fs.cat_file, p).decode("utf-8")


def write_text(path: str, text: str) -> None:
  """Replaces `path` whole: readers see the old content or the new, never a part."""
  if is_url(path):
    fs, p = _fs(path)
    _call(path, "write", fs.pipe_file, p, text.encode("utf-8"))
    return
  tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def create_text(path: str, text: str) -> bool:
  """Writes `path` only if nothing is there yet; returns whether it did. Locally O_CREAT|O_EXCL; on a URL an
  upload with a create-only precondition (gcsfs mode="create": GCS ifGenerationMatch=0) where the filesystem
  has one, else a check then a write (a race: two writers between the check and the write both succeed)."""
  if not is_url(path):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    return True
  fs, p = _fs(path)
  data = text.encode("utf-8")
  try:
    fs.pipe_file(p, data, mode="create")
    return True
  except FileExistsError:
    return False
  except TypeError:  # this filesystem has no create-only mode: check, then write
    pass
  except Exception as e:
    raise _wrap(path, "write", e) from e
  if _call(path, "check", fs.exists, p):
    return False
  _call(path, "write", fs.pipe_file, p, data)
  return True


def remove(path: str) -> None:
  """Deletes one file or object (missing is fine)."""
  if not is_url(path):
    if os.path.exists(path):
      os.remove(path)
    return
  fs, p = _fs(path)
  if _call(path, "check", fs.exists, p):
    _call(path, "delete", fs.rm_file, p)


def rmtree(path: str) -> None:
  """Deletes a directory or prefix and everything under it (missing is fine)."""
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, p = _fs(path)
  if _call(path, "list", fs.exists, p):
    _call(path, "delete", fs.rm, p, recursive=True)


def move(src: str, dst: str) -> None:
  """Moves a file or directory (prefix) to `dst` (which must not exist): locally a rename; on object storage a
  copy of each object then its deletion."""
  if not is_url(src):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.rename(src, dst)
    return
  fs, p = _fs(src)
  _call(src, "move", fs.mv, p, _fs(dst)[1], recursive=True)


def upload(local: str, url: str) -> None:
  """Copies one local file to `url` (one object: atomic)."""
  fs, p = _fs(url)
  _call(url, "write", fs.put_file, local, p)


def walk_files(local_dir: str) -> list[str]:
  """Relative paths of the files under a local directory, sorted."""
  out = []
  for root, _, names in os.walk(local_dir):
    out += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
  return sorted(out)


# ------------------------------------------------------------------------------------------- JSON lines


class JsonLines:
  """An append-only JSON-lines file. Locally each line is appended and flushed as it is written; on a URL
  the lines live in memory and `flush()` rewrites the object whole (at most every `min_interval` seconds
  unless forced), since objects cannot be appended to."""

  def __init__(self, path: str, lines: list[str] | None = None, min_interval: float = 30.0):
    self.path, self.min_interval = path, min_interval
    self._url = is_url(path)
    self._lines = list(lines or [])
    self._dirty, self._flushed_at = False, time.monotonic()
    self._file = None if self._url else open(path, "a", encoding="utf-8")

  def write(self, line: str) -> None:
    line = line if line.endswith("\n") else line + "\n"
    if self._url:
      self._lines.append(line)
      self._dirty = True
      self.flush(force=False)
    else:
      self._file.write(line)
      self._file.flush()

  def flush(self, force: bool = True) -> None:
    if not self._url or not self._dirty:
      return
    if not force and time.monotonic() - self._flushed_at < self.min_interval:
      return
    write_text(self.path, "".join(self._lines))
    self._dirty, self._flushed_at = False, time.monotonic()

  def close(self, flush: bool = True) -> None:
    if self._url:
      if flush:
        self.flush()
    elif self._file is not None:
      self._file.close()
      self._file = None


def read_lines(path: str) -> list[str]:
  """The lines of a text file (keeping their newlines); [] when it does not exist."""
  if not exists(path):
    return []
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read().decode("utf-8", errors="replace").splitlines(keepends=True)
  return read_text(path).splitlines(keepends=True)


# ----------------------------------------------------------------------------------------- local copies


def cache_root() -> str:
  """Where URL models and datasets are downloaded: $GKD_JAX_CACHE, else ~/.cache/gkd_jax."""
  return os.environ.get("GKD_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gkd_jax")


def _listing(url: str) -> tuple[Any, list[tuple[str, dict]]]:
  """(fs, [(relative name, info)]) of the objects at `url`: the object itself, everything under the
  prefix, or the matches of a glob."""
  fs, p = _fs(url)
  if any(c in p for c in "*?["):
    matches = _call(url, "list", fs.glob, p)
    return fs, [(os.path.basename(m), _call(url, "list", fs.info, m)) for m in sorted(matches)]
  if _call(url, "check", fs.isfile, p):
    return fs, [(os.path.basename(p), _call(url, "check", fs.info, p))]
  if not _call(url, "list", fs.isdir, p):
    raise FileNotFoundError(f"{url} does not exist (no object or prefix by that name)")
  found = _call(url, "list", fs.find, p, detail=True)
  root = p.rstrip("/") + "/"
  return fs, [(name[len(root) :], info) for name, info in sorted(found.items()) if name.startswith(root)]


def local_copy(url: str) -> str:
  """A local path holding what `url` holds (a file, a directory, or a glob's matching files).

  Downloaded once into cache_root(), keyed by the URL and the objects' names, sizes and versions, so a
  changed object is fetched again; a half-finished download is never used (it is filled beside its final
  name and renamed in). Local paths are returned unchanged."""
  if not is_url(url):
    return url
  fs, entries = _listing(url)
  if not entries:
    raise FileNotFoundError(f"{url} matches no objects")
  version = [(n, i.get("size"), i.get("generation") or i.get("etag") or i.get("mtime")) for n, i in entries]
  key = hashlib.sha256(json.dumps([url, version], default=str).encode()).hexdigest()[:20]
  is_glob = any(c in url.split(_URL_MARK, 1)[1] for c in "*?[")
  single = not is_glob and len(entries) == 1 and entries[0][0] == os.path.basename(url.rstrip("/"))
  target = os.path.join(cache_root(), "url", key)
  if not os.path.isdir(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=os.path.dirname(target))
    try:
      for name, info in entries:
        dest = os.path.join(staging, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _call(url, "download", fs.get_file, info["name"], dest)
      os.chmod(staging, 0o755)
      try:
        os.rename(staging, target)
      except OSError:  # another process finished the same download first
        if not os.path.isdir(target):
          raise
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  if single:
    return os.path.join(target, entries[0][0])
  if is_glob:
    return os.path.join(target, os.path.basename(url))
  return target
