"""Per-command flag parsing on a fresh absl FlagValues (so commands can run in-process
repeatedly)."""

from collections.abc import Callable
import os
import re

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
  except UserError:
    raise
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field.
    detail = str(e.args[0] if e.args else e).replace("\n", "; ").replace("'", "")
    raise UserError(
      f"unknown config field {detail} (see the config file for valid fields)"
    ) from None
  except (IndexError, TypeError, ValueError) as e:
    # ml_collections: a field path it cannot parse or follow (`--config.mesh.rules.0=...`,
    # `--config.mesh.rules.x=...`: into a list).
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.lstrip("-").startswith("config.")]
    raise UserError(
      f"cannot override {' or '.join(overrides) or 'the config'}: {error_line(e)} (see the "
      "config file for valid fields; lists are overridden whole)"
    ) from None
  except flags.Error as e:  # A value of the wrong type, --config.a after --config.a.b, ...
    raise UserError(error_line(e)) from None
  if config:
    _check_section_overrides(fv, argv)
  return fv


# Top-level config sections whose entries are free-form (a dict of evaluators), so that replacing
# the whole section (`--config.evals={}`: no evaluators) is meaningful.
FREE_FORM_SECTIONS = ("evals",)


def _check_section_overrides(fv: flags.FlagValues, argv: list[str]) -> None:
  """`--config.train={...}` replaces the whole section: the fields it does not name would be
  missing when the stage reads them. Refused, except for `FREE_FORM_SECTIONS`."""
  names = [re.match(r"--?config\.(\w+)(=|$)", arg) for arg in argv[1:]]
  names = [m.group(1) for m in names if m]
  if not names or fv["config"].value is None:
    return
  try:
    config = fv["config"].value
    sections = {n for n in names if isinstance(config.get(n), ml_collections.ConfigDict)}
  except OSError:  # A config file that cannot be read: `require_config` says so.
    return
  bad = sorted(sections - set(FREE_FORM_SECTIONS))
  if bad:
    raise UserError(
      f"--config.{bad[0]} would replace the whole '{bad[0]}' section; override its fields one at "
      f"a time, e.g. --config.{bad[0]}.FIELD=VALUE"
    )


def error_line(error: BaseException) -> str:
  """One line for a flag error. absl wraps the error raised while parsing a value: the outermost
  message that quotes the innermost one (it names the flag too), else the innermost one."""
  chain = [error]
  while True:
    e = chain[-1]
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None or inner in chain:
      break
    chain.append(inner)
  lines = [next((l.strip() for l in str(e).splitlines() if l.strip()), "") for e in chain]
  root = lines[-1]
  line = next((l for l in lines if root and root in l), root)
  return line or type(chain[-1]).__name__


def define_lm_run(f: _Definer) -> None:
  """`--workdir` (an LM run) and `--tokenizer` (its image tokenizer, when it moved apart)."""
  f.DEFINE_string("workdir", None, "LM run directory (from `vqlm train`, configs/lm.py)")
  f.DEFINE_string("tokenizer", None, "image tokenizer run (default: the one the LM recorded)")


def check_workdir(workdir: str, flag: str = "--workdir") -> str:
  """Returns the absolute workdir, created with its parents; a clear error when it cannot be."""
  if not workdir:
    raise UserError(f"{flag} is required: a directory for this run's outputs")
  if "://" in workdir:
    raise UserError(
      f"{flag} {workdir}: only `vqlm train` takes a bucket URL; copy the run to a local "
      f"directory first (e.g. `gcloud storage cp -r {workdir} .`) or mount the bucket"
    )
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
