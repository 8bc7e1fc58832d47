"""A tiny regression task: exercises the shared training loop (tests, the soak benchmark)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqlm.train.state import TrainState


class ToyModel(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
      (x.shape[-1], self.width),
    )
    out = self.param(
      "out",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
      (self.width, 1),
    )
    return jnp.tanh(x @ kernel) @ out


class ToyTask:
  """Fits y = sum(x) with a two-layer net; batch {"x": [B, 4], "y": [B, 1]}."""

  def __init__(self, learning_rate=0.05, width=8):
    self.model = ToyModel(width=width)
    self.tx = optax.adam(learning_rate)

  def init(self, rng, batch):
    params = self.model.init(rng, batch["x"])["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(nn.meta.unbox(params)),
      extra={},
    )

  def train_step(self, state, batch, rng):
    noise = 1e-3 * jax.random.normal(rng, batch["y"].shape)

    def loss_fn(params):
      pred = self.model.apply({"params": params}, batch["x"])
      return jnp.mean((pred - batch["y"] - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state), {
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
    }


class ToySource:
  """Random-access regression data: x ~ N(0, 1) seeded by index, y = sum(x)."""

  def __init__(self, n=256):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    x = np.random.default_rng(i).normal(size=4).astype(np.float32)
    return {"x": x, "y": np.asarray([x.sum()], np.float32)}


def identity_transform(index, example):
  del index
  return dict(example)
