"""Every shipped config preset builds and its train step lowers, so that none rots unnoticed.

Each preset is loaded from its file under configs/ (as `--config configs/FILE:ARG` does), its
batch cut to one example per data x fsdp shard (the state's shapes do not depend on it) and its
train step lowered on abstract inputs by `vqlm compile --lower_only`'s `analyze`: nothing is
allocated, so even the 7B one costs only tracing time. Presets whose lowering takes more than a few
seconds on 2 CPU cores (the unrolled LM `base` and the 256x256 tokenizers with their GAN) are
`slow`; so is lowering the FSDP presets over 8 faked devices with their meshes as shipped.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from vqlm.commands import compile as compile_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

# (config file, argument, parameters as docs/configs.md and the configs' docstrings quote them,
# mesh override for one device or "", slow).
PRESETS = [
  ("tokenizer.py", "size=tiny", 14.9e3, "", False),
  ("tokenizer.py", "size=small", 224e3, "", False),
  ("tokenizer.py", "size=base", 57.6e6, "", True),
  ("tokenizer.py", "size=large", 104e6, "", True),
  ("tokenizer.py", "size=dalle", 51.8e6, "", True),
  ("tokenizer_imagenet.py", "size=base", 57.6e6, "", True),
  ("tokenizer_imagenet.py", "size=large", 104e6, "", True),
  ("lm.py", "size=tiny", 0.131e6, "", False),
  ("lm.py", "size=small", 3.54e6, "", False),
  ("lm.py", "size=base", 110e6, "", True),
  ("lm.py", "size=large", 342e6, "", False),
  ("lm.py", "size=xl", 1.37e9, "", False),
  ("lm.py", "size=7b", 7.01e9, "", False),
  ("lm_coco.py", "size=large", 342e6, "", False),
  # fsdp=8 as shipped needs 8 devices: here over the one present (as shipped in the slow test).
  ("lm_coco.py", "size=xl", 1.37e9, "data=1,fsdp=-1", False),
]

# The FSDP presets with their meshes as shipped, on 8 faked devices (in a fresh process: the device
# count must be set before JAX starts). (file, argument, expected mesh).
SHARDED = [
  ("lm.py", "size=xl", {"data": 1, "fsdp": 8, "tensor": 1}),
  ("lm.py", "size=7b", {"data": 1, "fsdp": 8, "tensor": 1}),
  ("lm_coco.py", "size=large", {"data": 8, "fsdp": 1, "tensor": 1}),
  ("lm_coco.py", "size=xl", {"data": 1, "fsdp": 8, "tensor": 1}),
]


def load_config(name: str, arg: str):
  """`get_config(arg)` of configs/NAME, loaded by path as `--config configs/NAME:ARG` does."""
  spec = importlib.util.spec_from_file_location(
    f"vqlm_config_{name.removesuffix('.py')}", os.path.join(CONFIGS, name)
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def lower(name: str, arg: str, mesh: str = "") -> tuple[object, dict]:
  """(config, facts) of the preset lowered with one example per data x fsdp shard."""
  config = compile_cmd.apply_overrides(load_config(name, arg), mesh=mesh, batch=jax.device_count())
  return config, compile_cmd.analyze(config, lower_only=True)


def _param(name, arg, params, mesh, slow):
  marks = [pytest.mark.slow] if slow else []
  return pytest.param(name, arg, params, mesh, marks=marks, id=f"{name}:{arg}")


# Configs without a model of their own (it comes from the tuned run, `init_from`): nothing to
# lower here; they load by path, and their stage is tested in tests/test_tune.py.
NO_MODEL = {"tune.py": ("method=dpo", "method=grpo")}


def test_every_config_file_is_covered():
  shipped = {f for f in os.listdir(CONFIGS) if f.endswith(".py")}
  assert shipped == {p[0] for p in PRESETS} | set(NO_MODEL)
  for name, args in NO_MODEL.items():
    for arg in args:
      config = load_config(name, arg)
      assert config.stage == "tune" and f"method={config.method}" == arg


@pytest.mark.parametrize("name,arg,params,mesh", [_param(*p) for p in PRESETS])
def test_preset_builds_and_lowers(name, arg, params, mesh):
  config, facts = lower(name, arg, mesh)
  assert facts["num_params"] == pytest.approx(params, rel=0.02)
  # Float32 parameters, all on the one device.
  assert facts["state_bytes"]["params"] == 4 * facts["num_params"]
  assert facts["state_bytes"]["optimizer"] > 0
  batch = jax.device_count()
  if config.stage == "lm":
    assert facts["batch_shape"] == (batch, config.train.seq_len)
    assert f"size={config.size} " in facts["description"]
  else:
    size = config.data.image_size
    assert facts["batch_shape"] == (batch, size, size, 3)
  assert facts["lower_seconds"] > 0 and facts["compile_seconds"] is None


_SHARDED_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_config_presets import lower
for name, arg in json.loads(sys.argv[2]):
  _, facts = lower(name, arg)
  keys = ("devices", "mesh", "num_params", "state_bytes", "batch_shape")
  print(json.dumps({k: facts[k] for k in keys}), flush=True)
"""


@pytest.mark.slow
def test_fsdp_presets_lower_with_their_meshes_on_8_faked_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cases = [[name, arg] for name, arg, _ in SHARDED]
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT, os.path.dirname(__file__), json.dumps(cases)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == len(SHARDED), proc.stdout[-3000:]
  for (name, arg, mesh), line in zip(SHARDED, lines):
    facts = json.loads(line)
    assert facts["devices"] == 8 and facts["mesh"] == mesh, (name, arg, facts)
    assert facts["batch_shape"][0] == 8, (name, arg, facts)
    replicated = 4 * facts["num_params"]
    held = facts["state_bytes"]["params"]
    if mesh["fsdp"] == 8:  # Each device holds about an eighth of the parameters.
      assert held < replicated / 6, (name, arg, held, replicated)
    else:
      assert held == replicated, (name, arg, held, replicated)


def test_vq_ema_decay_can_be_set_from_the_command_line():
  from vqlm.commands import flags as flag_lib
  from vqlm.runtime.config import as_kwargs

  def bottleneck(*overrides):
    argv = ["vqlm train", "--config", "configs/tokenizer.py:size=tiny,bottleneck=vq", *overrides]
    config = flag_lib.require_config(flag_lib.parse(argv, lambda f: None, config=True))
    return as_kwargs(config.model)["bottleneck"]

  assert bottleneck()["ema_decay"] is None
  assert bottleneck("--config.model.bottleneck.ema_decay=0.99")["ema_decay"] == 0.99
