import numpy as np
import pytest
import scipy.linalg

from vqlm.data import shapes
from vqlm.eval import fid
from vqlm.nn import inception


def reference_fid(mu1, sigma1, mu2, sigma2):
  """The textbook formula, float64, scipy.linalg.sqrtm."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float(
    np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  )


def _features(seed, n, d, shift=0.0, scale=1.0):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  return (rng.standard_normal((n, d)) @ mix * scale + shift).astype(np.float32)


@pytest.mark.parametrize("method", fid.METHODS)
@pytest.mark.parametrize("n, d", [(400, 16), (12, 40)])  # Full-rank and singular covariances.
def test_matches_reference(method, n, d):
  a = _features(0, n, d)
  b = _features(1, n + 5, d, shift=0.3, scale=1.5)
  ref = reference_fid(*fid.statistics(a), *fid.statistics(b))
  assert ref > 1.0
  assert fid.fid_from_features(a, b, method=method) == pytest.approx(ref, rel=1e-6)
  assert fid.frechet_distance(
    *fid.statistics(a), *fid.statistics(b), method=method
  ) == pytest.approx(ref, rel=1e-6)
  assert fid.fid_from_features(b, a, method=method) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("method", fid.METHODS)
def test_identical_sets_give_zero(method):
  a = _features(2, 300, 24, shift=5.0, scale=3.0)
  mu, sigma = fid.statistics(a)
  assert abs(fid.fid_from_features(a, a, method=method)) < 1e-8 * np.trace(sigma)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8 * np.trace(sigma)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # sqrtm on the singular example.
@pytest.mark.parametrize("method", fid.METHODS)
def test_diagonal_gaussians_closed_form(method):
  # ||mu1 - mu2||^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i)), worked by hand:
  # (1 + 4) + (1 + 4 - 2*2) + (4 + 9 - 2*6) = 5 + 1 + 1 = 7.
  assert fid.frechet_distance(
    [0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([4.0, 9.0]), method=method
  ) == pytest.approx(7.0, rel=1e-12)
  # 0.25 + (0.25 + 1 - 2*0.5) + (2 + 8 - 2*4) + (0 + 1 - 0) = 0.25 + 0.25 + 2 + 1 = 3.5;
  # the zero variance makes the product singular.
  assert fid.frechet_distance(
    [0.5, 0.0, 0.0],
    np.diag([0.25, 2.0, 0.0]),
    [0.0, 0.0, 0.0],
    np.diag([1.0, 8.0, 1.0]),
    method=method,
  ) == pytest.approx(3.5, rel=1e-9)


def test_statistics_float64_unbiased():
  a = _features(3, 50, 6)
  mu, sigma = fid.statistics(a)
  assert mu.dtype == sigma.dtype == np.float64
  assert mu.shape == (6,) and sigma.shape == (6, 6)
  np.testing.assert_allclose(mu, a.astype(np.float64).mean(0), rtol=1e-12)
  x = a.astype(np.float64) - mu
  np.testing.assert_allclose(sigma, x.T @ x / 49, rtol=1e-10)
  mu1, sigma1 = fid.statistics(a[:, :1])
  assert sigma1.shape == (1, 1)


def test_sqrtm_retries_with_eps_offset_when_not_finite(monkeypatch):
  calls = []
  real_sqrtm = scipy.linalg.sqrtm

  def flaky_sqrtm(m):
    calls.append(m)
    return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
  s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
  value = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-3)
  np.testing.assert_allclose(calls[1], (s1 + 1e-3 * np.eye(2)) @ (s2 + 1e-3 * np.eye(2)))
  expected = 1 + 4 + 4 + 9 - 2 * (np.sqrt(1.001 * 4.001) + np.sqrt(4.001 * 9.001))
  assert value == pytest.approx(expected, rel=1e-9)


def test_sqrtm_imaginary_part(monkeypatch):
  s = np.diag([1.0, 4.0])
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.diag([1.0, 4.0]) + 1e-6j * np.eye(2))
  assert fid.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0.0, abs=1e-9)
  monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.diag([1.0, 4.0]) + 0.1j * np.eye(2))
  with pytest.raises(ValueError, match="imaginary part of 0.1.*method='eigh'"):
    fid.frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="N >= 2"):
    fid.statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="\\[N, D\\]"):
    fid.statistics(np.zeros(8))
  with pytest.raises(ValueError, match="NaN"):
    fid.statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
  with pytest.raises(ValueError, match="dimensions differ"):
    fid.fid_from_features(np.zeros((3, 4)), np.zeros((3, 5)))
  with pytest.raises(ValueError, match="sigma\\[D, D\\]"):
    fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="method must be one of"):
    fid.fid_from_features(np.zeros((3, 4)), np.zeros((3, 4)), method="svd")


def _shapes_images(seed, n, **kwargs):
  return np.stack(
    [e["image"] for e in shapes.make_examples(split="train", num_examples=n, seed=seed, **kwargs)]
  )


def test_scene_fd_on_shapes():
  a = _shapes_images(0, 100)
  same = _shapes_images(1, 100)
  crowded = _shapes_images(2, 100, min_objects=3, max_objects=4)
  assert abs(fid.scene_fd(a, a)) < 1e-6
  fd_same = fid.scene_fd(a, same)
  fd_crowded = fid.scene_fd(a, crowded)
  assert 0.0 < fd_same < fd_crowded
  assert fd_crowded > 1.5 * fd_same


def test_inception_fid_with_random_weights(tmp_path):
  path = str(tmp_path / "inception.npz")
  variables = inception.init_inception_params(seed=0)
  inception.save_inception_params(path, variables)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  b = rng.integers(0, 128, (2, 24, 24, 3), dtype=np.uint8)

  features_a = fid.inception_features(variables, a, batch_size=2)  # Last batch padded.
  assert features_a.shape == (3, 2048) and features_a.dtype == np.float32
  np.testing.assert_array_equal(
    fid.inception_features(variables, a[2:], batch_size=2), features_a[2:]
  )
  features_b = fid.inception_features(variables, b, batch_size=2)

  value = fid.inception_fid(a, b, weights_path=path, batch_size=2, method="eigh")
  assert np.isfinite(value) and value > 0
  assert value == pytest.approx(
    fid.fid_from_features(features_a, features_b, method="eigh"), rel=1e-9
  )

  with pytest.raises(ValueError, match="--inception_weights"):
    fid.inception_fid(a, b, weights_path=str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="uint8"):
    fid.inception_features(variables, a.astype(np.float32))
