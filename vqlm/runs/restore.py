"""Parameters read back from a run's checkpoint for use: no optimizer state, any device count.

Training saves the whole train state (`step`, `params`, `opt_state`, `extra`) with Orbax. Using a
run needs only its parameters (and non-trainable collections such as a VQ layer's statistics), so
`restore_subtree` asks Orbax for that part alone (a partial restore: the Adam moments are never
read) and places it on a mesh made from the devices of *this* process: a run trained on 8 devices
with `fsdp=8` loads on one CPU, and a run trained on one CPU loads sharded over a GPU node.
"""

from collections.abc import Mapping
import os
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh
import orbax.checkpoint as ocp

from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.checkpoint import Checkpointer, CheckpointMismatchError


def inference_mesh(shape: Mapping[str, int] | None = None) -> Mesh:
  """A mesh over every device present: data-parallel by default (parameters replicated, or
  sharded by the rules over `fsdp` / `tensor` when `shape` asks for them)."""
  return mesh_lib.make_mesh(dict(shape or {"data": -1}))


def placed_abstract(boxed: Any, mesh: Mesh, rules: Any) -> Any:
  """Boxed `jax.eval_shape` output -> unboxed ShapeDtypeStructs carrying the mesh's shardings."""
  shardings = mesh_lib.logical_shardings(boxed, mesh, mesh_lib.rules_from_config(rules))
  abstract = nn.meta.unbox(boxed)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def latest_step(directory: str) -> int | None:
  """The newest committed step in `directory` (None when there is none)."""
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory)
  try:
    return ckpt.latest_step
  finally:
    ckpt.close()


def restore_subtree(
  directory: str, target: Mapping[str, Any], *, step: int | None = None
) -> tuple[int, dict[str, Any]]:
  """Restores the parts of the saved train state named by `target` (e.g. `{"params": ...}`).

  Args:
    directory: the run's `checkpoints/` directory.
    target: a subset of the saved state's top-level fields, as ShapeDtypeStructs with shardings
      (`placed_abstract`); every leaf must exist in the checkpoint with the same shape.
    step: the step to read (default: the newest).
  Returns:
    (step, the restored subtree with `target`'s structure and shardings).
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint in {directory}; train the run first")
  ckpt = Checkpointer(directory)
  try:
    step = ckpt.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}; train the run first")
    ckpt.check_compatible(step, target, partial=True)
  finally:
    ckpt.close()
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  restore_args = ocp.checkpoint_utils.construct_restore_args(dict(target))
  with ocp.PyTreeCheckpointer() as reader:
    restored = reader.restore(
      path,
      args=ocp.args.PyTreeRestore(
        item=dict(target), restore_args=restore_args, partial_restore=True
      ),
    )
  return step, {k: restored[k] for k in target}


__all__ = [
  "CheckpointMismatchError",
  "inference_mesh",
  "latest_step",
  "placed_abstract",
  "restore_subtree",
]
