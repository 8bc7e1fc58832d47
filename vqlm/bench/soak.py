"""`python -m vqlm.bench soak [--stage toy|tokenizer|lm] [--kills 20]`: kill -9 a training run
again and again; lose nothing.

Runs a training once straight through as the reference, then again with SIGKILL at random moments
(async checkpoint commits slowed by `VQLM_TEST_CHECKPOINT_FAULT=slow:0.2` so some kills land
mid-save), restarting after each kill, and checks that per-step losses and final parameters are
bit-identical. Every logged loss counts, also those of the steps a restart trains again after its
checkpoint. A kill waits until the process it kills has itself logged the kill's target step (so
start-up and compilation are never all that gets killed), then a random fraction of 0.3 s.

Stages (`--stage`):
  toy        the toy regression task through the shared loop (`vqlm.bench.toy_run`); default
  tokenizer  the image-tokenizer stage as a user starts it, `python -m vqlm train` with the tiny
             config (shapes, generated into the temporary directory)
  lm         the LM stage the same way, on codes that a tiny tokenizer run and `python -m vqlm
             encode` make first; each checkpoint also holds the grain data-iterator position
The two stages log every step, checkpoint every 3 steps and run their sample/validation hooks and
evaluators only after the last step (their rows are not compared); their final parameters are
read from the last checkpoint (`vqlm.runs.load`). All of it runs on the CPU.

Prints e.g. `lm soak: 20 SIGKILLs over 21 starts in 400s; per-step losses identical: True; final
parameters identical: True` and how many kills caught a commit in flight; exits with 0 only when
both are identical.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

STAGES = ("toy", "tokenizer", "lm")
CHECKPOINT_EVERY = 3
MAX_DELAY_S = 0.3  # After the target step: the kill lands within this many seconds.
START_TIMEOUT_S = 900  # A start that logs nothing for this long has hung.


class _Failed(Exception):
  """A command that should have run to its end did not."""


def _config_file(module: str) -> str:
  """The stage's config module as a file for `--config` (the one configs/*.py re-export)."""
  return importlib.util.find_spec(module).origin


def _train_cmd(config_module: str, workdir: str, overrides: dict) -> list[str]:
  """`python -m vqlm train` with the tiny config of `config_module` and `--config.x=v` overrides."""
  return [
    sys.executable,
    "-m",
    "vqlm",
    "train",
    "--config",
    f"{_config_file(config_module)}:size=tiny",
    "--workdir",
    workdir,
    "--progress=false",
    *[f"--config.{k}={v}" for k, v in overrides.items()],
  ]


def _soak_overrides(steps: int, hook_every: str) -> dict:
  """Log every step, save often; the stage's hook (`hook_every`) only runs at the last step."""
  return {
    "train.steps": steps,
    "train.log_every": 1,
    "train.checkpoint_every": CHECKPOINT_EVERY,
    f"train.{hook_every}": steps,
  }


class _Stage:
  """How to prepare, start and read back one kind of run."""

  name = ""

  def __init__(self, tmp: str, steps: int):
    self.tmp, self.steps = tmp, steps

  def prepare(self, run) -> None:
    """Makes what every start needs (`run(argv)` runs a command to its end)."""

  def command(self, workdir: str) -> list[str]:
    raise NotImplementedError

  def final(self, workdir: str) -> dict[str, np.ndarray]:
    """The parameters at the last step, by name."""
    raise NotImplementedError


class _Toy(_Stage):
  name = "toy"

  def command(self, workdir):
    return [sys.executable, "-m", "vqlm.bench.toy_run", workdir, str(self.steps)]

  def final(self, workdir):
    with np.load(os.path.join(workdir, "final.npz")) as f:
      return {k: f[k] for k in f.files}


def _restored(workdir: str, steps: int) -> dict[str, np.ndarray]:
  """The parameters (and a tokenizer's non-trainable collections) of the run's last checkpoint,
  which must be step `steps`."""
  import jax

  from vqlm import runs

  run = runs.load(workdir)
  if run.step != steps:
    raise UserError(f"the last checkpoint of {workdir} is step {run.step}, not {steps}")
  tree = run.params if isinstance(run, runs.LMRun) else run.variables
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in flat}


class _Tokenizer(_Stage):
  name = "tokenizer"

  def command(self, workdir):
    overrides = _soak_overrides(self.steps, "sample_every")
    overrides["data.data_dir"] = os.path.join(self.tmp, "data")
    return _train_cmd("vqlm.stages.tokenizer_config", workdir, overrides)

  def final(self, workdir):
    return _restored(workdir, self.steps)


class _LM(_Stage):
  name = "lm"

  def prepare(self, run):
    tokenizer, codes = os.path.join(self.tmp, "tokenizer"), os.path.join(self.tmp, "codes")
    data = {"data.data_dir": os.path.join(self.tmp, "data")}
    run(_train_cmd("vqlm.stages.tokenizer_config", tokenizer, data))
    run([sys.executable, "-m", "vqlm", "encode", "--tokenizer", tokenizer, "--out", codes])
    self.codes = codes

  def command(self, workdir):
    overrides = _soak_overrides(self.steps, "eval_every")
    overrides["data.codes"] = self.codes
    return _train_cmd("vqlm.stages.lm_config", workdir, overrides)

  def final(self, workdir):
    return _restored(workdir, self.steps)


_KINDS = {kind.name: kind for kind in (_Toy, _Tokenizer, _LM)}


def _rows(workdir: str, offset: int = 0) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl from byte `offset` on (a line cut by a kill is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    f.seek(offset)
    lines = f.read().decode("utf-8", errors="replace").splitlines()
  rows = []
  for line in lines:
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def _size(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.getsize(path) if os.path.exists(path) else 0


def _losses(workdir: str, offset: int = 0) -> list[tuple[int, float]]:
  """(step, train loss) of every logged training step, repeats included; eval rows ignored."""
  return [(r["step"], r["train/loss"]) for r in _rows(workdir, offset) if "train/loss" in r]


def _commit_in_flight(workdir: str) -> bool:
  """Whether an uncommitted (temporary) checkpoint directory is left behind."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any("tmp" in d for d in os.listdir(directory))


def _same_losses(run: list[tuple[int, float]], ref: list[tuple[int, float]]) -> bool:
  """Every step the reference logged was logged, and every logged loss equals the reference's."""
  want = dict(ref)
  return {s for s, _ in run} == set(want) and all(want.get(s) == loss for s, loss in run)


def _same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  return a.keys() == b.keys() and all(
    a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
  )


def _tail(path: str, chars: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-chars:]


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_enum("stage", "toy", list(STAGES), "what to train: toy | tokenizer | lm"),
      f.DEFINE_integer("kills", 20, "number of SIGKILLs"),
      f.DEFINE_integer("steps", 200, "training steps"),
      f.DEFINE_integer("seed", 0, "seed of the kill moments"),
    ),
  )
  if not 0 <= fv.kills <= fv.steps - 10:
    raise UserError(f"--kills={fv.kills} needs --steps of at least {fv.kills + 10}")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("VQLM_TEST_CHECKPOINT_FAULT", None)
  kill_env = dict(env, VQLM_TEST_CHECKPOINT_FAULT="slow:0.2")
  try:
    return _soak(fv, env, kill_env)
  except _Failed as e:
    print(f"{fv.stage} soak failed: {e}", file=sys.stderr)
    return 1


def _soak(fv, env: dict, kill_env: dict) -> int:
  rng = random.Random(fv.seed)
  with tempfile.TemporaryDirectory() as tmp:
    stage = _KINDS[fv.stage](tmp, fv.steps)
    log = os.path.join(tmp, "output.log")

    def run_to_end(cmd: list[str]) -> None:
      with open(log, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
      if done.returncode:
        raise _Failed(f"{' '.join(cmd)} failed ({done.returncode}):\n{_tail(log)}")

    stage.prepare(run_to_end)
    ref, run = os.path.join(tmp, "ref"), os.path.join(tmp, "run")
    run_to_end(stage.command(ref))
    start, kills, mid_save, starts = time.time(), 0, 0, 0
    for target in sorted(rng.sample(range(5, fv.steps - 5), fv.kills)):
      offset = _size(run)  # Only what this process logs counts towards its target.
      with open(log, "w") as out:
        proc = subprocess.Popen(stage.command(run), env=kill_env, stdout=out, stderr=out)
      starts += 1
      waited = time.monotonic()
      while proc.poll() is None and max((s for s, _ in _losses(run, offset)), default=0) < target:
        if time.monotonic() - waited > START_TIMEOUT_S:
          proc.kill()
          proc.wait()
          raise _Failed(f"start {starts} logged no step {target} in {START_TIMEOUT_S}s")
        time.sleep(0.02)
      time.sleep(rng.random() * MAX_DELAY_S)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_save += _commit_in_flight(run)
      elif proc.returncode:
        raise _Failed(f"start {starts} failed ({proc.returncode}):\n{_tail(log)}")
    run_to_end(stage.command(run))
    starts += 1
    same_losses = _same_losses(_losses(run), _losses(ref))
    same_params = _same_params(stage.final(run), stage.final(ref))
    print(
      f"{fv.stage} soak: {kills} SIGKILLs over {starts} starts in {time.time() - start:.0f}s; "
      f"per-step losses identical: {same_losses}; final parameters identical: {same_params}"
    )
    print(f"({mid_save} of the kills left a checkpoint commit in flight)")
    return 0 if same_losses and same_params else 1
