"""`python -m vqlm.bench soak [--kills 20]`: kill -9 a training run again and again; lose nothing.

Runs the toy training (`vqlm.bench.toy_run`) once straight through as the reference, then again
with SIGKILL at random moments (async checkpoint commits slowed so some kills land mid-save),
restarting after each kill, and checks that per-step losses and final parameters are bit-identical.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from vqlm.commands import flags as flag_lib


def _cmd(workdir, steps):
  return [sys.executable, "-m", "vqlm.bench.toy_run", workdir, str(steps)]


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in _rows(workdir) if "train/loss" in r}


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_integer("kills", 20, "number of SIGKILLs"),
      f.DEFINE_integer("steps", 200, "training steps"),
      f.DEFINE_integer("seed", 0, "seed of the kill moments"),
    ),
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rng = random.Random(fv.seed)
  with tempfile.TemporaryDirectory() as tmp:
    ref, run = os.path.join(tmp, "ref"), os.path.join(tmp, "run")
    subprocess.run(_cmd(ref, fv.steps), env=env, check=True, capture_output=True)
    kill_env = dict(env, VQLM_TEST_CHECKPOINT_FAULT="slow:0.2")
    start, kills, restarts = time.time(), 0, 0
    targets = sorted(rng.sample(range(5, fv.steps - 5), fv.kills))
    for target in targets:
      proc = subprocess.Popen(
        _cmd(run, fv.steps), env=kill_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
      )
      restarts += 1
      while proc.poll() is None and (_rows(run) or [{"step": 0}])[-1]["step"] < target:
        time.sleep(0.02)
      time.sleep(rng.random() * 0.3)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills += 1
      proc.wait()
    subprocess.run(_cmd(run, fv.steps), env=env, check=True, capture_output=True)
    same_losses = _losses(run) == _losses(ref)
    a, b = np.load(os.path.join(ref, "final.npz")), np.load(os.path.join(run, "final.npz"))
    same_params = all(np.array_equal(a[k], b[k]) for k in a.files)
    print(
      f"soak: {kills} SIGKILLs over {restarts + 1} starts in {time.time() - start:.0f}s; "
      f"per-step losses identical: {same_losses}; final parameters identical: {same_params}"
    )
    return 0 if same_losses and same_params else 1
