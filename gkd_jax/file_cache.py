"""Small file helpers for the task, the demo and the sweep: content fingerprints, tolerant reads, atomic
writes, and a JSON value computed once per fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, Callable


def fingerprint(obj: Any) -> str:
  """16 hex digits of sha256 over obj's JSON (keys sorted; non-JSON values by their str)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_text(path: str) -> str | None:
  """The file's text, or None when it cannot be read."""
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def scratch_path(path: str) -> str:
  """A fresh sibling name for staging (made with the umask's permissions, unlike tempfile's private ones)."""
  return os.path.join(os.path.dirname(path) or ".", f".tmp-{uuid.uuid4().hex}")


def write_atomic(path: str, text: str) -> None:
  """Writes text to path through a sibling scratch file and a rename: readers see the old or the new file."""
  tmp = scratch_path(path)
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def json_cache(path: str, key: str, compute: Callable[[], Any], field: str = "value") -> Any:
  """compute() once per fingerprint `key`, stored at path as {"fingerprint": key, field: value}."""
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get("fingerprint") == key:
      return cached[field]
  except (OSError, ValueError, KeyError):
    pass
  value = compute()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  write_atomic(path, json.dumps({"fingerprint": key, field: value}, indent=1))
  return value
