"""Device mesh from config, logical-axis shardings, and host-local -> global batches.

The same code runs on 1 CPU, 8 faked CPU devices, several processes and a TPU pod: parameters carry
logical axis names (`embed`, `mlp`, ...), the config's rules map them to the mesh axes
(`data`, `fsdp`, `tensor`), and batches are sharded over `data` x `fsdp`.
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vqlm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a Mesh with axes (data, fsdp, tensor) laid out along the devices' topology.

  One size may be -1 (all remaining devices); the sizes must multiply to `len(devices)` (default:
  every device of every process). `jax.make_mesh` orders the devices: on TPU it maps each mesh
  axis onto whole axes of the chips' physical torus, `tensor` (the last, most communicating axis)
  first, so neighbours along an axis are linked chips; on GPU it orders by device id; on CPU it
  keeps the given order. A shape that does not fit the TPU torus is a UserError, not a silent
  plain reshape.

  Devices in several slices (jax's `slice_index`: TPU slices, and GPU nodes, which jax counts as
  one slice each) are split: `data`, then `fsdp`, take the slice count (the slow links between
  slices carry only their gradient traffic) and each slice is laid out as above
  (`mesh_utils.create_hybrid_device_mesh`; `jax.make_mesh` refuses several slices).

  Uses Auto axis types: linen's logical constraints need them, and with the Explicit axis types
  that `jax.make_mesh` defaults to, `nn.Embed` raises `ShardingTypeError`.

  Returns:
    a Mesh whose `devices` array has shape [data, fsdp, tensor].
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserError(f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError("at most one mesh axis may be -1 (all remaining devices)")
  if any(s < 1 and s != -1 for s in sizes):
    raise UserError(
      f"mesh {dict(zip(MESH_AXES, sizes))}: every size must be >= 1 (or -1: all remaining "
      "devices); change config.mesh.shape"
    )
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(
        f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices;"
        " change config.mesh.shape"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  total = int(np.prod(sizes))
  if total != len(devices):
    raise UserError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices but "
      f"{len(devices)} are available; change config.mesh.shape"
    )
  named = dict(zip(MESH_AXES, sizes))
  auto = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  try:
    if slices == 1:
      return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
    across = _across_slices(named, slices)
    within = [size // n for size, n in zip(sizes, across)]
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  except NotImplementedError:  # mesh_utils: a size is no product of the torus's axis sizes.
    raise UserError(
      f"mesh {named} does not fit the {_topology(devices)} topology of the {len(devices)} "
      f"{devices[0].device_kind} devices: make each axis size a product of some of the topology's "
      "axis sizes (change config.mesh.shape)"
    ) from None


def _across_slices(named: Mapping[str, int], slices: int) -> list[int]:
  """How many slices each mesh axis spans: `data` as many as it can, then `fsdp`, never `tensor`.

  Returns:
    [data, fsdp, tensor] factors whose product is `slices`; each divides its axis size.
  """
  across, left = [], slices
  for axis in MESH_AXES:
    n = math.gcd(named[axis], left) if axis in BATCH_AXES else 1
    across.append(n)
    left //= n
  if left > 1:
    raise UserError(
      f"mesh {dict(named)} cannot be split over the devices' {slices} slices (TPU slices or GPU "
      f"nodes): make data x fsdp a multiple of {slices} (change config.mesh.shape)"
    )
  return across


def _topology(devices: Sequence[Any]) -> str:
  """`4x4x4`: the extent of the devices' physical coordinates (TPU `coords`), x cores per chip."""
  if not all(hasattr(d, "coords") for d in devices):
    return "physical"
  coords = np.array([d.coords for d in devices])
  dims = [int(n) for n in coords.max(axis=0) - coords.min(axis=0) + 1]
  cores = {d.core_on_chip for d in devices}
  return "x".join(map(str, dims + ([len(cores)] if len(cores) > 1 else [])))


@contextlib.contextmanager
def activate(mesh: Mesh, rules) -> Iterator[None]:
  """The mesh and flax's logical-axis rules, active while tracing and running model code.

  flax 0.12's `with_logical_constraint` applies only when `jax.sharding.get_abstract_mesh()` is
  set, which `jax.set_mesh` does and the legacy `with mesh:` no longer does (jax 0.10): under
  `with mesh:` every activation constraint is silently dropped.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Normalises config rules (lists from JSON/ConfigDict) into flax's tuple-of-pairs form."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    out.append((str(logical), mesh_axes))
  return tuple(out)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree whose leaves may be boxed with logical axis names.

  Unboxed leaves (optimizer counters, plain arrays) are replicated.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), mesh_specs, is_leaf=lambda x: isinstance(x, P)
  )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch array [B, ...]: B over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be divisible by this (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of a batch into global arrays sharded over data x fsdp.

  Args:
    local: arrays [B_local, ...]; each process holds a distinct, equally sized slice.
  """
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    for k, v in local.items()
  }
