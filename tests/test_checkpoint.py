"""Checkpointer: commit modes (rename or commit file), damaged steps, permanent steps, gs://."""

import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vqlm.errors import UserError
from vqlm.runtime import checkpoint as ckpt_lib
from vqlm.runtime.checkpoint import Checkpointer


def _state(value: float) -> dict:
  return {"w": jnp.full((64,), value, jnp.float32), "b": jnp.arange(3.0) + value}


def _save_steps(directory, steps, **kw) -> None:
  c = Checkpointer(str(directory), async_save=False, **kw)
  for step in steps:
    c.save(step, _state(float(step)), data={"position": step}, meta={"stage": "test"})
  c.close()


def _damage(step_dir) -> list[str]:
  """Truncates every array data file of a step to half its length."""
  damaged = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.sep + "d" + os.sep in path + os.sep or name.startswith("manifest"):
        with open(path, "rb") as f:
          data = f.read()
        with open(path, "wb") as f:
          f.write(data[: len(data) // 2])
        damaged.append(path)
  assert damaged
  return damaged


def test_damaged_latest_step_falls_back_to_newest_good_one(tmp_path):
  _save_steps(tmp_path, [3, 6, 9])
  _damage(tmp_path / "9")
  warnings = []
  c = Checkpointer(str(tmp_path), warn=warnings.append)
  restored = c.restore(_state(0.0))
  assert restored.step == 6
  np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.full(64, 6.0))
  assert restored.data == {"position": 6}
  assert len(warnings) == 1 and "step 9" in warnings[0] and "resumes from step 6" in warnings[0]
  # The damaged step is kept for inspection, out of Orbax's view; new saves go on normally.
  assert (tmp_path / "corrupt-9").is_dir() and not (tmp_path / "9").exists()
  assert c.all_steps() == [3, 6]
  c.save(9, _state(90.0))
  c.close()
  again = Checkpointer(str(tmp_path)).restore(_state(0.0))
  assert again.step == 9 and float(again.state["w"][0]) == 90.0


def test_every_step_unreadable_is_one_error_and_moves_nothing(tmp_path):
  _save_steps(tmp_path, [3])
  _damage(tmp_path / "3")
  with pytest.raises(UserError, match="no checkpoint in .* can be read \\(step 3"):
    Checkpointer(str(tmp_path)).restore(_state(0.0))
  assert (tmp_path / "3").is_dir()


def test_a_checkpoint_of_another_model_is_refused_not_skipped(tmp_path):
  _save_steps(tmp_path, [3, 6])
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="does not match the config"):
    Checkpointer(str(tmp_path)).restore({"w": jnp.zeros(65), "b": jnp.zeros(3)})
  assert sorted(os.listdir(tmp_path)) == ["3", "6"]


def test_keep_every_steps_keeps_permanent_steps(tmp_path):
  _save_steps(tmp_path, range(1, 11), max_to_keep=2, keep_every_steps=4)
  assert Checkpointer(str(tmp_path)).all_steps() == [4, 8, 9, 10]


def _mounts(tmp_path, rows: str) -> str:
  path = tmp_path / "mounts"
  path.write_text(rows)
  return str(path)


def test_commit_mode_from_mount_type(tmp_path):
  mounts = _mounts(
    tmp_path,
    "/dev/sda1 / ext4 rw 0 0\nbucket /mnt/vqlm fuse.gcsfuse rw 0 0\n"
    "tmpfs /mnt/vqlm/local tmpfs rw 0 0\n",
  )
  mode = ckpt_lib.commit_mode
  assert mode("/mnt/vqlm/run/checkpoints", mounts_file=mounts) == "commit_file"
  assert mode("/mnt/vqlm", mounts_file=mounts) == "commit_file"
  assert mode("/mnt/vqlm/local/run", mounts_file=mounts) == "rename"
  assert mode("/mnt/vqlmx/run", mounts_file=mounts) == "rename"
  assert mode("/home/me/run", mounts_file=mounts) == "rename"
  assert mode("gs://bucket/run/checkpoints", mounts_file=mounts) == "commit_file"
  assert mode("/mnt/vqlm/run", "rename", mounts_file=mounts) == "rename"
  with pytest.raises(UserError, match="checkpoint_commit"):
    mode("/x", "atomic")


def test_commit_file_mode_saves_and_resumes_where_renames_fail(tmp_path, monkeypatch):
  """A gcsfuse mount refuses directory renames; commit_file mode never renames a directory."""
  real_rename = os.rename

  def no_directory_rename(src, dst, *args, **kwargs):
    if os.path.isdir(src):
      raise OSError(95, "Operation not supported (directory rename on this mount)")
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "rename", no_directory_rename)
  with pytest.raises(OSError, match="not supported"):
    _save_steps(tmp_path / "renaming", [1], commit="rename")

  monkeypatch.setattr(ckpt_lib, "_mount_type", lambda path, mounts_file="": "fuse.gcsfuse")
  c = Checkpointer(str(tmp_path / "fuse"), async_save=True)
  assert c.commit == "commit_file"
  c.save(1, _state(1.0), data={"position": 1})
  c.save(2, _state(2.0), data={"position": 2})
  c.close()
  assert (tmp_path / "fuse" / "2" / "commit_success.txt").exists()
  restored = Checkpointer(str(tmp_path / "fuse")).restore(_state(0.0))
  assert restored.step == 2 and restored.data == {"position": 2}
  np.testing.assert_array_equal(np.asarray(restored.state["b"]), np.arange(3.0) + 2)


def test_gs_url_goes_to_orbax_unchanged(monkeypatch):
  seen = {}

  class FakeManager:
    def __init__(self, directory, options=None, item_handlers=None):
      seen["directory"] = directory
      seen["path_class"] = options.temporary_path_class

  monkeypatch.setattr(ocp, "CheckpointManager", FakeManager)
  c = Checkpointer("gs://bucket/runs/lm/checkpoints")
  assert seen["directory"] == "gs://bucket/runs/lm/checkpoints"
  assert c.directory == "gs://bucket/runs/lm/checkpoints"
  assert issubclass(seen["path_class"], ocp.path.atomicity.CommitFileTemporaryPath)
