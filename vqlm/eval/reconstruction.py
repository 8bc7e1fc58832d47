"""Reconstruction quality: PSNR, SSIM and codebook statistics (NumPy, float64 where it matters)."""

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, *, max_value: float = 255.0) -> np.ndarray:
  """Per-image PSNR in dB of uint8 (or [0, max_value]) images [N, H, W, C]; inf where identical."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(max_value**2 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-(x**2) / (2 * sigma**2))
  return g / g.sum()


def _filter(x: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering over H and W of [N, H, W, C]."""
  k = len(window)
  h = sum(window[i] * x[:, i : x.shape[1] - k + 1 + i] for i in range(k))
  return sum(window[i] * h[:, :, i : h.shape[2] - k + 1 + i] for i in range(k))


def ssim(
  a: np.ndarray,
  b: np.ndarray,
  *,
  max_value: float = 255.0,
  window_size: int = 7,
  sigma: float = 1.5,
) -> np.ndarray:
  """Per-image SSIM (Wang et al. 2004, Gaussian window, averaged over channels) of [N, H, W, C].

  A 7x7 window (not 11x11) so that 32x32 images still have a meaningful valid region.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  window = _gaussian_window(window_size, sigma)
  c1 = (0.01 * max_value) ** 2
  c2 = (0.03 * max_value) ** 2
  mu_a, mu_b = _filter(a, window), _filter(b, window)
  var_a = _filter(a * a, window) - mu_a**2
  var_b = _filter(b * b, window) - mu_b**2
  cov = _filter(a * b, window) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
    (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
  )
  return ssim_map.mean(axis=(1, 2, 3))


def codebook_stats(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
  """Usage (fraction of codes used), perplexity of the code histogram and dead-code count."""
  counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size).astype(np.float64)
  probs = counts / max(counts.sum(), 1.0)
  nonzero = probs[probs > 0]
  return {
    "usage": float((counts > 0).mean()),
    "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
    "dead_codes": int((counts == 0).sum()),
  }
