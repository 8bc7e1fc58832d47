"""Data sources: random-access captioned images behind one interface, chosen by name.

Every source is a `Source`: `len(source)` and `source[i] -> {"image": uint8 [S, S, 3], "text": str,
...}`, with attributes `name`, `split` and `image_size` (= S). Items may carry more keys:
"label" (int), "original_size" ((h, w) of the image content before resizing, read by the size
filters in `vqlm.data.filters`), "scene" (shapes), "file" (folder), "captions" (coco_captions: all
of them). Access is deterministic: `source[i]` is the same item every time, in every process.

`get_source(name, split=..., data_dir=..., image_size=...)` builds one of:
  shapes         procedural captioned shapes (`shapes_tfds`), stored as a TFDS data set
  digits         scikit-learn's bundled 8x8 digits, upscaled; "the digit seven"
  photos         seeded random crops of scikit-image's bundled photos; text is the photo's name
  mnist, cifar10, imagenet2012, coco_captions
                 TFDS data sets prepared as array_record, read with random access (no TensorFlow)
  folder         a directory of images, optionally with captions.jsonl or captions.csv

Each family lives in its own module: `base` (the `Source` interface), `builtin` (shapes, digits,
photos; shapes is built by `shapes_tfds`), `tfds` (the TFDS sets) and `folder`; moving_shapes is
`vqlm.data.moving_shapes`. Only numpy and PIL load with this package: scikit-learn, scikit-image
and tensorflow_datasets load when a source that needs them is built.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from vqlm.data.sources.base import Source
from vqlm.data.sources.builtin import PHOTO_SPLITS, DigitsSource, PhotosSource, _shapes_source
from vqlm.data.sources.folder import IMAGE_EXTENSIONS, FolderSource
from vqlm.data.sources.tfds import TfdsSource
from vqlm.errors import UserError

__all__ = [
  "Source",
  "get_source",
  "SOURCE_NAMES",
  "DigitsSource",
  "PhotosSource",
  "PHOTO_SPLITS",
  "TfdsSource",
  "FolderSource",
  "IMAGE_EXTENSIONS",
  "source_from_config",
]


def _folder_source(*, split: str, data_dir: str | None, image_size: int, **kwargs) -> Source:
  if data_dir is None:
    raise UserError(
      "the folder source needs data_dir=DIR (a folder of images, optionally with "
      "captions.jsonl or captions.csv)"
    )
  return FolderSource(data_dir, split=split, image_size=image_size, **kwargs)


def _tfds_builder(tfds_name: str) -> Callable[..., Source]:
  def build(*, split: str, data_dir: str | None, image_size: int, **kwargs) -> Source:
    return TfdsSource(tfds_name, split=split, data_dir=data_dir, image_size=image_size, **kwargs)

  return build


def _no_data_dir(cls: type[Source]) -> Callable[..., Source]:
  def build(*, split: str, data_dir: str | None, image_size: int, **kwargs) -> Source:
    del data_dir  # Bundled with an installed package.
    return cls(split=split, image_size=image_size, **kwargs)

  return build


def _moving_shapes(**kwargs):
  from vqlm.data.moving_shapes import MovingShapesSource  # pylint: disable=import-outside-toplevel

  return MovingShapesSource(**kwargs)


_SOURCES: dict[str, Callable[..., Source]] = {
  "shapes": _shapes_source,
  "digits": _no_data_dir(DigitsSource),
  "photos": _no_data_dir(PhotosSource),
  "mnist": _tfds_builder("mnist"),
  "cifar10": _tfds_builder("cifar10"),
  "imagenet2012": _tfds_builder("imagenet2012"),
  "coco_captions": _tfds_builder("coco_captions"),
  "folder": _folder_source,
  "moving_shapes": lambda *, split, data_dir, image_size, **kw: _moving_shapes(
    split=split, image_size=image_size, **kw
  ),
}
SOURCE_NAMES = tuple(_SOURCES)


def get_source(
  name: str, *, split: str, data_dir: str | None = None, image_size: int, **kwargs: Any
) -> Source:
  """The data source `name` (one of `SOURCE_NAMES`); `kwargs` go to that source's constructor.

  `data_dir`: the TFDS data directory for shapes (built there if absent) and the TFDS sets (None:
  TFDS's default); the image folder for folder; unused by digits and photos. Extra kwargs: shapes
  (min_objects, max_objects, sizes, seed), digits (method), photos (num_examples, seed,
  min_scale, photos, method), TFDS sets (method, class_names, caption, seed), folder
  (validation_fraction, method, background, name).
  """
  if name not in _SOURCES:
    raise UserError(f"unknown dataset {name!r}; valid: {', '.join(SOURCE_NAMES)}")
  if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
    raise UserError(f"image_size must be a positive int, got {image_size!r}")
  return _SOURCES[name](split=split, data_dir=data_dir, image_size=int(image_size), **kwargs)


def source_from_config(data, split: str) -> Source:
  """The data set a config's `data` section names (`name`, `data_dir`, `image_size`,
  `source_kwargs`), for one split."""
  from vqlm.runtime.config import as_kwargs

  kwargs = as_kwargs(data.get("source_kwargs", {})) or {}
  return get_source(
    data.name, split=split, data_dir=data.data_dir or None, image_size=data.image_size, **kwargs
  )
