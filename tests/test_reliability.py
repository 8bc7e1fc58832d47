"""Killed runs resume exactly; SIGTERM saves and exits; a full disk keeps the last checkpoint."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "vqlm", "bench", "toy_run.py")
STEPS = 40


def _env(**extra):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)


def _losses(workdir):
  """The last logged loss of every step (a resumed run re-logs steps after its checkpoint)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        out[row["step"]] = row["train/loss"]
  return out


def _final(workdir):
  with np.load(os.path.join(workdir, "final.npz")) as f:
    return {k: f[k] for k in f.files}


def _run_to_end(workdir, env):
  proc = subprocess.run(
    [sys.executable, SCRIPT, workdir, str(STEPS)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  _run_to_end(workdir, _env())
  return _losses(workdir), _final(workdir)


def _assert_same(workdir, reference):
  ref_losses, ref_params = reference
  assert _losses(workdir) == ref_losses
  params = _final(workdir)
  assert params.keys() == ref_params.keys()
  for k in params:
    np.testing.assert_array_equal(params[k], ref_params[k])


def _wait_for_step(workdir, step, proc, timeout=120):
  path = os.path.join(workdir, "metrics.jsonl")
  start = time.time()
  while time.time() - start < timeout and proc.poll() is None:
    if os.path.exists(path):
      with open(path) as f:
        rows = [json.loads(l) for l in f if l.strip()]
      if rows and rows[-1]["step"] >= step:
        return
    time.sleep(0.05)


def test_sigkill_at_random_moments_resumes_bit_exactly(tmp_path, reference):
  workdir = str(tmp_path / "run")
  rng = random.Random(0)
  # Slow commits keep async saves in flight for a while, so some kills land mid-save.
  env = _env(VQLM_TEST_CHECKPOINT_FAULT="slow:0.3")
  kills = 0
  for target in sorted(rng.sample(range(4, STEPS - 2), 3)):
    proc = subprocess.Popen(
      [sys.executable, SCRIPT, workdir, str(STEPS)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    _wait_for_step(workdir, target, proc)
    time.sleep(rng.random() * 0.2)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate()
  out = _run_to_end(workdir, _env())
  assert "finished" in out
  assert kills >= 2
  # No uncommitted temporary directories survive the restart.
  leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
  assert not leftovers
  _assert_same(workdir, reference)


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path, reference):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
    [sys.executable, SCRIPT, workdir, str(STEPS)],
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for_step(workdir, 10, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  match = re.search(r"preempted: saved step (\d+)", out)
  assert match, out
  step = int(match.group(1))
  assert str(step) in os.listdir(os.path.join(workdir, "checkpoints"))
  assert "finished" not in out
  assert f"resuming from step {step}" in _run_to_end(workdir, _env())
  _assert_same(workdir, reference)


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path):
  import jax.numpy as jnp

  from vqlm.runtime.checkpoint import FAULT_ENV, Checkpointer

  state = {"w": jnp.arange(4.0)}
  good = Checkpointer(str(tmp_path), async_save=False)
  good.save(1, state)
  good.close()
  os.environ[FAULT_ENV] = "enospc"
  try:
    bad = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(OSError, match="No space left"):
      bad.save(2, {"w": jnp.arange(4.0) + 1})
      bad.wait()
  finally:
    del os.environ[FAULT_ENV]
  again = Checkpointer(str(tmp_path))
  assert again.latest_step == 1
  restored = again.restore({"w": jnp.zeros(4)})
  np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.arange(4.0))
