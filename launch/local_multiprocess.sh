#!/usr/bin/env bash
# The multi-process (SLURM) code path on one machine: N CPU processes on 127.0.0.1.
#
#   launch/local_multiprocess.sh [N] [vqlm train flags...]
#   launch/local_multiprocess.sh 2 --config configs/lm.py:size=tiny \
#       --config.data.codes=runs/codes --workdir runs/lm2
#
# Each process runs launch/_process.sh, the same entry point `slurm_gpu.sh` starts under srun, with
# VQLM_LOCAL_RANK/VQLM_LOCAL_WORLD in place of SLURM_PROCID/SLURM_NTASKS and JAX_PLATFORMS=cpu
# (one CPU device per process; the mesh spans all processes' devices). Output lines are prefixed
# with the process index. If one process fails, the others are stopped (they would otherwise wait
# in a collective until jax's timeout) and the script exits non-zero.
#
# Environment: VQLM_PORT (coordinator port; default: a free one), VQLM_BIN (default: vqlm).
# Needs bash >= 5.1 (`wait -n -p`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
num=2
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  num="$1"
  shift
fi
if ((num < 1)); then
  echo "local_multiprocess.sh: the number of processes must be >= 1, not $num" >&2
  exit 2
fi
port="${VQLM_PORT:-}"
if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
fi

running=()
stop_all() {
  local pid
  for pid in "${running[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  # SIGTERM asks the loop to save and stop between steps; a process blocked in a collective
  # waiting for the one that died never gets there, so it is killed after a grace period.
  (
    sleep "${VQLM_STOP_GRACE:-10}"
    kill -KILL "${running[@]}" 2>/dev/null || true
  ) >/dev/null 2>&1 &
}
trap 'stop_all; exit 130' INT TERM

prefixers=()
for ((i = 0; i < num; i++)); do
  exec {out}> >(sed -u "s/^/[$i] /")
  prefixers+=("$!")
  VQLM_LOCAL_RANK="$i" VQLM_LOCAL_WORLD="$num" VQLM_PORT="$port" JAX_PLATFORMS=cpu \
    "$here/_process.sh" "$@" >&"$out" 2>&1 &
  running+=("$!")
  exec {out}>&-  # The process keeps its copy; its prefixer ends when it does.
done

status=0
while ((${#running[@]} > 0)); do
  code=0
  finished=""
  wait -n -p finished "${running[@]}" || code=$?
  if [[ -z "$finished" ]]; then
    break  # No child left to wait for.
  fi
  rest=()
  for pid in "${running[@]}"; do
    [[ "$pid" == "$finished" ]] || rest+=("$pid")
  done
  running=("${rest[@]}")
  if ((code != 0 && status == 0)); then
    status="$code"
    echo "local_multiprocess.sh: a process exited with status $code; stopping the others" >&2
    stop_all
  fi
done
wait "${prefixers[@]}" 2>/dev/null || true  # Let the last output lines through.
exit "$status"
