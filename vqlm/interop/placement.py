"""Imported parameters placed straight onto a mesh: each device receives only its slice.

An importer returns a nested dict of `Lazy` leaves (`vqlm.interop.checkpoint_files`), one per
parameter of the model. `place_params` turns it into the model's params as global `jax.Array`s
sharded by the logical axis rules, one parameter at a time:

  * the parameter's `NamedSharding` comes from its logical axis names and the rules (as a run's
    checkpoint is restored, `vqlm.runs.restore.placed_abstract`);
  * with a slice reader (`Lazy.load_slice`) each distinct device slice is read on its own (a
    replicated slice once, copied per device), so the whole tensor is never in memory; otherwise
    the tensor is read once (`load()`), kept while its slices are copied to the devices, then
    dropped;
  * each device gets a fresh, owned copy of its slice (`jax.device_put`, one device at a time): on
    the CPU XLA may adopt a suitably aligned NumPy buffer instead of copying it, and a buffer
    adopted from a view would keep the whole read tensor alive;
  * `release()`, when given, runs after each parameter: pass the checkpoint's `close` so the pages
    of the memory-mapped files it read leave the process (else every file read stays mapped and
    counts in its resident memory until the checkpoint is closed).

So the host holds, besides the placed arrays, about one converted tensor (or one slice) plus the
mapped pages of what that tensor was read from: a 7B checkpoint never sits whole in one host's
memory (figures: docs/benchmarks.md, `python -m vqlm.bench load`). In a multi-process run each
process reads the slices of its own devices only.
"""

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
from jax.sharding import Mesh
import numpy as np

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import Lazy
from vqlm.runs import restore

Index = tuple[slice, ...]


def _name(path: tuple[Any, ...]) -> str:
  """`(DictKey('layer_0'), DictKey('attn'), ...)` -> `"layer_0/attn/..."`."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested mapping's leaves by `/`-joined name (`Lazy`, arrays and other values are leaves)."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}/{key}" if prefix else str(key)))
  return out


def _index_key(index: Index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A hashable, normalised form of a device's index (`(start, stop)` per dimension)."""
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided device index {index}")
    out.append((start, stop))
  return tuple(out)


def _check_leaf(name: str, leaf: Any, want: jax.ShapeDtypeStruct) -> np.dtype:
  """The dtype `leaf` is stored as; UserError when its shape or kind of dtype differs from the
  model's parameter `want`."""
  if not isinstance(leaf, (Lazy, np.ndarray, np.generic, jax.Array)):
    raise UserError(
      f"parameter {name}: the imported tree holds a {type(leaf).__name__}, not an array"
    )
  shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
  if shape != tuple(want.shape):
    raise UserError(
      f"parameter {name}: the checkpoint has shape {shape} but the config expects "
      f"{tuple(want.shape)}; import a checkpoint of the model size the config describes"
    )
  target = np.dtype(want.dtype)
  if dtype != target and (dtype.kind == "f") != (target.kind == "f"):
    raise UserError(
      f"parameter {name}: the checkpoint stores {dtype.name} but the config expects "
      f"{target.name}; import a checkpoint of the architecture the config describes"
    )
  return dtype


def _owned(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """A C-contiguous copy of `array` in `dtype` that owns its memory."""
  return np.array(array, dtype=dtype, order="C", copy=True)


def _place_one(
  name: str, leaf: Any, want: jax.ShapeDtypeStruct, use_slices: bool
) -> tuple[jax.Array, int]:
  """`leaf` placed with `want.sharding`; returns (the global array, how many reads it took)."""
  sharding = want.sharding
  shape, dtype = tuple(want.shape), np.dtype(want.dtype)
  by_device = sharding.addressable_devices_indices_map(shape)
  groups: dict[tuple[tuple[int, int], ...], list[tuple[jax.Device, Index]]] = {}
  for device, index in by_device.items():
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    groups.setdefault(_index_key(index, shape), []).append((device, index))
  slicer = getattr(leaf, "load_slice", None) if use_slices else None
  whole = len(groups) == 1 and all(
    a == 0 and b == n for (a, b), n in zip(next(iter(groups)), shape)
  )
  reads = 0
  full = None
  arrays: dict[jax.Device, jax.Array] = {}
  for key, members in groups.items():
    if slicer is not None and not whole:
      part = np.asarray(slicer(members[0][1]))
      expected = tuple(b - a for a, b in key)
      if tuple(part.shape) != expected:
        raise ValueError(
          f"parameter {name}: load_slice returned shape {part.shape} for {members[0][1]}, "
          f"expected {expected}"
        )
      reads += 1
    else:
      if full is None:
        full = leaf() if isinstance(leaf, Lazy) else np.asarray(leaf)
        if tuple(full.shape) != shape:
          raise ValueError(f"parameter {name}: loaded with shape {full.shape}, expected {shape}")
        reads += 1
      part = full[members[0][1]]
    for device, _ in members:
      arrays[device] = jax.device_put(_owned(part, dtype), device)
    del part
  del full
  ordered = [arrays[d] for d in by_device]
  return jax.make_array_from_single_device_arrays(shape, sharding, ordered), reads


def place_params(
  tree: Mapping[str, Any],
  abstract_boxed: Any,
  mesh: Mesh,
  rules: Any,
  *,
  release: Callable[[], Any] | None = None,
  use_slices: bool = True,
  stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Places imported parameters on `mesh`, sharded as the model's logical axes say.

  Args:
    tree: nested dict with the structure of the model's params; leaves are `Lazy` (read here,
      one at a time) or arrays (NumPy or jax), each of the parameter's shape. Floating leaves
      are converted to the parameter's dtype.
    abstract_boxed: the model's boxed abstract params (`jax.eval_shape` of `init`, e.g.
      `vqlm.runs.lm_run.abstract_params`): shapes, dtypes and logical axis names.
    mesh, rules: the mesh and the logical -> mesh axis rules (config form or flax's tuples).
    release: called after each parameter is placed (e.g. `HFCheckpoint.close`).
    use_slices: read per-device slices with `Lazy.load_slice` where a leaf has one (False: read
      whole tensors; the benchmark compares the two).
    stats: if given, filled with `reads` ({name: reads}), `placed_bytes` (bytes of this process's
      shards, replicas counted) and `largest_bytes` (the largest parameter, in its dtype).
  Returns:
    the params: nested dicts of `jax.Array`s with the `NamedSharding`s of `abstract_boxed`.
  Raises:
    UserError (one line, naming the parameter) when the tree lacks a parameter, has one the
    model lacks, or a leaf's shape (or kind of dtype) differs from the parameter's.
  """
  placed = restore.placed_abstract(abstract_boxed, mesh, rules)
  wanted = {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(placed)[0]}
  given = _flat(tree)
  missing = [n for n in wanted if n not in given]
  extra = [n for n in given if n not in wanted]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"lacks {len(missing)} parameter(s) of the model (e.g. {missing[0]})")
    if extra:
      parts.append(f"has {len(extra)} the model lacks (e.g. {extra[0]})")
    raise UserError(
      f"the imported checkpoint {' and '.join(parts)}; import a checkpoint of the architecture "
      "and size the config describes"
    )
  for name, want in wanted.items():
    _check_leaf(name, given[name], want)
  out: dict[str, jax.Array] = {}
  reads: dict[str, int] = {}
  for name, want in wanted.items():
    out[name], reads[name] = _place_one(name, given[name], want, use_slices)
    if release is not None:
      release()
  if stats is not None:
    stats["reads"] = reads
    stats["placed_bytes"] = placed_bytes(out)
    stats["largest_bytes"] = max(
      (math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in wanted.values()), default=0
    )
  leaves = [out[_name(path)] for path, _ in jax.tree_util.tree_flatten_with_path(placed)[0]]
  return jax.tree.unflatten(jax.tree.structure(placed), leaves)


def placed_bytes(tree: Any) -> int:
  """Bytes of a tree's arrays held by this process's devices (each replica counted)."""
  return sum(
    shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
  )
