"""`python -m vqlm.bench tokenizer`: images/s of the train step, encode and decode."""

import os
import re
import subprocess
import sys

import pytest

from vqlm.bench import __main__ as bench_main
from vqlm.bench import tokenizer as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "configs", "tokenizer.py")


def test_tiny_reports_three_rates_with_compile_excluded(capsys):
  code = bench_main.main(
    [
      "tokenizer",
      "--config",
      f"{TOKENIZER}:size=tiny",
      "--batch",
      "4",
      "--steps",
      "2",
      "--repeats",
      "1",
    ]
  )
  out = capsys.readouterr().out
  assert code == 0
  assert re.search(r"^device: 1 x .+ \(cpu\)$", out, re.M), out
  assert "32x32 -> 8x8 (32 codes)" in out and "batch 4" in out
  for name in ("train step", "encode", "decode"):
    m = re.search(rf"^{name}: ([\d,.]+) images/s \(compile ([\d.]+)s, excluded\)$", out, re.M)
    assert m, f"no '{name}' line in:\n{out}"
    assert float(m.group(1).replace(",", "")) > 0
    assert float(m.group(2)) > 0


def test_imports_no_data_library():
  """It must run where grain / TFDS are absent (the lent GPU machine)."""
  code = (
    "import sys; import vqlm.bench.tokenizer as b; "
    "b.build_trainer(__import__('vqlm.stages.tokenizer_config', fromlist=['x'])"
    ".get_config('size=tiny')); "
    "print([m for m in ('grain', 'tensorflow_datasets') if m in sys.modules])"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_rejects_an_lm_config():
  with pytest.raises(ValueError, match="image-tokenizer config"):
    bench.main(["x", "--config", os.path.join(ROOT, "configs", "lm.py") + ":size=tiny"])
