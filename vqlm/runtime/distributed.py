"""Multi-process start-up: `jax.distributed.initialize` when launched as several processes.

The mode is `maybe_initialize(mode)`'s argument (`vqlm train --distributed=...`), else the
environment variable VQLM_DISTRIBUTED, else `auto`:
  * `off`: never initialise: one process, whatever the environment says;
  * `on`: always initialise: with the explicit variables below when set, else
    `jax.distributed.initialize()` without arguments, which finds the cluster itself (SLURM, Cloud
    TPU VM, GKE TPU, Open MPI, ...) and fails when it finds none;
  * `auto`: initialise when the environment describes several processes (first match wins):
    - explicit: VQLM_COORDINATOR=host:port VQLM_NUM_PROCESSES=N (> 1) VQLM_PROCESS_ID=i, what
      `launch/_process.sh` (under `srun` and for `launch/local_multiprocess.sh`) and
      `launch/tpu_pod.sh` set;
    - a SLURM step of several tasks: inside `srun` (SLURM_STEP_ID set, SLURM_STEP_NUM_TASKS > 1);
      jax reads SLURM_* itself (coordinator = first node of the step). An `salloc` shell or an
      `sbatch` batch script also sets SLURM_NTASKS but is one process: nothing starts there;
    - GKE TPU: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) lists more than one host;
    - a Cloud TPU VM: jax found TPU chips and libtpu when it was imported (the flag its own TPU
      cluster detection reads; no network query here). `jax.distributed.initialize()` then reads
      the slice's hosts from the TPU VM metadata server, so `vqlm train` started on every host
      forms one job (a one-host slice becomes a one-process job).
A single process on a laptop or a GPU machine initialises nothing.
"""

import os

import jax

from vqlm.errors import UserError

MODES = ("auto", "on", "off")

_initialized = False


def maybe_initialize(mode: str | None = None) -> bool:
  """Initialises the distributed runtime as `mode` (default: VQLM_DISTRIBUTED or `auto`) says.

  Returns:
    whether the distributed runtime is initialised (by this call or an earlier one).
  """
  global _initialized
  mode = resolve_mode(mode)
  if _initialized or jax.distributed.is_initialized():
    _initialized = True
    return True
  if mode == "off":
    return False
  env = os.environ
  if env.get("VQLM_COORDINATOR"):
    num, pid = _explicit_process(env)
    if num > 1 or mode == "on":
      _initialize(mode, env["VQLM_COORDINATOR"], num_processes=num, process_id=pid)
  elif mode == "on" or _cluster_of_several(env):
    _initialize(mode)
  return _initialized


def resolve_mode(mode: str | None) -> str:
  """`mode`, else VQLM_DISTRIBUTED, else `auto`; anything but auto/on/off is a UserError."""
  source = "the distributed mode"
  if mode is None:
    mode, source = os.environ.get("VQLM_DISTRIBUTED", ""), "VQLM_DISTRIBUTED"
  value = mode.strip().lower() or "auto"
  if value not in MODES:
    raise UserError(f"{source} {mode!r} is not one of {', '.join(MODES)}; set it to one of them")
  return value


def _explicit_process(env) -> tuple[int, int]:
  """(VQLM_NUM_PROCESSES, VQLM_PROCESS_ID) next to VQLM_COORDINATOR, checked."""
  try:
    num = int(env.get("VQLM_NUM_PROCESSES", "1"))
    pid = int(env.get("VQLM_PROCESS_ID", "0" if num == 1 else ""))
  except ValueError:
    raise UserError(
      "VQLM_COORDINATOR is set, so VQLM_NUM_PROCESSES and VQLM_PROCESS_ID must be integers "
      f"(got {env.get('VQLM_NUM_PROCESSES')!r}, {env.get('VQLM_PROCESS_ID')!r}); set both"
    ) from None
  if not 0 <= pid < num:
    raise UserError(
      f"VQLM_PROCESS_ID={pid} is not in 0..{num - 1} (VQLM_NUM_PROCESSES={num}); fix the launcher"
    )
  return num, pid


def _cluster_of_several(env) -> bool:
  """Whether a launcher jax detects by itself started this process as one of several."""
  if "SLURM_STEP_ID" in env:  # inside `srun`; an salloc shell or a batch script is no step.
    return _int(env.get("SLURM_STEP_NUM_TASKS")) > 1
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
  if hosts:  # GKE TPU: the hosts of the slice.
    return len(hosts.split(",")) > 1
  return running_in_cloud_tpu_vm() and "TPU_SKIP_MDS_QUERY" not in env


def running_in_cloud_tpu_vm() -> bool:
  """jax's own answer, computed at `import jax` from libtpu and the TPU chips on the PCI bus."""
  from jax._src import cloud_tpu_init

  return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _int(value: str | None) -> int:
  try:
    return int(value or "1")
  except ValueError:
    return 1


def _initialize(mode: str, *args, **kwargs) -> None:
  global _initialized
  try:
    jax.distributed.initialize(*args, **kwargs)
  except ValueError as e:  # jax found no cluster to join, or was given values it rejects.
    detail = " ".join(str(e).split())
    raise UserError(
      f"starting the distributed runtime (mode {mode}) failed: {detail}; run under a launcher "
      "jax detects, set VQLM_COORDINATOR, VQLM_NUM_PROCESSES and VQLM_PROCESS_ID, or use "
      "--distributed=off"
    ) from None
  _initialized = True
