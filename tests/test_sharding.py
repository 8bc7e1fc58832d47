"""Sharded training equals single-device training (8 faked CPU devices; two local processes)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "sharded_lm_script.py")


def _env(devices=1, **extra):
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    **extra,
  )
  return env


def _run(args, env, timeout=300):
  proc = subprocess.run(
    [sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_mesh_equals_single_device_and_checkpoint_moves_between_topologies(tmp_path):
  out = str(tmp_path / "mesh.json")
  _run(["mesh", out], _env(devices=8))
  r = json.load(open(out))
  np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-5)
  # Bounds with headroom over float32 reduction-order noise (typical values: docs/evaluation.md).
  assert r["param_rel_diff"] < 1e-5
  assert r["param_max_diff"] < 1e-4
  assert r["next_loss_4"] == pytest.approx(r["next_loss_8"], rel=1e-5)
  assert r["next_loss_1"] == pytest.approx(r["next_loss_8"], rel=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.ci
def test_two_processes_equal_one(tmp_path):
  single = str(tmp_path / "single.json")
  _run(["single", single], _env())
  multi = str(tmp_path / "multi.json")
  env = _env(COORD=f"127.0.0.1:{_free_port()}")
  procs = [
    subprocess.Popen(
      [sys.executable, SCRIPT, "proc", multi, str(i), "2"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  a, b = json.load(open(single)), json.load(open(multi))
  assert b["process_count"] == 2
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
  for x, y in zip(a["params"], b["params"]):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
