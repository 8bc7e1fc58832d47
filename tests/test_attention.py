import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn import attention, layers


def test_make_attention_mask_is_causal_and_within_segments():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  mask = attention.make_attention_mask(seg)
  assert mask.shape == (1, 1, 5, 5) and mask.dtype == jnp.bool_
  expected = np.array(
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool
  )
  np.testing.assert_array_equal(mask[0, 0], expected)


def test_make_decode_mask_sees_slots_up_to_position():
  mask = attention.make_decode_mask(jnp.array([[2], [0]]), 4)
  assert mask.shape == (2, 1, 1, 4)
  np.testing.assert_array_equal(mask[:, 0, 0], [[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_xla_attention_matches_jax_reference(kv_heads):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 6, 4, 8))
  k = jax.random.normal(kk, (2, 6, kv_heads, 8))
  v = jax.random.normal(kv, (2, 6, kv_heads, 8))
  mask = attention.make_attention_mask(jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]]))
  ours = attention.dot_product_attention(q, k, v, mask)
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  causal = attention.dot_product_attention(q, k, v, None)
  ref_causal = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(causal, ref_causal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_query_chunks_give_the_same_values_and_gradients(chunks):
  kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(kq, (2, 13, 4, 8))
  k, v = jax.random.normal(kk, (2, 13, 2, 8)), jax.random.normal(kv, (2, 13, 2, 8))
  g = jax.random.normal(kg, (2, 13, 4, 8))
  seg = jnp.array([[1] * 5 + [2] * 8, [1] * 11 + [0] * 2])
  for mask in (None, attention.make_attention_mask(seg)):

    def loss(q, k, v, c, mask=mask):
      return jnp.sum(attention.dot_product_attention(q, k, v, mask, query_chunks=c) * g)

    ref = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 1)
    out = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, chunks)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_causal_attention_needs_as_many_keys_as_queries():
  q = jnp.ones((1, 3, 2, 4))
  with pytest.raises(ValueError, match="causal"):
    attention.dot_product_attention(q, jnp.ones((1, 5, 2, 4)), jnp.ones((1, 5, 2, 4)), None)


def test_attention_softmax_in_float32_for_bf16_inputs():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 5, 2, 8))
  out16 = attention.dot_product_attention(
    q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), None
  )
  assert out16.dtype == jnp.bfloat16
  out32 = attention.dot_product_attention(q, k, v, None)
  np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=5e-2)


def test_unknown_implementation_raises():
  q = jnp.ones((1, 2, 2, 4))
  with pytest.raises(ValueError, match="attention_impl"):
    attention.dot_product_attention(q, q, q, None, implementation="flash")
  with pytest.raises(ValueError, match="bfloat16"):
    attention.dot_product_attention(q, q, q, None, implementation="cudnn")


def test_write_kv_cache_scatters_per_row():
  cache = attention.init_kv_cache(2, 5, 1, 2)
  k = jnp.arange(2 * 2 * 2, dtype=jnp.float32).reshape(2, 2, 1, 2) + 1
  new = attention.write_kv_cache(cache, k, -k, jnp.array([[0, 1], [3, 4]]))
  assert new["k"].shape == (2, 1, 2, 5)  # [B, KVH, Dh, L]: keys transposed
  assert new["v"].shape == (2, 1, 5, 2)  # [B, KVH, L, Dh]
  np.testing.assert_array_equal(new["k"][0, 0, :, :2], k[0, :, 0].T)
  np.testing.assert_array_equal(new["k"][1, 0, :, 3:], k[1, :, 0].T)
  np.testing.assert_array_equal(new["v"][1, 0, 3:], -k[1, :, 0])
  assert float(jnp.abs(new["k"][0, :, :, 2:]).sum()) == 0
  assert float(jnp.abs(new["k"][1, :, :, :3]).sum()) == 0
  assert float(jnp.abs(new["v"][1, :, :3]).sum()) == 0


def _module(**kw):
  return attention.Attention(num_heads=4, num_kv_heads=2, head_dim=8, **kw)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_module_params_and_causality(qk_norm):
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  sin, cos = layers.rope_1d(jnp.broadcast_to(jnp.arange(6), (2, 6)), 8)
  mod = _module(qk_norm=qk_norm)
  variables = mod.init(jax.random.key(1), x, sin=sin, cos=cos, mask=None)
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"]))
  assert shapes["query"]["kernel"] == (16, 4, 8)
  assert shapes["key"]["kernel"] == shapes["value"]["kernel"] == (16, 2, 8)
  assert shapes["out"]["kernel"] == (4, 8, 16)
  assert ("query_norm" in shapes) == qk_norm
  y, cache = mod.apply(variables, x, sin=sin, cos=cos, mask=None)
  assert y.shape == x.shape and cache is None
  x2 = x.at[:, 4].set(7.0)
  y2, _ = mod.apply(variables, x2, sin=sin, cos=cos, mask=None)
  np.testing.assert_allclose(y2[:, :4], y[:, :4], rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(y2[:, 4:] - y[:, 4:]).max()) > 1e-3


def test_attention_with_cache_matches_full_attention():
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  sin, cos = layers.rope_1d(positions, 8)
  mod = _module()
  variables = mod.init(jax.random.key(1), x, sin=sin, cos=cos, mask=None)
  full, _ = mod.apply(variables, x, sin=sin, cos=cos, mask=None)
  cache = attention.init_kv_cache(2, 10, 2, 8)
  # Prefill 4 tokens, then 2 single steps.
  out, cache = mod.apply(
    variables,
    x[:, :4],
    sin=sin[:, :4],
    cos=cos[:, :4],
    mask=attention.make_decode_mask(positions[:, :4], 10),
    cache=cache,
    positions=positions[:, :4],
  )
  outs = [out]
  for t in (4, 5):
    out, cache = mod.apply(
      variables,
      x[:, t : t + 1],
      sin=sin[:, t : t + 1],
      cos=cos[:, t : t + 1],
      mask=attention.make_decode_mask(positions[:, t : t + 1], 10),
      cache=cache,
      positions=positions[:, t : t + 1],
    )
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="positions"):
    mod.apply(variables, x, sin=sin, cos=cos, mask=None, cache=cache)
