"""Sources that need no download: shapes (procedural), digits (scikit-learn), photos
(scikit-image). The data libraries are imported only when a source of theirs is built."""

from collections.abc import Sequence
import functools
import threading
from typing import Any

import numpy as np

from vqlm.data import transforms
from vqlm.data.sources.base import _DIGIT_WORDS, Source, _check_split
from vqlm.errors import UserError


class _WrappedSource(Source):
  """Gives an outside random-access source (e.g. shapes) the `Source` attributes."""

  def __init__(self, inner: Any, *, name: str, split: str, image_size: int):
    self._inner = inner
    self.name, self.split, self.image_size = name, split, image_size

  def __len__(self) -> int:
    return len(self._inner)

  def _get(self, index: int) -> dict[str, Any]:
    return dict(self._inner[index])


def _shapes_source(*, split: str, data_dir: str | None, image_size: int, **kwargs) -> Source:
  from vqlm.data.sources import shapes_tfds  # pylint: disable=import-outside-toplevel

  inner = shapes_tfds.load_shapes(data_dir=data_dir, image_size=image_size, split=split, **kwargs)
  return _WrappedSource(inner, name="shapes", split=split, image_size=image_size)


# ---------------------------------------------------------------------------------------- digits

_DIGIT_SPLITS = {"train": (0, 1400), "validation": (1400, 1600), "test": (1600, 1797)}


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
  return images, digits.target.astype(np.int64)


class DigitsSource(Source):
  """scikit-learn's 1,797 bundled 8x8 handwritten digits, upscaled to `image_size`, as RGB.

  Splits by index: train 0..1399, validation 1400..1599, test 1600..1796. Text: "the digit seven".
  """

  def __init__(self, *, split: str = "train", image_size: int = 32, method: str = "bilinear"):
    _check_split(split, tuple(_DIGIT_SPLITS), "digits")
    self.name, self.split, self.image_size = "digits", split, image_size
    start, stop = _DIGIT_SPLITS[split]
    images, labels = _load_digits()
    self._labels = labels[start:stop]
    self._images = np.stack(
      [transforms.to_rgb(transforms.resize(x, image_size, method)) for x in images[start:stop]]
    )  # [N, S, S, 3]

  def __len__(self) -> int:
    return len(self._labels)

  def _get(self, index: int) -> dict[str, Any]:
    label = int(self._labels[index])
    return {
      "image": self._images[index].copy(),
      "text": f"the digit {_DIGIT_WORDS[label]}",
      "label": label,
      "original_size": (8, 8),
    }


# ---------------------------------------------------------------------------------------- photos

# Photos that ship inside the scikit-image package (no download), held out by split.
PHOTO_SPLITS = {
  "train": (
    "astronaut",
    "camera",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "coins",
    "moon",
    "brick",
    "grass",
    "cell",
  ),
  "validation": ("clock", "page"),
  "test": ("chelsea", "gravel"),
}
_PHOTO_EXAMPLES = {"train": 10_000, "validation": 500, "test": 500}


class PhotosSource(Source):
  """Random square crops of scikit-image's bundled photos, resized to `image_size`.

  Crop `i` is drawn from an rng seeded by `(seed, split, i)`: a photo, a side between
  `min_scale` x the photo's shorter side (at least `image_size`) and the whole shorter side, and a
  position. Each split has its own photos (`PHOTO_SPLITS`). Text: the photo's name ("coffee").
  """

  def __init__(
    self,
    *,
    split: str = "train",
    image_size: int = 32,
    num_examples: int | None = None,
    seed: int = 0,
    min_scale: float = 0.25,
    photos: Sequence[str] | None = None,
    method: str = "bicubic",
  ):
    _check_split(split, tuple(PHOTO_SPLITS), "photos")
    known = sorted(set().union(*PHOTO_SPLITS.values()))
    photos = tuple(photos) if photos is not None else PHOTO_SPLITS[split]
    for photo in photos:
      if photo not in known:
        raise UserError(f"unknown photo {photo!r}; valid: {', '.join(known)}")
    if not photos:
      raise UserError("photos must name at least one photo")
    if not 0.0 < min_scale <= 1.0:
      raise UserError(f"min_scale must be in (0, 1], got {min_scale}")
    self.name, self.split, self.image_size = "photos", split, image_size
    self.photos = photos
    self._num = _PHOTO_EXAMPLES[split] if num_examples is None else int(num_examples)
    if self._num <= 0:
      raise UserError(f"num_examples must be positive, got {num_examples}")
    self._seed, self._min_scale, self._method = seed, min_scale, method
    self._split_id = tuple(PHOTO_SPLITS).index(split)
    self._cache: dict[str, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_cache": {}, "_lock": None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._num

  def photo(self, name: str) -> np.ndarray:
    """The whole photo `name` as uint8 `[H, W, 3]` (loaded once)."""
    with self._lock:
      if name not in self._cache:
        import skimage.data  # pylint: disable=import-outside-toplevel

        image = getattr(skimage.data, name)()
        self._cache[name] = transforms.to_rgb(np.asarray(image, np.uint8))
      return self._cache[name]

  def _get(self, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([self._seed, self._split_id, index])
    name = self.photos[int(rng.integers(len(self.photos)))]
    image = self.photo(name)
    short = min(image.shape[:2])
    low = min(short, max(self.image_size, round(short * self._min_scale)))
    side = int(rng.integers(low, short + 1))
    crop = transforms.random_crop(image, side, rng)
    crop = transforms.resize(crop, self.image_size, self._method)
    return {
      "image": crop,
      "text": name.replace("_", " "),
      "photo": name,
      "original_size": (side, side),
    }
