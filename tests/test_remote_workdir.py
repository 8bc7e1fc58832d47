"""Bucket work directories: small files mirrored, checkpoints straight to the bucket, resume on a
new host. The bucket is a local directory behind epath's `gs://` scheme (no network)."""

import os

from etils.epath import backend, gpath
import pytest

from vqlm import cli
from vqlm.data import pipeline
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import DEFAULT_RULES
from vqlm.runtime.remote_workdir import RemoteWorkdir
from vqlm.testing.toy_task import ToySource, ToyTask, identity_transform
from vqlm.train import loop


class _LocalBucket(backend._OsPathBackend):  # noqa: SLF001 - epath's own local backend.
  """`gs://NAME/...` read and written under a local root."""

  def __init__(self, root):
    self.root = str(root)

  def _local(self, path):
    path = os.fspath(path)
    return os.path.join(self.root, path[len("gs://") :]) if path.startswith("gs://") else path

  def __getattribute__(self, name):
    attr = super().__getattribute__(name)
    if name.startswith("_") or name == "root" or not callable(attr):
      return attr
    local = super().__getattribute__("_local")
    return lambda path, *a, **kw: attr(local(path), *[local(x) for x in a], **kw)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  root = tmp_path / "bucket"
  root.mkdir()
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _LocalBucket(root))  # noqa: SLF001
  return root


def _train(remote, steps):
  trainer = loop.Trainer(
    ToyTask(),
    mesh=mesh_lib.make_mesh({"data": -1}),
    rules=DEFAULT_RULES,
    options=loop.LoopOptions(steps=steps, log_every=1, checkpoint_every=2, progress=False),
  )
  data = pipeline.make_iterator(
    ToySource(), global_batch_size=8, transform=identity_transform, seed=0, num_threads=0
  )
  messages = []
  remote.pull()
  loop.run(
    trainer,
    data_iter=data,
    workdir=remote.local,
    checkpoint_dir=remote.checkpoint_dir,
    after_save=lambda step: remote.push(),
    log_fn=messages.append,
  )
  remote.push()
  return messages


def test_a_new_host_resumes_from_the_bucket(bucket, tmp_path):
  # The checkpoints' URL is mapped to the local bucket too (Orbax writes gs:// itself, through
  # tensorstore, which this test cannot reach).
  first = RemoteWorkdir("gs://runs/toy", mirror=str(tmp_path / "host_a"))
  first.checkpoint_dir = str(bucket / "runs" / "toy" / "checkpoints")
  _train(first, 4)
  stored = sorted(os.listdir(bucket / "runs" / "toy"))
  assert {"metrics.jsonl", "checkpoints"} <= set(stored) and ".vqlm.lock" not in stored
  assert first.push() == 0  # Nothing changed since the last copy.

  second = RemoteWorkdir("gs://runs/toy", mirror=str(tmp_path / "host_b"))
  second.checkpoint_dir = first.checkpoint_dir
  messages = _train(second, 6)
  assert any("resuming from step 4" in m for m in messages)
  with open(bucket / "runs" / "toy" / "metrics.jsonl") as f:
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert not os.path.exists(tmp_path / "host_b" / "checkpoints")


def test_pull_skips_checkpoints_and_push_copies_only_changes(bucket, tmp_path):
  remote = RemoteWorkdir("gs://b/run", mirror=str(tmp_path / "mirror"))
  os.makedirs(tmp_path / "mirror" / "samples")
  (tmp_path / "mirror" / "config.json").write_text("{}")
  (tmp_path / "mirror" / "samples" / "a.png").write_bytes(b"png")
  assert remote.push() == 2 and remote.push() == 0
  (tmp_path / "mirror" / "config.json").write_text('{"changed": 1}')
  assert remote.push() == 1
  os.makedirs(bucket / "b" / "run" / "checkpoints" / "7")
  (bucket / "b" / "run" / "checkpoints" / "7" / "big").write_bytes(b"x" * 1000)
  other = RemoteWorkdir("gs://b/run", mirror=str(tmp_path / "other"))
  assert other.pull() == 2
  assert (tmp_path / "other" / "config.json").read_text() == '{"changed": 1}'
  assert not (tmp_path / "other" / "checkpoints").exists()


def test_train_in_an_unreachable_bucket_is_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("VQLM_MIRROR_DIR", str(tmp_path / "mirrors"))

  def unreachable(*args, **kwargs):
    raise PermissionError("403 Forbidden: no access to bucket")

  monkeypatch.setattr(RemoteWorkdir, "pull", unreachable)
  argv = ["vqlm", "train", "--config", "configs/tokenizer.py:size=tiny"]
  assert cli.main([*argv, "--workdir", "gs://nowhere/run", "--progress=false"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("vqlm: error: cannot read gs://nowhere/run (") and "\n" not in err
  assert cli.main(["vqlm", "generate", "--workdir", "gs://b/run", "--prompt", "x"]) == 2
  assert "read from a local copy" in capsys.readouterr().err
