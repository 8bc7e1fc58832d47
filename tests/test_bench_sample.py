"""`python -m vqlm.bench sample`: image tokens/s of the sampler in alternating timed blocks."""

import os
import re
import subprocess
import sys

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
      "--cpu_devices",
      "1",
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
  argv += ["--cpu_devices", "1"]
  assert (
    bench_main.main(argv + ["--grid", "4", "--codes", "32", "--hf_threads", "default,1,3"]) == 0
  )
  out = capsys.readouterr().out
  assert "hf 2 threads tok/s" in out and "hf 1 thread tok/s" in out and "hf 3 threads" in out
  for batch in (1, 2):
    assert {t for b, t in calls if b == batch} == {1, 2, 3}
    assert re.search(rf"^\s+{batch} \|\s+\d+ \|\s+\d+ \|\s+\d+ \|\s+\d+ \|\s+[\d.]+x", out, re.M)


@pytest.mark.ci  # A fresh process (JAX started with 2 host devices): about 10 s.
def test_host_devices_time_one_decode_loop_per_device():
  # A fresh process: JAX starts there with 2 host devices (a started JAX keeps its devices).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  argv = ["sample", "--size", "tiny", "--batches", "1,4", "--repeats", "1", "--blocks", "1"]
  argv += ["--skip_transformers", "--grid", "4", "--codes", "32", "--cpu_devices", "2"]
  proc = subprocess.run(
    [sys.executable, "-m", "vqlm.bench", *argv],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "2 host devices" in out and "vqlm 2 dev tok/s" in out, out
  # Batch 1 cannot be split: only the one-device sampler runs; batch 4 runs on both.
  assert re.search(r"^\s+1 \|\s+\d+ \|\s+- \|", out, re.M), out
  assert re.search(r"^\s+4 \|\s+\d+ \|\s+\d+ \|", out, re.M), out
  assert "vqlm 2 dev first call at batch 4" in out and "vqlm 2 dev first call at batch 1" not in out


def test_negative_cpu_devices_are_refused(capsys):
  argv = ["sample", "--size", "tiny", "--cpu_devices", "-1", "--skip_transformers"]
  assert bench_main.main(argv) == 2
  assert "--cpu_devices" in capsys.readouterr().err
