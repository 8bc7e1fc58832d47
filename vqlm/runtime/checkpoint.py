"""Orbax checkpoints of a run: train state + data-iterator state + run metadata, in one step dir.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous; Orbax writes into a
temporary directory and renames it on commit, so a run killed mid-save keeps the previous committed
step, and `cleanup_tmp_directories` removes the leftovers on the next start.

Permanent checkpoints are the steps divisible by `keep_every_steps`; all others (periodic or
time-based saves) are temporary and only the newest `max_to_keep` of them survive.
"""

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FAULT_ENV = "VQLM_TEST_CHECKPOINT_FAULT"


def _fault_injecting_path_class() -> type | None:
  """A test hook: `VQLM_TEST_CHECKPOINT_FAULT=slow:SECONDS` delays every commit (so a test can
  kill the process while an async save is in flight); `=enospc` makes every commit fail as if the
  disk were full. Unset (always, outside tests) it changes nothing."""
  spec = os.environ.get(FAULT_ENV, "")
  if not spec:
    return None
  import asyncio

  base = ocp.path.atomicity.AtomicRenameTemporaryPath

  class FaultyTemporaryPath(base):
    async def finalize(self, *args, **kwargs):
      if spec.startswith("slow:"):
        await asyncio.sleep(float(spec.split(":", 1)[1]))
      elif spec == "enospc":
        raise OSError(28, "No space left on device (injected by " + FAULT_ENV + ")")
      return await super().finalize(*args, **kwargs)

  return FaultyTemporaryPath


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir does not fit the configured model."""


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
    directory: where step directories live (created if missing).
    max_to_keep: how many of the newest checkpoints to keep.
    keep_every_steps: steps divisible by this are never deleted (0: none are permanent).
    async_save: write in a background thread while training continues.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int = 3,
    keep_every_steps: int = 0,
    async_save: bool = True,
  ):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_every_steps or None,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
      temporary_path_class=_fault_injecting_path_class(),
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
      raise CheckpointMismatchError(
        f"checkpoint step {step} in {self.directory} does not match the config (parameter "
        f"{name} is {'missing from' if missing else 'only in'} the checkpoint); use a new "
        "--workdir or the config that made this run"
      )
    for name, shape in want.items():
      if have[name] != shape:
        raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the config: {name} has "
          f"shape {have[name]} there but {shape} in the config; use a new --workdir or the "
          "config that made this run"
        )

  def restore(self, target: Any, step: int | None = None) -> Restored | None:
    """Restores the latest (or given) step onto `target`'s shapes and shardings; None if empty."""
    step = self.latest_step if step is None else step
    if step is None:
      return None
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
