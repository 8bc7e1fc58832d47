"""`vqlm train --config configs/<family>.py[:args] --workdir RUN [--config.x.y=value]`.

Resumes from RUN/checkpoints when it exists. The stage (image tokenizer or LM) comes from the
config's `stage` field.
"""

import importlib

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

STAGES = {"tokenizer": "vqlm.stages.tokenizer", "lm": "vqlm.stages.lm"}


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
  workdir = flag_lib.check_workdir(fv.workdir)
  stage = config.get("stage")
  if stage not in STAGES:
    raise UserError(f"config has unknown stage '{stage}'; valid: {', '.join(STAGES)}")
  importlib.import_module(STAGES[stage]).train(config, workdir, progress=fv.progress)
  return 0
