"""`python -m vqlm.bench sample`: image tokens/s of the sampler in alternating timed blocks."""

import re

import pytest

from vqlm.bench import __main__ as bench_main


def test_tiny_reports_a_rate_per_batch_size(capsys):
  code = bench_main.main(
    [
      "sample",
      "--size",
      "tiny",
      "--batches",
      "1,2",
      "--repeats",
      "1",
      "--blocks",
      "2",
      "--skip_transformers",
      "--grid",
      "4",
      "--codes",
      "32",
    ]
  )
  out = capsys.readouterr().out
  assert code == 0
  assert "median of 2 x 1 runs" in out and "16 image tokens per prompt" in out
  assert "transformers baseline skipped: --skip_transformers" in out
  for batch in (1, 2):
    assert re.search(
      rf"^vqlm first call at batch {batch} \(compile \+ run\): [\d.]+ s$", out, re.M
    ), out
    row = re.search(rf"^\s+{batch} \|\s+(\d+) \|\s+- ", out, re.M)
    assert row and int(row.group(1)) > 0, out


@pytest.mark.parametrize("flag", ["--blocks", "--repeats"])
def test_non_positive_counts_are_refused(flag, capsys):
  assert bench_main.main(["sample", "--size", "tiny", flag, "0", "--skip_transformers"]) == 2
  assert "must be positive" in capsys.readouterr().err
