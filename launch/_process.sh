#!/usr/bin/env bash
# One vqlm training process: `launch/_process.sh [vqlm train flags...]`.
#
# The shared per-process entry point of `slurm_gpu.sh` (under `srun`) and `local_multiprocess.sh`.
# It turns the launcher's view of "which process am I" into the three variables that
# `vqlm.runtime.distributed.maybe_initialize()` reads, then execs `vqlm train "$@"`:
#   VQLM_COORDINATOR    host:port of process 0 (jax's coordination service listens there)
#   VQLM_NUM_PROCESSES  number of processes
#   VQLM_PROCESS_ID     this process's index, 0 .. N-1
#
# Where the index comes from (first match wins):
#   SLURM (srun)  SLURM_PROCID / SLURM_NTASKS; host = first node of
#                 `scontrol show hostnames "$SLURM_JOB_NODELIST"`; port = VQLM_PORT or, like jax's
#                 own SLURM detection, 61440 + SLURM_JOB_ID % 4096 (so concurrent jobs differ).
#   local         VQLM_LOCAL_RANK / VQLM_LOCAL_WORLD (set by local_multiprocess.sh);
#                 host = 127.0.0.1, port = VQLM_PORT (required).
# VQLM_COORDINATOR, when already set, is kept (e.g. on nodes where scontrol is unavailable).
#
# Devices (SLURM only): VQLM_DEVICES_PER_PROCESS=n makes this process drive the GPUs
# SLURM_LOCALID*n .. SLURM_LOCALID*n+n-1 of its node (or, when SLURM already bound the task to n
# GPUs through CUDA_VISIBLE_DEVICES, its visible GPUs 0..n-1), via JAX_LOCAL_DEVICE_IDS. This
# must be explicit: when jax sees SLURM variables it otherwise sets
# local_device_ids=[SLURM_LOCALID], i.e. ONE GPU per process, which silently idles 7 of 8 GPUs
# in a one-process-per-node launch.
#
# VQLM_BIN overrides the command (default: `vqlm` on PATH).
set -euo pipefail

if [[ -n "${SLURM_PROCID:-}" && -n "${SLURM_NTASKS:-}" ]]; then
  rank="$SLURM_PROCID"
  world="$SLURM_NTASKS"
  if [[ -z "${VQLM_COORDINATOR:-}" ]]; then
    hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
    host="${hosts%%$'\n'*}"  # The first line (`| head -n 1` could die of SIGPIPE under pipefail).
    port="${VQLM_PORT:-$((61440 + ${SLURM_JOB_ID:-0} % 4096))}"
    export VQLM_COORDINATOR="$host:$port"
  fi
  if [[ -n "${VQLM_DEVICES_PER_PROCESS:-}" ]]; then
    per="$VQLM_DEVICES_PER_PROCESS"
    first=$((${SLURM_LOCALID:-0} * per))
    visible="${CUDA_VISIBLE_DEVICES:-}"
    if [[ -n "$visible" && $(tr ',' '\n' <<<"$visible" | wc -l) -eq "$per" ]]; then
      first=0  # SLURM already bound this task to exactly its own GPUs.
    fi
    ids="$first"
    for ((d = first + 1; d < first + per; d++)); do
      ids="$ids,$d"
    done
    export JAX_LOCAL_DEVICE_IDS="$ids"
  fi
elif [[ -n "${VQLM_LOCAL_RANK:-}" && -n "${VQLM_LOCAL_WORLD:-}" ]]; then
  rank="$VQLM_LOCAL_RANK"
  world="$VQLM_LOCAL_WORLD"
  if [[ -z "${VQLM_COORDINATOR:-}" ]]; then
    export VQLM_COORDINATOR="127.0.0.1:${VQLM_PORT:?set VQLM_PORT to a free TCP port}"
  fi
else
  echo "_process.sh: no process index: run it under srun (SLURM_PROCID) or from" \
    "local_multiprocess.sh (VQLM_LOCAL_RANK/VQLM_LOCAL_WORLD)" >&2
  exit 2
fi

export VQLM_NUM_PROCESSES="$world"
export VQLM_PROCESS_ID="$rank"
exec "${VQLM_BIN:-vqlm}" train "$@"
