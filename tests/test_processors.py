import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.sample import processors
from vqlm.sample.processors import SamplingConfig, Settings

V = 50
MASK = jax.jit(processors.top_k_top_p_mask)  # One compile per input shape for the whole file.
# The same with a top-k of up to FAST_TOP_K ids always taken by `lax.top_k` (by default only rows
# of more than FAST_TOP_K_MIN_IDS ids take it), and always found by bisection.
MASK_TOP_K = jax.jit(functools.partial(processors.top_k_top_p_mask, fast_min_ids=0))
MASK_BISECT = jax.jit(functools.partial(processors.top_k_top_p_mask, fast_top_k=0))
BOTH_PATHS = pytest.mark.parametrize("mask_fn", [MASK_TOP_K, MASK_BISECT], ids=["top_k", "bisect"])


def _logits(seed, b=4, v=V):
  """Distinct float32 logits (no ties)."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(v).astype(np.float32) * 0.37 - 5.0 for _ in range(b)])


def _ref_keep(logits, k, p):
  """NumPy reference of top-k then top-p on one row."""
  order = np.argsort(-logits, kind="stable")
  kk = len(logits) if k <= 0 else min(k, len(logits))
  kept = order[:kk]
  z = logits[kept] - logits[kept].max()
  probs = np.exp(z) / np.exp(z).sum()
  out = np.zeros(len(logits), bool)
  mass = 0.0
  for idx, pr in zip(kept, probs):
    if mass < p or p >= 1.0 or not out.any():
      out[idx] = True
    mass += pr
  return out


@BOTH_PATHS
def test_top_k_keeps_exactly_the_k_largest(mask_fn):
  logits = _logits(0)
  ks = np.array([1, 3, 10, 0])
  keep = np.asarray(mask_fn(logits, ks, np.ones(4)))
  for row, k in zip(range(4), ks):
    want = np.zeros(V, bool)
    want[np.argsort(-logits[row])[: k if k else V]] = True
    np.testing.assert_array_equal(keep[row], want)
  assert keep.sum(1).tolist() == [1, 3, 10, V]


@BOTH_PATHS
def test_top_k_breaks_ties_towards_lower_ids(mask_fn):
  logits = np.zeros((1, 6), np.float32)
  keep = np.asarray(mask_fn(logits, np.array([2]), np.array([1.0])))
  np.testing.assert_array_equal(keep[0], [True, True, False, False, False, False])


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
  cases = {0.3: 1, 0.45: 1, 0.55: 2, 0.65: 2, 0.75: 3, 0.8: 3, 0.9: 4, 0.97: 5, 1.0: 5}
  for p, n in cases.items():
    keep = np.asarray(MASK(logits, np.array([0]), np.array([p])))
    np.testing.assert_array_equal(keep[0], np.arange(5) < n, err_msg=f"top_p={p}")


@BOTH_PATHS
@pytest.mark.parametrize("seed", range(5))
def test_top_k_then_top_p_matches_reference(seed, mask_fn):
  logits = _logits(seed) * 0.5
  ks = np.array([0, 5, 20, 2])
  ps = np.array([0.6, 0.9, 0.3, 1.0], np.float32)
  keep = np.asarray(mask_fn(logits, ks, ps))
  for row in range(4):
    np.testing.assert_array_equal(keep[row], _ref_keep(logits[row], ks[row], ps[row]))


def test_process_applies_temperature_and_never_unmasks():
  logits = _logits(1)
  logits[:, :5] = -np.inf
  temperature = np.array([2.0, 0.5, 1.0, 0.0])
  top_p = np.array([1.0, 1.0, 0.999999, 1.0])
  out = np.asarray(jax.jit(processors.process)(logits, temperature, np.zeros(4, int), top_p))
  assert np.all(np.isneginf(out[:, :5]))
  np.testing.assert_allclose(out[0, 5:], logits[0, 5:] / 2.0, rtol=1e-6)
  np.testing.assert_allclose(out[1, 5:], logits[1, 5:] / 0.5, rtol=1e-6)
  np.testing.assert_allclose(out[3, 5:], logits[3, 5:], rtol=1e-6)  # greedy rows: unscaled


def test_greedy_rows_take_the_argmax_and_sampled_rows_respect_the_masks():
  logits = _logits(2, b=3)
  temps = np.array([0.0, 1.0, 1.0], np.float32)
  ks = np.array([0, 3, 0])
  ps = np.array([1.0, 1.0, 0.5], np.float32)
  draw = jax.jit(jax.vmap(processors.sample, in_axes=(0, None, None, None, None)))
  keys = jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(jax.random.key(1), 400))
  ids = np.asarray(draw(keys, logits, temps, ks, ps))  # [400, 3]
  assert np.all(ids[:, 0] == np.argmax(logits[0]))
  assert set(ids[:, 1]) <= set(np.argsort(-logits[1])[:3].tolist())
  assert len(set(ids[:, 1])) == 3
  allowed = np.flatnonzero(_ref_keep(logits[2], 0, 0.5))
  assert set(ids[:, 2]) <= set(allowed.tolist())


def test_sampling_frequencies_follow_the_tempered_distribution():
  logits = np.log(np.array([[0.6, 0.3, 0.1]], np.float32))
  n = 4000
  keys = jax.random.split(jax.random.key(3), n)
  sample = jax.jit(
    jax.vmap(
      lambda k, t: processors.sample(k[None], logits, t, jnp.zeros(1, int), jnp.ones(1)),
      in_axes=(0, None),
    )
  )
  for t in (1.0, 2.0):
    ids = np.asarray(sample(keys, jnp.array([t])))[:, 0]
    want = np.array([0.6, 0.3, 0.1]) ** (1 / t)
    want /= want.sum()
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / n, want, atol=0.03)


@BOTH_PATHS
def test_top_p_with_tied_logits_keeps_lower_ids_first(mask_fn):
  logits = np.array([[0.0, 1.0, 1.0, 1.0, -1.0]], np.float32)  # probs ~ .16 .32 .32 .32 .06
  keep = np.asarray(mask_fn(logits, np.array([0]), np.array([0.5])))
  np.testing.assert_array_equal(keep[0], [False, True, True, False, False])
  keep = np.asarray(mask_fn(logits, np.array([2]), np.array([1.0])))
  np.testing.assert_array_equal(keep[0], [False, True, True, False, False])


@BOTH_PATHS
def test_masks_handle_infinite_and_extreme_logits(mask_fn):
  logits = np.array([[-np.inf, 3e38, -3e38, 0.0, -0.0, 1e-30, -np.inf, 5.0]], np.float32)
  keep = np.asarray(mask_fn(logits, np.array([3]), np.array([1.0])))
  np.testing.assert_array_equal(np.flatnonzero(keep[0]), [1, 5, 7])
  keep = np.asarray(mask_fn(logits, np.array([0]), np.array([0.5])))
  np.testing.assert_array_equal(np.flatnonzero(keep[0]), [1])


@pytest.mark.parametrize("v", [5, 32, 70])
def test_categorical_follows_the_distribution_and_skips_zero_probability_ids(v):
  rng = np.random.default_rng(v)
  logits = rng.normal(size=(1, v)).astype(np.float32)
  logits[0, rng.choice(v, size=v // 3, replace=False)] = -np.inf
  want = np.exp(logits[0] - logits[0][np.isfinite(logits[0])].max())
  want /= want.sum()
  last = np.nextafter(np.float32(1), np.float32(0))
  u = np.concatenate([np.linspace(0, 1, 20000, endpoint=False), [0.0, last]])
  ids = np.asarray(
    jax.jit(jax.vmap(lambda x: processors.categorical(x[None], logits)[0]))(
      jnp.asarray(u, jnp.float32)
    )
  )
  assert np.all(want[ids] > 0)
  np.testing.assert_allclose(np.bincount(ids[:-2], minlength=v) / 20000, want, atol=2e-3)


def test_row_settings_pick_image_settings_inside_runs():
  config = SamplingConfig(text=Settings(0.7, 5, 0.9), image=Settings(1.3, 0, 1.0)).as_arrays()
  t, k, p = processors.row_settings(config, jnp.array([True, False]))
  np.testing.assert_allclose(t, [1.3, 0.7], rtol=1e-6)
  np.testing.assert_array_equal(k, [0, 5])
  np.testing.assert_allclose(p, [1.0, 0.9], rtol=1e-6)
  assert t.dtype == jnp.float32 and k.dtype == jnp.int32


def test_settings_are_traced_leaves_so_new_values_do_not_recompile():
  fn = jax.jit(lambda c, x: processors.row_settings(c, x)[0])
  fn(SamplingConfig(text=Settings(0.5)).as_arrays(), jnp.array([False]))
  fn(SamplingConfig(text=Settings(0.9, 7, 0.3)).as_arrays(), jnp.array([False]))
  assert fn._cache_size() == 1


@pytest.mark.parametrize(
  "settings, match",
  [
    (Settings(temperature=-1.0), "temperature"),
    (Settings(top_k=-2), "top_k"),
    (Settings(top_p=0.0), "top_p"),
    (Settings(top_p=1.5), "top_p"),
  ],
)
def test_bad_settings_raise(settings, match):
  with pytest.raises(ValueError, match=match):
    SamplingConfig(image=settings).check()


def test_fast_and_bisected_top_k_agree_on_mixed_rows_and_ties():
  rng = np.random.default_rng(3)
  logits = np.round(rng.normal(size=(6, 300)), 1).astype(np.float32)  # Many ties.
  logits[1, :250] = -np.inf  # Fewer finite ids than some k below.
  for ks in ([1, 7, 64, 0, 64, 2], [5, 65, 1, 0, 300, 9]):  # All within the fast width; not.
    ks = np.array(ks)
    fast = np.asarray(MASK_TOP_K(logits, ks, np.ones(6)))
    np.testing.assert_array_equal(fast, np.asarray(MASK_BISECT(logits, ks, np.ones(6))))
    np.testing.assert_array_equal(fast, np.asarray(MASK(logits, ks, np.ones(6))))
    for row, k in enumerate(ks):
      want = np.zeros(300, bool)
      want[np.argsort(-logits[row], kind="stable")[: k if k else 300]] = True
      np.testing.assert_array_equal(fast[row], want)
