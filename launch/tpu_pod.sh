#!/usr/bin/env bash
# A Cloud TPU VM pod slice for vqlm: create it, install vqlm on every host, train, delete it.
#
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh setup
#   launch/tpu_pod.sh run --config configs/lm.py:size=xl --config.data.codes=/mnt/vqlm/codes/coco \
#       --workdir /mnt/vqlm/runs/lm_xl
#   launch/tpu_pod.sh compile --config configs/lm.py:size=xl   # memory check on the slice
#   launch/tpu_pod.sh ssh 'tail -n 20 ~/vqlm-train.log'    # any command on every host
#   launch/tpu_pod.sh delete
#
# A pod slice has one VM ("host", "worker") per 4 (v4/v5p) or 4-8 (v5e/v6e) chips; `run` starts
# `vqlm train` on all of them at once (`gcloud ... ssh --worker=all`), each with VQLM_COORDINATOR
# (worker 0, port VQLM_PORT or 8476), VQLM_NUM_PROCESSES and VQLM_PROCESS_ID read from the TPU VM
# metadata server, so vqlm.runtime.distributed joins them into one job; the mesh spans every chip of the
# slice and each host feeds its share of the global batch. (One slice; multi-slice is not covered.)
#
# Storage: every host must read the same data and write the same run directory. `setup` mounts
# the Cloud Storage bucket $TPU_BUCKET with Cloud Storage FUSE (gcsfuse) at $TPU_MOUNT (default
# /mnt/vqlm) on every host; pass data paths under it. The workdir can be a path under the mount
# (checkpoints then commit with a commit file, not a directory rename, which gcsfuse refuses) or
# a gs:// URL (Orbax writes checkpoints to the bucket directly; `setup` installs the gcs extra).
# Encode the data once (`vqlm encode`) into the bucket before training the LM.
#
# Preemption (spot/preemptible slices, maintenance): the loop saves a checkpoint on SIGTERM; run
# the same `run` command again (on a re-created slice if needed) to resume from the workdir.
#
# Environment (defaults in brackets):
#   TPU_NAME [vqlm-pod]  TPU_ZONE [us-central2-b]  TPU_TYPE [v4-32]  TPU_PROJECT [gcloud's]
#   TPU_VERSION          runtime image [tpu-ubuntu2204-base] (v5e: v2-alpha-tpuv5-lite,
#                        v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   TPU_SPOT=1           create a Spot slice (cheaper, may be preempted)
#   TPU_BUCKET           gs://bucket (or bucket) mounted at TPU_MOUNT [/mnt/vqlm]; empty: no mount
#   VQLM_GIT_URL         clone vqlm from here on every host; empty: copy this checkout (git archive
#                        of HEAD, so commit first) with `gcloud ... scp`
#   VQLM_GIT_REF [main]  branch or tag to clone
#   TPU_PYTHON [python3.11]  interpreter for the venv ~/vqlm-venv (vqlm needs Python >= 3.11)
#   TPU_DETACH=1         `run` returns at once; the training keeps going under nohup, logging to
#                        ~/vqlm-train.log on each host (follow it with the `ssh` subcommand)
#   LIBTPU_INIT_ARGS     extra TPU compiler flags, added after the defaults below
set -euo pipefail

name="${TPU_NAME:-vqlm-pod}"
zone="${TPU_ZONE:-us-central2-b}"
accelerator="${TPU_TYPE:-v4-32}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
mount_point="${TPU_MOUNT:-/mnt/vqlm}"
python="${TPU_PYTHON:-python3.11}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# TPU compiler flags (libtpu reads LIBTPU_INIT_ARGS), all to overlap collectives with compute.
# Names and meanings as in JAX's "List of XLA compiler flags" (docs/xla_flags.md); libtpu rejects
# an unknown flag at start-up, so this list stays to ones that exist.
tpu_flags=(
  # Fuse asynchronous collectives with the compute (output/loop fusions, convolutions) scheduled
  # between their -start and -done, so the transfer proceeds while those fusions run.
  --xla_tpu_enable_async_collective_fusion=true
  # ... and include all-gathers in that fusion (FSDP gathers each layer's weights).
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  # ... and let one async collective continue across several fusions (steps).
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  # Overlap compute and communication on a single TensorCore (MegaCore-fusion's one-core form).
  --xla_tpu_overlap_compute_collective_tc=true
  # Make all-gathers asynchronous (start early, wait late) instead of blocking.
  --xla_enable_async_all_gather=true
)

gcloud_tpu() {
  local args=("$@" --zone="$zone")
  if [[ -n "${TPU_PROJECT:-}" ]]; then
    args+=(--project="$TPU_PROJECT")
  fi
  gcloud compute tpus tpu-vm "${args[@]}"
}

on_all_hosts() {
  gcloud_tpu ssh "$name" --worker=all --command="$1"
}

create() {
  local args=(create "$name" --accelerator-type="$accelerator" --version="$version")
  if [[ "${TPU_SPOT:-0}" == "1" ]]; then
    args+=(--spot)
  fi
  gcloud_tpu "${args[@]}"
}

setup() {
  local src
  if [[ -n "${VQLM_GIT_URL:-}" ]]; then
    src="rm -rf ~/vqlm && git clone --depth 1 --branch $(printf '%q' "${VQLM_GIT_REF:-main}") \
$(printf '%q' "$VQLM_GIT_URL") ~/vqlm"
  else
    local archive
    archive="$(mktemp --suffix=.tar.gz)"
    git -C "$here/.." archive --format=tar.gz -o "$archive" HEAD
    gcloud_tpu scp "$archive" "$name:~/vqlm.tar.gz" --worker=all
    rm -f "$archive"
    src="rm -rf ~/vqlm && mkdir ~/vqlm && tar -xzf ~/vqlm.tar.gz -C ~/vqlm"
  fi
  local install="set -e; $src
if ! command -v $python >/dev/null; then
  sudo apt-get update -qq && sudo apt-get install -y -qq $python $python-venv
fi
$python -m venv ~/vqlm-venv
~/vqlm-venv/bin/pip install -q --upgrade pip
~/vqlm-venv/bin/pip install -q -e ~/vqlm'[gcs]' 'jax[tpu]>=0.10.2,<0.12'
~/vqlm-venv/bin/python -c 'import jax; print(jax.device_count(), jax.local_device_count())'"
  on_all_hosts "$install"
  if [[ -n "${TPU_BUCKET:-}" ]]; then
    local bucket="${TPU_BUCKET#gs://}"
    # Cloud Storage FUSE from Google's apt repository, as in its installation guide.
    on_all_hosts "set -e
if ! command -v gcsfuse >/dev/null; then
  key=/usr/share/keyrings/cloud.google.asc
  repo=https://packages.cloud.google.com/apt
  echo \"deb [signed-by=\$key] \$repo gcsfuse-\$(lsb_release -c -s) main\" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -s \$repo/doc/apt-key.gpg | sudo tee \$key >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p $mount_point && sudo chown \$USER $mount_point
mountpoint -q $mount_point || gcsfuse --implicit-dirs $(printf '%q' "$bucket") $mount_point"
  fi
}

# Runs first on every host: its process index, the process count and the coordinator (worker 0)
# from the TPU VM's metadata server, exported as the VQLM_* variables vqlm.runtime.distributed reads.
# These are the values jax.distributed.initialize() itself looks up on a Cloud TPU VM; setting
# them explicitly makes every host join one job (one process per host) on any vqlm version.
read -r -d '' host_env <<'REMOTE' || true
md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
endpoints="$(curl -sf -H 'Metadata-Flavor: Google' "$md/worker-network-endpoints")"
IFS=, read -ra workers <<< "$endpoints"
VQLM_PROCESS_ID="$(curl -sf -H 'Metadata-Flavor: Google' "$md/agent-worker-number")"
VQLM_COORDINATOR="${workers[0]##*:}:COORDINATOR_PORT"
VQLM_NUM_PROCESSES="${#workers[@]}"
export VQLM_PROCESS_ID VQLM_COORDINATOR VQLM_NUM_PROCESSES
REMOTE

# `vqlm SUBCOMMAND ARGS` on every host at once, as one multi-host job.
vqlm_everywhere() {
  local subcommand="$1"
  shift
  if [[ $# -eq 0 ]]; then
    echo "tpu_pod.sh: pass vqlm $subcommand's flags (--config ... --workdir $mount_point/...)" >&2
    exit 2
  fi
  if [[ "$subcommand" == "train" ]]; then
    set -- --noprogress "$@"  # Logs, not a progress bar, over ssh.
  fi
  local libtpu="${tpu_flags[*]}${LIBTPU_INIT_ARGS:+ $LIBTPU_INIT_ARGS}"
  local remote
  remote="${host_env//COORDINATOR_PORT/${VQLM_PORT:-8476}}
cd ~/vqlm && LIBTPU_INIT_ARGS=$(printf '%q' "$libtpu") ~/vqlm-venv/bin/vqlm $subcommand \
$(printf '%q ' "$@")"
  if [[ "$subcommand" == "train" && "${TPU_DETACH:-0}" == "1" ]]; then
    on_all_hosts "nohup bash -c $(printf '%q' "$remote") > ~/vqlm-train.log 2>&1 < /dev/null &"
  else
    on_all_hosts "$remote"
  fi
}

command="${1:-}"
shift || true
case "$command" in
  create) create ;;
  setup) setup ;;
  run) vqlm_everywhere train "$@" ;;
  compile) vqlm_everywhere compile "$@" ;;
  ssh) on_all_hosts "${1:?tpu_pod.sh ssh: pass the command to run on every host}" ;;
  delete) gcloud_tpu delete "$name" --quiet ;;
  *)
    echo "usage: launch/tpu_pod.sh create|setup|run FLAGS|compile FLAGS|ssh COMMAND|delete" >&2
    echo "       (TPU_NAME=$name TPU_ZONE=$zone TPU_TYPE=$accelerator TPU_VERSION=$version)" >&2
    exit 2
    ;;
esac
