"""The safetensors reader/writer of `vqlm.interop.checkpoint_files` (no torch needed)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import (
  HFCheckpoint,
  Lazy,
  lazy,
  materialize,
  write_safetensors,
)


def _tensors():
  rng = np.random.default_rng(0)
  return {
    "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
    "b": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
    "c": np.arange(7, dtype=np.int64),
    "d": rng.standard_normal((2, 2)).astype(np.float16),
  }


@pytest.mark.parametrize("max_shard_bytes", [2**30, 40])
def test_round_trip_one_file_and_shards(tmp_path, max_shard_bytes):
  tensors = _tensors()
  files = write_safetensors(str(tmp_path), tensors, max_shard_bytes=max_shard_bytes)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy"}))
  sharded = max_shard_bytes < 100
  assert len(files) == (4 if sharded else 1)
  assert (tmp_path / "model.safetensors.index.json").exists() == sharded
  with HFCheckpoint(str(tmp_path)) as ckpt:
    assert ckpt.config == {"model_type": "toy"}
    assert ckpt.names() == sorted(tensors)
    for name, value in tensors.items():
      assert ckpt.shape(name) == value.shape
      assert ckpt.dtype(name) == value.dtype
      np.testing.assert_array_equal(ckpt.read(name), value)
    np.testing.assert_array_equal(
      ckpt.read_slice("a.weight", (slice(1, 3),)), tensors["a.weight"][1:3]
    )
    np.testing.assert_array_equal(ckpt.read("b", dtype=np.float32), tensors["b"].astype(np.float32))


def test_lazy_reads_on_demand_and_checks_shape(tmp_path):
  write_safetensors(str(tmp_path), _tensors())
  ckpt = HFCheckpoint(str(tmp_path))
  tree = {"dense": {"kernel": lazy(ckpt, "a.weight", lambda w: w.T, shape=(4, 3))}}
  out = materialize(tree)
  np.testing.assert_array_equal(out["dense"]["kernel"], _tensors()["a.weight"].T)
  assert out["dense"]["kernel"].dtype == np.float32
  wrong = Lazy((9,), np.dtype(np.float32), lambda: np.zeros(3))
  with pytest.raises(ValueError, match="expected"):
    wrong()


def test_damaged_files_give_one_line_errors(tmp_path):
  write_safetensors(str(tmp_path), _tensors())
  path = tmp_path / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:-8])  # the last tensor loses its end
  with pytest.raises(UserError, match="truncated or damaged"):
    HFCheckpoint(str(tmp_path))
  path.write_bytes(b"\xff" * 8 + data[8:])
  with pytest.raises(UserError, match="damaged safetensors header"):
    HFCheckpoint(str(tmp_path))
  os.remove(path)
  with pytest.raises(UserError, match="no \\*.safetensors"):
    HFCheckpoint(str(tmp_path))
  with pytest.raises(UserError, match="neither"):
    HFCheckpoint(str(tmp_path / "missing"))


def test_missing_shard_and_missing_tensor(tmp_path):
  write_safetensors(str(tmp_path), _tensors(), max_shard_bytes=40)
  with HFCheckpoint(str(tmp_path)) as ckpt:
    with pytest.raises(UserError, match="no tensor 'nope'"):
      ckpt.read("nope")
  os.remove(tmp_path / "model-00002-of-00004.safetensors")
  with pytest.raises(UserError, match="missing shard"):
    HFCheckpoint(str(tmp_path))


@pytest.mark.interop
def test_files_agree_with_the_safetensors_package(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tensors = {k: v for k, v in _tensors().items() if k != "b"}  # its numpy API lacks bfloat16
  write_safetensors(str(tmp_path / "ours"), tensors)
  loaded = safetensors_numpy.load_file(str(tmp_path / "ours" / "model.safetensors"))
  for name, value in tensors.items():
    np.testing.assert_array_equal(loaded[name], value)
  (tmp_path / "theirs").mkdir()
  safetensors_numpy.save_file(tensors, str(tmp_path / "theirs" / "model.safetensors"))
  with HFCheckpoint(str(tmp_path / "theirs")) as ckpt:
    for name, value in tensors.items():
      np.testing.assert_array_equal(ckpt.read(name), value)
