"""Work directories in a bucket (`--workdir gs://bucket/run`), with no FUSE mount.

Checkpoints, the large and precious part of a run, are written by Orbax straight to
`gs://bucket/run/checkpoints` (Orbax commits them there with a commit file: object stores cannot
rename a directory). The run's small files (config.json, vocabulary, text model, metrics,
TensorBoard events, sample grids, eval.json) are written by the ordinary code to a local mirror
directory and copied to the bucket after every checkpoint and at the end of the command; a
restarted run (a preempted VM, another host) first copies them back from the bucket. A file is
copied only when its size or modification time changed since the last copy.

The mirror lives under `$VQLM_MIRROR_DIR` (default `~/.cache/vqlm/workdirs`), one directory per
URL. Bucket access goes through `etils.epath` (for `gs://`, `gcsfs` must be installed: the
`gcs` extra).
"""

import os
import shutil

from etils import epath

CHECKPOINTS = "checkpoints"
MIRROR_ENV = "VQLM_MIRROR_DIR"


def is_url(path: str) -> bool:
  return "://" in str(path)


def default_mirror(url: str) -> str:
  root = os.environ.get(MIRROR_ENV) or os.path.join(
    os.path.expanduser("~"), ".cache", "vqlm", "workdirs"
  )
  scheme, rest = url.split("://", 1)
  return os.path.join(root, scheme, rest.strip("/"))


class RemoteWorkdir:
  """A bucket URL and its local mirror.

  Args:
    url: e.g. `gs://bucket/runs/lm`.
    mirror: the local directory (default: `default_mirror(url)`).
  """

  def __init__(self, url: str, mirror: str | None = None):
    self.url = url.rstrip("/")
    self.local = os.path.abspath(mirror or default_mirror(self.url))
    self.checkpoint_dir = f"{self.url}/{CHECKPOINTS}"
    self._pushed: dict[str, tuple[int, int]] = {}

  def _local_files(self):
    for root, dirs, files in os.walk(self.local):
      rel_root = os.path.relpath(root, self.local)
      if rel_root == ".":
        dirs[:] = [d for d in dirs if d != CHECKPOINTS]
      for name in files:
        if name.startswith(".vqlm.lock") or ".tmp" in name:
          continue
        yield os.path.normpath(os.path.join(rel_root, name))

  def pull(self) -> int:
    """Copies the run's small files from the bucket into the mirror; returns how many."""
    os.makedirs(self.local, exist_ok=True)
    remote = epath.Path(self.url)
    if not remote.exists():
      return 0
    count = 0
    for rel in _remote_files(remote):
      target = os.path.join(self.local, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with (remote / rel).open("rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
      self._pushed[rel] = self._signature(target)
      count += 1
    return count

  @staticmethod
  def _signature(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns

  def push(self) -> int:
    """Copies new or changed small files from the mirror to the bucket; returns how many."""
    remote = epath.Path(self.url)
    count = 0
    for rel in self._local_files():
      source = os.path.join(self.local, rel)
      signature = self._signature(source)
      if self._pushed.get(rel) == signature:
        continue
      target = remote / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      with open(source, "rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)
      self._pushed[rel] = signature
      count += 1
    return count


def _remote_files(root: epath.Path, prefix: str = ""):
  """Relative paths of the files under `root`, skipping `checkpoints/` at the top (names come
  from listing each directory, which every epath back end spells the same way)."""
  for child in root.iterdir():
    rel = f"{prefix}{child.name}"
    if child.is_dir():
      if rel != CHECKPOINTS:
        yield from _remote_files(child, rel + "/")
    else:
      yield rel
