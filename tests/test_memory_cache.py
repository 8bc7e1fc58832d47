import numpy as np

from vqlm.data import pipeline
from vqlm.data.memory_cache import CachedImages, cache_images


class _Source:
  def __init__(self, images):
    self.images = images
    self.reads = 0

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    self.reads += 1
    return {"image": self.images[i], "text": f"image {i}"}


def _images(n=10, size=4):
  return [np.full((size, size, 3), i, np.uint8) for i in range(n)]


def test_cache_serves_the_same_images_and_batches():
  source = _Source(_images())
  cached = cache_images(source, log_fn=lambda m: None)
  assert isinstance(cached, CachedImages) and len(cached) == 10 and cached.nbytes == 10 * 48
  for i in range(10):
    np.testing.assert_array_equal(cached[i]["image"], source.images[i])
  # The tokenizer's batches are the same with and without the cache, in the same order.
  kw = dict(global_batch_size=4, transform=pipeline.image_transform(), seed=3)
  plain = pipeline.make_iterator(source, **kw)
  fast = pipeline.make_iterator(cached, **kw)
  for _ in range(5):
    np.testing.assert_array_equal(next(plain)["image"], next(fast)["image"])


def test_cache_declines_large_or_ragged_sources():
  source = _Source(_images())
  assert cache_images(source, max_bytes=10 * 48 - 1) is None
  assert source.reads == 1  # judged from the first image, nothing else read
  ragged = _Source(_images(3) + [np.zeros((5, 5, 3), np.uint8)])
  assert cache_images(ragged, log_fn=lambda m: None) is None
  assert cache_images(_Source([])) is None
