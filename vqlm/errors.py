"""`UserError`: a mistake the user can fix (a bad flag, config value, path or input file).

The `vqlm` command prints a UserError as one line, `vqlm: error: ...`, naming the fix, and exits
with status 2; `--debug` shows its traceback too. Any other exception keeps its traceback: it is
a bug (or a library failure) and the traceback is what a report of it needs. A UserError is a
ValueError, so code that catches ValueError still catches it.
"""


class UserError(ValueError):
  """A mistake the user can fix; the message names the fix in one line."""


# Sizes and counts beyond int32 overflow XLA's shapes and indices.
MAX_SIZE = 2**31 - 1


def check_int(name: str, value, *, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
  """`value` as an int in `[minimum, maximum]` (a size, count or step setting), else a UserError
  naming `name`."""
  import numbers

  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise UserError(f"{name}={value!r} must be an integer")
  if not minimum <= value <= maximum:
    raise UserError(f"{name}={value} must be in [{minimum}, {maximum}]")
  return int(value)
