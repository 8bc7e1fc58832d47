"""`python -m vqlm.bench NAME --help` prints the benchmark's flags and exits 0 for every NAME."""

import pytest

from vqlm.bench import __main__ as bench_main


@pytest.mark.parametrize("name", sorted(bench_main.BENCHMARKS))
def test_every_benchmark_prints_its_flags(name, capsys):
  assert bench_main.main([name, "--help"]) == 0
  out = capsys.readouterr()
  assert "--" in out.out + out.err


def test_unknown_benchmark_is_usage(capsys):
  assert bench_main.main(["nope"]) == 2
  assert "usage: python -m vqlm.bench" in capsys.readouterr().err
