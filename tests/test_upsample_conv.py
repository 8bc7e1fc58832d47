"""UpsampleConv against up-sampling + flax's nn.Conv: the same parameters, outputs, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.upsample_conv import UpsampleConv, parity_kernels

RTOL, ATOL = 1e-4, 1e-4


def _up(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=RTOL, atol=ATOL), a, b)


@pytest.mark.parametrize("shape,use_bias", [((2, 6, 7, 4), True), ((1, 3, 5, 2), False)])
def test_equals_upsampling_then_flax_conv(shape, use_bias):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  ref = nn.Conv(5, (3, 3), padding="SAME", use_bias=use_bias)
  ours = UpsampleConv(5, use_bias=use_bias)
  ref_params = ref.init(jax.random.key(3), _up(x))
  # The same names, shapes and initial values: checkpoints of either read with the other.
  _close(ref_params, ours.init(jax.random.key(3), x))
  params = jax.tree.map(
    lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape), ref_params
  )
  out = ours.apply(params, x)
  assert out.shape == (shape[0], 2 * shape[1], 2 * shape[2], 5)
  _close(out, ref.apply(params, _up(x)))
  target = jax.random.normal(jax.random.key(9), out.shape)

  def grads(fn):
    return jax.grad(lambda p, v: jnp.sum((fn(p, v) - target) ** 2), argnums=(0, 1))(params, x)

  _close(grads(ours.apply), grads(lambda p, v: ref.apply(p, _up(v))))


def test_parity_kernels_fold_the_taps():
  k = jnp.arange(9.0).reshape(3, 3, 1, 1)  # rows [0 1 2], [3 4 5], [6 7 8]
  p = parity_kernels(k)[:, :, 0, :]  # [2, 2, 4 parities]
  # Parity (0, 0): rows (-1: k0, 0: k1 + k2), columns likewise.
  np.testing.assert_array_equal(p[..., 0], [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]])
  # Parity (1, 1): rows (0: k0 + k1, +1: k2), columns (0: c0 + c1, +1: c2).
  np.testing.assert_array_equal(p[..., 3], [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]])
