import os

# Keep tests single-threaded-friendly and quiet; tests that need several devices start a subprocess
# with XLA_FLAGS=--xla_force_host_platform_device_count=8 (faking devices slows everything else).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from vqlm.runtime import host_memory  # noqa: E402

host_memory.reuse_host_memory()  # as the `vqlm` command does, before JAX starts its threads

import jax  # noqa: E402

# The default threefry generator compiles slowly on CPU; tests only need *a* fixed generator.
jax.config.update("jax_default_prng_impl", "rbg")


import pytest  # noqa: E402

from vqlm import cli  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """A tiny tokenizer run, its code shards and a tiny LM run (about a minute on 2 cores), made
  once per test session through the `vqlm` command; tests must not change them."""
  root = tmp_path_factory.mktemp("tiny")
  data = str(root / "data")
  tok, codes, lm = str(root / "tok"), str(root / "codes"), str(root / "lm")
  assert (
    cli.main(
      [
        "vqlm",
        "train",
        "--config",
        "configs/tokenizer.py:size=tiny",
        f"--config.data.data_dir={data}",
        "--workdir",
        tok,
        "--progress=false",
      ]
    )
    == 0
  )
  assert cli.main(["vqlm", "encode", "--tokenizer", tok, "--out", codes]) == 0
  assert (
    cli.main(
      [
        "vqlm",
        "train",
        "--config",
        "configs/lm.py:size=tiny",
        f"--config.data.codes={codes}",
        "--workdir",
        lm,
        "--progress=false",
      ]
    )
    == 0
  )
  return {"root": root, "tok": tok, "codes": codes, "lm": lm, "data": data}
