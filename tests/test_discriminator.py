import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss


def rng_key(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU: eager param init dominates here.
  return jax.random.key(seed, impl="rbg")


@pytest.mark.parametrize("num_layers,size,grid", [(1, 16, 8), (2, 16, 4), (3, 32, 4), (3, 16, 2)])
def test_patch_logits_shape(num_layers, size, grid):
  disc = NLayerDiscriminator(channels=8, num_layers=num_layers)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(disc.init, rng_key(0), x)
  logits = jax.eval_shape(disc.apply, variables, x)
  assert logits.shape == (2, grid, grid, 1) and logits.dtype == jnp.float32


def test_channel_widths_double_and_cap_at_8x():
  disc = NLayerDiscriminator(channels=4, num_layers=5, norm="none")
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(disc.init, rng_key(0), x)["params"]
  widths = [params[f"conv{i}"]["kernel"].shape[-1] for i in range(6)]
  assert widths == [4, 8, 16, 32, 32, 32]
  assert not any(k.endswith("_norm") for k in params)


def test_bf16_logits_are_float32():
  disc = NLayerDiscriminator(channels=8, num_layers=2, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((3, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(disc.init, rng_key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert jax.eval_shape(disc.apply, variables, x).dtype == jnp.float32


def test_forward_is_finite_and_per_image():
  disc = NLayerDiscriminator(channels=8, num_layers=2)
  x = jax.random.uniform(rng_key(1), (3, 16, 16, 3), minval=-1, maxval=1)
  variables = disc.init(rng_key(0), x)
  logits = disc.apply(variables, x)
  assert np.isfinite(np.asarray(logits)).all()
  # GroupNorm has no batch coupling: one image alone gives the same logits.
  np.testing.assert_allclose(disc.apply(variables, x[:1]), logits[:1], atol=1e-5)


def test_unknown_norm_rejected():
  with pytest.raises(ValueError, match="norm"):
    NLayerDiscriminator(norm="batch").init(rng_key(0), jnp.zeros((1, 16, 16, 3)))


def test_hinge_losses_closed_form():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1.
  assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 1.0))
  assert float(hinge_g_loss(fake)) == pytest.approx(1 / 3)
  confident = hinge_d_loss(jnp.full((4,), 1.5), jnp.full((4,), -3.0))
  assert float(confident) == 0.0
  assert hinge_d_loss(real.astype(jnp.bfloat16), fake).dtype == jnp.float32
  assert hinge_g_loss(fake.astype(jnp.bfloat16)).dtype == jnp.float32
