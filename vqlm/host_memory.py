"""Host memory for XLA:CPU: keep freed blocks in malloc's heap instead of unmapping them.

XLA:CPU runs a compiled program with one temporary buffer that holds all of its intermediates:
295 MB for the `small` LM training step at 8 x 256 tokens. glibc's malloc serves a block that
large with a fresh `mmap` (it is above the 32 MiB ceiling of its mmap threshold) and returns it
with `munmap` when the step ends, so every step page-faults the whole buffer in again: 72k
minor faults and about 18% of the step's time on this 2-core machine, spent in the kernel.
`reuse_host_memory()` makes malloc take such blocks from its heap and keep them when freed, so
the next step reuses the same pages (0 faults per step; `python -m vqlm.bench lm` measures the
effect on the training step). The cost is that the process's resident memory stays at its peak
instead of shrinking after each step, which is what a training or sampling process wants anyway.

The `vqlm` command and `python -m vqlm.bench` call it before JAX starts; a script that imports
vqlm as a library calls it first thing:

    from vqlm import host_memory
    host_memory.reuse_host_memory()   # before the first JAX computation or jax.devices()

It must run before XLA creates its CPU worker threads: a thread that already has its own malloc
arena keeps it. Set `VQLM_HOST_MALLOC=system` to keep glibc's defaults. On platforms other than
Linux with glibc it does nothing and returns False.
"""
import ctypes
import os
import sys

ENV_VAR = "VQLM_HOST_MALLOC"
MODES = ("reuse", "system")

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1   # free memory at the top of the heap kept before returning it to the OS
_M_MMAP_MAX = -4         # how many blocks may be served by mmap; 0 = none
_M_ARENA_MAX = -8        # malloc arenas; 1 = every thread uses the main, brk-grown heap
_KEEP_BYTES = 2**31 - 1  # mallopt takes an int

_applied = False


def mode() -> str:
  """The requested mode from `VQLM_HOST_MALLOC` ("reuse" unless set); ValueError if unknown."""
  value = os.environ.get(ENV_VAR, "reuse").strip().lower() or "reuse"
  if value not in MODES:
    raise ValueError(f"{ENV_VAR}={value!r}; use 'reuse' (keep freed host memory for the next "
                     "step) or 'system' (glibc's defaults).")
  return value


def reuse_host_memory() -> bool:
  """Makes glibc's malloc serve every block from one heap and keep freed memory for reuse.

  Sets `M_ARENA_MAX=1` (in a per-thread arena a block over 64 MiB must be mmapped),
  `M_MMAP_MAX=0` and a 2 GiB `M_TRIM_THRESHOLD`. Idempotent. Returns True when the settings are
  in effect, False when `VQLM_HOST_MALLOC=system` (settings made by an earlier call stay) or
  the C library is not glibc.
  """
  global _applied
  if mode() == "system" or not sys.platform.startswith("linux"):
    return False
  if _applied:
    return True
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES))
  _applied = all(mallopt(param, value) == 1 for param, value in settings)
  return _applied
