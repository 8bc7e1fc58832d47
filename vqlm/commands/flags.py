"""Per-command flag parsing on a fresh absl FlagValues (so commands can run in-process
repeatedly)."""

from collections.abc import Callable
import os

from absl import flags
import ml_collections
from ml_collections import config_flags

from vqlm.errors import UserError


class HelpShown(Exception):
  """Raised after `--help` / `-h` printed a command's flags (the command then exits with 0)."""


HELP_FLAGS = ("--help", "-h", "--helpfull", "--helpshort")


class _Definer:
  """`f.DEFINE_string(name, default, help)` etc. on one FlagValues instead of absl's global one."""

  def __init__(self, fv: flags.FlagValues):
    self._fv = fv

  def __getattr__(self, name: str):
    define = getattr(flags, name)
    return lambda *args, **kwargs: define(*args, flag_values=self._fv, **kwargs)


def parse(
  argv: list[str], define: Callable[[_Definer], None], *, config: bool = False
) -> flags.FlagValues:
  """Defines `define(f)`'s flags (plus `--config` with overrides if asked) and parses `argv`.

  `--config path.py:arg` loads `get_config(arg)`; `--config.train.steps=100` overrides a field;
  an unknown field fails with absl's error naming it.
  """
  fv = flags.FlagValues()
  if config:
    config_flags.DEFINE_config_file(
      "config",
      None,
      "config file: path.py[:key=value,...]",
      flag_values=fv,
      lock_config=True,
      sys_argv=list(argv),
    )
  define(_Definer(fv))
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(command_help(argv[0], fv))
    raise HelpShown()
  try:
    fv(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field.
    detail = str(e.args[0] if e.args else e).replace("\n", "; ").replace("'", "")
    raise UserError(
      f"unknown config field {detail} (see the config file for valid fields)"
    ) from None
  return fv


def define_lm_run(f: _Definer) -> None:
  """`--workdir` (an LM run) and `--tokenizer` (its image tokenizer, when it moved apart)."""
  f.DEFINE_string("workdir", None, "LM run directory (from `vqlm train`, configs/lm.py)")
  f.DEFINE_string("tokenizer", None, "image tokenizer run (default: the one the LM recorded)")


def check_workdir(workdir: str, flag: str = "--workdir") -> str:
  """Returns the absolute workdir, created with its parents; a clear error when it cannot be."""
  if not workdir:
    raise UserError(f"{flag} is required: a directory for this run's outputs")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"{flag} {workdir} is a file; choose a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(
      f"cannot create {flag} {workdir} ({e.strerror}); choose a path you can write to"
    ) from None
  return workdir


def require_config(fv: flags.FlagValues) -> ml_collections.ConfigDict:
  """The loaded `--config`; a config file that cannot be read is one line naming the path."""
  if fv["config"].value is None:
    raise UserError("--config is required, e.g. --config configs/tokenizer.py:size=small")
  config = fv["config"].value
  try:
    config.get("stage")  # ml_collections defers a failed load to the first access.
  except OSError:
    path = str(getattr(fv["config"], "config_filename", "") or "").split(":")[0]
    raise UserError(
      f"cannot read the config file {path or 'given to --config'}; config paths are relative to "
      "the current directory (the shipped ones are in the repository's configs/)"
    ) from None
  return config


def command_help(name: str, fv: flags.FlagValues) -> str:
  """`usage: vqlm <command> [flags]`, the command's description, then each flag with its help."""
  from vqlm.commands import COMMANDS

  lines = [f"usage: {name} [flags]"]
  entry = COMMANDS.get(name.split()[-1])
  if entry:
    lines += ["", entry[1]]
  lines += ["", "flags:"]
  for flag in sorted(fv._flags().values(), key=lambda f: f.name):  # noqa: SLF001
    if flag.name in ("help", "helpfull", "helpshort", "helpxml") or flag.name.startswith("config."):
      continue
    default = "" if flag.default is None else f" (default: {flag.default_as_str or flag.default})"
    lines.append(f"  --{flag.name}: {flag.help}{default}")
  if "config" in fv:
    lines.append("  --config.<field>=VALUE: override any field of the config (unknown fields fail)")
  return "\n".join(lines)
