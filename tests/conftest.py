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
