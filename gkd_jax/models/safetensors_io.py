"""safetensors checkpoints: a reader on numpy memmaps, a writer on the safetensors library.

Reading memory-maps each file and hands out zero-copy views, so a loader can slice exactly the part of a
tensor one device shard needs. bf16/fp8 go through ml_dtypes (numpy has no native bf16).
Format: u64 little-endian header length, JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
Writing is safetensors.numpy.save_file per file; huggingface_hub plans the shards and names them as
transformers does (model-00001-of-00002.safetensors + model.safetensors.index.json).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors.numpy import save_file

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


def write_file(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  # save_file reads each array's buffer by pointer, so strided views (transposes) must be made contiguous.
  tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
  save_file(tensors, path, metadata={"format": "pt"})  # transformers refuses files without a known format


def write_checkpoint(directory: str, tensors: Mapping[str, np.ndarray], max_shard_size: int | str = "5GB") -> None:
  """Writes model.safetensors, or model-0000i-of-0000n.safetensors + index when over max_shard_size."""
  split = split_state_dict_into_shards_factory(
      dict(tensors),
      get_storage_size=lambda array: array.nbytes,
      filename_pattern="model{suffix}.safetensors",  # HF names: model.safetensors, model-00001-of-00002...
      max_shard_size=max_shard_size,
  )
  for stale in [INDEX_FILE, SINGLE_FILE]:
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  for fname, names in split.filename_to_tensors.items():
    write_file(os.path.join(directory, fname), {name: tensors[name] for name in names})
  if split.is_sharded:
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
