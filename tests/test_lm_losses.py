"""The factored loss of FSQ level embeddings equals the plain loss over the whole vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.nn.token_embed import level_one_hot
from vqlm.nn.transformer import Transformer, TransformerConfig, supports_factored_logits
from vqlm.train import lm_task as lm
from vqlm.train import optim
from vqlm.train.lm_losses import factored_token_losses, token_losses

LEVELS = (3, 4, 2)  # 24 codes; uneven levels check the digit layout
OFF, K, V = 30, 24, 60  # text ids below the codes and 6 specials after them


def _full_logits(other, levels):
  """The `[B, S, V]` logits the factored pair stands for."""
  image = levels @ jnp.asarray(level_one_hot(LEVELS)).T
  return jnp.concatenate([other[..., :OFF], image, other[..., OFF:]], axis=-1)


def _factored(other, levels, targets):
  return factored_token_losses(other, levels, targets, image_offset=OFF, code_levels=LEVELS)


def _targets(rng, shape):
  return jnp.asarray(rng.integers(0, V, size=shape), jnp.int32)


def test_factored_losses_equal_full_ones():
  rng = np.random.default_rng(0)
  other = jnp.asarray(rng.normal(size=(2, 50, V - K)) * 3, jnp.float32)
  levels = jnp.asarray(rng.normal(size=(2, 50, sum(LEVELS))) * 3, jnp.float32)
  targets = _targets(rng, (2, 50))
  got = _factored(other, levels, targets)
  want = token_losses(_full_logits(other, levels), targets)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_factored_correctness_counts_the_argmax_and_ties():
  rng = np.random.default_rng(1)
  other = jnp.asarray(rng.normal(size=(1, 4, V - K)), jnp.float32)
  levels = jnp.zeros((1, 4, sum(LEVELS)), jnp.float32)
  levels = levels.at[..., [0, 3, 7]].set(10.0)  # code with digits (0, 0, 0): id OFF is the argmax
  targets = jnp.asarray([[OFF, OFF + 1, 5, V - 1]], jnp.int32)
  _, _, correct = factored_token_losses(
    other, levels, targets, image_offset=OFF, code_levels=LEVELS
  )
  np.testing.assert_array_equal(correct, [[1.0, 0.0, 0.0, 0.0]])
  # A text id whose logit ties the best code's counts as correct, as in token_losses.
  other = other.at[0, 2, 5].set(30.0)
  _, _, correct = factored_token_losses(
    other, levels, targets, image_offset=OFF, code_levels=LEVELS
  )
  assert float(correct[0, 2]) == 1.0


def test_factored_gradients_equal_full_ones():
  rng = np.random.default_rng(2)
  other = jnp.asarray(rng.normal(size=(1, 8, V - K)), jnp.float32)
  levels = jnp.asarray(rng.normal(size=(1, 8, sum(LEVELS))), jnp.float32)
  targets = _targets(rng, (1, 8))

  def loss(fn):
    def f(o, l):
      ce, z, _ = fn(o, l)
      return ce.sum() + 0.1 * z.sum()

    return jax.grad(f, argnums=(0, 1))(other, levels)

  got = loss(lambda o, l: _factored(o, l, targets))
  want = loss(lambda o, l: token_losses(_full_logits(o, l), targets))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


MODEL = dict(
  vocab_size=V,
  dim=32,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  mlp_dim=64,
  image_offset=OFF,
  image_size=K,
  image_embed_init="levels",
  code_levels=LEVELS,
)


def _batch(seed=0, b=2, s=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, OFF, size=(b, s + 1)).astype(np.int32)
  tokens[:, 5:] = rng.integers(OFF, OFF + K, size=(b, s - 4))
  tokens[:, -1] = V - 2  # a special after the codes
  return {
    "tokens": jnp.asarray(tokens[:, :-1]),
    "targets": jnp.asarray(tokens[:, 1:]),
    "loss_weights": jnp.ones((b, s), jnp.float32),
    "segment_ids": jnp.ones((b, s), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)),
  }


def test_model_factored_logits_are_its_logits():
  model = Transformer(TransformerConfig(**MODEL))
  batch = _batch()
  params = model.init(jax.random.key(0), batch["tokens"])
  logits, _ = model.apply(params, batch["tokens"])
  (other, levels), _ = model.apply(params, batch["tokens"], factored_logits=True)
  np.testing.assert_allclose(_full_logits(other, levels), logits, rtol=1e-5, atol=1e-5)


def test_train_step_with_factored_loss_matches_the_full_one():
  """LMTask takes the factored path for level embeddings; its loss, metrics and update equal
  those of the full logits (`factored_loss=False`)."""
  tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0)
  model = Transformer(TransformerConfig(**MODEL))
  kw = dict(model=model, optimizer=tx, z_loss_weight=1e-3, image_offset=OFF, image_size=K)
  task, full_task = lm.LMTask(**kw), lm.LMTask(**kw, factored_loss=False)
  assert task.factored_loss and not full_task.factored_loss
  batch = _batch(1)
  state = task.init(jax.random.key(0), batch)
  factored, m1 = jax.jit(task.train_step)(state, batch, jax.random.key(1))
  full, m2 = jax.jit(full_task.train_step)(state, batch, jax.random.key(1))
  sums = jax.jit(task.eval_step)(factored, batch)
  full_sums = jax.jit(full_task.eval_step)(factored, batch)
  for key in sums:
    np.testing.assert_allclose(sums[key], full_sums[key], rtol=1e-5, atol=1e-5, err_msg=key)
  for key in ("loss", "ce_loss", "z_loss", "text_loss", "image_loss", "text_acc", "image_acc"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    factored.params,
    full.params,
  )


def test_factored_logits_refused_without_level_embeddings():
  config = TransformerConfig(**{**MODEL, "image_embed_init": "learned", "code_levels": ()})
  assert not supports_factored_logits(config)
  model = Transformer(config)
  tokens = _batch()["tokens"]
  params = model.init(jax.random.key(0), tokens)
  with pytest.raises(UserError, match="factored_logits needs"):
    model.apply(params, tokens, factored_logits=True)
  tx, _ = optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10)
  with pytest.raises(UserError, match="factored_loss=True needs"):
    lm.LMTask(
      model=model,
      optimizer=tx,
      z_loss_weight=0.0,
      image_offset=OFF,
      image_size=K,
      factored_loss=True,
    )
