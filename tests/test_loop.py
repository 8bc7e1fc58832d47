import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.data import pipeline
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.checkpoint import to_numpy
from vqlm.runtime.config import DEFAULT_RULES
from vqlm.testing.toy_task import ToySource, ToyTask, identity_transform
from vqlm.train import loop
from vqlm.train.metrics import read_metrics


def _trainer(steps, **kw):
  mesh = mesh_lib.make_mesh({"data": -1})
  opts = loop.LoopOptions(
    steps=steps, log_every=1, checkpoint_every=kw.pop("checkpoint_every", 5), progress=False, **kw
  )
  return loop.Trainer(ToyTask(), mesh=mesh, rules=DEFAULT_RULES, options=opts)


def _iter(seed=0):
  return pipeline.make_iterator(
    ToySource(), global_batch_size=8, transform=identity_transform, seed=seed, num_threads=0
  )


def test_loss_falls_and_metrics_written(tmp_path):
  state = loop.run(_trainer(30), data_iter=_iter(), workdir=str(tmp_path), log_fn=lambda s: None)
  rows = read_metrics(str(tmp_path))
  assert int(state.step) == 30
  assert [r["step"] for r in rows] == list(range(1, 31))
  assert rows[-1]["train/loss"] < 0.5 * rows[0]["train/loss"]
  assert os.listdir(tmp_path / "tb")
  assert 30 in [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]


def test_resume_equals_straight_run(tmp_path):
  straight = loop.run(
    _trainer(10), data_iter=_iter(), workdir=str(tmp_path / "a"), log_fn=lambda s: None
  )
  loop.run(_trainer(5), data_iter=_iter(), workdir=str(tmp_path / "b"), log_fn=lambda s: None)
  messages = []
  resumed = loop.run(
    _trainer(10), data_iter=_iter(), workdir=str(tmp_path / "b"), log_fn=messages.append
  )
  assert any("resuming from step 5" in m for m in messages)
  for a, b in zip(
    jax.tree.leaves(to_numpy(straight.params)), jax.tree.leaves(to_numpy(resumed.params))
  ):
    np.testing.assert_array_equal(a, b)
  losses_a = [r["train/loss"] for r in read_metrics(str(tmp_path / "a"))]
  losses_b = [r["train/loss"] for r in read_metrics(str(tmp_path / "b"))]
  assert losses_a == losses_b


def test_nonfinite_update_is_skipped():
  trainer = _trainer(3)
  batch = mesh_lib.global_batch(next(_iter()), trainer.mesh)
  state = trainer.init_state(jax.random.key(0), batch)
  before = to_numpy(state.params)
  bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.inf))
  state, metrics = trainer.step(state, bad, jax.random.key(1))
  assert int(state.step) == 1
  assert float(metrics["skipped"]) == 1.0
  assert int(state.extra["guard"]["consecutive"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(to_numpy(state.params))):
    np.testing.assert_array_equal(a, b)
  state, metrics = trainer.step(state, batch, jax.random.key(2))
  assert int(state.extra["guard"]["consecutive"]) == 0
  assert int(state.extra["guard"]["skipped"]) == 1


def test_consecutive_nonfinite_stops_with_message(tmp_path):
  class BadSource(ToySource):
    def __getitem__(self, i):
      ex = super().__getitem__(i)
      ex["x"] = ex["x"] * np.float32("nan")
      return ex

  it = pipeline.make_iterator(
    BadSource(), global_batch_size=8, transform=identity_transform, seed=0, num_threads=0
  )
  with pytest.raises(loop.NonFiniteError, match="consecutive updates had non-finite"):
    loop.run(
      _trainer(20, max_consecutive_skips=3),
      data_iter=it,
      workdir=str(tmp_path),
      log_fn=lambda s: None,
    )


def test_mismatched_checkpoint_is_refused(tmp_path):
  loop.run(_trainer(2), data_iter=_iter(), workdir=str(tmp_path), log_fn=lambda s: None)
  wide = _trainer(4)
  wide.task = ToyTask(width=16)
  with pytest.raises(ValueError, match="does not match the config"):
    loop.run(wide, data_iter=_iter(), workdir=str(tmp_path), log_fn=lambda s: None)


def test_loss_spike_is_skipped_after_warmup():
  trainer = _trainer(30, spike_sigma=3.0, spike_warmup=5)
  it = _iter()
  batch = mesh_lib.global_batch(next(it), trainer.mesh)
  state = trainer.init_state(jax.random.key(0), batch)
  for i in range(8):
    state, metrics = trainer.step(
      state, mesh_lib.global_batch(next(it), trainer.mesh), jax.random.key(i)
    )
  assert float(metrics["skipped"]) == 0.0
  before = to_numpy(state.params)
  spike = dict(batch, y=batch["y"] * 1000.0)  # Finite, but far above the running loss.
  state, metrics = trainer.step(state, spike, jax.random.key(9))
  assert float(metrics["skipped"]) == 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(to_numpy(state.params))):
    np.testing.assert_array_equal(a, b)
  state, metrics = trainer.step(state, batch, jax.random.key(10))
  assert int(state.extra["guard"]["skipped"]) == 1 and int(state.extra["guard"]["consecutive"]) == 0


def test_time_based_checkpoints(tmp_path):
  def steps_saved(minutes, workdir):
    trainer = _trainer(4, checkpoint_every=1000, checkpoint_minutes=minutes, keep_checkpoints=10)
    loop.run(trainer, data_iter=_iter(), workdir=str(workdir), log_fn=lambda s: None)
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())

  assert steps_saved(0.0, tmp_path / "often") == [1, 2, 3, 4]
  assert steps_saved(1e6, tmp_path / "rarely") == [4]


def test_config_train_fields_reach_the_loop_options():
  from vqlm.errors import UserError
  from vqlm.stages import tokenizer_config, wiring

  config = tokenizer_config.get_config("size=tiny")
  config.train.update(keep_every_steps=7, spike_sigma=2.5, spike_warmup=11)
  config.train.checkpoint_commit = "commit_file"
  options = wiring.make_trainer(ToyTask(), config).options
  assert (options.keep_every_steps, options.spike_sigma, options.spike_warmup) == (7, 2.5, 11)
  assert options.checkpoint_commit == "commit_file"
  config.train.spike_sigma = -1.0
  with pytest.raises(UserError, match="spike_sigma"):
    wiring.make_trainer(ToyTask(), config)
