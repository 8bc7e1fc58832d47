"""Loaded runs: parameters only, on the devices present, from a run directory that moved."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vqlm import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import runs_fsdp_script  # noqa: E402


@pytest.mark.ci
def test_fsdp8_run_loads_on_one_device_after_its_directory_moved(tiny, tmp_path):
  """Trained with fsdp=8 on 8 devices; loaded here, on one, after `mv`: the same parameters
  bit for bit, logits within 1e-5 and the same greedy tokens."""
  before = tmp_path / "before"
  os.makedirs(before)
  shutil.copytree(tiny["tok"], before / "tok")
  shutil.copytree(tiny["codes"], before / "codes")
  out = str(tmp_path / "reference.npz")
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "tests", "runs_fsdp_script.py"),
      str(before / "tok"),
      str(before / "codes"),
      str(before / "lm"),
      out,
    ],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  moved = tmp_path / "moved"
  os.rename(before, moved)

  run = runs.load(str(moved / "lm"))
  assert isinstance(run, runs.LMRun)
  assert run.tokenizer_dir() == str(moved / "tok")
  reference = np.load(out)
  mine = runs_fsdp_script.flat_params(run.params)
  assert sorted(mine) == sorted(k for k in reference.files if k.startswith("param/"))
  for name, value in mine.items():
    np.testing.assert_array_equal(value, reference[name], err_msg=name)
  outputs = runs_fsdp_script.reference_outputs(run)
  np.testing.assert_allclose(outputs["logits"], reference["logits"], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(outputs["image_ids"], reference["image_ids"])
  np.testing.assert_array_equal(outputs["text_ids"], reference["text_ids"])
  images = run.generate(["a small blue square"], num_per_prompt=2, temperature=0.0)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_parameters_only_no_optimizer_state(tiny):
  run = runs.load(tiny["lm"])
  assert set(run.params) >= {"embed"} and not hasattr(run, "opt_state")
  tok = runs.load(tiny["tok"])
  assert isinstance(tok, runs.TokenizerRun) and set(tok.variables) <= {"params", "batch_stats"}


def test_a_moved_lm_without_its_tokenizer_names_the_flag(tiny, tmp_path):
  shutil.copytree(tiny["lm"], tmp_path / "lm")
  config = runs.load_config(str(tmp_path / "lm"))
  config.data.tokenizer = str(tmp_path / "gone")
  runs.save_config(str(tmp_path / "lm"), config)
  run = runs.LMRun(str(tmp_path / "lm"))
  with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
    run.tokenizer_run()
  # Given explicitly, the tokenizer is found again.
  assert runs.LMRun(str(tmp_path / "lm"), tokenizer=tiny["tok"]).tokenizer_run().grid == (8, 8)


def test_eval_file_merges_sections(tmp_path):
  runs.write_eval(str(tmp_path), "a", {"x": 1.0})
  runs.write_eval(str(tmp_path), "b", {"y": np.float32(2.0)}, config={"stage": "lm"})
  assert runs.read_eval(str(tmp_path)) == {
    "a": {"x": 1.0},
    "b": {"y": 2.0},
    "config": {"stage": "lm"},
  }


def test_load_refuses_a_directory_that_is_not_a_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a vqlm run directory"):
    runs.load(str(tmp_path))
