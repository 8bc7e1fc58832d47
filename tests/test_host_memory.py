"""`vqlm.runtime.host_memory`: large XLA:CPU temporaries reuse their pages instead of faulting them
in."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vqlm.runtime import host_memory

_glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")

# A fresh interpreter: the allocator settings must precede JAX's CPU threads. The gradient step's
# temporary buffer (the [4096, 2048] hidden activations and their gradient, 32 MiB each) is above
# glibc's 32 MiB mmap ceiling.
_PROBE = textwrap.dedent("""
    import json, resource
    from vqlm.runtime import host_memory
    applied = host_memory.reuse_host_memory()
    import jax, jax.numpy as jnp
    x = jnp.full((4096, 256), 0.01, jnp.float32)
    w = (jnp.full((256, 2048), 0.01, jnp.float32), jnp.full((2048, 256), 0.01, jnp.float32))
    step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w[0]) @ w[1]))))
    for _ in range(5):
      jax.block_until_ready(step(w, x))
    faults = []
    for _ in range(8):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(step(w, x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The fewest of 8 calls: a call now and then may find its block not yet freed by the last.
    print(json.dumps({"applied": applied, "faults": min(faults)}))
""")


def _probe(mode: str) -> dict:
  env = dict(os.environ, VQLM_HOST_MALLOC=mode, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # Two fresh JAX processes that each time a large computation.
@pytest.mark.skipif(not _glibc, reason="the settings are glibc's mallopt")
def test_reuse_removes_the_page_faults_of_large_temporaries():
  system = _probe("system")
  reuse = _probe("auto")  # JAX_PLATFORMS=cpu
  assert system["applied"] is False and reuse["applied"] is True
  # glibc's defaults map the temporaries afresh on every call: over 64 MiB of 4 KiB pages
  # (about 18k faults here); reused, they fault in once (0 per call here).
  assert system["faults"] > 10_000, system
  assert reuse["faults"] < system["faults"] / 10, (reuse, system)


def test_unknown_mode_is_a_one_line_error(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, "jemalloc")
  with pytest.raises(ValueError, match="VQLM_HOST_MALLOC='jemalloc'; use 'auto'"):
    host_memory.reuse_host_memory()


def test_system_mode_changes_nothing(monkeypatch):
  monkeypatch.setenv(host_memory.ENV_VAR, "system")
  assert host_memory.reuse_host_memory() is False
  monkeypatch.setenv(host_memory.ENV_VAR, "")
  assert host_memory.mode() == "auto"


def test_auto_mode_leaves_accelerator_processes_alone(monkeypatch):
  monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not host_memory.computes_on_cpu()
  assert host_memory.reuse_host_memory() is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.computes_on_cpu()
  monkeypatch.setenv(host_memory.ENV_VAR, "reuse")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.computes_on_cpu()
  assert host_memory.reuse_host_memory() is bool(_glibc)
