"""One run per work directory: a lock that process 0 holds while it trains.

Two `vqlm train` commands started on the same `--workdir` would interleave checkpoints, overwrite
each other's `config.json` and metrics. The second one is refused with one line. The lock is an
advisory `flock` on `WORKDIR/.vqlm.lock`, which the kernel releases when the holding process dies,
so a killed run (`kill -9`, a preempted VM) never leaves it stuck; the file records who holds it,
for the message.

Only process 0 of a multi-process run takes it (all processes of one run share the directory). A
`gs://` work directory has no file locks and is not locked.
"""

from collections.abc import Iterator
import contextlib
import fcntl
import os
import socket

import jax

from vqlm.errors import UserError

LOCK_FILE = ".vqlm.lock"

# Directories this process holds, with a nesting count: a stage that holds the lock may call the
# training loop, which takes it again.
_held: dict[str, tuple[int, int]] = {}


def _holder(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip() or "another process"
  except OSError:
    return "another process"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the lock of `workdir` for the duration of the block (re-entrant in one process).

  Raises:
    UserError: another live process holds it.
  """
  if "://" in workdir or jax.process_index() != 0:
    yield
    return
  key = os.path.realpath(workdir)
  if key in _held:
    fd, depth = _held[key]
    _held[key] = (fd, depth + 1)
    try:
      yield
    finally:
      fd, depth = _held[key]
      _held[key] = (fd, depth - 1)
    return
  os.makedirs(key, exist_ok=True)
  path = os.path.join(key, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise UserError(
      f"{workdir} is in use by {_holder(path)}; wait for that run to finish (or stop it), or "
      "choose another --workdir"
    ) from None
  os.ftruncate(fd, 0)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
  _held[key] = (fd, 1)
  try:
    yield
  finally:
    fd, depth = _held.pop(key)
    os.ftruncate(fd, 0)
    os.close(fd)  # Closing the descriptor releases the flock.
