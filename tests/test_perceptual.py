import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.perceptual import (
  feature_maps,
  load_feature_weights,
  perceptual_distance,
  perceptual_loss,
  random_feature_weights,
  save_feature_weights,
)


def rng_key(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU: eager param init dominates here.
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = tmp_path_factory.mktemp("perceptual") / "feat.npz"
  save_feature_weights(str(path), random_feature_weights(0, stage_channels=(8, 16, 16)))
  return load_feature_weights(str(path))


def _images(seed, b=2, size=16):
  return jax.random.uniform(rng_key(seed), (b, size, size, 3), minval=-1.0, maxval=1.0)


def test_feature_map_shapes(weights):
  maps = feature_maps(weights, _images(0))
  assert [m.shape for m in maps] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 16)]
  assert all(m.dtype == jnp.float32 for m in maps)


def test_zero_for_identical_positive_otherwise_and_symmetric(weights):
  x, y = _images(0), _images(1)
  assert float(perceptual_loss(weights, x, x)) == 0.0
  d_xy = perceptual_distance(weights, x, y)
  assert d_xy.shape == (2,) and (np.asarray(d_xy) > 0).all()
  np.testing.assert_allclose(perceptual_distance(weights, y, x), d_xy, rtol=1e-5)
  # A small change is closer than an unrelated image.
  near = perceptual_distance(weights, x, x + 0.05 * (y - x))
  assert (np.asarray(near) < np.asarray(d_xy)).all()


def test_lin_weights_scale_each_stage(weights):
  x, y = _images(0), _images(1)
  base = perceptual_distance(weights, x, y)
  doubled = dict(weights)
  for s, c in enumerate((8, 16, 16)):
    doubled[f"lin{s}"] = 2.0 * jnp.ones((c,))
  np.testing.assert_allclose(perceptual_distance(doubled, x, y), 2.0 * base, rtol=1e-5)


def test_gradients_are_finite_even_for_flat_images(weights):
  flat = jnp.full((1, 16, 16, 3), -1.0)
  grad = jax.grad(lambda a: perceptual_loss(weights, a, flat))(flat + 0.01)
  assert np.isfinite(np.asarray(grad)).all()


def test_missing_file_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match="perceptual_weights_path") as err:
    load_feature_weights(str(tmp_path / "nope.npz"))
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="perceptual_weights_path"):
    load_feature_weights("")


def test_malformed_archive_rejected(tmp_path):
  w = random_feature_weights(0, stage_channels=(4,))
  del w["stage0.conv1.bias"]
  np.savez(tmp_path / "bad.npz", **w)
  with pytest.raises(ValueError, match="stage0.conv1.bias"):
    load_feature_weights(str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "empty.npz", other=np.zeros(3))
  with pytest.raises(ValueError, match="stage"):
    load_feature_weights(str(tmp_path / "empty.npz"))
