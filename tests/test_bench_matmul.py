"""`python -m vqlm.bench matmul`: the dense layer's three training matmuls, jax vs torch."""

import re

import pytest

from vqlm.bench import __main__ as bench_main
from vqlm.bench import matmul


def test_reports_every_matmul_of_every_shape(capsys):
  code = bench_main.main(
    ["matmul", "--tokens", "16", "--shapes", "8x4,4x8", "--calls", "2", "--blocks", "1"]
  )
  out = capsys.readouterr().out
  assert code == 0
  for shape in ("16x8x4", "16x4x8"):
    for kind in matmul.KINDS:
      row = re.search(rf"^\s+{shape} \|\s+{kind} \|\s+([\d.]+) \|\s+(\S+) \|", out, re.M)
      assert row and float(row.group(1)) > 0, out


def test_shapes_flag_errors_name_the_format():
  assert matmul.parse_shapes("256x768, 768X256") == [(256, 768), (768, 256)]
  with pytest.raises(ValueError, match="KxN"):
    matmul.parse_shapes("256x")
  with pytest.raises(ValueError, match="must be positive"):
    matmul.run(tokens=0, shapes=[(2, 2)], calls=1, blocks=1, use_torch=False)
