"""The `vqlm` command: `vqlm <command> [flags]`. Parses and dispatches; the work lives elsewhere.

`vqlm --help` lists the commands; `vqlm <command> --help` (or `-h`) lists a command's flags.

User errors (`vqlm.errors.UserError`: bad config keys, missing files, mismatched checkpoints, bad
images) print one line `vqlm: error: ...` naming the fix and exit with status 2; `--debug` shows
their traceback too. Any other exception keeps its traceback.
"""

import importlib
import sys

from vqlm.commands import COMMANDS
from vqlm.errors import UserError

# Mistakes a user can fix: one line, no traceback (unless --debug).
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def usage() -> str:
  lines = [
    "usage: vqlm <command> [--flags]   (vqlm <command> --help for its flags)",
    "",
    "commands:",
  ]
  for name, (_, description) in COMMANDS.items():
    lines.append(f"  {name:<10}{description}")
  lines += ["", "--debug (any command): show the traceback of user errors too"]
  return "\n".join(lines)


def _quiet_libraries() -> None:
  """Keep the terminal for vqlm's own progress: library INFO/WARNING logs go unless VQLM_VERBOSE."""
  import logging
  import os
  import warnings

  if os.environ.get("VQLM_VERBOSE"):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)
  logging.getLogger("jax").setLevel(logging.ERROR)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  try:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
  except ImportError:
    pass


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0
  command = argv[1]
  if command not in COMMANDS:
    print(
      f"vqlm: error: unknown command '{command}'; valid: {', '.join(COMMANDS)}", file=sys.stderr
    )
    return 2
  debug = "--debug" in argv[2:]
  argv = argv[:2] + [a for a in argv[2:] if a != "--debug"]
  from absl import flags

  from vqlm.commands.flags import HelpShown, error_line
  from vqlm.runtime import host_memory

  try:
    host_memory.reuse_host_memory()  # before JAX starts its CPU threads
  except ValueError as e:
    print(f"vqlm: error: {e}", file=sys.stderr)
    return 2
  _quiet_libraries()
  module = importlib.import_module(COMMANDS[command][0])
  try:
    if command == "bench":
      return int(module.main(argv[2:]) or 0)
    return int(module.main([f"vqlm {command}"] + argv[2:]) or 0)
  except HelpShown:
    return 0
  except USER_ERRORS as e:
    if debug:
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"vqlm: error: {message}", file=sys.stderr)
    return 2
  except flags.Error as e:
    if debug:
      raise
    print(f"vqlm: error: {error_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("vqlm: interrupted; run the same command to resume", file=sys.stderr)
    return 130
  except BrokenPipeError:
    # The reader went away (`vqlm train --help | head`): not an error. Point stdout at devnull
    # so that Python's final flush does not raise again.
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
  sys.exit(main())
