"""The one training skeleton both stages share.

A stage supplies a *task* with two pure functions:
  `init(rng, batch) -> TrainState` (parameters may be boxed with logical axis names) and
  `train_step(state, batch, rng) -> (state, metrics)`.
The loop does everything else: the mesh, a state born sharded (`eval_shape` -> logical specs ->
`jit(init, out_shardings=...)`), a jitted step with the state donated, a guard that skips updates
with non-finite numbers (and, optionally, loss spikes), Orbax checkpoints of state + data iterator
(every N steps and every M minutes, async), automatic resume from the workdir, SIGTERM handling,
TensorBoard + `metrics.jsonl`, a tqdm bar with loss and throughput, and periodic hooks (image grids,
evaluation).
"""

from collections.abc import Callable, Mapping
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from tqdm.auto import tqdm

from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime import workdir_lock
from vqlm.runtime.checkpoint import Checkpointer
from vqlm.train.metrics import MetricWriter
from vqlm.train.state import TrainState

log = logging.getLogger(__name__)


class TrainTask(Protocol):
  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> TrainState: ...

  def train_step(
    self, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]: ...


class NonFiniteError(RuntimeError):
  """Too many consecutive updates had non-finite losses or gradients."""


@dataclasses.dataclass
class LoopOptions:
  """How long to train and how often to log, save and run hooks (all in steps unless named)."""

  steps: int
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 1000
  checkpoint_minutes: float = 10.0
  keep_checkpoints: int = 3
  keep_every_steps: int = 0  # Steps divisible by this are kept for good (0: none).
  checkpoint_commit: str = "auto"  # auto | rename | commit_file (`runtime.checkpoint`).
  async_checkpoints: bool = True
  max_consecutive_skips: int = 10
  spike_sigma: float = 0.0  # > 0: skip updates whose loss exceeds mean + sigma * std (EMA).
  spike_warmup: int = 100
  progress: bool = True
  throughput_key: str = ""  # A metric counting work units per step (e.g. "num_tokens").


@dataclasses.dataclass
class Hook:
  """Calls `fn(state, step)` every `every` steps (and after the last step)."""

  every: int
  fn: Callable[[TrainState, int], Mapping[str, float] | None]
  name: str = ""


def _guard_init() -> dict[str, jax.Array]:
  return {
    "skipped": jnp.zeros((), jnp.int32),
    "consecutive": jnp.zeros((), jnp.int32),
    "loss_mean": jnp.zeros((), jnp.float32),
    "loss_sq": jnp.zeros((), jnp.float32),
    "count": jnp.zeros((), jnp.int32),
  }


def guarded(train_step: Callable, *, spike_sigma: float, spike_warmup: int) -> Callable:
  """Wraps a step: an update with a non-finite loss/grad norm (or a loss spike) is not applied.

  The step counter still advances (the batch was consumed), params, optimizer state and extras
  keep their old values, and `state.extra["guard"]` counts skipped and consecutive skips.
  """

  def step(state: TrainState, batch, rng):
    guard = state.extra["guard"]
    new_state, metrics = train_step(state, batch, rng)
    loss = jnp.asarray(metrics["loss"], jnp.float32)
    ok = jnp.isfinite(loss)
    if "grad_norm" in metrics:
      ok &= jnp.isfinite(jnp.asarray(metrics["grad_norm"], jnp.float32))
    if spike_sigma > 0:
      std = jnp.sqrt(jnp.maximum(guard["loss_sq"] - guard["loss_mean"] ** 2, 0.0))
      spike = (guard["count"] >= spike_warmup) & (loss > guard["loss_mean"] + spike_sigma * std)
    else:
      spike = jnp.zeros((), bool)
    apply = ok & ~spike
    kept = jax.tree.map(
      lambda new, old: jnp.where(apply, new, old),
      (new_state.params, new_state.opt_state, new_state.extra),
      (state.params, state.opt_state, state.extra),
    )
    decay = 0.99
    safe_loss = jnp.where(apply, loss, guard["loss_mean"])
    new_guard = {
      "skipped": guard["skipped"] + (~apply).astype(jnp.int32),
      "consecutive": jnp.where(apply, 0, guard["consecutive"] + 1).astype(jnp.int32),
      "loss_mean": jnp.where(
        guard["count"] == 0, safe_loss, decay * guard["loss_mean"] + (1 - decay) * safe_loss
      ),
      "loss_sq": jnp.where(
        guard["count"] == 0, safe_loss**2, decay * guard["loss_sq"] + (1 - decay) * safe_loss**2
      ),
      "count": guard["count"] + apply.astype(jnp.int32),
    }
    extra = dict(kept[2])
    extra["guard"] = new_guard
    out = TrainState(step=state.step + 1, params=kept[0], opt_state=kept[1], extra=extra)
    metrics = dict(metrics)
    metrics["skipped"] = new_guard["skipped"].astype(jnp.float32)
    return out, metrics

  return step


class Trainer:
  """Builds the sharded state and the jitted step for a task on a mesh; runs the loop."""

  def __init__(self, task: TrainTask, *, mesh: Mesh, rules, options: LoopOptions):
    self.task = task
    self.mesh = mesh
    self.rules = mesh_lib.rules_from_config(rules)
    self.options = options
    self._step_fn = None
    self.state_shardings = None

  def context(self):
    """Mesh + logical-axis rules, active while tracing and running model code."""
    return mesh_lib.activate(self.mesh, self.rules)

  def _init_fn(self, example_batch):
    def init(rng):
      state = self.task.init(rng, example_batch)
      extra = dict(state.extra or {})
      extra["guard"] = _guard_init()
      return state.replace(extra=extra)

    return init

  def abstract_state(self, example_batch) -> Any:
    """Boxed abstract state (ShapeDtypeStructs with logical names) without allocating."""
    with self.context():
      return jax.eval_shape(self._init_fn(example_batch), jax.random.key(0))

  def init_state(self, rng: jax.Array, example_batch) -> TrainState:
    """The train state, created directly with its final shardings."""
    abstract = self.abstract_state(example_batch)
    self.state_shardings = mesh_lib.logical_shardings(abstract, self.mesh, self.rules)
    init = self._init_fn(example_batch)
    with self.context():
      return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=self.state_shardings)(rng)

  def abstract_target(self, example_batch) -> Any:
    """Unboxed ShapeDtypeStructs with the shardings a restored state must have."""
    abstract = nn.meta.unbox(self.abstract_state(example_batch))
    if self.state_shardings is None:
      self.state_shardings = mesh_lib.logical_shardings(
        self.abstract_state(example_batch), self.mesh, self.rules
      )
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract,
      self.state_shardings,
    )

  @property
  def step_fn(self) -> Callable:
    """jit(state, batch, rng) -> (state, metrics); the state argument is donated."""
    if self._step_fn is None:
      step = guarded(
        self.task.train_step,
        spike_sigma=self.options.spike_sigma,
        spike_warmup=self.options.spike_warmup,
      )
      self._step_fn = jax.jit(
        step, donate_argnums=0, out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh))
      )
    return self._step_fn

  def step(self, state, batch, rng):
    with self.context():
      return self.step_fn(state, batch, rng)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def _save_signals(
  step: int, opts: LoopOptions, ckpt: Checkpointer, *, elapsed: float, sigterm: bool
) -> tuple[bool, bool]:
  """(time-based save due, preemption) agreed by all processes.

  With one process both are checked every step. With several, they are checked at log steps only
  and process 0's view is broadcast, so every process saves at the same step.
  """
  timed = elapsed >= opts.checkpoint_minutes * 60
  if jax.process_count() == 1:
    return timed, sigterm
  if step % opts.log_every:
    return False, False
  from jax.experimental import multihost_utils

  flags = np.asarray([timed, sigterm or ckpt.reached_preemption(step)], np.int32)
  flags = multihost_utils.broadcast_one_to_all(flags)
  return bool(flags[0]), bool(flags[1])


def run(
  trainer: Trainer,
  *,
  data_iter,
  workdir: str,
  hooks: list[Hook] = (),
  meta: Mapping[str, Any] | None = None,
  log_fn: Callable[[str], None] = print,
  checkpoint_dir: str | None = None,
  after_save: Callable[[int], None] | None = None,
  warm_start: Callable[[TrainState], TrainState] | None = None,
) -> TrainState:
  """Trains `trainer.task` on `data_iter` until `options.steps`, resuming from `workdir` if
  possible.

  Args:
    trainer: the task, mesh and options.
    data_iter: a checkpointable iterator of host-local numpy batches (`vqlm.data.pipeline`).
    workdir: the run directory; checkpoints go to `workdir/checkpoints`.
    hooks: periodic callbacks (image grids, evaluation); their returned scalars are logged.
    meta: JSON metadata stored with every checkpoint (e.g. the config).
    checkpoint_dir: where checkpoints go (default `workdir/checkpoints`; may be a `gs://` URL).
    after_save: called with the step after each checkpoint save starts (e.g. to copy the run's
      small files to a bucket).
    warm_start: applied to the freshly initialised state when the run has no checkpoint yet
      (e.g. parameters from another run: `config.init_from`); never on resume.
  Returns:
    The final train state.
  """
  with workdir_lock.hold(workdir):
    return _run(
      trainer,
      data_iter=data_iter,
      workdir=workdir,
      hooks=hooks,
      meta=meta,
      log_fn=log_fn,
      checkpoint_dir=checkpoint_dir or os.path.join(workdir, "checkpoints"),
      after_save=after_save,
      warm_start=warm_start,
    )


def _run(
  trainer, *, data_iter, workdir, hooks, meta, log_fn, checkpoint_dir, after_save, warm_start
):
  opts = trainer.options
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(
    checkpoint_dir,
    max_to_keep=opts.keep_checkpoints,
    keep_every_steps=opts.keep_every_steps,
    async_save=opts.async_checkpoints,
    commit=opts.checkpoint_commit,
    warn=log_fn,
  )
  writer = MetricWriter(workdir)
  first = next(data_iter)
  example = mesh_lib.global_batch(first, trainer.mesh)
  target = trainer.abstract_target(example)
  restored = ckpt.restore(target)
  if restored is not None:
    state = restored.state
    if restored.data is not None:
      data_iter.set_state(restored.data)
    log_fn(f"resuming from step {restored.step} of {workdir}")
    pending = None
  else:
    state = trainer.init_state(jax.random.key(opts.seed), example)
    if warm_start is not None:
      state = warm_start(state)
    pending = example  # The batch already drawn is the first training batch.
  start = int(jax.device_get(state.step))
  base_rng = jax.random.key(opts.seed + 1)
  bar = tqdm(
    total=opts.steps,
    initial=start,
    disable=not opts.progress or jax.process_index() != 0,
    dynamic_ncols=True,
    desc=os.path.basename(os.path.normpath(workdir)),
  )
  last_save_time = time.monotonic()
  last_log_time = time.monotonic()
  last_log_step = start
  step = start
  try:
    with _Preemption() as preemption:
      while step < opts.steps:
        batch = (
          pending if pending is not None else mesh_lib.global_batch(next(data_iter), trainer.mesh)
        )
        pending = None
        state, metrics = trainer.step(state, batch, jax.random.fold_in(base_rng, step))
        step += 1
        bar.update(1)
        if step % opts.log_every == 0 or step == opts.steps:
          host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.monotonic()
          rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
          host["steps_per_sec"] = rate
          if opts.throughput_key:
            host[f"{opts.throughput_key}_per_sec"] = rate * host[opts.throughput_key]
          last_log_time, last_log_step = now, step
          writer.write_scalars(step, host, prefix="train/")
          bar.set_postfix(loss=f"{host['loss']:.4f}", it_s=f"{rate:.1f}")
          consecutive = int(jax.device_get(state.extra["guard"]["consecutive"]))
          if consecutive >= opts.max_consecutive_skips:
            raise NonFiniteError(
              f"{consecutive} consecutive updates had non-finite numbers (last at step {step});"
              f" the last good checkpoint is step {ckpt.latest_step}; lower the learning rate "
              "or check the data"
            )
        for hook in hooks:
          if step % hook.every == 0 or step == opts.steps:
            scalars = hook.fn(state, step)
            if scalars:
              writer.write_scalars(step, scalars, prefix=f"{hook.name}/" if hook.name else "")
        timed, preempted = _save_signals(
          step, opts, ckpt, elapsed=time.monotonic() - last_save_time, sigterm=preemption.requested
        )
        if step % opts.checkpoint_every == 0 or step == opts.steps or timed or preempted:
          ckpt.save(step, state, data=data_iter.get_state(), meta=dict(meta or {}))
          last_save_time = time.monotonic()
          if after_save is not None:
            after_save(step)
        if preempted:
          ckpt.wait()
          log_fn(f"preempted: saved step {step} to {workdir}; run the same command to resume")
          break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return state
