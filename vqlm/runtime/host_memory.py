"""Host memory for XLA:CPU: keep freed blocks in malloc's heap instead of unmapping them.

XLA:CPU runs a compiled program with one temporary buffer that holds all of its intermediates,
hundreds of MB for the `small` LM training step at 8 x 256 tokens. glibc's malloc serves a block
that large with a fresh `mmap` (it is above the 32 MiB ceiling of its mmap threshold) and returns
it with `munmap` when the step ends, so every step page-faults the whole buffer in again, and a
sizeable share of the step is spent in the kernel doing it (docs/benchmarks.md).
`reuse_host_memory()` makes malloc take such blocks from its heap and keep them when freed, so
the next step reuses the same pages (no page faults for that buffer; `python -m vqlm.bench lm`
measures the effect on the training step). The cost is resident memory: the heap keeps every
block it held, and for large steps its fragmentation can raise the peak well above the live data
(below).

The `vqlm` command and `python -m vqlm.bench` call it before JAX starts; a script that imports
vqlm as a library calls it first thing:

    from vqlm.runtime import host_memory
    host_memory.reuse_host_memory()   # before the first JAX computation or jax.devices()

It must run before XLA creates its CPU worker threads: a thread that already has its own malloc
arena keeps it. `VQLM_HOST_MALLOC` chooses: `auto` (the default) applies the settings when JAX
will compute on the CPU (`JAX_PLATFORMS` starts with `cpu`, or no GPU/TPU plugin is installed),
since accelerator buffers never go through malloc; `reuse` always applies them; `system` keeps
glibc's defaults. On platforms other than Linux with glibc it does nothing and returns False.

Whether it pays depends on the step's size. On a 2-core CPU the `small` step gains; the `base`
step (8 x 256, float32) does not: it still page-faults (fewer times), and its peak resident
memory more than doubles, since the heap keeps every block it ever held. A large model on a small
CPU machine may therefore want `VQLM_HOST_MALLOC=system`. Figures and commands are in
docs/benchmarks.md.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

from vqlm.errors import UserError

ENV_VAR = "VQLM_HOST_MALLOC"
MODES = ("auto", "reuse", "system")
# Python packages that give JAX a GPU or TPU backend besides the `jax_plugins` entry points.
_ACCELERATOR_PACKAGES = ("libtpu",)

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1  # free memory at the top of the heap kept before returning it to the OS
_M_MMAP_MAX = -4  # how many blocks may be served by mmap; 0 = none
_M_ARENA_MAX = -8  # malloc arenas; 1 = every thread uses the main, brk-grown heap
_KEEP_BYTES = -1  # mallopt takes an int; glibc reads -1 as SIZE_MAX: never trim

_applied = False


def mode() -> str:
  """The requested mode from `VQLM_HOST_MALLOC` ("auto" unless set); ValueError if unknown."""
  value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if value not in MODES:
    raise UserError(
      f"{ENV_VAR}={value!r}; use 'auto' (keep freed host memory when JAX runs on "
      "the CPU), 'reuse' (always) or 'system' (glibc's defaults)."
    )
  return value


def computes_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, judged without starting it: `JAX_PLATFORMS` if set,
  else whether a GPU/TPU plugin (`jax_plugins` entry point or libtpu) is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PACKAGES)


def reuse_host_memory() -> bool:
  """Makes glibc's malloc serve every block from one heap and keep freed memory for reuse.

  Sets `M_ARENA_MAX=1` (in a per-thread arena a block over 64 MiB must be mmapped),
  `M_MMAP_MAX=0` and an unlimited `M_TRIM_THRESHOLD` (never trim). Idempotent. Returns True when
  the settings are in effect; False when `VQLM_HOST_MALLOC=system`, or `auto` and JAX will use an
  accelerator (settings made by an earlier call stay), or the C library is not glibc.
  """
  global _applied
  requested = mode()
  if requested == "system" or not sys.platform.startswith("linux"):
    return False
  if requested == "auto" and not computes_on_cpu():
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
