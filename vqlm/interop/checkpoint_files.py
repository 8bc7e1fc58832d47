"""Hugging Face style checkpoint directories, read lazily and written in shards.

A source is a directory with `config.json` and the weights as one `model.safetensors` or as
shards `model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json` (diffusers
writes `diffusion_pytorch_model.safetensors`; any `*.safetensors` is read). The safetensors
format is parsed here (an 8-byte header length, a JSON header, then raw little-endian arrays), so
reading needs neither torch nor the `safetensors` package, reads bfloat16 (via `ml_dtypes`), and
maps each file into memory: a tensor is read from disk only when `read(name)` asks for it.

`Lazy` is one parameter not yet read: its shape and dtype, and a function that reads and converts
it. Importers return nested dicts of `Lazy` leaves, so whoever places them (on one host, or
sharded over a mesh) reads one tensor at a time.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import glob
import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from vqlm.errors import UserError

INDEX_SUFFIX = ".safetensors.index.json"
_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offset of the tensor in its file
  end: int


def _read_header(path: str) -> tuple[dict[str, Any], int]:
  """The JSON header of a safetensors file and the offset its data starts at."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise UserError(f"{path} is not a safetensors file (shorter than 8 bytes); re-download it")
    (size,) = struct.unpack("<Q", raw)
    if size > 100 * 2**20 or size > os.path.getsize(path) - 8:
      raise UserError(f"{path} has a damaged safetensors header ({size} bytes); re-download it")
    try:
      header = json.loads(f.read(size))
    except ValueError as e:
      raise UserError(f"{path} has a damaged safetensors header ({e}); re-download it") from None
  return header, 8 + size


class HFCheckpoint:
  """The weights (and `config.json`) of a Hugging Face style directory or one safetensors file.

  `names()`, `shape(name)`, `dtype(name)` read only headers; `read(name)` returns one tensor as
  a NumPy array (a copy, in its stored dtype unless `dtype=` is given).
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if os.path.isfile(path) and path.endswith(".safetensors"):
      files, config_dir = [self.path], os.path.dirname(self.path)
    elif os.path.isdir(path):
      files, config_dir = self._files(self.path), self.path
    else:
      raise UserError(f"{path} is neither a checkpoint directory nor a .safetensors file")
    config_path = os.path.join(config_dir, "config.json")
    self.config: dict[str, Any] = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        self.config = json.load(f)
    self._entries: dict[str, _Entry] = {}
    self.metadata: dict[str, str] = {}
    for file in files:
      header, start = _read_header(file)
      self.metadata.update(header.pop("__metadata__", None) or {})
      size = os.path.getsize(file)
      for name, info in header.items():
        code = info.get("dtype")
        if code not in _DTYPES:
          raise UserError(f"{file}: tensor {name} has dtype {code}, which vqlm cannot read")
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (start + int(o) for o in info["data_offsets"])
        if end - begin != math.prod(shape) * _DTYPES[code].itemsize or end > size:
          raise UserError(f"{file}: tensor {name} is truncated or damaged; re-download the file")
        self._entries[name] = _Entry(file, _DTYPES[code], shape, begin, end)
    self._maps: dict[str, np.memmap] = {}

  @staticmethod
  def _files(directory: str) -> list[str]:
    indexes = sorted(glob.glob(os.path.join(directory, "*" + INDEX_SUFFIX)))
    if indexes:
      with open(indexes[0]) as f:
        weight_map = json.load(f).get("weight_map", {})
      files = sorted({os.path.join(directory, v) for v in weight_map.values()})
      missing = [f for f in files if not os.path.exists(f)]
      if missing:
        raise UserError(
          f"{indexes[0]} lists {len(missing)} missing shard(s), e.g. {missing[0]}; "
          "download every shard"
        )
      return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      raise UserError(
        f"{directory} has no *.safetensors weights; convert .bin checkpoints with "
        "transformers' save_pretrained(..., safe_serialization=True) first"
      )
    return files

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def _entry(self, name: str) -> _Entry:
    try:
      return self._entries[name]
    except KeyError:
      raise UserError(
        f"{self.path} has no tensor {name!r}; is it a checkpoint of the architecture you "
        "import it as?"
      ) from None

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name).shape

  def dtype(self, name: str) -> np.dtype:
    return self._entry(name).dtype

  def nbytes(self, name: str) -> int:
    entry = self._entry(name)
    return entry.end - entry.begin

  def file_of(self, name: str) -> str:
    return self._entry(name).file

  def _view(self, name: str) -> np.ndarray:
    entry = self._entry(name)
    if entry.file not in self._maps:
      self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
    raw = self._maps[entry.file][entry.begin : entry.end]
    return raw.view(entry.dtype).reshape(entry.shape)

  def read(self, name: str, dtype: Any = None) -> np.ndarray:
    """Tensor `name` as a new array (`dtype=` converts it, e.g. to float32)."""
    view = self._view(name)
    return np.array(view, dtype=dtype if dtype is not None else view.dtype, copy=True)

  def read_slice(self, name: str, index: tuple[slice, ...], dtype: Any = None) -> np.ndarray:
    """`read(name)[index]` reading only what the index selects from the mapped file."""
    view = self._view(name)[index]
    return np.array(view, dtype=dtype if dtype is not None else view.dtype, copy=True)

  def close(self) -> None:
    """Unmaps the files (their pages leave this process's memory)."""
    self._maps.clear()

  def __enter__(self) -> "HFCheckpoint":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class Lazy:
  """One parameter not read yet: `load()` returns a NumPy array of `shape` and `dtype`.

  `load_slice(index)`, when given, returns `load()[index]` (`index`: one `slice` per dimension,
  in the converted tensor's coordinates) reading only that part, so that placing the parameter
  sharded over a mesh (`vqlm.interop.placement`) never holds the whole tensor.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray]
  load_slice: Callable[[tuple[slice, ...]], np.ndarray] | None = None

  def __call__(self) -> np.ndarray:
    array = np.asarray(self.load())
    if tuple(array.shape) != tuple(self.shape):
      raise ValueError(f"Lazy tensor loaded with shape {array.shape}, expected {self.shape}")
    return array.astype(self.dtype, copy=False)


def lazy(
  ckpt: HFCheckpoint,
  name: str,
  transform: Callable[[np.ndarray], np.ndarray] | None = None,
  *,
  shape: tuple[int, ...] | None = None,
  dtype: Any = np.float32,
) -> Lazy:
  """`Lazy` of tensor `name` of `ckpt`, converted by `transform` (give `shape` when it changes
  the shape; `transform` must not need more than the tensor itself)."""
  out_shape = tuple(shape) if shape is not None else ckpt.shape(name)
  fn = transform or (lambda a: a)
  return Lazy(out_shape, np.dtype(dtype), lambda: fn(ckpt.read(name, dtype=np.float32)))


def materialize(tree: Any) -> Any:
  """A nested dict with every `Lazy` leaf read (for small models and tests)."""
  if isinstance(tree, Lazy):
    return tree()
  if isinstance(tree, Mapping):
    return {k: materialize(v) for k, v in tree.items()}
  return tree


def write_safetensors(
  directory: str,
  tensors: Mapping[str, np.ndarray],
  *,
  prefix: str = "model",
  max_shard_bytes: int = 5 * 2**30,
  metadata: Mapping[str, str] | None = None,
) -> list[str]:
  """Writes `tensors` as `{prefix}.safetensors`, or as shards of at most `max_shard_bytes` plus
  `{prefix}.safetensors.index.json` when they do not fit in one; returns the files written."""
  os.makedirs(directory, exist_ok=True)
  shards: list[list[str]] = [[]]
  size = 0
  for name in tensors:
    nbytes = np.asarray(tensors[name]).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  if len(shards) == 1:
    names_of = {f"{prefix}.safetensors": shards[0]}
  else:
    n = len(shards)
    names_of = {f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}
  written = []
  for file, names in names_of.items():
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in names:
      array = np.ascontiguousarray(tensors[name])
      if array.dtype not in _CODES:
        raise UserError(f"cannot write tensor {name} of dtype {array.dtype} as safetensors")
      header[name] = {
        "dtype": _CODES[array.dtype],
        "shape": list(array.shape),
        "data_offsets": [offset, offset + array.nbytes],
      }
      offset += array.nbytes
      arrays.append(array)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = os.path.join(directory, file)
    with open(path, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for array in arrays:
        f.write(array.tobytes())
    written.append(path)
  if len(names_of) > 1:
    index = {
      "metadata": {"total_size": sum(np.asarray(t).nbytes for t in tensors.values())},
      "weight_map": {name: file for file, names in names_of.items() for name in names},
    }
    with open(os.path.join(directory, prefix + INDEX_SUFFIX), "w") as f:
      json.dump(index, f, indent=2)
  return written
