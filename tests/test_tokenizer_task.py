import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqlm.nn.discriminator import hinge_g_loss
from vqlm.nn.perceptual import random_feature_weights, save_feature_weights
from vqlm.train.tokenizer_task import TokenizerTask, loss_config, psnr


def rng_key(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU: eager param init dominates here.
  return jax.random.key(seed, impl="rbg")


TINY = {"channels": 8, "channel_multipliers": (1, 2), "num_res_blocks": 0, "latent_dim": 4}


def _blobs(n, size, seed=0):
  """Flat background with two coloured rectangles per image, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  images = np.full((n, size, size, 3), -0.8, np.float32)
  for i in range(n):
    for _ in range(2):
      y, x = rng.integers(0, size - 4, 2)
      h, w = rng.integers(3, 8, 2)
      images[i, y : y + h, x : x + w] = rng.uniform(-1, 1, 3)
  return jnp.asarray(images)


def _changed(a, b):
  return any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check_step(task, images, expect_keys=(), step=None):
  state = task.init(rng_key(0), {"image": images})
  step = step or jax.jit(task.train_step)
  new, metrics = step(state, {"image": images}, rng_key(1))
  # The step increments `step` itself (the shared loop's guard also sets it).
  assert int(new.step) == 1
  assert _changed(new.params, state.params)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  for key in ("loss", "recon_loss", "psnr", "grad_norm", "bottleneck_loss", *expect_keys):
    assert metrics[key].shape == () and metrics[key].dtype == jnp.float32, key
    assert np.isfinite(float(metrics[key])), key
  return state, new, metrics


@pytest.fixture(scope="module")
def vq_run():
  """The VQ tokenizer (codebook loss, l2 codes, k-means init, restarts) trained 100 steps."""
  images = _blobs(16, 16)
  task = TokenizerTask(
    model_kwargs={
      "encoder": {"channels": 8, "channel_multipliers": (1, 2), "latent_dim": 8},
      "bottleneck": {
        "kind": "vq",
        "codebook_size": 64,
        "code_dim": 4,
        "l2_normalize": True,
        "kmeans_init": True,
        "restart_after": 20,
      },
    },
    loss={"recon": "l2"},
    optimizer=optax.adam(3e-3),
  )
  start = time.monotonic()
  state0 = task.init(rng_key(0), images)
  step = jax.jit(task.train_step, donate_argnums=0)
  state = jax.tree.map(jnp.copy, state0)
  history = []
  for i in range(100):
    state, metrics = step(state, {"image": images}, rng_key(i))
    history.append(jax.device_get(metrics))
  return dict(
    task=task,
    images=images,
    state0=state0,
    state=state,
    history=history,
    step=step,
    seconds=time.monotonic() - start,
  )


def test_vq_overfits_tiny_set(vq_run):
  losses = [float(m["recon_loss"]) for m in vq_run["history"]]
  assert losses[-1] < 0.5 * losses[0], losses[::10]
  assert float(vq_run["history"][-1]["psnr"]) > float(vq_run["history"][0]["psnr"]) + 3
  assert vq_run["step"]._cache_size() == 1  # One compiled program for every step.
  assert vq_run["seconds"] < 60


def test_vq_step_metrics_and_state(vq_run):
  first = vq_run["history"][0]
  for key in (
    "loss",
    "recon_loss",
    "psnr",
    "grad_norm",
    "usage",
    "perplexity",
    "dead_codes",
    "commitment",
    "codebook",
    "bottleneck_loss",
  ):
    assert np.isfinite(first[key]), key
  assert first["grad_norm"] > 0 and 0 < first["usage"] <= 1
  state, state0 = vq_run["state"], vq_run["state0"]
  assert int(state.step) == 100 and _changed(state.params, state0.params)
  stats = state.extra["batch_stats"]["quantizer"]
  assert bool(stats["initialized"]) and not bool(
    state0.extra["batch_stats"]["quantizer"]["initialized"]
  )


def test_eval_step_and_reconstruct_do_not_change_state(vq_run):
  task, state, images = vq_run["task"], vq_run["state"], vq_run["images"]
  before = jax.tree.map(np.asarray, state)
  out = jax.jit(task.eval_step)(state, {"image": images})
  assert out["codes"].shape == (16, 8, 8) and out["codes"].dtype == jnp.int32
  assert out["recon"].shape == images.shape
  assert float(out["psnr"]) == pytest.approx(float(psnr(out["recon"], images)), rel=1e-5)
  np.testing.assert_allclose(
    task.reconstruct(state.params, state.extra, images), out["recon"], atol=1e-5
  )
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)


# The identity bottleneck's step is covered by the GAN test below.
@pytest.mark.parametrize(
  "bottleneck,keys",
  [
    ({"kind": "gaussian"}, ("kl",)),
    ({"kind": "fsq", "levels": (4, 3)}, ("usage", "perplexity", "dead_codes")),
    (
      {"kind": "vq", "codebook_size": 16, "ema_decay": 0.9, "kmeans_init": True},
      ("usage", "perplexity", "dead_codes", "commitment"),
    ),
  ],
)
def test_one_step_per_bottleneck(bottleneck, keys):
  task = TokenizerTask(
    model_kwargs={"encoder": TINY, "bottleneck": bottleneck},
    loss={"recon": "l1"},
    optimizer=optax.adam(1e-3),
  )
  state, new, _ = _check_step(task, _blobs(2, 8), keys)
  if bottleneck.get("ema_decay"):
    assert _changed(new.extra["batch_stats"], state.extra["batch_stats"])


def test_gan_with_perceptual_and_adaptive_weight(tmp_path):
  path = str(tmp_path / "feat.npz")
  save_feature_weights(path, random_feature_weights(0, stage_channels=(4, 8)))
  task = TokenizerTask(
    model_kwargs={"encoder": TINY, "bottleneck": {"kind": "identity"}},
    loss={
      "gan_weight": 0.5,
      "disc_start": 1,
      "perceptual_weight": 0.3,
      "perceptual_weights_path": path,
      "disc": {"channels": 4, "num_layers": 2},
    },
    optimizer=optax.adam(1e-3),
    disc_optimizer=optax.adam(1e-3),
  )
  images = _blobs(2, 8)
  batch = {"image": images}
  step = jax.jit(task.train_step)
  state0, state1, m0 = _check_step(
    task,
    images,
    ("perceptual_loss", "g_loss", "d_loss", "d_weight", "logits_real", "logits_fake"),
    step,
  )
  # Before disc_start: the discriminator is frozen and the G term is off.
  assert float(m0["disc_active"]) == 0.0
  assert not _changed(state1.extra["disc_params"], state0.extra["disc_params"])
  assert float(m0["loss"]) == pytest.approx(
    float(m0["recon_loss"] + 0.3 * m0["perceptual_loss"]), rel=1e-5
  )
  state2, m1 = step(state1, batch, rng_key(2))
  assert step._cache_size() == 1
  assert float(m1["disc_active"]) == 1.0
  assert _changed(state2.extra["disc_params"], state1.extra["disc_params"])
  assert _changed(state2.params, state1.params)

  # The adaptive weight is |d nll / dW| / (|d g / dW| + 1e-4) at the decoder's last conv.
  model, disc_params = task.model, state1.extra["disc_params"]

  def last_layer_grads(params):
    def losses(params):
      recon, _ = model.apply({"params": params, "batch_stats": {}}, images, train=True)
      nll, _ = task._nll(recon, images)
      return nll, hinge_g_loss(task.disc.apply({"params": disc_params}, recon))

    g_nll = jax.grad(lambda p: losses(p)[0])(params)["dec"]["conv_out"]["kernel"]
    g_g = jax.grad(lambda p: losses(p)[1])(params)["dec"]["conv_out"]["kernel"]
    return jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + 1e-4)

  expected = float(jax.jit(last_layer_grads)(state1.params))
  assert float(m1["d_weight"]) == pytest.approx(expected, rel=1e-3)
  assert float(m1["loss"]) == pytest.approx(
    float(m1["recon_loss"] + 0.3 * m1["perceptual_loss"] + 0.5 * m1["d_weight"] * m1["g_loss"]),
    rel=1e-5,
  )


def test_loss_config_validation():
  with pytest.raises(ValueError, match="valid: recon, recon_weight"):
    loss_config({"recon_wieght": 1.0})
  with pytest.raises(ValueError, match="'l1' or 'l2'"):
    loss_config({"recon": "huber"})
  kwargs = {
    "model_kwargs": {"encoder": TINY, "bottleneck": {"kind": "identity"}},
    "optimizer": optax.sgd(0.1),
  }
  with pytest.raises(ValueError, match="disc_optimizer"):
    TokenizerTask(loss={"gan_weight": 0.1}, **kwargs)
  with pytest.raises(ValueError, match="--config.loss.perceptual_weights_path"):
    TokenizerTask(loss={"perceptual_weight": 1.0}, **kwargs)
