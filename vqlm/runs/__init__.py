"""Trained runs loaded for use: `load(workdir)` -> `TokenizerRun` | `LMRun`.

A loaded run holds parameters only (no optimizer state), placed on a mesh of the devices present,
and a run directory may be moved or copied (paths to other runs are also stored relative to it).
Also the saved config (`config.json`) and the one reader/writer of `eval.json`.
"""

from vqlm.errors import UserError
from vqlm.runs.eval_file import EVAL_FILE, read_eval, write_eval
from vqlm.runs.lm_run import LMRun
from vqlm.runs.saved_config import (
  CONFIG_FILE,
  check_same_model,
  config_to_dict,
  load_config,
  save_config,
)
from vqlm.runs.tokenizer_run import TokenizerRun

RUN_TYPES = {"tokenizer": TokenizerRun, "lm": LMRun}


def load(workdir: str, **kwargs) -> TokenizerRun | LMRun:
  """The trained run in `workdir`, as the class its stage calls for (kwargs go to it)."""
  stage = load_config(workdir).get("stage")
  if stage not in RUN_TYPES:
    raise UserError(f"{workdir} has unknown stage {stage!r}; valid: {', '.join(RUN_TYPES)}")
  return RUN_TYPES[stage](workdir, **kwargs)


__all__ = [
  "CONFIG_FILE",
  "EVAL_FILE",
  "LMRun",
  "RUN_TYPES",
  "TokenizerRun",
  "check_same_model",
  "config_to_dict",
  "load",
  "load_config",
  "read_eval",
  "save_config",
  "write_eval",
]
