import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.bottlenecks import (
  FSQ,
  GaussianBottleneck,
  VectorQuantizer,
  code_statistics,
  kmeans,
  make_bottleneck,
)


def rng_key(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU: eager param init dominates here.
  return jax.random.key(seed, impl="rbg")


RNGS = {"sample": rng_key(11), "restart": rng_key(12)}


def _train(module, variables, z):
  """One training-mode call: ((z_q, aux), new variables)."""
  return module.apply(variables, z, train=True, rngs=RNGS, mutable=["batch_stats"])


def _with_stats(variables, **stats):
  out = {"params": variables.get("params", {}), "batch_stats": dict(variables["batch_stats"])}
  out["batch_stats"].update({k: jnp.asarray(v) for k, v in stats.items()})
  return out


def _clusters(n_per=16, seed=0, offset=0.0):
  """Four tight, far-apart 2-D clusters; returns (points [4n, 2], true means [4, 2])."""
  rng = np.random.default_rng(seed)
  centres = np.array([[10, 0], [0, 10], [-10, 0], [0, -10]], np.float32) + offset
  pts = np.concatenate([c + 0.1 * rng.normal(size=(n_per, 2)) for c in centres]).astype(np.float32)
  means = pts.reshape(4, n_per, 2).mean(axis=1)
  return pts, means


def _sorted_rows(a):
  a = np.asarray(a)
  return a[np.lexsort(a.T[::-1])]


# -- factory and shapes --------------------------------------------------------------------------


def test_factory_rejects_unknown_kind_listing_valid_ones():
  with pytest.raises(ValueError, match="identity, gaussian, vq, fsq"):
    make_bottleneck("vqvae")


@pytest.mark.parametrize(
  "kind,kwargs,out_dim,discrete",
  [
    ("identity", {}, 6, False),
    ("gaussian", {"latent_dim": 3}, 3, False),
    ("vq", {"codebook_size": 16, "latent_dim": 6, "code_dim": 4, "l2_normalize": True}, 6, True),
    ("vq", {"codebook_size": 16, "latent_dim": 6, "ema_decay": 0.9}, 6, True),
    ("fsq", {"levels": (4, 3), "latent_dim": 6}, 6, True),
  ],
)
def test_shapes_and_aux_of_every_kind(kind, kwargs, out_dim, discrete):
  module = make_bottleneck(kind, **kwargs)
  z = jax.ShapeDtypeStruct((2, 4, 5, 6), jnp.float32)
  variables = jax.eval_shape(lambda z: module.init(RNGS | {"params": rng_key(0)}, z), z)
  (z_q, aux), _ = jax.eval_shape(lambda v, z: _train(module, v, z), variables, z)
  assert z_q.shape == (2, 4, 5, out_dim)
  assert aux["loss"].shape == () and aux["loss"].dtype == jnp.float32
  if discrete:
    assert aux["indices"].shape == (2, 4, 5) and aux["indices"].dtype == jnp.int32
    for key in ("usage", "perplexity", "dead_codes"):
      assert aux[key].shape == () and aux[key].dtype == jnp.float32
  else:
    assert "indices" not in aux


def test_code_statistics_closed_form():
  counts, stats = code_statistics(jnp.array([[0, 0], [1, 3]]), 4)
  np.testing.assert_array_equal(counts, [2, 1, 0, 1])
  assert float(stats["usage"]) == pytest.approx(0.75)
  entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
  assert float(stats["perplexity"]) == pytest.approx(math.exp(entropy), rel=1e-5)


# -- Gaussian ------------------------------------------------------------------------------------


def test_gaussian_kl_matches_closed_form_and_sampling():
  module = GaussianBottleneck(latent_dim=4, kl_weight=0.5)
  z = jax.random.normal(rng_key(0), (8, 8, 8, 5))
  variables = module.init(rng_key(1), z)
  p = variables["params"]["moments"]
  m = np.asarray(z).reshape(-1, 5) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  mu, logvar = m[:, :4], np.clip(m[:, 4:], -30, 20)
  sigma = np.exp(0.5 * logvar)
  kl = np.mean(-np.log(sigma) + (sigma**2 + mu**2) / 2 - 0.5)
  mean_out, aux = module.apply(variables, z, train=False)
  assert float(aux["kl"]) == pytest.approx(kl, rel=1e-4)
  assert float(aux["loss"]) == pytest.approx(0.5 * kl, rel=1e-4)
  np.testing.assert_allclose(mean_out.reshape(-1, 4), mu, atol=1e-4)
  sample, _ = module.apply(variables, z, train=True, rngs=RNGS)
  noise = (np.asarray(sample).reshape(-1, 4) - mu) / sigma
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1
  prior = GaussianBottleneck.sample_prior(rng_key(3), (2, 4, 4, 4))
  assert prior.shape == (2, 4, 4, 4) and prior.dtype == jnp.float32


# -- VQ ------------------------------------------------------------------------------------------


def test_vq_indices_are_nearest_codes_and_lookup_round_trips():
  module = VectorQuantizer(codebook_size=16, latent_dim=6, code_dim=3, l2_normalize=True)
  z = jax.random.normal(rng_key(0), (2, 4, 4, 6))
  variables = module.init(rng_key(1), z)
  z_q, aux = module.apply(variables, z, train=False)
  codes = np.asarray(module.apply(variables, method=module.codebook))
  assert codes.shape == (16, 3)
  np.testing.assert_allclose(np.linalg.norm(codes, axis=-1), 1.0, rtol=1e-5)
  p = variables["params"]["proj_in"]
  ze = np.asarray(z).reshape(-1, 6) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  ze /= np.linalg.norm(ze, axis=-1, keepdims=True)
  expected = np.argmin(((ze[:, None] - codes[None]) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), expected)
  looked_up = module.apply(variables, aux["indices"], method=module.lookup)
  np.testing.assert_allclose(looked_up, z_q, atol=1e-5)
  q2, idx2 = module.apply(variables, z, method=module.quantize)
  np.testing.assert_array_equal(idx2, aux["indices"])
  np.testing.assert_allclose(q2, z_q, atol=1e-5)


def test_vq_straight_through_and_loss_gradients():
  module = VectorQuantizer(codebook_size=8, latent_dim=4, beta=0.25)
  z = jax.random.normal(rng_key(0), (1, 2, 2, 4))
  variables = module.init(rng_key(1), z)
  weights = jax.random.normal(rng_key(2), z.shape)

  def through(z):
    z_q, _ = module.apply(variables, z, train=False)
    return jnp.sum(z_q * weights)

  np.testing.assert_allclose(jax.grad(through)(z), weights, atol=1e-6)  # identity Jacobian

  def codebook_loss(params):
    _, aux = module.apply({**variables, "params": params}, z, train=False)
    return aux["codebook"], aux["indices"]

  grads, indices = jax.grad(codebook_loss, has_aux=True)(variables["params"])
  row_norms = np.linalg.norm(np.asarray(grads["codebook"]), axis=-1)
  used = np.isin(np.arange(8), np.asarray(indices))
  assert (row_norms[used] > 0).all() and (row_norms[~used] == 0).all()


def test_vq_ema_update_follows_the_formula():
  decay, eps = 0.8, 1e-5
  module = VectorQuantizer(codebook_size=4, latent_dim=2, ema_decay=decay, eps=eps)
  codebook = np.array([[0, 0], [1, 0], [0, 1], [5, 5]], np.float32)
  z = jnp.array([[[[0.1, 0.1], [0.9, 0.1]], [[1.1, -0.1], [0.1, 0.8]]]])
  variables = _with_stats(module.init(rng_key(0), z), embed_sum=codebook)
  np.testing.assert_allclose(module.apply(variables, method=module.codebook), codebook, atol=1e-5)
  (_, aux), new = _train(module, variables, z)
  np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), [0, 1, 1, 2])
  counts = np.array([1, 2, 1, 0], np.float32)
  sums = np.array([[0.1, 0.1], [2.0, 0.0], [0.1, 0.8], [0, 0]], np.float32)
  size = decay * 1.0 + (1 - decay) * counts
  embed = decay * codebook + (1 - decay) * sums
  np.testing.assert_allclose(new["batch_stats"]["cluster_size"], size, rtol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["embed_sum"], embed, rtol=1e-5, atol=1e-6)
  n = size.sum()
  expected = embed / ((size + eps) / (n + 4 * eps) * n)[:, None]
  after = np.asarray(module.apply({**variables, **new}, method=module.codebook))
  np.testing.assert_allclose(after, expected, rtol=1e-5)
  # Code 1 moved towards the mean of its assigned vectors (1.0, 0.0) -> still close; code 2
  # towards (0.1, 0.8); the unused code 3 is unchanged up to the normaliser.
  assert np.linalg.norm(after[2] - [0.1, 0.8]) < np.linalg.norm(codebook[2] - [0.1, 0.8])
  assert float(aux["codebook"]) == 0.0


def test_vq_state_is_frozen_outside_training():
  module = VectorQuantizer(codebook_size=4, latent_dim=2, ema_decay=0.5, kmeans_init=True)
  z = jnp.asarray(_clusters()[0]).reshape(1, 8, 8, 2)
  variables = module.init(rng_key(0), z)
  _, new = module.apply(variables, z, train=False, rngs=RNGS, mutable=["batch_stats"])
  for key, value in variables["batch_stats"].items():
    np.testing.assert_array_equal(new["batch_stats"][key], value)
  # train=True without a mutable collection runs (no update) instead of failing.
  z_q, _ = module.apply(variables, z, train=True, rngs=RNGS)
  assert z_q.shape == z.shape


def test_kmeans_finds_separated_clusters():
  pts, means = _clusters()
  centres = jax.jit(lambda r, x: kmeans(r, x, 4, iters=3))(rng_key(0), jnp.asarray(pts))
  np.testing.assert_allclose(_sorted_rows(centres), _sorted_rows(means), atol=1e-4)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_vq_kmeans_init_happens_once(ema_decay):
  module = VectorQuantizer(
    codebook_size=4, latent_dim=2, kmeans_init=True, kmeans_iters=3, ema_decay=ema_decay
  )
  pts, means = _clusters()
  z = jnp.asarray(pts).reshape(1, 8, 8, 2)
  variables = module.init(rng_key(0), z)
  assert not bool(variables["batch_stats"]["initialized"])
  step = jax.jit(lambda v, z: _train(module, v, z))
  (_, aux), new = step(variables, z)
  variables = {**variables, **new}
  assert bool(variables["batch_stats"]["initialized"])
  first = np.asarray(module.apply(variables, method=module.codebook))
  # With EMA, the update on the same batch right after k-means keeps the means.
  np.testing.assert_allclose(_sorted_rows(first), _sorted_rows(means), atol=1e-3)
  assert float(aux["usage"]) == 1.0
  # A second batch from shifted clusters must not re-run k-means.
  shifted = jnp.asarray(_clusters(seed=1, offset=3.0)[0]).reshape(1, 8, 8, 2)
  _, new = step(variables, shifted)
  second = np.asarray(module.apply({**variables, **new}, method=module.codebook))
  if ema_decay is None:
    np.testing.assert_array_equal(second, first)
  else:  # One EMA step: 10% of the way towards the means shifted by 3.
    np.testing.assert_allclose(second - first, 0.3, atol=0.05)


@pytest.mark.parametrize("ema_decay,l2", [(None, False), (0.99, False), (None, True)])
def test_vq_restart_replaces_dead_codes_with_batch_vectors(ema_decay, l2):
  module = VectorQuantizer(
    codebook_size=8, latent_dim=2, restart_after=2, ema_decay=ema_decay, l2_normalize=l2
  )
  codebook = np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], -1)
  codebook = codebook.astype(np.float32)
  z = jnp.asarray(
    np.array([[1.0, 0.05], [1.1, -0.02], [0.9, 0.1], [1.0, 0.3]], np.float32)
  ).reshape(1, 2, 2, 2)
  variables = module.init(rng_key(0), z)
  if ema_decay is None:
    variables = {**variables, "params": {"codebook": jnp.asarray(codebook)}}
  else:
    variables = _with_stats(variables, embed_sum=codebook)
  (_, aux), new = _train(module, variables, z)  # Codes 1..7 unused for 1 step: not dead yet.
  assert float(aux["dead_codes"]) == 0.0
  variables = {**variables, **new}
  np.testing.assert_allclose(module.apply(variables, method=module.codebook), codebook, atol=2e-2)
  (_, aux), new = _train(module, variables, z)  # Unused for 2 steps: restarted.
  assert float(aux["dead_codes"]) == 7.0
  variables = {**variables, **new}
  after = np.asarray(module.apply(variables, method=module.codebook))
  batch = np.asarray(z).reshape(-1, 2)
  if l2:
    batch = batch / np.linalg.norm(batch, axis=-1, keepdims=True)
  for row in after[1:]:
    assert np.abs(batch - row).max(axis=-1).min() < 1e-4, row
  np.testing.assert_array_equal(variables["batch_stats"]["steps_unused"], np.zeros(8))


def test_vq_bf16_compute_keeps_float32_losses():
  module = VectorQuantizer(codebook_size=8, latent_dim=4, code_dim=2, dtype=jnp.bfloat16)
  z = jax.random.normal(rng_key(0), (2, 3, 3, 4), jnp.bfloat16)
  variables = module.init(rng_key(1), z)
  (z_q, aux), _ = _train(module, variables, z)
  assert aux["loss"].dtype == jnp.float32 and aux["indices"].dtype == jnp.int32
  assert np.isfinite(np.asarray(z_q, np.float32)).all()


def test_vq_rejects_bad_ema_decay():
  with pytest.raises(ValueError, match="ema_decay"):
    VectorQuantizer(codebook_size=4, latent_dim=2, ema_decay=1.5).init(
      rng_key(0), jnp.zeros((1, 1, 1, 2))
    )


# -- FSQ -----------------------------------------------------------------------------------------


def test_fsq_implicit_codebook_and_index_round_trip():
  module = FSQ(levels=(8, 5, 5, 5))
  assert module.codebook_size == 1000
  variables = module.init(rng_key(0), jnp.zeros((1, 1, 1, 4)))
  codes = np.asarray(module.apply(variables, method=module.codebook))
  assert codes.shape == (1000, 4) and len(np.unique(codes, axis=0)) == 1000
  assert codes.min() >= -1.0 and codes.max() <= 1.0
  indices = module.apply(variables, jnp.asarray(codes), method=module.codes_to_indices)
  np.testing.assert_array_equal(indices, np.arange(1000))
  for i, levels in enumerate((8, 5, 5, 5)):
    assert len(np.unique(codes[:, i])) == levels


def test_fsq_forward_uses_exactly_the_levels_and_passes_gradients():
  module = FSQ(levels=(8, 5, 3))
  z = 3.0 * jax.random.normal(rng_key(0), (4, 16, 16, 3))
  variables = module.init(rng_key(1), z)
  (z_q, aux), _ = _train(module, variables, z)
  flat = np.asarray(z_q).reshape(-1, 3)
  assert [len(np.unique(flat[:, i])) for i in range(3)] == [8, 5, 3]
  looked_up = module.apply(variables, aux["indices"], method=module.lookup)
  np.testing.assert_allclose(looked_up, z_q, atol=1e-6)
  # Straight-through rounding: d sum(z_q) / dz is the bound's derivative, rescaled to [-1, 1]:
  # z_q = round(tanh(z + shift) * half - offset) / (levels // 2) with the rounding's gradient 1.
  grad = np.asarray(jax.grad(lambda z: jnp.sum(module.apply(variables, z)[0]))(z))
  levels = np.asarray((8, 5, 3), np.float64)
  half = (levels - 1.0) * (1.0 + module.eps) / 2.0
  shift = np.arctanh(np.where(levels % 2 == 0, 0.5, 0.0) / half)
  expected = (1.0 - np.tanh(np.asarray(z, np.float64) + shift) ** 2) * half / (levels // 2)
  assert expected.max() > 0.5  # Some z lie where the bound is steep, not only in its tails.
  np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-5)


def test_fsq_projects_when_dims_differ():
  module = FSQ(levels=(5, 5), latent_dim=6)
  z = jax.random.normal(rng_key(0), (2, 4, 4, 6))
  variables = module.init(rng_key(1), z)
  assert variables["params"]["proj_in"]["kernel"].shape == (6, 2)
  z_q, aux = module.apply(variables, z, train=False)
  assert z_q.shape == (2, 4, 4, 6)
  np.testing.assert_allclose(
    module.apply(variables, aux["indices"], method=module.lookup), z_q, atol=1e-5
  )
  assert float(aux["usage"]) == pytest.approx(len(np.unique(aux["indices"])) / 25)


def test_fsq_rejects_levels_below_two():
  with pytest.raises(ValueError, match="levels"):
    FSQ(levels=(1, 5)).init(rng_key(0), jnp.zeros((1, 1, 1, 2)))


def test_vq_lookup_normalize_searches_raw_codes_and_returns_unit_rows():
  # transformers' JanusVQVAE: argmin over the raw codebook, l2-normalised rows when decoding.
  module = VectorQuantizer(codebook_size=8, latent_dim=3, lookup_normalize=True)
  raw = np.array([[i + 1, i % 2, -i] for i in range(8)], np.float32)
  z = jax.random.normal(rng_key(0), (1, 4, 4, 3)) * 3.0
  variables = module.init(rng_key(1), z)
  variables = {**variables, "params": {"codebook": jnp.asarray(raw)}}
  z_q, aux = module.apply(variables, z)
  expected = np.argmin(((np.asarray(z).reshape(-1, 1, 3) - raw[None]) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), expected)
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
  np.testing.assert_allclose(z_q.reshape(-1, 3), unit[expected], atol=1e-6)
  np.testing.assert_allclose(module.apply(variables, method=module.codebook), unit, atol=1e-6)
  q, idx = module.apply(variables, z, method=module.quantize)
  np.testing.assert_array_equal(idx, aux["indices"])
  np.testing.assert_allclose(q, z_q, atol=1e-6)
