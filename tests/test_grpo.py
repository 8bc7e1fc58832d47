"""GRPOTask: on a toy problem (reward: the first image code is 3) its steps raise the rewarded
code's probability; the KL term is 0 while the policy is the reference; metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.train import preference as pref
from vqlm.train.grpo import GRPOTask

V, OFF, K, REWARDED = 48, 32, 16, 3
MODEL = dict(
  vocab_size=V,
  dim=16,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  mlp_dim=32,
  image_offset=OFF,
  image_size=K,
)
PROMPT = [1, 2, 3, 4, 5]


def group_batch() -> dict[str, jnp.ndarray]:
  """One group holding every code once as the reply to PROMPT (the expected policy gradient of
  a uniform sampler); weight on the code only; reward 1 for code REWARDED."""
  seqs = np.array([PROMPT + [OFF + c, 6] for c in range(K)], np.int32)
  n = seqs.shape[1] - 1
  weights = np.zeros((K, n), np.float32)
  weights[:, len(PROMPT) - 1] = 1.0  # the target at this position is the code
  rewards = (np.arange(K) == REWARDED).astype(np.float32)
  batch = {
    "tokens": seqs[:, :-1],
    "targets": seqs[:, 1:],
    "loss_weights": weights,
    "segment_ids": np.ones((K, n), np.int32),
    "positions": np.tile(np.arange(n, dtype=np.int32), (K, 1)),
    "advantages": np.asarray(pref.group_advantages(rewards[None])).reshape(-1),
    "rewards": rewards,
    "reward_color": np.full(K, 0.25, np.float32),
  }
  return {k: jnp.asarray(v) for k, v in batch.items()}


def code_prob(task, params, batch) -> jax.Array:
  logits = task._forward({"params": params}, batch)
  return jax.nn.softmax(logits[0, len(PROMPT) - 1].astype(jnp.float32))[OFF + REWARDED]


@pytest.fixture(scope="module")
def trained():
  task = GRPOTask(
    model=Transformer(TransformerConfig(**MODEL)),
    optimizer=optax.sgd(0.1),  # plain SGD: the smallest step to compile
    image_offset=OFF,
    image_size=K,
    kl_coef=0.04,
  )
  batch = group_batch()
  state = jax.jit(task.init)(jax.random.key(0), batch)
  reference = jax.tree.map(np.asarray, state.extra["reference"])
  prob = jax.jit(lambda params: code_prob(task, params, batch))
  probs, metrics = [float(prob(state.params))], []
  step = jax.jit(task.train_step, donate_argnums=0)
  for i in range(10):
    state, m = step(state, batch, jax.random.key(i))
    metrics.append(jax.tree.map(float, m))
    probs.append(float(prob(state.params)))
  kept = jax.tree.map(np.asarray, state.extra["reference"])
  # The tuned state with its reference as the policy again (same shapes: no new compile).
  again = state.replace(params=jax.tree.map(jnp.copy, state.extra["reference"]))
  after = step(again, batch, jax.random.key(0))[1]
  metrics.append(jax.tree.map(float, after))
  return kept, reference, probs, metrics


def test_steps_raise_the_rewarded_codes_probability(trained):
  _, _, probs, _ = trained
  assert probs[-1] > 3 * probs[0], probs
  assert all(b > a for a, b in zip(probs, probs[1:])), probs


def test_kl_is_zero_while_the_policy_is_the_reference(trained):
  _, reference, _, metrics = trained
  first, last, again = metrics[0], metrics[-2], metrics[-1]
  assert first["kl"] == 0.0 and first["clip_frac"] == 0.0 and first["ratio"] == 1.0
  # The old log-probs are the policy's own: the surrogate's value is mean(A) = 0 in a group.
  assert abs(first["loss"]) < 1e-6
  assert last["kl"] > 0
  assert again["kl"] == 0.0  # the reference as the policy again


def test_the_reference_never_moves(trained):
  kept, reference, _, _ = trained
  same = jax.tree.map(np.array_equal, reference, kept)
  assert all(jax.tree.leaves(same))


def test_metrics(trained):
  _, _, _, metrics = trained
  m = metrics[0]
  assert m["reward"] == pytest.approx(1 / K) and m["reward_color"] == pytest.approx(0.25)
  assert m["num_tokens"] == K and m["grad_norm"] > 0
  assert m["advantage_abs"] == pytest.approx(
    float(np.mean(np.abs(pref.group_advantages(np.eye(K)[REWARDED][None])))), rel=1e-5
  )


def test_bad_settings_are_one_line():
  model = Transformer(TransformerConfig(**MODEL))
  kw = dict(model=model, optimizer=optax.sgd(0.1), image_offset=OFF, image_size=K)
  with pytest.raises(UserError, match="kl_coef"):
    GRPOTask(kl_coef=-1, **kw)
  with pytest.raises(UserError, match="clip_eps"):
    GRPOTask(clip_eps=0, **kw)
