"""maybe_initialize: which launch environments start the distributed runtime, under each mode.

The environment is faked and `jax.distributed.initialize` replaced by a recorder: no test starts a
runtime or contacts a metadata server.
"""

import os

from jax._src import cloud_tpu_init
import pytest

from vqlm import cli
from vqlm.errors import UserError
from vqlm.runtime import distributed

SALLOC_SHELL = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_NPROCS": "4"}
SRUN_STEP = {
  **SALLOC_SHELL,
  "SLURM_STEP_ID": "0",
  "SLURM_STEP_NUM_TASKS": "4",
  "SLURM_STEP_NODELIST": "node[1-2]",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "1",
}
EXPLICIT = {"VQLM_COORDINATOR": "10.0.0.1:1234", "VQLM_NUM_PROCESSES": "4", "VQLM_PROCESS_ID": "2"}


@pytest.fixture
def calls(monkeypatch):
  """A clean launch environment (no SLURM, TPU or VQLM variables, not a Cloud TPU VM); returns
  the list of recorded `jax.distributed.initialize` calls as (args, kwargs)."""
  for name in list(os.environ):
    if name.startswith(("SLURM_", "VQLM_", "TPU_")):
      monkeypatch.delenv(name)
  # The flag jax's own TPU cluster detection reads (setattr fails if jax renames it).
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)
  monkeypatch.setattr(distributed, "_initialized", False)
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  recorded = []
  monkeypatch.setattr(
    distributed.jax.distributed,
    "initialize",
    lambda *args, **kwargs: recorded.append((args, kwargs)),
  )
  return recorded


def setenv(monkeypatch, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)


def test_a_laptop_initialises_nothing(calls):
  assert distributed.maybe_initialize() is False
  assert calls == []


def test_an_salloc_shell_or_batch_script_is_one_process(calls, monkeypatch):
  setenv(monkeypatch, SALLOC_SHELL)
  assert distributed.maybe_initialize() is False
  assert calls == []


def test_an_srun_step_of_several_tasks_lets_jax_read_slurm(calls, monkeypatch):
  setenv(monkeypatch, SRUN_STEP)
  assert distributed.maybe_initialize() is True
  assert calls == [((), {})]
  assert distributed.maybe_initialize() is True  # once only
  assert len(calls) == 1


def test_an_srun_step_of_one_task_is_one_process(calls, monkeypatch):
  setenv(monkeypatch, {**SRUN_STEP, "SLURM_STEP_NUM_TASKS": "1"})
  assert distributed.maybe_initialize() is False
  assert calls == []


def test_a_cloud_tpu_vm_lets_jax_find_the_slice(calls, monkeypatch):
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  assert distributed.maybe_initialize() is True
  assert calls == [((), {})]


def test_a_tpu_vm_that_skips_the_metadata_server_is_one_process(calls, monkeypatch):
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  assert distributed.maybe_initialize() is False
  assert calls == []


@pytest.mark.parametrize("hosts, expected", [("w-0,w-1,w-2,w-3", [((), {})]), ("w-0", [])])
def test_gke_tpu_counts_the_worker_hosts(calls, monkeypatch, hosts, expected):
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", hosts)
  assert distributed.maybe_initialize() is bool(expected)
  assert calls == expected


def test_explicit_variables_come_first(calls, monkeypatch):
  setenv(monkeypatch, {**SRUN_STEP, **EXPLICIT})
  assert distributed.maybe_initialize() is True
  assert calls == [(("10.0.0.1:1234",), {"num_processes": 4, "process_id": 2})]


def test_explicit_single_process_initialises_nothing_unless_on(calls, monkeypatch):
  setenv(monkeypatch, {**EXPLICIT, "VQLM_NUM_PROCESSES": "1", "VQLM_PROCESS_ID": "0"})
  assert distributed.maybe_initialize() is False
  assert distributed.maybe_initialize("on") is True
  assert calls == [(("10.0.0.1:1234",), {"num_processes": 1, "process_id": 0})]


@pytest.mark.parametrize("how", ["argument", "env"])
def test_off_never_initialises(calls, monkeypatch, how):
  setenv(monkeypatch, {**SRUN_STEP, **EXPLICIT})
  monkeypatch.setattr(cloud_tpu_init, "running_in_cloud_tpu_vm", True)
  if how == "env":
    monkeypatch.setenv("VQLM_DISTRIBUTED", "off")
  assert distributed.maybe_initialize("off" if how == "argument" else None) is False
  assert calls == []


def test_on_forces_jax_detection(calls, monkeypatch):
  monkeypatch.setenv("VQLM_DISTRIBUTED", "On")
  assert distributed.maybe_initialize() is True
  assert calls == [((), {})]


def test_the_argument_overrides_the_environment(calls, monkeypatch):
  setenv(monkeypatch, {**SRUN_STEP, "VQLM_DISTRIBUTED": "off"})
  assert distributed.maybe_initialize("auto") is True
  assert calls == [((), {})]


def test_on_without_a_cluster_is_a_one_line_user_error(calls, monkeypatch):
  def no_cluster(*args, **kwargs):
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(distributed.jax.distributed, "initialize", no_cluster)
  with pytest.raises(UserError, match=r"mode on\) failed: coordinator_address") as e:
    distributed.maybe_initialize("on")
  assert "\n" not in str(e.value) and "--distributed=off" in str(e.value)
  assert distributed.maybe_initialize("auto") is False  # nothing was marked initialised


@pytest.mark.parametrize(
  "env, mode, match",
  [
    ({"VQLM_DISTRIBUTED": "maybe"}, None, r"VQLM_DISTRIBUTED 'maybe' is not one of auto, on, off"),
    ({}, "yes", r"the distributed mode 'yes' is not one of auto, on, off"),
    ({**EXPLICIT, "VQLM_PROCESS_ID": ""}, None, r"VQLM_PROCESS_ID must be integers"),
    ({**EXPLICIT, "VQLM_NUM_PROCESSES": "four"}, None, r"VQLM_NUM_PROCESSES and"),
    ({**EXPLICIT, "VQLM_PROCESS_ID": "4"}, None, r"VQLM_PROCESS_ID=4 is not in 0..3"),
  ],
)
def test_bad_settings_are_one_line_user_errors(calls, monkeypatch, env, mode, match):
  setenv(monkeypatch, env)
  with pytest.raises(UserError, match=match) as e:
    distributed.maybe_initialize(mode)
  assert "\n" not in str(e.value)
  assert calls == []


@pytest.mark.parametrize("command", ["train", "compile"])
def test_commands_pass_their_distributed_flag(calls, monkeypatch, capsys, command):
  modes = []
  monkeypatch.setattr(distributed, "maybe_initialize", modes.append)
  # No --config: each command stops with its UserError right after starting the runtime.
  assert cli.main(["vqlm", command, "--distributed=off"]) == 2
  assert cli.main(["vqlm", command]) == 2
  assert modes == ["off", None]
  assert cli.main(["vqlm", command, "--distributed=maybe"]) == 2
  assert "--distributed" in capsys.readouterr().err
