"""make_mesh: topology-aware device order (fake TPU and GPU devices), Auto axis types on 8 faked
CPU devices, and one-line errors for shapes that do not fit."""

import dataclasses
import json
import os
import subprocess
import sys

from jax.sharding import AxisType
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.runtime import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """The attributes jax's mesh_utils and Mesh read from a device."""

  id: int
  coords: tuple[int, int, int] = (0, 0, 0)
  core_on_chip: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"
  process_index: int = 0
  slice_index: int = 0


def tpu_slice(dims):
  """One fake TPU v4 chip per coordinate of an x*y*z torus, numbered with y varying fastest and
  then x (so consecutive ids are not neighbours along x)."""
  nx, ny, nz = dims
  return [
    FakeDevice(id=(z * nx + x) * ny + y, coords=(x, y, z))
    for z in range(nz)
    for x in range(nx)
    for y in range(ny)
  ]


def test_tpu_mesh_follows_physical_links_not_device_ids():
  devices = sorted(tpu_slice((4, 2, 1)), key=lambda d: d.id)
  mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 4}, devices=devices)
  assert mesh.devices.shape == (1, 2, 4)
  assert mesh.axis_names == mesh_lib.MESH_AXES
  assert mesh.axis_types == (AxisType.Auto,) * 3
  for row in mesh.devices.reshape(-1, 4):  # along `tensor`, the innermost axis
    coords = np.array([d.coords for d in row])
    steps = np.abs(np.diff(coords, axis=0)).sum(axis=1)
    assert steps.tolist() == [1, 1, 1], coords  # each next device is a linked neighbour
    assert [d.id for d in row] != list(range(row[0].id, row[0].id + 4))  # not id order
  # A plain reshape of the id-ordered list would put (0, 1, 0) next to (1, 0, 0): two hops.
  plain = [d.coords for d in devices[:4]]
  assert plain[1:3] == [(0, 1, 0), (1, 0, 0)]


def test_shape_that_does_not_fit_the_torus_is_a_one_line_user_error():
  devices = tpu_slice((4, 2, 1))
  with pytest.raises(UserError, match=r"does not fit the 4x2x1 topology") as e:
    mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=devices)
  assert "\n" not in str(e.value) and "config.mesh.shape" in str(e.value)


def gpu_nodes(nodes, per_node):
  """Fake GPUs of several nodes (jax gives each node its own slice_index), listed out of order."""
  devices = [
    FakeDevice(
      id=n * per_node + g, platform="gpu", device_kind="NVIDIA H100", process_index=n, slice_index=n
    )
    for n in range(nodes)
    for g in range(per_node)
  ]
  return devices[::-1]


def test_devices_in_several_slices_put_data_then_fsdp_across_slices():
  devices = gpu_nodes(2, 4)
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 4}, devices=devices)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert ids.tolist() == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]  # one node per data row
  assert mesh.axis_types == (AxisType.Auto,) * 3
  mesh = mesh_lib.make_mesh({"fsdp": 4, "tensor": 2}, devices=devices)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert ids.tolist() == [[[0, 1], [2, 3], [4, 5], [6, 7]]]  # tensor pairs stay inside a node
  with pytest.raises(UserError, match=r"make data x fsdp a multiple of 2") as e:
    mesh_lib.make_mesh({"tensor": 8}, devices=devices)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "shape, match",
  [
    ({"model": 8}, r"unknown mesh axes \['model'\]; valid: data, fsdp, tensor"),
    ({"data": -1, "fsdp": -1}, r"at most one mesh axis may be -1"),
    ({"data": -1, "fsdp": 3}, r"does not divide 8 devices; change config.mesh.shape"),
    ({"data": 2, "fsdp": 2}, r"needs 4 devices but 8 are available; change config.mesh.shape"),
  ],
)
def test_bad_shapes_are_one_line_user_errors(shape, match):
  with pytest.raises(UserError, match=match) as e:
    mesh_lib.make_mesh(shape, devices=tpu_slice((2, 2, 2)))
  assert "\n" not in str(e.value)


EIGHT_CPUS = """
import json
import flax.linen as nn
import jax
import jax.numpy as jnp
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import DEFAULT_RULES

out = {}
for name, shape in [("2x4", {"data": 2, "fsdp": 4}), ("all", {"data": -1}),
                    ("fsdp_tensor", {"fsdp": -1, "tensor": 2})]:
  mesh = mesh_lib.make_mesh(shape)
  out[name] = {
    "shape": list(mesh.devices.shape),
    "types": [t.name for t in mesh.axis_types],
    "ids": [d.id for d in mesh.devices.flat],
  }

class Embed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(16, 8, embedding_init=nn.with_logical_partitioning(
      nn.initializers.normal(), ("vocab", "embed")))(ids)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
with mesh_lib.activate(mesh, DEFAULT_RULES):
  ids = jnp.zeros((8, 3), jnp.int32)
  variables = jax.jit(Embed().init)(jax.random.key(0), ids)
  y = jax.jit(Embed().apply)(variables, ids)
out["embed_sharding"] = str(y.sharding.spec)
print(json.dumps(out))
"""


def test_eight_cpu_devices_give_auto_meshes_in_device_order():
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  proc = subprocess.run(
    [sys.executable, "-c", EIGHT_CPUS], env=env, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["2x4"]["shape"] == [2, 4, 1]
  assert out["all"]["shape"] == [8, 1, 1]
  assert out["fsdp_tensor"]["shape"] == [1, 4, 2]
  for mesh in ("2x4", "all", "fsdp_tensor"):
    assert out[mesh]["types"] == ["Auto"] * 3
    assert out[mesh]["ids"] == list(range(8))  # CPU devices keep jax.devices() order
  # nn.Embed under the mesh works (Explicit axes raise ShardingTypeError) and the activation
  # constraint applies: batch over data x fsdp.
  assert out["embed_sharding"] == "P(('data', 'fsdp'),)"
