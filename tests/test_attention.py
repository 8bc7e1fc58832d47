from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn import attention, layers


@pytest.fixture(autouse=True)
def float32_matmuls_in_full():
  """The references here are float32; a GPU multiplies float32 in TF32 by default (about 1e-3
  relative error), so each test runs with full-precision matmuls (no change on a CPU)."""
  with jax.default_matmul_precision("highest"):
    yield


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
  cache = attention.init_kv_cache(2, 70, 1, 2)  # 70 positions: two key panels of 64 slots.
  k = jnp.arange(2 * 2 * 2, dtype=jnp.float32).reshape(2, 2, 1, 2) + 1
  new = attention.write_kv_cache(cache, k, -k, jnp.array([[0, 1], [63, 64]]))
  assert new["k"].shape == (2, 1, 2, 2, 64)  # [B, KVH, L / P, Dh, P]: keys in panels
  assert new["v"].shape == (2, 1, 128, 2)  # [B, KVH, L, Dh]
  # Slot-major keys: keys_slot_major undoes the panels.
  keys = np.asarray(attention.keys_slot_major(new["k"]))  # [B, L, KVH, Dh]
  np.testing.assert_array_equal(keys[0, :2, 0], k[0, :, 0])
  np.testing.assert_array_equal(keys[1, 63:65, 0], k[1, :, 0])
  np.testing.assert_array_equal(new["k"][1, 0, 0, :, 63], k[1, 0, 0])
  np.testing.assert_array_equal(new["k"][1, 0, 1, :, 0], k[1, 1, 0])
  np.testing.assert_array_equal(new["v"][1, 0, 63:65], -k[1, :, 0])
  assert float(np.abs(keys[0, 2:]).sum()) == float(np.abs(keys[1, :63]).sum()) == 0
  assert float(np.abs(keys[1, 65:]).sum()) == 0
  assert float(jnp.abs(new["v"][1, :, :63]).sum()) == 0


def test_grow_kv_cache_appends_zero_slots_and_keeps_the_written_ones():
  cache = attention.init_kv_cache(2, 10, 2, 4)
  assert cache["v"].shape[2] == attention.cache_slots(10) == attention.KEY_PANEL
  k = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
  written = attention.write_kv_cache(cache, k, 2 * k, jnp.array([[0, 1, 2], [5, 6, 7]]))
  grown = attention.grow_kv_cache(written, 100)  # Rounded up to whole panels: 128 slots.
  assert grown["k"].shape == (2, 2, 2, 4, 64) and grown["v"].shape == (2, 2, 128, 4)
  keys = attention.keys_slot_major(grown["k"])
  np.testing.assert_array_equal(keys[:, :64], attention.keys_slot_major(written["k"]))
  np.testing.assert_array_equal(grown["v"][:, :, :64], written["v"])
  assert float(jnp.abs(keys[:, 64:]).sum()) == float(jnp.abs(grown["v"][:, :, 64:]).sum()) == 0
  with pytest.raises(ValueError, match="below"):
    attention.grow_kv_cache(grown, 64)


def test_paneled_keys_give_the_logits_of_slot_major_keys():
  """The decode layout (keys in panels, a batched product per panel) against keys [B, K, T, Dh]:
  the same sums, so the same values."""
  b, s, n, kvh, dh, t = 3, 2, 4, 2, 8, 128
  q, k, v = (
    jax.random.normal(jax.random.key(i), shape)
    for i, shape in enumerate([(b, s, n, dh), (b, kvh, t, dh), (b, kvh, t, dh)])
  )
  mask = attention.make_decode_mask(jnp.array([[70, 71], [0, 1], [126, 127]]), t)
  panels = k.reshape(b, kvh, t // 64, 64, dh).transpose(0, 1, 2, 4, 3)
  got = attention.attend_head_major(q, panels, v, mask, keys_paneled=True)
  want = attention.attend_head_major(q, k, v, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


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
  slots = cache["v"].shape[2]  # 10 positions, rounded up to a whole key panel.
  # Prefill 4 tokens, then 2 single steps.
  out, cache = mod.apply(
    variables,
    x[:, :4],
    sin=sin[:, :4],
    cos=cos[:, :4],
    mask=attention.make_decode_mask(positions[:, :4], slots),
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
      mask=attention.make_decode_mask(positions[:, t : t + 1], slots),
      cache=cache,
      positions=positions[:, t : t + 1],
    )
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="positions"):
    mod.apply(variables, x, sin=sin, cos=cos, mask=None, cache=cache)


# -- implementations: "auto" resolution, "splash", accelerator-only checks --------------------

needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")
needs_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Splash)")


def test_auto_resolves_by_platform_dtype_and_head_dim():
  resolve = attention.resolve_implementation
  for platform in ("gpu", "cuda"):
    assert resolve("auto", jnp.bfloat16, platform=platform) == "cudnn"
    assert resolve("auto", jnp.float16, platform=platform, head_dim=64) == "cudnn"
    assert resolve("auto", jnp.float32, platform=platform) == "xla"
    assert resolve("auto", "bfloat16", platform=platform, head_dim=256) == "xla"
    assert resolve("auto", jnp.bfloat16, platform=platform, head_dim=60) == "xla"
  assert resolve("auto", jnp.bfloat16, platform="rocm") == "xla"
  for dtype in (jnp.float32, jnp.bfloat16):
    assert resolve("auto", dtype, platform="tpu") == "splash"
    assert resolve("auto", dtype, platform="cpu") == "xla"
  for name in ("xla", "cudnn", "splash"):  # Named kernels are taken as they are.
    assert resolve(name, jnp.float32, platform="tpu") == name
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    resolve("flash", jnp.float32)
  if jax.default_backend() == "cpu":  # The real backend, unmocked.
    assert resolve("auto", jnp.bfloat16) == "xla"


def _qkv(b=2, t=100, n=4, kvh=2, dh=16, dtype=jnp.float32, seed=3):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, n, dh), dtype)
  return (
    q,
    jax.random.normal(kk, (b, t, kvh, dh), dtype),
    jax.random.normal(kv, (b, t, kvh, dh), dtype),
  )


def test_splash_matches_xla_values_and_gradients_with_segments_gqa_and_padding():
  """Pallas interpret mode off TPU: T=100 is padded to 128, 4 query heads share 2 kv heads, and
  the rows hold two packed segments / a padding tail (segment 0)."""
  q, k, v = _qkv()
  seg = jnp.array([[1] * 40 + [2] * 60, [1] * 90 + [0] * 10])
  mask = attention.make_attention_mask(seg)
  g = jax.random.normal(jax.random.key(4), q.shape)

  @jax.jit
  def both(q, k, v):
    def loss(impl, q, k, v):
      out = attention.dot_product_attention(q, k, v, mask, implementation=impl, segment_ids=seg)
      return jnp.sum(out * g)

    return [
      jax.value_and_grad(partial(loss, i), argnums=(0, 1, 2))(q, k, v) for i in ("xla", "splash")
    ]

  ref, ours = both(q, k, v)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_splash_refuses_a_dense_mask_and_auto_falls_back_to_xla(monkeypatch):
  q, k, v = _qkv(b=1, t=6)
  mask = attention.make_decode_mask(jnp.broadcast_to(jnp.arange(6), (1, 6)), 6)
  with pytest.raises(ValueError, match="segment_ids"):
    attention.dot_product_attention(q, k, v, mask, implementation="splash")
  with pytest.raises(ValueError, match="self-attention"):
    attention.splash_attention(q, k[:, :3], v[:, :3])
  monkeypatch.setattr(attention, "backend_platform", lambda: "tpu")
  out = attention.dot_product_attention(q, k, v, mask, implementation="auto")
  np.testing.assert_allclose(out, attention.dot_product_attention(q, k, v, mask), atol=1e-6)


def _record(monkeypatch, platform):
  """Mocks the backend as `platform` and records which kernel runs (each computes with "xla")."""
  calls = []
  monkeypatch.setattr(attention, "backend_platform", lambda: platform)

  def fake_splash(q, k, v, segment_ids=None):
    calls.append("splash")
    mask = None if segment_ids is None else attention.make_attention_mask(segment_ids)
    return attention.dot_product_attention(q, k, v, mask)

  real = jax.nn.dot_product_attention

  def fake_sdpa(*args, implementation=None, **kw):
    calls.append(implementation)
    return real(*args, implementation="xla", **kw)

  monkeypatch.setattr(attention, "splash_attention", fake_splash)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_sdpa)
  return calls


def test_auto_picks_the_kernel_for_training_and_xla_for_cached_decoding(monkeypatch):
  x = jax.random.normal(jax.random.key(0), (2, 6, 16), jnp.bfloat16)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  sin, cos = layers.rope_1d(positions, 8)
  seg = jnp.array([[1, 1, 1, 2, 2, 2], [1] * 6])
  mask = attention.make_attention_mask(seg)
  mod = _module(dtype=jnp.bfloat16)
  assert mod.attention_impl == "auto"
  abstract = jax.eval_shape(partial(mod.init, sin=sin, cos=cos, mask=None), jax.random.key(1), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape, np.float32), abstract)
  cache = attention.init_kv_cache(2, 8, 2, 8, jnp.bfloat16)
  decode_mask = attention.make_decode_mask(positions, cache["v"].shape[2])
  decode = dict(mask=decode_mask, cache=cache, positions=positions)
  train = dict(mask=mask, segment_ids=seg)
  # A new function per call: traced afresh, under the platform mocked at that moment.
  apply = lambda m, run, **kw: run(lambda v, x: m.apply(v, x, sin=sin, cos=cos, **kw))(variables, x)
  trace = lambda f: partial(jax.eval_shape, f)
  for platform, kernel in (("tpu", "splash"), ("cuda", "cudnn"), ("rocm", None), ("cpu", None)):
    calls = _record(monkeypatch, platform)
    apply(mod, trace, **train)  # Traced only: the kernel is chosen then.
    assert calls == ([kernel] if kernel else []), platform
    calls.clear()
    apply(mod, trace, **decode)
    assert calls == [], platform  # Cached prefill / decode: "xla", whatever the platform.
  # The (faked) kernel gets the packing segments: the same values as "xla" with the dense mask.
  calls = _record(monkeypatch, "tpu")
  xla = _module(dtype=jnp.bfloat16, attention_impl="xla")
  ours, ref = (apply(m, jax.jit, **train)[0] for m in (mod, xla))
  assert calls == ["splash"]
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), atol=2e-2)


@pytest.mark.parametrize("platform", ["tpu", "cuda", "cpu"])
def test_attention_impl_leaves_the_parameter_tree_alone(monkeypatch, platform):
  from vqlm.nn.transformer import Transformer, TransformerConfig

  _record(monkeypatch, platform)  # cuDNN cannot even be traced without a GPU.
  base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
  tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  trees = []
  for impl in ("auto", "xla", "cudnn", "splash"):
    config = TransformerConfig(**base, attention_impl=impl, dtype="bfloat16", scan_layers=True)
    abstract = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)
    trees.append(jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(abstract)))
  assert all(t == trees[0] for t in trees[1:])
  assert TransformerConfig(**base).attention_impl == "auto"


def test_transformer_passes_segment_ids_to_the_kernel(monkeypatch):
  """Packed rows reach the kernel as segment_ids through the scanned blocks: with the backend
  mocked as a TPU, "auto" gives the same logits as "xla" (the kernel is faked with "xla" over
  the segments it is given; the real one is compared above)."""
  from vqlm.nn.transformer import Transformer, TransformerConfig

  calls = _record(monkeypatch, "tpu")
  base = dict(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 64)
  seg = jnp.array([[1] * 5 + [2] * 7, [1] * 10 + [0] * 2])
  positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None].repeat(2, 0)
  models = [
    Transformer(TransformerConfig(**base, attention_impl=impl, scan_layers=True))
    for impl in ("xla", "auto")
  ]
  abstract = nn.meta.unbox(jax.eval_shape(models[0].init, jax.random.key(1), tokens))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape, np.float32), abstract)
  ref, auto = (
    jax.jit(m.apply)(variables, tokens, positions=positions, segment_ids=seg)[0] for m in models
  )
  assert calls and set(calls) == {"splash"}
  np.testing.assert_allclose(auto, ref, rtol=1e-5, atol=1e-5)


# Accelerator-only checks: skipped here, run by a session on a GPU / TPU machine.


def _causal_and_packed(dtype, t):
  q, k, v = _qkv(b=2, t=t, n=8, kvh=4, dh=64, dtype=dtype)
  seg = jnp.concatenate(
    [jnp.ones((2, t // 2), jnp.int32), 2 * jnp.ones((2, t - t // 2), jnp.int32)], 1
  )
  return q, k, v, seg


def _check_kernel_against_xla(impl, dtype, t, tol):
  q, k, v, seg = _causal_and_packed(dtype, t)
  mask = attention.make_attention_mask(seg)
  g = jax.random.normal(jax.random.key(5), q.shape, dtype)
  for m, s in ((None, None), (mask, seg)):

    def loss(impl, q, k, v, m=m, s=s):
      out = attention.dot_product_attention(q, k, v, m, implementation=impl, segment_ids=s)
      return jnp.sum(out.astype(jnp.float32) * g)

    run = lambda i: jax.jit(jax.value_and_grad(partial(loss, i), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(run(impl)), jax.tree.leaves(run("xla"))):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), impl


@needs_gpu
def test_cudnn_matches_xla_on_gpu():
  _check_kernel_against_xla("cudnn", jnp.bfloat16, 256, 3e-2)
  assert attention.resolve_implementation("auto", jnp.bfloat16, head_dim=64) == "cudnn"


@needs_tpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-3), (jnp.bfloat16, 3e-2)])
def test_splash_matches_xla_on_tpu(dtype, tol):
  _check_kernel_against_xla("splash", dtype, 1024, tol)
  _check_kernel_against_xla("splash", dtype, 300, tol)  # Padded to 384.
  assert attention.resolve_implementation("auto", dtype) == "splash"


# -- QK-norm kinds and the Swin norm order (Chameleon) ------------------------------------------


def test_layernorm_qk_norm_has_per_head_scale_and_bias_and_matches_numpy():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  sin, cos = layers.rope_1d(jnp.broadcast_to(jnp.arange(5), (2, 5)), 8)
  mod = _module(qk_norm="layernorm")
  variables = nn.meta.unbox(mod.init(jax.random.key(1), x, sin=sin, cos=cos, mask=None))
  params = variables["params"]
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes["query_norm"] == {"scale": (4, 8), "bias": (4, 8)}
  assert shapes["key_norm"] == {"scale": (2, 8), "bias": (2, 8)}
  # Random per-head affine parameters, then the module against a NumPy reference of the layer.
  keys = iter(jax.random.split(jax.random.key(2), 4))
  for name in ("query_norm", "key_norm"):
    for p in ("scale", "bias"):
      params[name][p] = jax.random.normal(next(keys), params[name][p].shape)
  y, _ = mod.apply(variables, x, sin=sin, cos=cos, mask=None)

  def ln(h, scale, bias):  # [B, S, H, D]: statistics over D only, then per-head affine.
    h = np.asarray(h, np.float64)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + attention.QK_LAYERNORM_EPS) * scale + bias

  def rope(h):
    c, s = (np.concatenate([a, a], -1)[:, :, None] for a in (np.asarray(cos), np.asarray(sin)))
    return h * c + np.concatenate([-h[..., 4:], h[..., :4]], -1) * s

  xn = np.asarray(x, np.float64)
  proj = lambda name: np.einsum("bsd,dhk->bshk", xn, np.asarray(params[name]["kernel"]))
  q = rope(ln(proj("query"), *(np.asarray(params["query_norm"][p]) for p in ("scale", "bias"))))
  k = rope(ln(proj("key"), *(np.asarray(params["key_norm"][p]) for p in ("scale", "bias"))))
  v = proj("value")
  k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  logits = np.einsum("bshk,bthk->bhst", q, k) / np.sqrt(8)
  logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  out = np.einsum("bhst,bthk->bshk", w / w.sum(-1, keepdims=True), v)
  want = np.einsum("bshk,hkd->bsd", out, np.asarray(params["out"]["kernel"]))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_qk_norm_true_is_rms_and_bad_settings_name_the_valid_ones():
  x = jax.random.normal(jax.random.key(0), (1, 3, 16))
  sin, cos = layers.rope_1d(jnp.broadcast_to(jnp.arange(3), (1, 3)), 8)
  outs = []
  for setting in (True, "rms"):
    mod = _module(qk_norm=setting)
    variables = mod.init(jax.random.key(1), x, sin=sin, cos=cos, mask=None)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(variables["params"]["query_norm"])) == {
      "scale": (8,)
    }
    outs.append(mod.apply(variables, x, sin=sin, cos=cos, mask=None)[0])
  np.testing.assert_array_equal(outs[0], outs[1])
  assert attention.qk_norm_kind(False) is None and attention.qk_norm_kind(1) == "rms"
  with pytest.raises(ValueError, match="layernorm"):
    _module(qk_norm="ln").init(jax.random.key(1), x, sin=sin, cos=cos, mask=None)
  from vqlm.nn.transformer import TransformerConfig

  base = dict(vocab_size=16, dim=16, num_layers=1, num_heads=2, mlp_dim=32)
  assert TransformerConfig(**base, qk_norm="layernorm").qk_norm == "layernorm"
  with pytest.raises(ValueError, match="qk_norm="):
    TransformerConfig(**base, qk_norm="layer")


def test_swin_norm_moves_the_block_norms_after_the_sublayers():
  from vqlm.nn.transformer import Block

  x = jax.random.normal(jax.random.key(0), (2, 4, 16))
  sin, cos = layers.rope_1d(jnp.broadcast_to(jnp.arange(4), (2, 4)), 8)
  kw = dict(num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=24, attention_impl="xla")
  pre, swin = Block(**kw), Block(**kw, swin_norm=True)
  variables = pre.init(jax.random.key(1), x, None, sin, cos, None, None)
  assert jax.tree.map(jnp.shape, swin.init(jax.random.key(1), x, None, sin, cos, None, None)) == (
    jax.tree.map(jnp.shape, variables)
  )
  params = nn.meta.unbox(variables)["params"]
  params["attn_norm"]["scale"] = jnp.linspace(0.5, 1.5, 16)
  params["mlp_norm"]["scale"] = jnp.linspace(1.5, 0.5, 16)
  got, _ = swin.apply({"params": params}, x, None, sin, cos, None, None)
  bound = lambda mod, name: lambda h: mod.apply({"params": params[name]}, h)
  attn = attention.Attention(**{k: kw[k] for k in ("num_heads", "num_kv_heads", "head_dim")})
  rms = lambda name: bound(layers.RMSNorm(1e-6), name)
  h = x + rms("attn_norm")(
    attn.apply({"params": params["attn"]}, x, sin=sin, cos=cos, mask=None)[0]
  )
  want = h + rms("mlp_norm")(bound(layers.MLP(24), "mlp")(h))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  plain, _ = pre.apply({"params": params}, x, None, sin, cos, None, None)
  assert float(jnp.abs(plain - got).max()) > 1e-2
