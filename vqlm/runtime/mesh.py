"""Device mesh from config, logical-axis shardings, and host-local -> global batches.

The same code runs on 1 CPU, 8 faked CPU devices, several processes and a TPU pod: parameters carry
logical axis names (`embed`, `mlp`, ...), the config's rules map them to the mesh axes
(`data`, `fsdp`, `tensor`), and batches are sharded over `data` x `fsdp`.
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vqlm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a Mesh with axes (data, fsdp, tensor); one size may be -1 (all remaining devices).

  Uses Auto axis types: linen's logical constraints need them, and with the Explicit axis types
  that `jax.make_mesh` now defaults to, `nn.Embed` raises `ShardingTypeError`.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserError(f"unknown mesh axes {sorted(unknown)}; valid: {', '.join(MESH_AXES)}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise UserError("at most one mesh axis may be -1 (all remaining devices)")
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
  try:
    array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # Topology-unaware fallback (e.g. CPU or odd shapes).
    array = np.asarray(devices).reshape(sizes)
  return Mesh(array, MESH_AXES)


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
