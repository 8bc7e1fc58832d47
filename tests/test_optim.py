import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqlm.errors import UserError
from vqlm.train import optim


def _params(boxed=False):
  params = {
    "embed": {"embedding": jnp.ones((6, 4))},
    "layer_0": {
      "attn": {"query": {"kernel": jnp.ones((4, 2, 2))}, "query_norm": {"scale": jnp.ones(2)}},
      "attn_norm": {"scale": jnp.ones(4)},
      "mlp": {"wi": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)}},
    },
    "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
    "codebook_proj": {"kernel": jnp.ones((3, 4))},
  }
  if boxed:
    params = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, ("a",) * x.ndim), params)
  return params


EXPECTED_DECAY = {
  "embed": {"embedding": False},
  "layer_0": {
    "attn": {"query": {"kernel": True}, "query_norm": {"scale": False}},
    "attn_norm": {"scale": False},
    "mlp": {"wi": {"kernel": True, "bias": False}},
  },
  "conv": {"kernel": True},
  "codebook_proj": {"kernel": False},
}


@pytest.mark.parametrize("boxed", [False, True])
def test_decay_mask_excludes_norms_biases_embeddings(boxed):
  assert optim.default_decay_mask(_params(boxed)) == EXPECTED_DECAY


@pytest.mark.parametrize("boxed", [False, True])
def test_weight_decay_only_touches_masked_in_params(boxed):
  tx, _ = optim.make_optimizer(
    learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=None
  )
  params = _params(boxed)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  new = nn.meta.unbox(optax.apply_updates(params, updates))
  changed = jax.tree.map(lambda x: bool(jnp.any(x != 1.0)), new)
  assert changed == EXPECTED_DECAY
  # Decoupled decay: p <- p - lr * wd * p at step 0 (lr = peak since warmup_steps=0).
  np.testing.assert_allclose(new["conv"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  if boxed:
    assert isinstance(
      optax.apply_updates(params, updates)["conv"]["kernel"], nn.LogicallyPartitioned
    )


def test_schedule_warmup_then_cosine_to_end_fraction():
  _, schedule = optim.make_optimizer(
    learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_fraction=0.1
  )
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.55, rtol=1e-5)  # cosine midpoint
  np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-5)
  np.testing.assert_allclose(schedule(500), 0.1, rtol=1e-5)
  assert all(schedule(t) >= schedule(t + 1) for t in range(10, 110, 7))


def test_clipping_equals_adamw_on_clipped_gradients():
  params = {"w": jnp.ones((3, 2))}
  grads = [{"w": jnp.full((3, 2), 100.0)}, {"w": jnp.array([[0.1, -0.2]] * 3)}]
  kw = dict(learning_rate=0.01, warmup_steps=0, total_steps=10, weight_decay=0.0)
  clipped, _ = optim.make_optimizer(clip_norm=1.0, **kw)
  plain, _ = optim.make_optimizer(clip_norm=None, **kw)

  def run(tx, gs):
    p, s = params, tx.init(params)
    for g in gs:
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
    return p

  pre_clipped = [
    jax.tree.map(lambda x, n=float(optax.tree.norm(g)): x * min(1.0, 1.0 / n), g) for g in grads
  ]
  np.testing.assert_allclose(run(clipped, grads)["w"], run(plain, pre_clipped)["w"], rtol=1e-6)
  assert not np.allclose(run(plain, grads)["w"], run(plain, pre_clipped)["w"])


def test_gradient_accumulation_applies_mean_every_k_steps():
  kw = dict(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.1, clip_norm=1.0)
  accum, _ = optim.make_optimizer(grad_accum_steps=2, **kw)
  single, _ = optim.make_optimizer(**kw)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  g1 = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([1.0, -1.0])}
  g2 = {"w": jnp.array([[-1.0, 0.0], [1.0, 0.5]]), "b": jnp.array([0.5, 0.5])}
  state = accum.init(params)
  u1, state = accum.update(g1, state, params)
  p1 = optax.apply_updates(params, u1)
  jax.tree.map(np.testing.assert_array_equal, p1, params)  # no update after 1 of 2
  u2, state = accum.update(g2, state, p1)
  p2 = optax.apply_updates(p1, u2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  u_ref, _ = single.update(mean, single.init(params), params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p2, optax.apply_updates(params, u_ref)
  )


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="warmup_steps < total_steps"):
    optim.make_optimizer(learning_rate=1.0, warmup_steps=10, total_steps=10)
  with pytest.raises(ValueError, match="grad_accum_steps"):
    optim.make_optimizer(learning_rate=1.0, warmup_steps=1, total_steps=10, grad_accum_steps=0)
  with pytest.raises(ValueError, match="end_lr_fraction"):
    optim.make_optimizer(learning_rate=1.0, warmup_steps=1, total_steps=10, end_lr_fraction=2.0)


def _flat(tree) -> dict:
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(tree))
  return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


@pytest.mark.parametrize("boxed", [False, True])
def test_frozen_parameters_never_move_and_do_not_count_in_the_clip(boxed):
  frozen = ("embed", "layer_0/mlp/wi")
  params = _params(boxed)
  grads = jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params)
  kw = dict(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=1.0)
  tx, _ = optim.make_optimizer(freeze=("embed", "mlp/wi"), **kw)
  updates = _flat(tx.update(grads, tx.init(params), params)[0])
  for name, value in updates.items():
    assert np.any(value) != name.startswith(frozen), name
  # The clip sees only the trained gradients: the same updates as training them alone.
  plain, _ = optim.make_optimizer(**kw)
  zeroed = jax.tree_util.tree_map_with_path(
    lambda path, g: g * 0 if "/".join(str(k.key) for k in path).startswith(frozen) else g,
    nn.meta.unbox(grads),
  )
  unboxed = nn.meta.unbox(params)
  reference = _flat(plain.update(zeroed, plain.init(unboxed), unboxed)[0])
  for name, value in updates.items():
    if not name.startswith(frozen):
      np.testing.assert_allclose(value, reference[name], rtol=1e-6)


def test_a_freeze_pattern_that_matches_nothing_is_one_line():
  tx, _ = optim.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, freeze=("embd",))
  with pytest.raises(optim.UserError, match="'embd' matches no parameter .*embed/embedding"):
    tx.init(_params())
  tx, _ = optim.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, freeze=("(",))
  with pytest.raises(optim.UserError, match="not a regular expression"):
    tx.init(_params())


@pytest.mark.parametrize("freeze", [(0,), ("",), 7])
def test_freeze_entries_that_are_not_patterns_are_one_line(freeze):
  with pytest.raises(UserError, match="optim.freeze"):
    tx, _ = optim.make_optimizer(learning_rate=0.1, warmup_steps=0, total_steps=10, freeze=freeze)
    tx.init({"embed": jnp.zeros(2)})
