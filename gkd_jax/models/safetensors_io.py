"""Minimal safetensors reader/writer on numpy memmaps.

Reading memory-maps each file and hands out zero-copy views, so a loader can slice exactly the part of a
tensor one device shard needs. bf16/fp8 go through ml_dtypes (numpy has no native bf16).
Format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: str) -> tuple[dict, int]:
  """(header, data start); a file that is not a complete safetensors file fails naming it."""
  size = os.path.getsize(path)
  bad = lambda why: ValueError(
      f"{path} is not a valid safetensors file ({why}): corrupt or truncated; re-download or re-export it"
  )
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise bad(f"its header claims {n} bytes but the file has {size}")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise bad(f"the header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  end = 8 + n
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      begin, stop = info["data_offsets"]
      count = int(np.prod(info["shape"], dtype=np.int64))
      width = np.dtype(_DTYPES[info["dtype"]]).itemsize
    except (KeyError, TypeError, ValueError) as e:
      raise bad(f"tensor {key!r} has a malformed entry {info!r:.200} ({type(e).__name__}: {e})") from None
    if not 0 <= begin <= stop or stop - begin != count * width:
      raise bad(f"tensor {key!r}: data_offsets {[begin, stop]} do not hold {info['shape']} {info['dtype']}")
    if end + stop > size:
      raise bad(f"tensor {key!r} ends at byte {end + stop} but the file has {size} bytes")
  return header, end


class CheckpointReader:
  """All tensors of a checkpoint directory (single file or sharded with an index), by HF name."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        try:
          files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
          raise ValueError(f"{index} is corrupt or truncated: expected JSON with a 'weight_map' ({e!r})") from e
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    self._entries: dict[str, tuple[str, int, dict]] = {}
    self._maps: dict[str, np.memmap] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, start = _read_header(path)
      header.pop("__metadata__", None)
      for key, info in header.items():
        self._entries[key] = (path, start, info)

  def keys(self) -> Iterable[str]:
    return self._entries.keys()

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][2]["shape"])

  def view(self, name: str) -> np.ndarray:
    """Zero-copy read-only view of one tensor."""
    path, start, info = self._entries[name]
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
    begin, end = info["data_offsets"]
    raw = self._maps[path][start + begin : start + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
  s = size.strip().upper()
  for unit in sorted(units, key=len, reverse=True):
    if s.endswith(unit):
      return int(float(s[: -len(unit)]) * units[unit])
  return int(s)


def write_file(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  header, offset = {}, 0
  for name, array in tensors.items():
    header[name] = {
        "dtype": _NAMES[array.dtype],
        "shape": list(array.shape),
        "data_offsets": [offset, offset + array.nbytes],
    }
    offset += array.nbytes
  header["__metadata__"] = {"format": "pt"}  # transformers refuses files without a known format
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())


def write_checkpoint(directory: str, tensors: Mapping[str, np.ndarray], max_shard_size: int | str = "5GB") -> None:
  """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index when over max_shard_size."""
  limit = _parse_size(max_shard_size)
  shards, current, size = [], {}, 0
  for name, array in tensors.items():
    if current and size + array.nbytes > limit:
      shards.append(current)
      current, size = {}, 0
    current[name] = array
    size += array.nbytes
  shards.append(current)
  for stale in [INDEX_FILE, SINGLE_FILE]:
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  if len(shards) == 1:
    write_file(os.path.join(directory, SINGLE_FILE), shards[0])
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_file(os.path.join(directory, fname), shard)
    weight_map.update({name: fname for name in shard})
  total = sum(a.nbytes for a in tensors.values())
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
