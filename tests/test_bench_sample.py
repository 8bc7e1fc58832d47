"""`python -m vqlm.bench sample`: image tokens/s of the sampler in alternating timed blocks."""

import re

import pytest

from vqlm.bench import __main__ as bench_main
from vqlm.bench import sample as sample_bench


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


@pytest.mark.parametrize("threads", ["0", "two", ""])
def test_bad_hf_thread_counts_are_refused(threads, capsys):
  argv = ["sample", "--size", "tiny", "--hf_threads", threads, "--skip_transformers"]
  assert bench_main.main(argv) == 2
  assert "--hf_threads" in capsys.readouterr().err


def test_every_batch_size_is_timed_against_each_torch_thread_count(monkeypatch, capsys):
  # A stand-in for transformers' generate (torch is not needed): records its thread counts.
  calls = []

  def fake_runner(*args, **kwargs):
    assert kwargs["cache_implementation"] == "static"

    def run(batch, seed, threads=None):
      calls.append((batch, threads))

    run.default_threads = 2
    return run

  monkeypatch.setattr(sample_bench, "transformers_runner", fake_runner)
  argv = ["sample", "--size", "tiny", "--batches", "1,2", "--repeats", "1", "--blocks", "2"]
  assert (
    bench_main.main(argv + ["--grid", "4", "--codes", "32", "--hf_threads", "default,1,3"]) == 0
  )
  out = capsys.readouterr().out
  assert "hf 2 threads tok/s" in out and "hf 1 thread tok/s" in out and "hf 3 threads" in out
  for batch in (1, 2):
    assert {t for b, t in calls if b == batch} == {1, 2, 3}
    assert re.search(rf"^\s+{batch} \|\s+\d+ \|\s+\d+ \|\s+\d+ \|\s+\d+ \|\s+[\d.]+x", out, re.M)
