"""`vqlm compile`: ahead-of-time lowering/compiling of the train step on abstract inputs."""

import json
import os
import re
import subprocess
import sys

import pytest

from vqlm import cli
from vqlm.commands import compile as compile_cmd
from vqlm.nn.presets import NOMINAL_VOCAB
from vqlm.stages import lm_config, tokenizer_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(ROOT, "configs", "lm.py")
TOKENIZER = os.path.join(ROOT, "configs", "tokenizer.py")
MEMORY_ROWS = ("arguments", "outputs", "aliased", "temporaries", "generated code", "total")


def _run(capsys, *args) -> tuple[int, str, str]:
  code = cli.main(["vqlm", "compile", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def lm_tiny():
  """(config, facts) of the tiny LM, compiled once for the module."""
  config = compile_cmd.apply_overrides(lm_config.get_config("size=tiny"))
  return config, compile_cmd.analyze(config)


def test_lm_tiny_has_positive_memory_and_flops(lm_tiny):
  _, facts = lm_tiny
  mem = facts["memory"]
  assert tuple(mem) == MEMORY_ROWS
  assert all(isinstance(v, int) for v in mem.values()), mem
  for name in ("arguments", "outputs", "temporaries", "total"):
    assert mem[name] > 0, name
  assert mem["total"] == (
    mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated code"]
  )
  # The state is donated: its buffers are reused for the new state (aliased ~ outputs).
  assert mem["aliased"] > 0.9 * mem["outputs"]
  num_params = facts["num_params"]
  assert facts["state_bytes"]["params"] == 4 * num_params  # float32 params, one device
  assert mem["arguments"] > 12 * num_params  # params + Adam's two moments, float32
  assert 0.8 < facts["xla_flops"] / facts["model_flops"] < 1.5  # No scan: XLA counts every layer.
  assert f"vocab={NOMINAL_VOCAB['tiny']}" in facts["description"]
  assert facts["devices"] == 1 and facts["global_batch"] == facts["batch_shape"][0]
  assert facts["compile_seconds"] is not None and facts["lower_seconds"] > 0
  # The verdict is given exactly when the device's memory is known (not on CPU).
  assert (facts["fits"] is None) == (facts["device_memory"] is None)


def test_main_prints_the_key_lines(capsys, monkeypatch, lm_tiny):
  """main parses flags into the config, calls analyze and prints its facts (no second compile)."""
  config, facts = lm_tiny
  calls = []

  def fake_analyze(c, **kwargs):
    calls.append((c, kwargs))
    return facts

  monkeypatch.setattr(compile_cmd, "analyze", fake_analyze)
  code, out, err = _run(capsys, "--config", f"{LM}:size=tiny", "--vocab_size", "512")
  assert code == 0, err
  [(passed, kwargs)] = calls
  assert passed.train.batch_size == config.train.batch_size
  assert kwargs == {"vocab_size": 512, "lower_only": False}
  assert re.search(r"^devices: 1 x .+; mesh data=1 fsdp=1 tensor=1$", out, re.M), out
  assert f"global batch {' x '.join(map(str, facts['batch_shape']))}" in out
  assert "train state per device: " in out and f"for {facts['num_params']:,} params" in out
  assert re.search(r"^lowered in [\d.]+s$", out, re.M) and re.search(r"^compiled in", out, re.M)
  for name in MEMORY_ROWS:
    value = facts["memory"][name]
    assert re.search(rf"^  {name}\s+{value / 2**30:.4f} GiB\s+\({value:,} bytes\)$", out, re.M), (
      name,
      out,
    )
  assert f"FLOPs per step per device (XLA cost analysis): {facts['xla_flops']:.4g}" in out
  assert f"(6N + attention): {facts['model_flops']:.4g}" in out


def test_tokenizer_tiny_has_positive_memory():
  config = compile_cmd.apply_overrides(tokenizer_config.get_config("size=tiny"), batch=4)
  facts = compile_cmd.analyze(config)
  for name in ("arguments", "outputs", "temporaries", "total"):
    assert facts["memory"][name] > 0, name
  assert facts["batch_shape"] == (4, 32, 32, 3)
  assert facts["xla_flops"] > 0
  assert facts["model_flops"] is None  # 6 N + attention is for LMs only.


def test_lower_only_handles_base_without_allocating_it():
  config = compile_cmd.apply_overrides(lm_config.get_config("size=base"), batch=2, seq_len=256)
  facts = compile_cmd.analyze(config, lower_only=True)
  assert facts["num_params"] > 100_000_000
  assert facts["state_bytes"]["params"] == 4 * facts["num_params"]
  assert facts["batch_shape"] == (2, 256)
  assert facts["lower_seconds"] > 0
  assert facts["compile_seconds"] is None and facts["memory"] is None
  assert facts["xla_flops"] is None and facts["model_flops"] is None


def test_bad_flags_fail_with_one_line(capsys):
  code, _, err = _run(capsys, "--config", f"{LM}:size=tiny", "--mesh", "data=2", "--lower_only")
  assert code == 2 and "needs 2 devices but 1 are available" in err
  code, _, err = _run(capsys, "--config", f"{LM}:size=tiny", "--mesh", "pipe=2")
  assert code == 2 and "--mesh item 'pipe=2'" in err
  code, _, err = _run(capsys, "--config", f"{TOKENIZER}:size=tiny", "--seq_len", "8")
  assert code == 2 and "LM configs only" in err


def test_parse_mesh_overrides_and_nominal_vocab():
  assert compile_cmd.parse_mesh("data=2, fsdp=-1,tensor=1") == {"data": 2, "fsdp": -1, "tensor": 1}
  with pytest.raises(ValueError, match="not an integer"):
    compile_cmd.parse_mesh("data=two")
  base = lm_config.get_config("size=tiny")
  config = compile_cmd.apply_overrides(base, mesh="fsdp=-1", batch=8, seq_len=32)
  assert (config.mesh.shape.fsdp, config.train.batch_size, config.train.seq_len) == (-1, 8, 32)
  fresh = lm_config.get_config("size=tiny")  # The original is left alone:
  assert (base.train.batch_size, base.train.seq_len) == (
    fresh.train.batch_size,
    fresh.train.seq_len,
  )
  for size, total in NOMINAL_VOCAB.items():
    vocab = compile_cmd.nominal_vocab(size)
    assert vocab.padded_size == total, size
    assert vocab.grid == (16, 16)
    if total > 2 * 16384:
      assert vocab.image_size == 16384


# Runs in a fresh process: the faked device count must be set before JAX starts.
_FSDP_SCRIPT = """
import json, sys
from vqlm.commands import compile as compile_cmd
from vqlm.stages import lm_config
config = compile_cmd.apply_overrides(lm_config.get_config("size=tiny"), mesh=sys.argv[1], batch=4)
facts = compile_cmd.analyze(config, lower_only=True)
keys = ("devices", "platform", "mesh", "num_params", "state_bytes")
print(json.dumps({k: facts[k] for k in keys}))
"""


def test_fsdp_shards_the_state_over_faked_devices():
  """On 4 faked CPU devices, fsdp=4 keeps about a quarter of the params per device."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  facts = {}
  for mesh in ("data=4,fsdp=1", "data=1,fsdp=4"):
    proc = subprocess.run(
      [sys.executable, "-c", _FSDP_SCRIPT, mesh],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    facts[mesh] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts[mesh]["devices"] == 4 and facts[mesh]["platform"] == "cpu"
  replicated, sharded = facts["data=4,fsdp=1"], facts["data=1,fsdp=4"]
  assert sharded["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  n = replicated["num_params"]
  assert replicated["state_bytes"]["params"] == 4 * n
  assert sharded["state_bytes"]["params"] < 0.3 * replicated["state_bytes"]["params"]
