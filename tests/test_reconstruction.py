import numpy as np
import pytest

from vqlm.eval import reconstruction


def test_psnr_matches_formula():
  a = np.zeros((2, 4, 4, 3), np.uint8)
  b = a.copy()
  b[0] += 10  # MSE 100 -> 10 log10(255^2 / 100)
  out = reconstruction.psnr(a, b)
  assert out[0] == pytest.approx(10 * np.log10(255**2 / 100))
  assert np.isinf(out[1])


def test_ssim_against_skimage():
  skm = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
  ours = reconstruction.ssim(a, b)
  for i in range(2):
    ref = skm.structural_similarity(
      a[i],
      b[i],
      channel_axis=-1,
      data_range=255,
      gaussian_weights=True,
      sigma=1.5,
      use_sample_covariance=False,
      win_size=7,
    )
    assert ours[i] == pytest.approx(ref, abs=2e-3)
  assert reconstruction.ssim(a, a) == pytest.approx([1.0, 1.0])


def test_codebook_stats():
  stats = reconstruction.codebook_stats(np.array([[0, 1], [1, 1]]), 4)
  assert stats["usage"] == 0.5 and stats["dead_codes"] == 2
  p = np.array([0.25, 0.75])
  assert stats["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
