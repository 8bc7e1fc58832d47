"""Per-command flag parsing on a fresh absl FlagValues (so commands can run in-process repeatedly)."""
import os
from collections.abc import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags


class _Definer:
  """`f.DEFINE_string(name, default, help)` etc. on one FlagValues instead of absl's global one."""

  def __init__(self, fv: flags.FlagValues):
    self._fv = fv

  def __getattr__(self, name: str):
    define = getattr(flags, name)
    return lambda *args, **kwargs: define(*args, flag_values=self._fv, **kwargs)


def parse(argv: list[str], define: Callable[[_Definer], None], *,
          config: bool = False) -> flags.FlagValues:
  """Defines `define(f)`'s flags (plus `--config` with overrides if asked) and parses `argv`.

  `--config path.py:arg` loads `get_config(arg)`; `--config.train.steps=100` overrides a field;
  an unknown field fails with absl's error naming it.
  """
  fv = flags.FlagValues()
  if config:
    config_flags.DEFINE_config_file("config", None, "config file: path.py[:key=value,...]",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
  define(_Definer(fv))
  try:
    fv(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field.
    detail = str(e.args[0] if e.args else e).replace("\n", "; ").replace("'", "")
    raise ValueError(f"unknown config field {detail} (see the config file for valid fields)"
                     ) from None
  return fv


def check_workdir(workdir: str) -> str:
  """Returns the absolute workdir; its parent must exist (the workdir itself is created)."""
  if not workdir:
    raise ValueError("--workdir is required: a directory for this run's outputs")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise ValueError(f"the parent of --workdir {workdir} does not exist; create {parent} first "
                     "or choose another path")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file; choose a directory")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def require_config(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  if fv["config"].value is None:
    raise ValueError("--config is required, e.g. --config configs/tokenizer.py:size=small")
  return fv["config"].value
