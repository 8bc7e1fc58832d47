#!/usr/bin/env bash
#SBATCH --job-name=vqlm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
# Multi-node GPU training under SLURM. Submit from the repository root, with the Python
# environment that has vqlm installed active (srun passes the environment on):
#
#   sbatch launch/slurm_gpu.sh --config configs/lm.py:size=xl \
#       --config.data.codes=/shared/codes/coco --workdir /shared/runs/lm_xl
#
# The #SBATCH lines are defaults; sbatch's own flags override them (--nodes=4, --time=...).
#   one process per GPU (default): --ntasks-per-node = GPUs per node. Each process drives one GPU.
#   one process per node:  sbatch --ntasks-per-node=1 --cpus-per-task=96 launch/slurm_gpu.sh ...
#                          Each process drives all GPUs of its node (fewer processes, one input
#                          pipeline per node; same results).
# Either way the mesh (config.mesh.shape) spans all GPUs of all nodes and the global batch
# (config.train.batch_size) is split evenly over processes.
#
# Every task runs launch/_process.sh, the same entry point launch/local_multiprocess.sh uses on
# one machine (tests/test_launch.py runs that): it sets VQLM_COORDINATOR (first node of
# `scontrol show hostnames "$SLURM_JOB_NODELIST"`, port 61440 + job id % 4096),
# VQLM_NUM_PROCESSES=$SLURM_NTASKS and VQLM_PROCESS_ID=$SLURM_PROCID, which
# vqlm.runtime.distributed.maybe_initialize() passes to jax.distributed.initialize. (Without them jax
# would detect SLURM by itself from the same variables, but would also bind each process to ONE
# GPU, local_device_ids=[SLURM_LOCALID], which is wrong for one process per node; _process.sh sets
# JAX_LOCAL_DEVICE_IDS from VQLM_DEVICES_PER_PROCESS instead.) It assumes the tasks of a node all
# see the node's GPUs, or that SLURM bound each task to exactly its share (CUDA_VISIBLE_DEVICES).
#
# Preemption and time limits: --signal=TERM@300 sends SIGTERM to every task 5 minutes before the
# time limit; the training loop then saves a checkpoint at an agreed step and exits. Submitting the
# same command again (e.g. `sbatch --dependency=afterany:$SLURM_JOB_ID ...`) resumes from it.
# The workdir and the data must be on a file system every node can read (and write, for workdir).
#
# Environment: VQLM_REPO (default: the submit directory), VQLM_PORT, VQLM_BIN (default: vqlm),
# XLA_FLAGS (added after the GPU flags of _gpu_env.sh), NCCL_* (passed to NCCL as usual).
set -euo pipefail

repo="${VQLM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f "$repo/launch/_process.sh" ]]; then
  echo "slurm_gpu.sh: $repo/launch/_process.sh not found; submit from the vqlm repository root" \
    "or set VQLM_REPO" >&2
  exit 2
fi
# shellcheck source=_gpu_env.sh source-path=SCRIPTDIR
source "$repo/launch/_gpu_env.sh"

nodes="${SLURM_JOB_NUM_NODES:-1}"
gpus_per_node="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
gpus_per_node="${gpus_per_node##*:}"  # "h100:8" -> "8".
if [[ -z "$gpus_per_node" ]]; then
  gpus_per_node="$(nvidia-smi -L | wc -l)"
fi
tasks_per_node="${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / nodes))}"
tasks_per_node="${tasks_per_node%%(*}"  # "8(x2)" -> "8".
if ((gpus_per_node % tasks_per_node)); then
  echo "slurm_gpu.sh: $tasks_per_node tasks per node do not divide $gpus_per_node GPUs per node" >&2
  exit 2
fi
export VQLM_DEVICES_PER_PROCESS=$((gpus_per_node / tasks_per_node))

echo "slurm_gpu.sh: job $SLURM_JOB_ID, $nodes node(s) x $gpus_per_node GPU(s), $SLURM_NTASKS" \
  "process(es) of $VQLM_DEVICES_PER_PROCESS GPU(s) each; XLA_FLAGS=$XLA_FLAGS" >&2
# --kill-on-bad-exit: if one process fails, stop the others instead of letting them wait in a
# collective until the timeout.
srun --kill-on-bad-exit=1 bash "$repo/launch/_process.sh" "$@"
