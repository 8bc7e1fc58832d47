"""DPO and GRPO-style losses against NumPy, their gradients, a toy policy and a DPO train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.train import optim
from vqlm.train import preference as pref


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_sequence_logps_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(3, 5))
  weights = (rng.random((3, 5)) < 0.6).astype(np.float32)
  want = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0] * weights
  got = pref.sequence_logps(jnp.asarray(logits, jnp.bfloat16), targets, weights)
  assert got.dtype == jnp.float32 and got.shape == (3,)
  np.testing.assert_allclose(pref.sequence_logps(logits, targets, weights), want.sum(-1), rtol=1e-5)
  np.testing.assert_allclose(got, want.sum(-1), atol=0.3)  # bf16 logits, f32 arithmetic


def test_dpo_loss_matches_numpy_and_pushes_chosen_up():
  rng = np.random.default_rng(1)
  pc, pr, rc, rr = (rng.normal(size=6).astype(np.float32) * 4 - 20 for _ in range(4))
  beta = 0.3
  want = -np.mean(_np_log_sigmoid(beta * ((pc - rc) - (pr - rr))))
  got = jax.jit(pref.dpo_loss, static_argnums=4)(pc, pr, rc, rr, beta)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g_c, g_r, g_rc = jax.grad(pref.dpo_loss, argnums=(0, 1, 2))(pc, pr, rc, rr, beta)
  assert (g_c < 0).all() and (g_r > 0).all()  # descent raises chosen, lowers rejected
  np.testing.assert_array_equal(g_rc, 0)  # the reference is fixed
  np.testing.assert_allclose(pref.dpo_loss(pc, pr, pc, pr, beta), np.log(2), rtol=1e-6)


def test_group_advantages():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 5.0, 2.0]])
  want = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-6)
  got = pref.group_advantages(rewards)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_array_equal(got[1], 0)
  with pytest.raises(UserError, match="groups"):
    pref.group_advantages(rewards.reshape(-1))


def _np_grpo(logps, old, ref, adv, w, clip_eps, kl_coef):
  ratio = np.exp(logps - old)
  a = adv[:, None]
  surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a)
  r = ref - logps
  kl = np.exp(r) - r - 1
  return -((surrogate - kl_coef * kl) * w).sum() / w.sum()


def test_grpo_loss_matches_numpy_and_clips():
  rng = np.random.default_rng(2)
  logps = -rng.random((4, 6)).astype(np.float32) * 3
  old = logps + rng.normal(size=(4, 6)).astype(np.float32) * 0.3
  ref = logps + rng.normal(size=(4, 6)).astype(np.float32) * 0.3
  adv = rng.normal(size=4).astype(np.float32)
  w = (rng.random((4, 6)) < 0.7).astype(np.float32)
  loss, m = pref.grpo_loss(logps, old, ref, adv, w, clip_eps=0.2, kl_coef=0.1)
  np.testing.assert_allclose(loss, _np_grpo(logps, old, ref, adv, w, 0.2, 0.1), rtol=1e-5)
  assert 0 < m["clip_frac"] < 1 and m["kl"] > 0
  # A ratio above 1 + eps with a positive advantage is clipped: no gradient from the surrogate.
  g = jax.grad(
    lambda lp: pref.grpo_loss(lp, old * 0, old * 0, adv * 0 + 1, w * 0 + 1, kl_coef=0)[0]
  )
  grads = g(jnp.full((4, 6), 0.5))
  np.testing.assert_array_equal(grads, 0)
  grads = g(jnp.full((4, 6), 0.1))  # ratio 1.105: inside the clip range, pushed up
  assert (grads < 0).all()


def test_grpo_moves_a_toy_policy_toward_the_rewarded_action():
  k, n, rewarded = 4, 16, 2
  ref = jnp.zeros(k)

  @jax.jit
  def step(logits, key):
    actions = jax.random.categorical(key, logits, shape=(1, n))  # one group of n samples
    rewards = (actions == rewarded).astype(jnp.float32)
    adv = pref.group_advantages(rewards).reshape(-1)

    def loss_fn(lg):
      lp = jax.nn.log_softmax(lg)[actions.reshape(-1)][:, None]  # [n, 1]
      ref_lp = jax.nn.log_softmax(ref)[actions.reshape(-1)][:, None]
      old = jax.lax.stop_gradient(lp)
      return pref.grpo_loss(lp, old, ref_lp, adv, jnp.ones_like(lp), kl_coef=0.01)[0]

    return logits - 0.5 * jax.grad(loss_fn)(logits)

  logits = ref
  for i in range(60):
    logits = step(logits, jax.random.key(i))
  probs = jax.nn.softmax(logits)
  assert probs[rewarded] > 0.9, probs


V, OFF, K = 48, 32, 16
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


def _pair_batch():
  """One prompt (tokens 1..5) with a chosen and a rejected 3-token reply; weights on replies."""
  prompt = [1, 2, 3, 4, 5]
  rows = []
  for reply in ([10, 11, 12], [20, 21, 22]):
    seq = np.array(prompt + reply + [6], np.int32)
    w = np.array([0] * (len(prompt) - 1) + [1] * (len(reply) + 1), np.float32)
    n = len(seq) - 1
    rows.append(
      {
        "tokens": seq[:-1],
        "targets": seq[1:],
        "loss_weights": w,
        "segment_ids": np.ones(n, np.int32),
        "positions": np.arange(n, dtype=np.int32),
      }
    )
  return pref.pair_batch([rows[0]], [rows[1]])


def test_dpo_task_loss_falls_on_a_fixed_pair():
  tx, _ = optim.make_optimizer(learning_rate=3e-3, warmup_steps=0, total_steps=20)
  task = pref.DPOTask(
    model=Transformer(TransformerConfig(**MODEL)),
    optimizer=tx,
    beta=0.5,
    image_offset=OFF,
    image_size=K,
  )
  batch = {k: jnp.asarray(v) for k, v in _pair_batch().items()}
  assert batch["tokens"].shape == (2, 8)
  state = jax.jit(task.init)(jax.random.key(0), batch)
  reference = jax.tree.map(np.asarray, state.extra["reference"])
  step = jax.jit(task.train_step, donate_argnums=0)
  losses = []
  for i in range(20):
    state, m = step(state, batch, jax.random.key(i))
    losses.append(float(m["loss"]))
  assert abs(losses[0] - np.log(2)) < 1e-4  # policy == reference at the start
  assert losses[-1] < 0.5 * losses[0] and float(m["reward_acc"]) == 1.0, losses
  assert float(m["chosen_logps"]) > float(m["rejected_logps"])
  same = jax.tree.map(np.array_equal, reference, jax.tree.map(np.asarray, state.extra["reference"]))
  assert all(jax.tree.leaves(same))
  with pytest.raises(UserError, match="beta"):
    pref.DPOTask(model=task.model, optimizer=tx, beta=0, image_offset=OFF, image_size=K)
