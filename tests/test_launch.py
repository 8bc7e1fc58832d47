"""launch/: shellcheck, the per-process entry point under SLURM and locally, the TPU pod script with
a fake gcloud, and two local processes training the tiny LM through the SLURM code path."""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")))
BIN = os.path.dirname(sys.executable)  # `vqlm` and `python3` of the environment under test.


def _clean_env(**extra: str) -> dict[str, str]:
  """This process's environment without launcher variables, plus `extra`."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "VQLM_", "JAX_LOCAL_", "CUDA_VISIBLE", "XLA_FLAGS"))
  }
  env.update(extra)
  return env


def _fake(directory, name: str, body: str) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


# Prints what a launched process would see: its argv and the launcher's variables.
SHOW = 'echo "argv: $*"; env | grep -E "^(VQLM_|JAX_LOCAL_DEVICE_IDS|XLA_FLAGS)" | sort\n'


def test_all_scripts_exist_and_pass_shellcheck():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {
    "tpu_pod.sh",
    "slurm_gpu.sh",
    "gpu_node.sh",
    "local_multiprocess.sh",
    "_process.sh",
    "_gpu_env.sh",
  } <= names
  for script in SCRIPTS:
    with open(script) as f:
      text = f.read()
    assert text.startswith("#!/usr/bin/env bash\n"), script
    if not script.endswith("_gpu_env.sh"):  # Sourced, not run.
      assert "set -euo pipefail" in text, script
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
  proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_xla_flags_exist_in_the_installed_xla():
  """XLA aborts at start-up on an unknown flag: every flag of _gpu_env.sh must parse."""
  flags = subprocess.run(
    ["bash", "-c", 'source launch/_gpu_env.sh; printf "%s" "$XLA_FLAGS"'],
    cwd=ROOT,
    env=_clean_env(),
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  check = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"

  def start(xla_flags):
    return subprocess.run(
      [sys.executable, "-c", check],
      capture_output=True,
      text=True,
      env=_clean_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags),
      timeout=120,
    )

  proc = start(flags)
  assert proc.returncode == 0, proc.stderr[-2000:]
  bad = start(flags + " --xla_gpu_no_such_flag=true")  # The check can fail.
  assert bad.returncode != 0 and "no_such_flag" in bad.stderr


def test_process_maps_slurm_variables(tmp_path):
  bin_dir = tmp_path / "bin"
  _fake(
    bin_dir,
    "scontrol",
    '[ "$1 $2" = "show hostnames" ] || exit 9\n'
    '[ "$3" = "gpu[07-08]" ] || exit 8\nprintf "gpu07\\ngpu08\\n"\n',
  )
  show = _fake(bin_dir, "show", SHOW)
  env = _clean_env(
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    VQLM_BIN=show,
    SLURM_PROCID="5",
    SLURM_NTASKS="8",
    SLURM_LOCALID="1",
    SLURM_JOB_NODELIST="gpu[07-08]",
    SLURM_JOB_ID="1234",
    VQLM_DEVICES_PER_PROCESS="4",
  )

  def run(**extra):
    proc = subprocess.run(
      ["bash", "launch/_process.sh", "--config", "c.py", "--workdir", "/a b"],
      cwd=ROOT,
      env={**env, **extra},
      capture_output=True,
      text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()

  out = run()
  assert "argv: train --config c.py --workdir /a b" in out
  assert f"VQLM_COORDINATOR=gpu07:{61440 + 1234 % 4096}" in out  # jax's own port rule
  assert "VQLM_NUM_PROCESSES=8" in out and "VQLM_PROCESS_ID=5" in out
  assert "JAX_LOCAL_DEVICE_IDS=4,5,6,7" in out  # local task 1 of 4 GPUs each
  # SLURM already bound the task to its four GPUs: they are its devices 0..3.
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in run(CUDA_VISIBLE_DEVICES="4,5,6,7")
  assert "VQLM_COORDINATOR=gpu07:23456" in run(VQLM_PORT="23456")
  no_index = subprocess.run(
    ["bash", "launch/_process.sh"], cwd=ROOT, env=_clean_env(), capture_output=True, text=True
  )
  assert no_index.returncode == 2 and "no process index" in no_index.stderr


def test_slurm_script_starts_one_process_per_task(tmp_path):
  """slurm_gpu.sh under a fake srun that runs each task in turn: 2 nodes x 2 tasks x 4 GPUs."""
  bin_dir = tmp_path / "bin"
  _fake(bin_dir, "scontrol", 'printf "node1\\nnode2\\n"\n')
  _fake(
    bin_dir,
    "srun",
    'while [[ "$1" == --* ]]; do echo "srun option $1"; shift; done\n'
    "per=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))\n"
    "for ((p = 0; p < SLURM_NTASKS; p++)); do\n"
    '  SLURM_PROCID=$p SLURM_LOCALID=$((p % per)) "$@" | sed "s/^/[$p] /"\ndone\n',
  )
  show = _fake(bin_dir, "show", SHOW)
  env = _clean_env(
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    VQLM_BIN=show,
    SLURM_SUBMIT_DIR=ROOT,
    SLURM_JOB_ID="77",
    SLURM_JOB_NODELIST="node[1-2]",
    SLURM_JOB_NUM_NODES="2",
    SLURM_NTASKS="4",
    SLURM_NTASKS_PER_NODE="2",
    SLURM_GPUS_ON_NODE="8",
  )
  proc = subprocess.run(
    ["bash", os.path.join(LAUNCH, "slurm_gpu.sh"), "--workdir", "/w"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.splitlines()
  assert "srun option --kill-on-bad-exit=1" in out
  for p in range(4):
    assert f"[{p}] argv: train --workdir /w" in out
    assert f"[{p}] VQLM_PROCESS_ID={p}" in out
    assert f"[{p}] VQLM_COORDINATOR=node1:{61440 + 77}" in out
    ids = "0,1,2,3" if p % 2 == 0 else "4,5,6,7"
    assert f"[{p}] JAX_LOCAL_DEVICE_IDS={ids}" in out
    assert any(
      line.startswith(f"[{p}] XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true")
      for line in out
    )
  bad = subprocess.run(
    ["bash", os.path.join(LAUNCH, "slurm_gpu.sh")],
    cwd=tmp_path,
    env={**env, "SLURM_NTASKS_PER_NODE": "3", "SLURM_NTASKS": "6"},
    capture_output=True,
    text=True,
  )
  assert bad.returncode == 2 and "do not divide 8 GPUs" in bad.stderr


def test_tpu_pod_script_with_a_fake_gcloud(tmp_path):
  """`run` sends one command to every host; executed by bash (with a fake metadata server), it
  gives vqlm the same argv and this host's process index, count and coordinator."""
  home = tmp_path / "home"
  _fake(
    home / "vqlm-venv" / "bin",
    "vqlm",
    'printf "%s\\n" "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS" "$@" > "$HOME/argv"\n'
    'env | grep "^VQLM_" | sort > "$HOME/env"\n',
  )
  os.makedirs(home / "vqlm")
  bin_dir = tmp_path / "bin"
  _fake(
    bin_dir,
    "gcloud",
    'line="$*"; echo "${line//$\'\\n\'/|}" >> "$HOME/gcloud.log"\n'
    'for a in "$@"; do case "$a" in --command=*) bash ${SYNTAX_ONLY:+-n} -c "${a#--command=}";;'
    " esac; done\n",
  )
  # The TPU VM metadata server of worker 2 of a 4-host slice.
  _fake(
    bin_dir,
    "curl",
    'case "${!#}" in\n'
    '  */worker-network-endpoints) echo -n "unknown:unknown:10.0.0.7,unknown:unknown:10.0.0.8,'
    'unknown:unknown:10.0.0.9,unknown:unknown:10.0.0.10";;\n'
    "  */agent-worker-number) echo -n 2;;\n  *) exit 22;;\nesac\n",
  )
  env = _clean_env(
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    HOME=str(home),
    TPU_NAME="pod1",
    TPU_ZONE="europe-west4-a",
    TPU_TYPE="v5p-64",
    TPU_SPOT="1",
  )

  def run(*args):
    proc = subprocess.run(
      ["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
    )
    return proc

  assert run("create").returncode == 0
  assert (
    run(
      "run",
      "--config",
      "configs/lm.py:size=xl",
      "--workdir",
      "/mnt/vqlm/my run",
      "--config.train.steps=10",
    ).returncode
    == 0
  )
  argv = (home / "argv").read_text().splitlines()
  assert argv[1:] == [
    "train",
    "--noprogress",
    "--config",
    "configs/lm.py:size=xl",
    "--workdir",
    "/mnt/vqlm/my run",
    "--config.train.steps=10",
  ]
  assert (home / "env").read_text().splitlines() == [
    "VQLM_COORDINATOR=10.0.0.7:8476",
    "VQLM_NUM_PROCESSES=4",
    "VQLM_PROCESS_ID=2",
  ]
  libtpu = argv[0].removeprefix("LIBTPU_INIT_ARGS=").split()
  assert "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true" in libtpu
  assert "--xla_tpu_overlap_compute_collective_tc=true" in libtpu
  assert "--xla_enable_async_all_gather=true" in libtpu
  assert run("compile", "--config", "configs/lm.py:size=xl").returncode == 0
  argv = (home / "argv").read_text().splitlines()
  assert argv[1:] == ["compile", "--config", "configs/lm.py:size=xl"]
  assert run("delete").returncode == 0
  log = (home / "gcloud.log").read_text().splitlines()
  assert len(log) == 4
  assert log[0] == (
    "compute tpus tpu-vm create pod1 --accelerator-type=v5p-64 "
    "--version=tpu-ubuntu2204-base --spot --zone=europe-west4-a"
  )
  for line in log[1:3]:
    assert line.startswith("compute tpus tpu-vm ssh pod1 --worker=all --command=")
  assert log[3] == "compute tpus tpu-vm delete pod1 --quiet --zone=europe-west4-a"
  # `setup`'s remote scripts (clone + install, gcsfuse mount) are valid bash.
  env.update(SYNTAX_ONLY="1", VQLM_GIT_URL="https://example.org/vqlm.git", TPU_BUCKET="gs://b k")
  setup = run("setup")
  assert setup.returncode == 0, setup.stderr
  log = (home / "gcloud.log").read_text().splitlines()[4:]
  assert (
    len(log) == 2 and "git clone --depth 1 --branch main https://example.org/vqlm.git" in log[0]
  )
  assert "gcsfuse --implicit-dirs b\\ k /mnt/vqlm" in log[1]
  no_flags = run("run")
  assert no_flags.returncode == 2 and "pass vqlm train's flags" in no_flags.stderr
  usage = run("launch")
  assert usage.returncode == 2 and "usage: launch/tpu_pod.sh" in usage.stderr


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
  fake = _fake(
    tmp_path,
    "fake",
    'echo "id=$VQLM_PROCESS_ID/$VQLM_NUM_PROCESSES $VQLM_COORDINATOR '
    '$JAX_PLATFORMS $*"\n[ "$VQLM_PROCESS_ID" = 1 ] && { sleep 3; exit 3; }\n'
    "exec sleep 60\n",
  )  # Process 1 fails once process 0 has surely printed.
  start = time.monotonic()
  proc = subprocess.run(
    [os.path.join(LAUNCH, "local_multiprocess.sh"), "2", "--x", "y z"],
    env=_clean_env(VQLM_BIN=fake, VQLM_PORT="4321"),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert time.monotonic() - start < 30  # Process 0 was stopped, not waited for.
  assert proc.returncode == 3
  out = proc.stdout.splitlines()
  assert "[0] id=0/2 127.0.0.1:4321 cpu train --x y z" in out
  assert "[1] id=1/2 127.0.0.1:4321 cpu train --x y z" in out
  assert "stopping the others" in proc.stderr


@pytest.mark.ci
def test_two_local_processes_train_the_tiny_lm(tmp_path):
  """Tokenizer -> encode -> LM on 2 processes through _process.sh (the SLURM entry point)."""
  # CPU code generation at -O0 halves compile time; what is under test is the distributed path.
  env = _clean_env(
    PATH=f"{BIN}:{os.environ['PATH']}",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_backend_optimization_level=0",
  )
  tok, codes, lm = tmp_path / "tok", tmp_path / "codes", tmp_path / "lm"

  def run(args, timeout):
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc

  run(
    [
      "vqlm",
      "train",
      "--config",
      "configs/tokenizer.py:size=tiny",
      "--workdir",
      str(tok),
      "--noprogress",
    ],
    240,
  )
  run(
    [
      "vqlm",
      "encode",
      "--tokenizer",
      str(tok),
      "--out",
      str(codes),
      "--splits",
      "train,validation",
    ],
    120,
  )
  proc = run(
    [
      os.path.join(LAUNCH, "local_multiprocess.sh"),
      "2",
      "--config",
      "configs/lm.py:size=tiny",
      f"--config.data.codes={codes}",
      "--workdir",
      str(lm),
      "--config.train.steps=6",
      "--noprogress",
    ],
    240,
  )
  lines = proc.stdout.splitlines() + proc.stderr.splitlines()
  assert any(line.startswith("[0] ") for line in lines)
  assert any(line.startswith("[1] ") for line in lines)
  with open(lm / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  # One job, not two: process 0 alone writes metrics, once per logged step.
  assert train_steps == [5, 6]
  assert all(
    r["train/loss"] == r["train/loss"] and r["train/loss"] > 0 for r in rows if "train/loss" in r
  )
  assert (lm / "checkpoints" / "6").is_dir()
