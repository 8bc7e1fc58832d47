"""Multi-process start-up: `jax.distributed.initialize` when launched as several processes.

Recognised launches (first match wins):
  * explicit: VQLM_COORDINATOR=host:port VQLM_NUM_PROCESSES=N VQLM_PROCESS_ID=i
    (also what `launch/local_multiprocess.sh` sets for two processes on one machine);
  * SLURM (`srun`): SLURM_NTASKS > 1 — jax reads SLURM_* itself (coordinator = first node);
  * Cloud TPU VM pod slices: jax discovers the other hosts itself (TPU_WORKER_HOSTNAMES).
A single process (the default on a laptop) initialises nothing.
"""

import os

import jax

_initialized = False


def maybe_initialize() -> bool:
  """Initialises the distributed runtime if the environment describes several processes."""
  global _initialized
  if _initialized:
    return True
  env = os.environ
  if env.get("VQLM_COORDINATOR"):
    num = int(env.get("VQLM_NUM_PROCESSES", "1"))
    if num > 1:
      jax.distributed.initialize(
        env["VQLM_COORDINATOR"], num_processes=num, process_id=int(env["VQLM_PROCESS_ID"])
      )
      _initialized = True
  elif int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
    _initialized = True
  elif len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    jax.distributed.initialize()
    _initialized = True
  return _initialized
