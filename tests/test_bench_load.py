"""`python -m vqlm.bench load`: the Llama mapping's slice readers and a tiny run of the bench."""

import json
import os

import numpy as np

from vqlm.bench import load
from vqlm.interop.checkpoint_files import HFCheckpoint, Lazy, write_safetensors


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      yield from _leaves(value, name)
    else:
      yield name, value


def test_slice_readers_equal_slices_of_whole_loads(tmp_path):
  shape = load.llama_shape(1)
  assert shape["dim"] == 256 and shape["num_kv_heads"] == 2
  shape["num_layers"] = 1
  write_safetensors(str(tmp_path), load.hf_tensors(shape))
  rng = np.random.default_rng(0)
  with HFCheckpoint(str(tmp_path)) as ckpt:
    tree = load.llama_tree(ckpt, shape, np.float32)
    leaves = dict(_leaves(tree))
    assert len(leaves) == 3 + 9
    assert leaves["layer_0/attn/query/kernel"].shape == (256, 4, 64)
    assert leaves["layer_0/attn/out/kernel"].shape == (4, 64, 256)
    assert leaves["head/kernel"].shape == (256, 2048)
    for name, leaf in leaves.items():
      assert isinstance(leaf, Lazy)
      whole = leaf()
      assert whole.shape == leaf.shape and whole.dtype == np.float32, name
      for _ in range(3):
        index = []
        for n in leaf.shape:
          a = int(rng.integers(0, n))
          index.append(slice(a, int(rng.integers(a + 1, n + 1))))
        if len(leaf.shape) == 3:  # whole heads, as the rules shard them (head_dim unsharded)
          index[2] = slice(None)
        np.testing.assert_array_equal(leaf.load_slice(tuple(index)), whole[tuple(index)], name)
  # The head kernel is lm_head.weight transposed; the query kernel splits q_proj's rows by head.
  with HFCheckpoint(str(tmp_path)) as ckpt:
    np.testing.assert_array_equal(leaves["head/kernel"](), ckpt.read("lm_head.weight").T)
    q = ckpt.read("model.layers.0.self_attn.q_proj.weight", np.float32)
    np.testing.assert_array_equal(leaves["layer_0/attn/query/kernel"]()[:, 1, :], q[64:128].T)


def test_tiny_bench_run(tmp_path):
  """`--size_mb 4`, one lazy mode (each mode is a fresh process with 8 faked devices)."""
  out = str(tmp_path / "load.json")
  argv = ["vqlm.bench load", "--size_mb", "4", "--modes", "slices", "--out", out]
  assert load.main(argv + ["--dir", str(tmp_path / "ckpt")]) == 0
  facts = json.load(open(out))
  r = facts["modes"]["slices"]
  assert facts["files"] == 3 and facts["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert r["devices"] == 8 and r["reads"] > 0
  assert r["placed_bytes"] == 2 * facts["checkpoint_bytes"] + 7 * 4 * facts["shape"]["dim"] * (
    2 * facts["shape"]["num_layers"] + 1
  )
  assert r["extra_bytes"] < facts["bound_bytes"]
  assert os.path.isdir(tmp_path / "ckpt")
