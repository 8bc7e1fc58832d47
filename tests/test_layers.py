import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn import layers


def _names(variables):
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return [b.names for b in boxes]


def test_dense_contracts_trailing_dims_with_named_kernel():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  dense = layers.Dense(6, axes=("heads", "head_dim", "embed"), in_dims=2)
  variables = dense.init(jax.random.key(1), x)
  assert _names(variables) == [("heads", "head_dim", "embed")]
  kernel = nn.meta.unbox(variables)["params"]["kernel"]
  assert kernel.shape == (3, 4, 6)
  y = dense.apply(variables, x)
  np.testing.assert_allclose(y, jnp.einsum("bshd,hde->bse", x, kernel), rtol=1e-5, atol=1e-5)


def test_dense_multi_output_features_and_bias():
  x = jnp.ones((2, 3, 8))
  dense = layers.Dense((2, 4), axes=("embed", "heads", "head_dim"), use_bias=True)
  variables = dense.init(jax.random.key(0), x)
  params = nn.meta.unbox(variables)["params"]
  assert params["kernel"].shape == (8, 2, 4) and params["bias"].shape == (2, 4)
  assert dense.apply(variables, x).shape == (2, 3, 2, 4)
  assert ("heads", "head_dim") in _names(variables)


def test_dense_rejects_wrong_number_of_axis_names():
  with pytest.raises(ValueError, match="must name all 3 kernel dimensions"):
    layers.Dense(4, axes=("embed", "mlp"), in_dims=2).init(jax.random.key(0), jnp.ones((2, 3, 5)))
  with pytest.raises(ValueError, match="axes"):
    layers.Dense(4, axes=("embed",)).init(jax.random.key(0), jnp.ones((2, 5)))


def test_dense_compute_dtype():
  dense = layers.Dense(4, axes=("embed", "mlp"), dtype=jnp.bfloat16)
  variables = dense.init(jax.random.key(0), jnp.ones((2, 8)))
  assert nn.meta.unbox(variables)["params"]["kernel"].dtype == jnp.float32
  assert dense.apply(variables, jnp.ones((2, 8))).dtype == jnp.bfloat16


def test_embed_lookup_and_attend():
  embed = layers.Embed(num_embeddings=10, features=4)
  ids = jnp.array([[1, 2, 9]])
  variables = embed.init(jax.random.key(0), ids)
  assert _names(variables) == [("vocab", "embed")]
  table = nn.meta.unbox(variables)["params"]["embedding"]
  np.testing.assert_array_equal(embed.apply(variables, ids), table[ids])
  x = jax.random.normal(jax.random.key(1), (1, 3, 4))
  logits = embed.apply(variables, x, method=embed.attend)
  assert logits.shape == (1, 3, 10) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-6)


def test_rmsnorm_computes_in_float32_and_returns_dtype():
  x = (jax.random.normal(jax.random.key(0), (2, 3, 16)) * 100).astype(jnp.bfloat16)
  norm = layers.RMSNorm(eps=1e-6, dtype=jnp.bfloat16)
  variables = norm.init(jax.random.key(1), x)
  assert _names(variables) == [("norm",)]
  y = norm.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  x32 = x.astype(jnp.float32)
  ref = x32 / jnp.sqrt(jnp.mean(x32**2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y.astype(jnp.float32) ** 2, -1)), 1.0, rtol=2e-2)


def test_swiglu_mlp_matches_formula():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  mlp = layers.MLP(mlp_dim=12)
  variables = mlp.init(jax.random.key(1), x)
  assert sorted(_names(variables)) == sorted([("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed")])
  p = nn.meta.unbox(variables)["params"]
  ref = (nn.silu(x @ p["wi_gate"]["kernel"]) * (x @ p["wi_up"]["kernel"])) @ p["wo"]["kernel"]
  np.testing.assert_allclose(mlp.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


def _rotated_dot(q, k, sin_q, cos_q, sin_k, cos_k):
  rq = layers.apply_rope(q[None, None, None], sin_q[None, None], cos_q[None, None])
  rk = layers.apply_rope(k[None, None, None], sin_k[None, None], cos_k[None, None])
  return float(jnp.sum(rq * rk))


def test_rope_1d_is_relative_and_norm_preserving():
  q, k = jax.random.normal(jax.random.key(0), (2, 16))
  pos = jnp.array([[3, 7, 103, 107]])
  sin, cos = layers.rope_1d(pos, 16)
  assert sin.shape == (1, 4, 8)
  d1 = _rotated_dot(q, k, sin[0, 0], cos[0, 0], sin[0, 1], cos[0, 1])
  d2 = _rotated_dot(q, k, sin[0, 2], cos[0, 2], sin[0, 3], cos[0, 3])
  assert abs(d1 - d2) < 1e-3
  x = jax.random.normal(jax.random.key(1), (1, 4, 2, 16))
  y = layers.apply_rope(x, sin, cos)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(layers.apply_rope(x, *layers.rope_1d(jnp.zeros((1, 4)), 16)), x)


def test_rope_2d_shapes_and_relative_in_both_axes():
  rows = jnp.array([[0, 0, 1, 5]])
  cols = jnp.array([[0, 2, 3, 9]])
  sin, cos = layers.rope_2d(rows, cols, 16)
  assert sin.shape == cos.shape == (1, 4, 8)
  # First half of the pairs turns with the row, the second half with the column.
  np.testing.assert_allclose(sin[0, 1, :4], 0.0, atol=1e-7)
  assert float(jnp.abs(sin[0, 1, 4:]).max()) > 0.1
  q, k = jax.random.normal(jax.random.key(0), (2, 16))
  r, c = jnp.array([[2, 4, 12, 14]]), jnp.array([[1, 7, 31, 37]])
  s2, c2 = layers.rope_2d(r, c, 16)
  d1 = _rotated_dot(q, k, s2[0, 0], c2[0, 0], s2[0, 1], c2[0, 1])
  d2 = _rotated_dot(q, k, s2[0, 2], c2[0, 2], s2[0, 3], c2[0, 3])
  assert abs(d1 - d2) < 1e-3
  # A different (row, col) offset with the same total distance changes the score.
  r3, c3 = jnp.array([[0, 4]]), jnp.array([[0, 0]])
  s3, co3 = layers.rope_2d(r3, c3, 16)
  r4, c4 = jnp.array([[0, 0]]), jnp.array([[0, 4]])
  s4, co4 = layers.rope_2d(r4, c4, 16)
  assert (
    abs(
      _rotated_dot(q, k, s3[0, 0], co3[0, 0], s3[0, 1], co3[0, 1])
      - _rotated_dot(q, k, s4[0, 0], co4[0, 0], s4[0, 1], co4[0, 1])
    )
    > 1e-3
  )
  with pytest.raises(ValueError, match="divisible by 4"):
    layers.rope_2d(rows, cols, 10)
  with pytest.raises(ValueError, match="even head_dim"):
    layers.rope_1d(rows, 7)


def test_image_run_index():
  is_image = jnp.array([[0, 1, 1, 1, 0, 1, 1]], bool)
  np.testing.assert_array_equal(layers.image_run_index(is_image), [[0, 1, 2, 3, 0, 1, 2]])
  starts = jnp.array([[1, 0, 0, 1, 0, 0, 0]], bool)
  np.testing.assert_array_equal(
    layers.image_run_index(is_image, starts=starts), [[0, 1, 2, 1, 0, 1, 2]]
  )
  chunk = jnp.array([[1, 1, 0, 1]], bool)
  np.testing.assert_array_equal(
    layers.image_run_index(chunk, previous=jnp.array([5])), [[6, 7, 0, 1]]
  )


def test_image_rows_cols():
  # Text at 0..1, a 2x3 image at 2..7, text at 8.
  positions = jnp.arange(9)[None]
  run = jnp.array([[0, 0, 1, 2, 3, 4, 5, 6, 0]])
  rows, cols = layers.image_rows_cols(positions, run, (2, 3))
  np.testing.assert_array_equal(rows, [[0, 1, 2, 2, 2, 3, 3, 3, 8]])
  np.testing.assert_array_equal(cols, [[0, 1, 2, 3, 4, 2, 3, 4, 8]])
  # A second image right after the first (run continues) restarts its grid.
  run2 = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  rows2, cols2 = layers.image_rows_cols(jnp.arange(8)[None], run2, (2, 3))
  np.testing.assert_array_equal(rows2, [[0, 0, 0, 1, 1, 1, 6, 6]])
  np.testing.assert_array_equal(cols2, [[0, 1, 2, 0, 1, 2, 6, 7]])
