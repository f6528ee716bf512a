"""Reading and writing `.safetensors` files with numpy alone (memory-mapped, tensor by tensor).

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian bytes (offsets
relative to the end of the header). A sharded checkpoint adds `model.safetensors.index.json`
({"metadata": {"total_size"}, "weight_map": {name: file}}).

Why not the `safetensors` package: its numpy API has no bfloat16 (the dtype most checkpoints are
stored in), and the format is small enough that a reader which memory-maps each file and copies
one tensor at a time keeps host memory at one tensor beyond what the caller keeps.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from moejax import errors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
  "F32": np.dtype(np.float32),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F16": np.dtype(np.float16),
  "F64": np.dtype(np.float64),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(errors.ConfigError):
  """A checkpoint file that cannot be read; the message names the file."""


class Reader:
  """The tensors of a model directory (one `model.safetensors` or a sharded index).

  `names()` lists them; `get(name)` returns a numpy copy of one tensor; `dtype(name)` and
  `shape(name)` read the header only.
  """

  def __init__(self, directory: str):
    self.directory = directory
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise SafetensorsError(f"{index_path} has no 'weight_map'; it is not a safetensors index")
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files, weight_map = [SINGLE_FILE], None
    else:
      raise SafetensorsError(
        f"{directory!r} has neither {SINGLE_FILE} nor {INDEX_FILE}: give a Hugging Face model "
        "directory saved with safetensors"
      )
    self._entries: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(directory, name)
      header, data_start = read_header(path)
      for tensor, entry in header.items():
        if weight_map is None or weight_map.get(tensor) == name:
          self._entries[tensor] = (path, entry, data_start)
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self._entries))
      if missing:
        raise SafetensorsError(
          f"{index_path} names {len(missing)} tensor(s) its files lack, e.g. {missing[0]!r}"
        )

  def names(self) -> list[str]:
    return sorted(self._entries)

  def dtype_name(self, name: str) -> str:
    return self._entries[name][1]["dtype"]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor `name` as a numpy array (a copy; the file is memory-mapped, not read whole)."""
    if name not in self._entries:
      raise SafetensorsError(f"{self.directory!r} has no tensor {name!r}")
    path, entry, data_start = self._entries[name]
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise SafetensorsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    return np.array(raw.view(dtype).reshape(shape))


def read_header(path: str) -> tuple[dict, int]:
  """({tensor name: entry}, byte offset of the data) of one .safetensors file."""
  try:
    with open(path, "rb") as f:
      (length,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(length))
  except (OSError, struct.error, ValueError) as e:
    raise SafetensorsError(f"{path} is not a readable safetensors file ({e})") from None
  header.pop("__metadata__", None)
  return header, 8 + length


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None):
  """Writes (name, array) pairs to one .safetensors file (C order, little-endian)."""
  arrays = [(name, np.ascontiguousarray(a)) for name, a in tensors]
  header, offset = {}, 0
  for name, a in arrays:
    if a.dtype not in _NAMES:
      raise SafetensorsError(f"cannot write tensor {name!r} of dtype {a.dtype}")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": []}
    header[name]["data_offsets"] = [offset, offset + a.nbytes]
    offset += a.nbytes
  if metadata:
    header["__metadata__"] = metadata
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for _, a in arrays:
      f.write(a.tobytes())


def write_sharded(directory: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int):
  """Writes the tensors into files of at most `max_shard_bytes` (a tensor is never split) and
  the index, as `save_pretrained` does; a single file needs no index. Returns the file names."""
  shards, current, size = [], [], 0
  for name, array in tensors:
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, array))
    size += array.nbytes
  if current:
    shards.append(current)
  if len(shards) == 1:
    write_file(os.path.join(directory, SINGLE_FILE), shards[0], {"format": "pt"})
    return [SINGLE_FILE]
  names, weight_map, total = [], {}, 0
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_file(os.path.join(directory, name), shard, {"format": "pt"})
    names.append(name)
    for tensor, array in shard:
      weight_map[tensor] = name
      total += array.nbytes
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return names
