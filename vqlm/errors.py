"""`UserError`: a mistake the user can fix (a bad flag, config value, path or input file).

The `vqlm` command prints a UserError as one line, `vqlm: error: ...`, naming the fix, and exits
with status 2; `--debug` shows its traceback too. Any other exception keeps its traceback: it is
a bug (or a library failure) and the traceback is what a report of it needs. A UserError is a
ValueError, so code that catches ValueError still catches it.
"""


class UserError(ValueError):
  """A mistake the user can fix; the message names the fix in one line."""
