"""`vqlm train --config configs/<family>.py[:args] --workdir RUN [--config.x.y=value]`.

Resumes from RUN/checkpoints when it exists. The stage (image tokenizer, LM, or preference
tuning of a chat LM: `configs/tune.py`) comes from the config's `stage` field.
"""

import importlib

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

STAGES = {"tokenizer": "vqlm.stages.tokenizer", "lm": "vqlm.stages.lm", "tune": "vqlm.stages.tune"}


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("workdir", None, "run directory (created; resumed if it holds a run)"),
      f.DEFINE_bool("progress", True, "show a progress bar"),
      f.DEFINE_enum(
        "distributed",
        None,
        ["auto", "on", "off"],
        "multi-process start-up: auto = when a launcher describes several processes (srun step, "
        "Cloud TPU VM, VQLM_COORDINATOR, ...); on = always; off = never (default: "
        "$VQLM_DISTRIBUTED or auto)",
      ),
    ),
    config=True,
  )
  from vqlm.runtime.distributed import maybe_initialize

  maybe_initialize(fv.distributed)
  config = flag_lib.require_config(fv)
  stage = config.get("stage")
  if stage not in STAGES:
    raise UserError(f"config has unknown stage '{stage}'; valid: {', '.join(STAGES)}")
  train = importlib.import_module(STAGES[stage]).train
  if fv.workdir and "://" in fv.workdir:
    _train_in_bucket(train, config, fv.workdir, stage=stage, progress=fv.progress)
  else:
    train(config, flag_lib.check_workdir(fv.workdir), progress=fv.progress)
  return 0


def _train_in_bucket(train, config, url: str, *, stage: str, progress: bool) -> None:
  """`--workdir gs://...`: checkpoints straight to the bucket, small files through a local mirror
  (`vqlm.runtime.remote_workdir`)."""
  import jax

  from vqlm.runtime.remote_workdir import RemoteWorkdir

  remote = RemoteWorkdir(url)
  try:
    remote.pull()
  except Exception as e:  # noqa: BLE001 - no credentials, no gcsfs, no such bucket, ...
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UserError(f"cannot read {url} ({reason}); check the URL and your access") from None
  print(f"{url}: checkpoints go to the bucket, other files through {remote.local}")
  writer = jax.process_index() == 0
  kwargs = dict(checkpoint_dir=remote.checkpoint_dir, after_save=None)
  if writer:
    kwargs["after_save"] = lambda step: remote.push()
  if stage == "lm":
    kwargs["share_files"] = lambda is_writer: remote.push() if is_writer else remote.pull()
  try:
    train(config, remote.local, progress=progress, **kwargs)
  finally:
    if writer:
      remote.push()
