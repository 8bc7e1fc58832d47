"""Orbax checkpoints of a run: train state + data-iterator state + run metadata, in one step dir.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous; Orbax writes into a
temporary directory and renames it on commit, so a run killed mid-save keeps the previous committed
step, and `cleanup_tmp_directories` removes the leftovers on the next start.

Permanent checkpoints are the steps divisible by `keep_every_steps`; all others (periodic or
time-based saves) are temporary and only the newest `max_to_keep` of them survive.

How a step commits (`commit`):
  * `rename` (local disks): Orbax writes into a temporary directory and renames it.
  * `commit_file`: Orbax writes into the step directory itself and marks it committed with a
    `commit_success.txt` file. Needed where renaming a directory fails or is not atomic: gcsfuse
    mounts of flat-namespace buckets refuse directory renames by default.
  * `auto` (the default): `commit_file` on FUSE mounts (`/proc/mounts`) and `gs://` URLs (which
    Orbax writes natively, with no mount), `rename` elsewhere.

A latest step that cannot be read back (a truncated or damaged file) is set aside as
`checkpoints/corrupt-<step>` with a warning, and the run resumes from the newest good step.
"""

from collections.abc import Callable
import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vqlm.errors import UserError

log = logging.getLogger(__name__)

FAULT_ENV = "VQLM_TEST_CHECKPOINT_FAULT"
COMMIT_MODES = ("auto", "rename", "commit_file")
CORRUPT_PREFIX = "corrupt-"


def is_url(path: str) -> bool:
  """`gs://bucket/dir` and other URL-style paths, which Orbax opens natively (no FUSE)."""
  return "://" in str(path)


def _mount_type(path: str, mounts_file: str = "/proc/mounts") -> str:
  """The file-system type of the mount holding `path` (e.g. `ext4`, `fuse.gcsfuse`); '' if
  unknown (no /proc on this OS)."""
  try:
    with open(mounts_file, encoding="utf-8") as f:
      rows = [line.split() for line in f if line.strip()]
  except OSError:
    return ""
  path = os.path.realpath(path)
  best, kind = "", ""
  for row in rows:
    if len(row) < 3:
      continue
    point = row[1].replace("\\040", " ")
    inside = path == point or path.startswith(point.rstrip("/") + "/")
    if inside and len(point) >= len(best):
      best, kind = point, row[2]
  return kind


def commit_mode(
  directory: str, requested: str = "auto", *, mounts_file: str = "/proc/mounts"
) -> str:
  """`rename` or `commit_file` for a checkpoint directory (see the module docstring)."""
  if requested not in COMMIT_MODES:
    raise UserError(
      f"unknown checkpoint commit mode {requested!r}; valid: {', '.join(COMMIT_MODES)}"
      " (config.train.checkpoint_commit)"
    )
  if requested != "auto":
    return requested
  if is_url(directory):
    return "commit_file"
  fstype = _mount_type(directory, mounts_file)  # The directory need not exist yet.
  return "commit_file" if fstype.startswith("fuse") else "rename"


def _temporary_path_class(mode: str) -> type:
  """Orbax's commit strategy for `mode`, wrapped by the fault-injection hook when it is set."""
  atomicity = ocp.path.atomicity
  base = (
    atomicity.CommitFileTemporaryPath
    if mode == "commit_file"
    else atomicity.AtomicRenameTemporaryPath
  )
  return _fault_injecting_path_class(base) or base


def _fault_injecting_path_class(base: type) -> type | None:
  """A test hook: `VQLM_TEST_CHECKPOINT_FAULT=slow:SECONDS` delays every commit (so a test can
  kill the process while an async save is in flight); `=enospc` makes every commit fail as if the
  disk were full. Unset (always, outside tests) it changes nothing."""
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return None
  import asyncio

  class FaultyTemporaryPath(base):
    async def finalize(self, *args, **kwargs):
      if spec.startswith("slow:"):
        await asyncio.sleep(float(spec.split(":", 1)[1]))
      elif spec == "enospc":
        raise OSError(28, "No space left on device (injected by " + FAULT_ENV + ")")
      return await super().finalize(*args, **kwargs)

  return FaultyTemporaryPath


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the configured model; `detail` names the first
  parameter that differs and how."""

  def __init__(self, message: str, detail: str = ""):
    super().__init__(message)
    self.detail = detail or message


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: dict | None
  meta: dict | None


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs carrying the target's shardings, for restoring onto a new topology."""

  def leaf(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(leaf, tree)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  """{'params/decoder/kernel': shape}; dataclass fields and dict keys spelled the same way."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): tuple(getattr(x, "shape", ())) for path, x in flat}


class Checkpointer:
  """Saves and restores a run; one instance per run directory.

  Args:
    directory: where step directories live (created if missing); a local path or a `gs://` URL.
    max_to_keep: how many of the newest checkpoints to keep.
    keep_every_steps: steps divisible by this are never deleted (0: none are permanent).
    async_save: write in a background thread while training continues.
    commit: `auto`, `rename` or `commit_file` (see the module docstring).
    warn: where warnings go (a damaged step set aside); default: the `logging` module.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 3,
    keep_every_steps: int = 0,
    async_save: bool = True,
    commit: str = "auto",
    warn: Callable[[str], None] | None = None,
  ):
    self._warn = warn or log.warning
    self.directory = directory if is_url(directory) else os.path.abspath(directory)
    self.commit = commit_mode(self.directory, commit)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_every_steps or None,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
      temporary_path_class=_temporary_path_class(self.commit),
    )
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  @property
  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
    self, step: int, state: Any, *, data: dict | None = None, meta: dict | None = None
  ) -> bool:
    """Starts saving `state` at `step` (asynchronously); returns whether a save started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      items["data"] = ocp.args.JsonSave(data)
    if meta is not None:
      items["meta"] = ocp.args.JsonSave(meta)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    """Blocks until every pending save has committed."""
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def check_compatible(self, step: int, target: Any, *, partial: bool = False) -> None:
    """Raises CheckpointMismatchError naming the first parameter whose shape differs.

    With `partial`, `target` may be a subset of the saved state (e.g. its params alone)."""
    saved = self._manager.item_metadata(step)
    saved_state = saved.get("state") if saved is not None else None
    if saved_state is None:
      return
    want = _flat_shapes(target)
    have = _flat_shapes(saved_state)
    missing = sorted(set(want) - set(have))
    extra = [] if partial else sorted(set(have) - set(want))
    if missing or extra:
      name = (missing or extra)[0]
      detail = f"parameter {name} is {'missing from' if missing else 'only in'} the checkpoint"
      raise CheckpointMismatchError(
        f"checkpoint step {step} in {self.directory} does not match the config ({detail}); use "
        "a new --workdir or the config that made this run",
        detail,
      )
    for name, shape in want.items():
      if have[name] != shape:
        detail = f"{name} has shape {have[name]} there but {shape} in the config"
        raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the config: {detail}; use "
          "a new --workdir or the config that made this run",
          detail,
        )

  def restore(self, target: Any, step: int | None = None) -> Restored | None:
    """Restores the latest (or given) step onto `target`'s shapes and shardings; None if empty.

    Without `step`, a newest step that cannot be read is set aside (`corrupt-<step>`, with a
    warning naming it) and the next older one is tried. A checkpoint of another model is never
    skipped: it raises CheckpointMismatchError."""
    if step is not None:
      return self._restore_step(target, step)
    unreadable = []
    for candidate in sorted(self.all_steps(), reverse=True):
      try:
        restored = self._restore_step(target, candidate)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - any read failure marks the step as damaged.
        unreadable.append((candidate, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]))
        continue
      for bad, reason in unreadable:
        self._set_aside(bad, reason, resume_step=candidate)
      return restored
    if unreadable:
      # No step at all can be read: more likely a problem of this process than of every file.
      # Nothing is moved; the first error is shown.
      bad, reason = unreadable[0]
      raise UserError(
        f"no checkpoint in {self.directory} can be read (step {bad}: {reason}); check the "
        "files, or start again with a new --workdir"
      )
    return None

  def _set_aside(self, step: int, reason: str, *, resume_step: int) -> None:
    """Moves an unreadable step out of Orbax's view, keeping its files for inspection."""
    from etils import epath

    target = f"{CORRUPT_PREFIX}{step}"
    self._warn(
      f"warning: checkpoint step {step} in {self.directory} cannot be read ({reason}); it is "
      f"kept as {target} and the run resumes from step {resume_step}"
    )
    if jax.process_index() == 0:
      root = epath.Path(self.directory)
      suffix = 0
      while (root / target).exists():
        suffix += 1
        target = f"{CORRUPT_PREFIX}{step}.{suffix}"
      (root / str(step)).rename(root / target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"vqlm_checkpoint_set_aside_{step}")
    self._manager.reload()

  def _restore_step(self, target: Any, step: int) -> Restored:
    self.check_compatible(step, target)
    items = {"state": ocp.args.StandardRestore(_abstract(target))}
    for name in ("data", "meta"):
      if os.path.isdir(os.path.join(self.directory, str(step), name)):
        items[name] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(
      step=step, state=restored["state"], data=restored.get("data"), meta=restored.get("meta")
    )

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def to_numpy(tree: Any) -> Any:
  """Copies a (possibly sharded) pytree to host NumPy arrays, e.g. for comparisons in tests."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
