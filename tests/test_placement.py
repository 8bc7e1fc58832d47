"""`vqlm.interop.placement.place_params`: imported (lazy) parameters placed on a mesh."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import Lazy
from vqlm.interop.placement import place_params
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.runs.lm_run import abstract_params
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import DEFAULT_RULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, tie_embeddings=False
)

# Runs with 8 faked CPU devices: places a lazy tree (whole-tensor and slice readers) on a
# data=2 x fsdp=2 x tensor=2 mesh and compares it with jax.device_put of the same values.
_SCRIPT = """
import json
import jax
import flax.linen as nn
import numpy as np
from vqlm.interop.checkpoint_files import Lazy
from vqlm.interop.placement import place_params, placed_bytes
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.runs import restore
from vqlm.runs.lm_run import abstract_params
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import DEFAULT_RULES

config = TransformerConfig(**json.loads(__import__("sys").argv[1]))
boxed = abstract_params(Transformer(config), 8)
mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
rng = np.random.default_rng(0)
values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), nn.meta.unbox(boxed))
target = restore.placed_abstract(boxed, mesh, DEFAULT_RULES)
expected = jax.tree.map(lambda v, t: jax.device_put(v, t.sharding), values, target)
out = {"devices": jax.device_count()}
for mode in ("whole", "slices"):
  loads, slices, released = [], [], []
  def lazy(path, v):
    name = jax.tree_util.keystr(path)
    def load():
      loads.append(name)
      return v.astype(np.float64)  # converted to the parameter's float32 on placement
    def load_slice(index):
      slices.append(name)
      return v[index]
    return Lazy(v.shape, np.dtype(np.float64), load, load_slice if mode == "slices" else None)
  tree = jax.tree_util.tree_map_with_path(lazy, values)
  stats = {}
  params = place_params(
    tree, boxed, mesh, DEFAULT_RULES, release=lambda: released.append(1), stats=stats
  )
  same = all(
    a.sharding == b.sharding and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected))
  )
  out[mode] = {
    "same": same,
    "structure": jax.tree.structure(params) == jax.tree.structure(expected),
    "leaves": len(jax.tree.leaves(values)),
    "loads": loads,
    "slices": slices,
    "released": len(released),
    "placed_bytes": stats["placed_bytes"],
    "expected_bytes": placed_bytes(expected),
  }
print(json.dumps(out))
"""


def test_places_each_device_its_slice_reading_each_tensor_once():
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  proc = subprocess.run(
    [sys.executable, "-c", _SCRIPT, json.dumps(CONFIG)],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  whole, slices = out["whole"], out["slices"]
  for r in (whole, slices):
    assert r["same"] and r["structure"]
    assert r["released"] == r["leaves"]
    assert r["placed_bytes"] == r["expected_bytes"]
  # Without slice readers every tensor is loaded exactly once.
  assert sorted(whole["loads"]) == sorted(set(whole["loads"])) and len(whole["loads"]) == 21
  assert whole["slices"] == []
  # With them only replicated tensors (the norm scales) are loaded whole; a sharded tensor is
  # read once per distinct slice (e.g. 4 for fsdp x tensor, replicated over data), never whole.
  assert set(slices["loads"]) == {n for n in set(whole["loads"]) if "scale" in n}
  assert len(slices["loads"]) == len(set(slices["loads"]))
  counts = {n: slices["slices"].count(n) for n in set(slices["slices"])}
  assert set(counts.values()) == {4}, counts


@pytest.fixture(scope="module")
def small():
  """(boxed abstract params, a 1-device mesh, params as NumPy arrays) of a tiny Transformer."""
  import flax.linen as nn

  boxed = abstract_params(Transformer(TransformerConfig(**CONFIG)), 8)
  values = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.meta.unbox(boxed))
  return boxed, mesh_lib.make_mesh({"data": 1}), values


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_shape_mismatch_is_one_line_naming_the_parameter(small):
  boxed, mesh, values = small
  bad = np.zeros((33, 4, 8), np.float32)
  values = {**values, "layer_1": {**values["layer_1"]}}
  values["layer_1"]["attn"] = {**values["layer_1"]["attn"], "query": {"kernel": bad}}
  calls = []
  lazy = {**values, "embed": {"embedding": Lazy((64, 32), np.float32, lambda: calls.append(1))}}
  with pytest.raises(UserError) as e:
    place_params(lazy, boxed, mesh, DEFAULT_RULES)
  message = _one_line(e)
  assert "layer_1/attn/query/kernel" in message and "(33, 4, 8)" in message
  assert "(32, 4, 8)" in message
  assert calls == []  # checked before anything is read


def test_missing_extra_and_dtype_kind_are_one_line_errors(small):
  boxed, mesh, values = small
  missing = {k: v for k, v in values.items() if k != "final_norm"}
  with pytest.raises(UserError) as e:
    place_params(missing, boxed, mesh, DEFAULT_RULES)
  assert "lacks 1 parameter(s)" in _one_line(e) and "final_norm/scale" in str(e.value)
  extra = {**values, "image_position": np.zeros((4, 32), np.float32)}
  with pytest.raises(UserError) as e:
    place_params(extra, boxed, mesh, DEFAULT_RULES)
  assert "has 1 the model lacks (e.g. image_position)" in _one_line(e)
  ints = {**values, "final_norm": {"scale": np.zeros(32, np.int32)}}
  with pytest.raises(UserError) as e:
    place_params(ints, boxed, mesh, DEFAULT_RULES)
  assert "final_norm/scale" in _one_line(e) and "int32" in str(e.value)
