"""`vqlm compile --sampler`: the sampler's decode step compiled on abstract inputs."""

import os
import re

from vqlm import cli
from vqlm.commands import compile as compile_cmd
from vqlm.stages import lm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(ROOT, "configs", "lm.py")
TOKENIZER = os.path.join(ROOT, "configs", "tokenizer.py")


def _run(capsys, *args) -> tuple[int, str, str]:
  code = cli.main(["vqlm", "compile", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_tiny_decode_step_memory_counts_params_and_cache():
  config = compile_cmd.apply_overrides(lm_config.get_config("size=tiny"), batch=4, seq_len=64)
  facts = compile_cmd.analyze_sampler(config)
  n = facts["num_params"]
  assert facts["params_bytes"] == 4 * n and facts["dtype"] == "float32"
  m = config.model
  kv_heads, head_dim = m.num_kv_heads, m.dim // m.num_heads
  # k and v of every layer: [rows, kv heads, 64 slots, head_dim] float32.
  assert facts["cache_slots"] == 64 and facts["rows"] == 4
  assert facts["cache_bytes"] == m.num_layers * 2 * 4 * kv_heads * 64 * head_dim * 4
  mem = facts["memory"]
  assert mem["arguments"] >= facts["params_bytes"] + facts["cache_bytes"]
  assert mem["aliased"] == facts["cache_bytes"]  # the donated cache becomes the new one
  assert mem["total"] > facts["params_bytes"] + facts["cache_bytes"]
  assert facts["xla_flops"] > 2 * n * 4 * 0.9  # about 2 N per token, 4 rows
  assert (facts["fits"] is None) == (facts["device_memory"] is None)


def test_cli_sampler_prints_sizes_and_refuses_tokenizer_configs(capsys):
  code, out, err = _run(
    capsys,
    "--config",
    f"{LM}:size=tiny",
    "--sampler",
    "--sampler_dtype",
    "bfloat16",
    "--batch",
    "2",
    "--seq_len",
    "100",
    "--lower_only",
  )
  assert code == 0, err
  assert re.search(r"^devices: 1 x .+; mesh data=1 fsdp=1 tensor=1$", out, re.M), out
  # 100 slots are rounded up to whole key panels (128).
  assert "sampler decode step: lm size=tiny vocab=512" in out and "2 rows" in out
  assert "a KV cache of 128 slots (bfloat16)" in out
  assert re.search(r"^per device: params [\d.e-]+ GiB \([\d,]+ bfloat16 params\)", out, re.M), out
  assert re.search(r"^lowered in [\d.]+s$", out, re.M) and "compiled in" not in out
  code, _, err = _run(capsys, "--config", f"{TOKENIZER}:size=tiny", "--sampler", "--lower_only")
  assert code == 2 and "--sampler applies to LM configs only" in err
  code, _, err = _run(capsys, "--config", f"{LM}:size=tiny", "--sampler_dtype", "bfloat16")
  assert code == 2 and "--sampler_dtype applies with --sampler only" in err
