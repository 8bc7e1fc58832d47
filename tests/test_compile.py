"""`vqlm compile`: ahead-of-time lowering/compiling of the train step on abstract inputs."""

import os
import re
import subprocess
import sys

import pytest

from vqlm import cli
from vqlm.commands import compile as compile_cmd
from vqlm.nn.presets import NOMINAL_VOCAB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(ROOT, "configs", "lm.py")
TOKENIZER = os.path.join(ROOT, "configs", "tokenizer.py")
MEMORY_ROWS = ("arguments", "outputs", "aliased", "temporaries", "generated code", "total")


def _run(capsys, *args) -> tuple[int, str, str]:
  code = cli.main(["vqlm", "compile", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


def _memory(out: str) -> dict[str, int]:
  rows = {}
  for name in MEMORY_ROWS:
    m = re.search(rf"^  {name}\s+([\d.]+) GiB\s+\(([\d,]+) bytes\)$", out, re.M)
    assert m, f"no '{name}' row in:\n{out}"
    rows[name] = int(m.group(2).replace(",", ""))
    assert abs(float(m.group(1)) - rows[name] / 2**30) < 1e-4
  return rows


def _state(out: str) -> tuple[int, float]:
  m = re.search(
    r"train state per device: [\d.e-]+ GiB for ([\d,]+) params \(params ([\d.e-]+),", out
  )
  assert m, out
  return int(m.group(1).replace(",", "")), float(m.group(2))


def test_lm_tiny_prints_positive_memory_and_flops(capsys):
  code, out, err = _run(capsys, "--config", f"{LM}:size=tiny")
  assert code == 0, err
  mem = _memory(out)
  for name in ("arguments", "outputs", "temporaries", "total"):
    assert mem[name] > 0, name
  assert mem["generated code"] >= 0
  assert mem["total"] == (
    mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated code"]
  )
  # The state is donated: its buffers are reused for the new state (aliased ~ outputs).
  assert mem["aliased"] > 0.9 * mem["outputs"]
  num_params, params_gib = _state(out)
  assert params_gib == pytest.approx(4 * num_params / 2**30, rel=1e-3)  # float32 params
  assert mem["arguments"] > 12 * num_params  # params + Adam's two moments, float32
  xla = float(re.search(r"XLA cost analysis\): ([\d.e+]+)", out).group(1))
  model = float(re.search(r"6N \+ attention\): ([\d.e+]+)", out).group(1))
  assert 0.8 < xla / model < 1.5  # No scan here: XLA counts every layer.
  assert f"vocab={NOMINAL_VOCAB['tiny']}" in out


def test_tokenizer_tiny_prints_positive_memory(capsys):
  code, out, err = _run(capsys, "--config", f"{TOKENIZER}:size=tiny", "--batch", "4")
  assert code == 0, err
  mem = _memory(out)
  for name in ("arguments", "outputs", "temporaries", "total"):
    assert mem[name] > 0, name
  assert "global batch 4 x 32 x 32 x 3" in out
  assert "FLOPs per step per device (XLA cost analysis)" in out


def test_lower_only_handles_base_without_allocating_it(capsys):
  code, out, err = _run(
    capsys, "--config", f"{LM}:size=base", "--batch", "2", "--seq_len", "256", "--lower_only"
  )
  assert code == 0, err
  num_params, params_gib = _state(out)
  assert num_params > 100_000_000
  assert params_gib == pytest.approx(4 * num_params / 2**30, rel=1e-3)
  assert "lowered in" in out and "compiled in" not in out and "temporaries" not in out


def test_bad_flags_fail_with_one_line(capsys):
  code, _, err = _run(capsys, "--config", f"{LM}:size=tiny", "--mesh", "data=2", "--lower_only")
  assert code == 2 and "needs 2 devices but 1 are available" in err
  code, _, err = _run(capsys, "--config", f"{LM}:size=tiny", "--mesh", "pipe=2")
  assert code == 2 and "--mesh item 'pipe=2'" in err
  code, _, err = _run(capsys, "--config", f"{TOKENIZER}:size=tiny", "--seq_len", "8")
  assert code == 2 and "LM configs only" in err


def test_parse_mesh_and_nominal_vocab():
  assert compile_cmd.parse_mesh("data=2, fsdp=-1,tensor=1") == {"data": 2, "fsdp": -1, "tensor": 1}
  with pytest.raises(ValueError, match="not an integer"):
    compile_cmd.parse_mesh("data=two")
  for size, total in NOMINAL_VOCAB.items():
    vocab = compile_cmd.nominal_vocab(size)
    assert vocab.padded_size == total, size
    assert vocab.grid == (16, 16)
    if total > 2 * 16384:
      assert vocab.image_size == 16384


def test_fsdp_shards_the_state_over_faked_devices(tmp_path):
  """On 4 faked CPU devices, fsdp=4 keeps about a quarter of the params per device."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  base = [
    sys.executable,
    "-m",
    "vqlm",
    "compile",
    "--config",
    f"{LM}:size=tiny",
    "--batch",
    "4",
    "--lower_only",
  ]
  outs = {}
  for mesh in ("data=4,fsdp=1", "data=1,fsdp=4"):
    proc = subprocess.run(
      base + ["--mesh", mesh], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 x cpu" in proc.stdout
    outs[mesh] = _state(proc.stdout)
  (n, replicated), (_, sharded) = outs["data=4,fsdp=1"], outs["data=1,fsdp=4"]
  assert replicated == pytest.approx(4 * n / 2**30, rel=1e-3)
  assert sharded < 0.3 * replicated
