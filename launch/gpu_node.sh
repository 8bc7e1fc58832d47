#!/usr/bin/env bash
# One machine, all its GPUs in one process: `launch/gpu_node.sh [vqlm train flags...]`.
#
#   launch/gpu_node.sh --config configs/lm.py:size=large --config.data.codes=/data/codes \
#       --workdir /data/runs/lm_large
#
# One process sees every visible GPU (restrict with CUDA_VISIBLE_DEVICES=0,1,...); the config's
# mesh (config.mesh.shape, one axis -1 = all remaining devices) spans them, and XLA uses NVLink
# collectives between them. No jax.distributed set-up is needed. The XLA flags are in
# _gpu_env.sh. Run it again with the same flags to resume from the last checkpoint.
#
# Environment: VQLM_BIN (default: vqlm on PATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=_gpu_env.sh source-path=SCRIPTDIR
source "$here/_gpu_env.sh"
if command -v nvidia-smi >/dev/null; then
  echo "gpu_node.sh: $(nvidia-smi -L | wc -l) GPU(s); XLA_FLAGS=$XLA_FLAGS" >&2
fi
exec "${VQLM_BIN:-vqlm}" train "$@"
