"""Fréchet distances between image sets: Inception FID and an offline scene-feature distance.

FD(a, b) = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) over Gaussian fits of features
(float64 NumPy). Two ways to get tr (S_a S_b)^{1/2}:
- "sqrtm" (default): scipy.linalg.sqrtm of S_a S_b exactly as pytorch-fid does it (if the root is
  not finite, retry with eps*I added to both covariances; drop an imaginary part that is
  numerical noise, fail on a large one), so numbers are comparable with published FIDs.
- "eigh": the eigenvalues of S_a^{1/2} S_b S_a^{1/2} (symmetric PSD, same spectrum as S_a S_b), via
  symmetric eigen-decompositions with negative round-off clipped: always real, stable for singular
  covariances (fewer samples than dimensions, constant features) and several times faster.

`inception_fid` runs the FID Inception-v3 (vqlm.nn.inception, weights from a user's `.npz`) on
uint8 images resized to 299x299; `scene_fd` uses `vqlm.data.scene_parser.scene_features` of shapes
images, so a number exists offline on the built-in data.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from vqlm.errors import UserError
from vqlm.nn import inception

METHODS = ("sqrtm", "eigh")


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[D]` and unbiased covariance `[D, D]` (float64) of `features[N, D]`, N >= 2."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise UserError(f"features must be [N, D] with N >= 2 samples, got shape {list(x.shape)}")
  if not np.all(np.isfinite(x)):
    raise UserError("features contain NaN or inf: check the feature extractor's input")
  return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, np.float64))
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise UserError(
      f"statistics {which}: need mu[D] and sigma[D, D], got {list(mu.shape)} and "
      f"{list(sigma.shape)} (compute them with vqlm.eval.fid.statistics)"
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise UserError(f"statistics {which} contain NaN or inf")
  return mu, sigma


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
  """tr (S1 S2)^{1/2} the pytorch-fid way."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise UserError(
        f"sqrtm of the covariance product has an imaginary part of {imag:.3g}: "
        "use more samples or method='eigh'"
      )
    covmean = covmean.real
  return float(np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr (S1 S2)^{1/2} = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})) for symmetric PSD S1, S2."""
  root1 = _psd_sqrt(sigma1)
  m = root1 @ sigma2 @ root1
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def _trace_sqrt_product_samples(xa: np.ndarray, xb: np.ndarray) -> float:
  """tr (S_a S_b)^{1/2} from centred samples `xa[N, D]`, `xb[M, D]` (S = x^T x / (n - 1)).

  The nonzero eigenvalues of S_a S_b are the squared singular values of xa xb^T / sqrt((N-1)(M-1)),
  so the trace is that matrix's nuclear norm: an [N, M] SVD instead of [D, D] decompositions.
  """
  s = np.linalg.svd(xa @ xb.T, compute_uv=False)
  return float(np.sum(s) / np.sqrt((len(xa) - 1) * (len(xb) - 1)))


def _distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, tr_covmean: float
) -> float:
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise UserError(f"method must be one of {METHODS}, got {method!r}")


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  *,
  eps: float = 1e-6,
  method: str = "sqrtm",
) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); float64 `mu[D]`, `sigma[D, D]`."""
  _check_method(method)
  mu1, sigma1 = _check_stats(mu1, sigma1, "1")
  mu2, sigma2 = _check_stats(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise UserError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  else:
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  return _distance(mu1, sigma1, mu2, sigma2, tr_covmean)


def fid_from_features(
  features_a: np.ndarray, features_b: np.ndarray, *, method: str = "sqrtm"
) -> float:
  """Fréchet distance between Gaussian fits of `features_a[N, D]` and `features_b[M, D]`.

  With method="eigh" and few samples (N M min(N, M) < D^3) the trace term comes from an [N, M]
  SVD of the centred samples (same value, much faster than [D, D] decompositions).
  """
  _check_method(method)
  mu1, sigma1 = statistics(features_a)
  mu2, sigma2 = statistics(features_b)
  if mu1.shape != mu2.shape:
    raise UserError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
  n, m, d = len(features_a), len(features_b), mu1.shape[0]
  if method == "eigh" and n * m * min(n, m) < d**3:
    xa = np.asarray(features_a, np.float64) - mu1
    xb = np.asarray(features_b, np.float64) - mu2
    return _distance(mu1, sigma1, mu2, sigma2, _trace_sqrt_product_samples(xa, xb))
  return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)


def scene_fd(images_a: np.ndarray, images_b: np.ndarray, *, method: str = "eigh") -> float:
  """Fréchet distance over shapes-scene parser features of uint8 `[N, H, W, 3]` image sets.

  Many parser features are constant on a data set (cells or attributes that never occur), so the
  covariances are singular: the default is the stable "eigh" method.
  """
  from vqlm.eval.scene_parser import scene_features  # numpy + scipy only; imported where used.

  return fid_from_features(scene_features(images_a), scene_features(images_b), method=method)


@jax.jit
def _inception_features(variables: Mapping, images: jax.Array) -> jax.Array:
  return inception.InceptionV3().apply(variables, inception.preprocess(images))


def inception_features(
  variables: Mapping, images: np.ndarray, *, batch_size: int = 50
) -> np.ndarray:
  """Pool3 features float32 `[N, 2048]` of uint8 images `[N, H, W, 3]` (any H, W; resized to 299).

  Runs in fixed-size batches (the last one padded) so one compiled program serves every call.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(
      "images must be uint8[N, H, W, 3] (convert with np.clip(x, 0, 255)"
      f".astype(np.uint8)), got {images.dtype}{list(images.shape)}"
    )
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start : start + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], np.uint8)])
    out.append(np.asarray(_inception_features(variables, jnp.asarray(batch)))[:n])
  if not out:
    return np.zeros((0, inception.FEATURE_DIM), np.float32)
  return np.concatenate(out).astype(np.float32)


def inception_fid(
  images_a: np.ndarray,
  images_b: np.ndarray,
  *,
  weights_path: str | os.PathLike | None,
  batch_size: int = 50,
  method: str = "sqrtm",
) -> float:
  """FID between uint8 image sets `[N, H, W, 3]`, `[M, H', W', 3]` with Inception weights `.npz`.

  Use thousands of images per set for a meaningful number (10k or 50k is customary); with fewer
  samples than 2048 the covariances are singular and FID is biased upwards.
  """
  variables = inception.load_inception_params(weights_path)
  features_a = inception_features(variables, images_a, batch_size=batch_size)
  features_b = inception_features(variables, images_b, batch_size=batch_size)
  return fid_from_features(features_a, features_b, method=method)
