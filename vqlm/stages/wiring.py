"""What both stages wire the same way: the loop's options and the trainer on the config's mesh."""

import ml_collections

from vqlm.errors import UserError
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import as_kwargs
from vqlm.train import loop


def make_trainer(
  task: loop.TrainTask,
  config: ml_collections.ConfigDict,
  *,
  progress: bool = True,
  throughput_key: str = "",
) -> loop.Trainer:
  """A `loop.Trainer` for `task` with the config's `train` options and `mesh`."""
  t = config.train
  for name in ("keep_every_steps", "spike_sigma", "spike_warmup"):
    if t.get(name, 0) < 0:
      raise UserError(f"config.train.{name} is {t.get(name)}; it must be >= 0")
  options = loop.LoopOptions(
    steps=t.steps,
    seed=t.seed,
    log_every=t.log_every,
    checkpoint_every=t.checkpoint_every,
    checkpoint_minutes=t.checkpoint_minutes,
    keep_checkpoints=t.keep_checkpoints,
    keep_every_steps=t.get("keep_every_steps", 0),
    checkpoint_commit=t.get("checkpoint_commit", "auto"),
    max_consecutive_skips=t.max_consecutive_skips,
    spike_sigma=t.get("spike_sigma", 0.0),
    spike_warmup=t.get("spike_warmup", 100),
    progress=progress,
    throughput_key=throughput_key,
  )
  mesh = mesh_lib.make_mesh(as_kwargs(config.mesh.shape))
  return loop.Trainer(task, mesh=mesh, rules=config.mesh.rules, options=options)
