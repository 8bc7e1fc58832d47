import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.train import lm_task as lm
from vqlm.train import optim
from vqlm.train.state import TrainState

V, OFF, K = 64, 40, 20
MODEL = dict(
  vocab_size=V,
  dim=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=64,
  image_offset=OFF,
  image_size=K,
)


def _batch(seed=0, b=2, s=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, size=(b, s + 1)).astype(np.int32)
  tokens[:, 6:] = rng.integers(OFF, OFF + K, size=(b, s + 1 - 6))  # text then image tokens
  weights = np.ones((b, s), np.float32)
  weights[0, -3:] = 0.0  # padding
  return {
    "tokens": jnp.asarray(tokens[:, :-1]),
    "targets": jnp.asarray(tokens[:, 1:]),
    "loss_weights": jnp.asarray(weights),
    "segment_ids": jnp.asarray(np.where(weights > 0, 1, 0).astype(np.int32)),
    "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
  }


def _task(z_loss=0.0, lr=3e-3, **model_kw):
  tx, _ = optim.make_optimizer(learning_rate=lr, warmup_steps=0, total_steps=100, weight_decay=0.01)
  model = Transformer(TransformerConfig(**MODEL, **model_kw))
  return lm.LMTask(model=model, optimizer=tx, z_loss_weight=z_loss, image_offset=OFF, image_size=K)


@pytest.fixture(scope="module")
def task_and_state():
  task = _task(z_loss=1e-3)
  return task, jax.jit(task.init)(jax.random.key(0), _batch())


def test_init_returns_boxed_params_with_logical_names(task_and_state):
  _, state = task_and_state
  assert isinstance(state, TrainState) and int(state.step) == 0 and state.extra == {}
  boxes = jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  specs = nn.get_partition_spec(state)
  assert tuple(specs.params["embed"]["embedding"]) == ("vocab", "embed")
  # Adam's moments carry the same names, so the loop can shard the optimizer state too.
  mu_specs = [
    tuple(s) for s in jax.tree.leaves(specs.opt_state, is_leaf=lambda x: isinstance(x, jax.P))
  ]
  assert ("vocab", "embed") in mu_specs


def test_train_step_same_on_boxed_and_unboxed_state(task_and_state):
  task, state = task_and_state
  step = jax.jit(task.train_step)
  batch = _batch(1)
  boxed, m1 = step(state, batch, jax.random.key(1))
  unboxed, m2 = step(nn.meta.unbox(state), batch, jax.random.key(1))
  assert int(boxed.step) == 1 and int(unboxed.step) == 1
  for key in m1:
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    nn.meta.unbox(boxed.params),
    unboxed.params,
  )


def test_metrics_match_manual_computation(task_and_state):
  task, state = task_and_state
  batch = _batch(2)
  _, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(0))
  logits, _ = task.model.apply(
    {"params": state.params},
    batch["tokens"],
    positions=batch["positions"],
    segment_ids=batch["segment_ids"],
  )
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None], -1)[..., 0]
  log_z = np.asarray(jax.nn.logsumexp(logits, -1))
  w = np.asarray(batch["loss_weights"])
  is_img = (np.asarray(batch["targets"]) >= OFF) & (np.asarray(batch["targets"]) < OFF + K)
  acc = np.asarray(jnp.argmax(logits, -1) == batch["targets"], np.float32)
  z = (log_z**2 * w).sum() / w.sum()
  np.testing.assert_allclose(metrics["ce_loss"], (ce * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], (ce * w).sum() / w.sum() + 1e-3 * z, rtol=1e-5)
  wt, wi = w * ~is_img, w * is_img
  np.testing.assert_allclose(metrics["text_loss"], (ce * wt).sum() / wt.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["image_loss"], (ce * wi).sum() / wi.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["text_acc"], (acc * wt).sum() / wt.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["image_acc"], (acc * wi).sum() / wi.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["num_tokens"], w.sum())
  assert float(metrics["grad_norm"]) > 0
  sums = jax.jit(task.eval_step)(state, batch)
  assert set(sums) == set(lm.EVAL_SUM_KEYS)
  summary = lm.eval_summary(jax.tree.map(lambda x: 2 * x, sums))  # two identical batches
  np.testing.assert_allclose(summary["loss"], metrics["ce_loss"], rtol=1e-5)
  np.testing.assert_allclose(summary["image_perplexity"], np.exp(metrics["image_loss"]), rtol=1e-4)
  np.testing.assert_allclose(summary["text_acc"], metrics["text_acc"], rtol=1e-5)


def test_zero_weight_tokens_do_not_change_the_gradient(task_and_state):
  task, state = task_and_state
  batch = _batch(3)
  other = dict(batch)
  other["targets"] = jnp.where(
    batch["loss_weights"] > 0, batch["targets"], (batch["targets"] + 5) % V
  )
  assert bool(jnp.any(other["targets"] != batch["targets"]))
  step = jax.jit(task.train_step)
  a, ma = step(state, batch, jax.random.key(0))
  b, mb = step(state, other, jax.random.key(0))
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
  np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nn.meta.unbox(a.params), nn.meta.unbox(b.params))
  # ... while a weighted target does change it.
  changed = dict(batch, targets=batch["targets"].at[1, 0].set((batch["targets"][1, 0] + 1) % V))
  _, mc = step(state, changed, jax.random.key(0))
  assert abs(float(mc["grad_norm"]) - float(ma["grad_norm"])) > 1e-6


def test_training_lowers_loss_on_a_repeated_batch():
  task = _task(lr=1e-2, scan_layers=True, remat_policy="full")
  batch = _batch(4)
  state = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0), batch))
  step = jax.jit(task.train_step, donate_argnums=0)
  losses = []
  for i in range(20):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 20
  assert losses[-1] < 0.5 * losses[0], losses


def test_codebook_task_keeps_the_codebook_fixed_in_extra():
  codebook = jax.random.normal(jax.random.key(3), (K, 5))
  tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
  model = Transformer(
    TransformerConfig(**dict(MODEL, num_layers=1), image_embed_init="codebook", codebook_dim=5)
  )
  with pytest.raises(ValueError, match="codebook"):
    lm.LMTask(model=model, optimizer=tx, z_loss_weight=0.0, image_offset=OFF, image_size=K)
  with pytest.raises(ValueError, match="shape"):
    lm.LMTask(
      model=model,
      optimizer=tx,
      z_loss_weight=0.0,
      image_offset=OFF,
      image_size=K,
      codebook=codebook[:, :3],
    )
  task = lm.LMTask(
    model=model, optimizer=tx, z_loss_weight=0.0, image_offset=OFF, image_size=K, codebook=codebook
  )
  batch = _batch(5)
  state = jax.jit(task.init)(jax.random.key(0), batch)
  np.testing.assert_array_equal(state.extra["codebook"]["embed"]["vectors"], codebook)
  param_paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(state.params))[0]
  ]
  assert not any("vectors" in p for p in param_paths)  # the codebook is not trainable
  new, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(0))
  np.testing.assert_array_equal(new.extra["codebook"]["embed"]["vectors"], codebook)
  assert np.isfinite(float(metrics["loss"]))
  proj_before = nn.meta.unbox(state.params)["embed"]["codebook_proj"]["kernel"]
  proj_after = nn.meta.unbox(new.params)["embed"]["codebook_proj"]["kernel"]
  assert float(jnp.abs(proj_after - proj_before).max()) > 0  # the projection is learned
