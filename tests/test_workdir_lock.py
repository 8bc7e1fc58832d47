"""One run per work directory: a second run is refused; a killed run does not leave the lock."""

import fcntl
import os
import signal
import subprocess
import sys

import pytest

from vqlm import cli
from vqlm.errors import UserError
from vqlm.runtime import workdir_lock

HOLDER = """
import sys, time
from vqlm.runtime import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def _start_holder(workdir):
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_run_is_refused_and_a_killed_run_releases_the_lock(tmp_path, capsys):
  proc = _start_holder(tmp_path)
  try:
    with pytest.raises(UserError, match=f"{tmp_path} is in use by pid {proc.pid} on "):
      with workdir_lock.hold(str(tmp_path)):
        pass
    # Through the command: one line, exit status 2, nothing written to the run.
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["vqlm", "train", "--config", "configs/tokenizer.py:size=tiny"]
    assert cli.main([*argv, "--workdir", str(tmp_path), "--progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vqlm: error: ") and "in use by pid" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  with workdir_lock.hold(str(tmp_path)):
    pass


def test_the_lock_is_reentrant_in_one_process(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with workdir_lock.hold(str(tmp_path / ".")):
      pass
    # Still held by the outer block: another open file description cannot take the flock.
    fd = os.open(tmp_path / workdir_lock.LOCK_FILE, os.O_RDWR)
    try:
      with pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
      os.close(fd)
  with workdir_lock.hold(str(tmp_path)):
    pass
