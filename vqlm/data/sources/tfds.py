"""TFDS data sets (mnist, cifar10, imagenet2012, coco_captions) prepared as array_record and
read with random access, without TensorFlow. tensorflow_datasets is imported only when one is
opened."""

from collections.abc import Sequence
import pathlib
import re
from typing import Any
import warnings

import numpy as np

from vqlm.data import transforms
from vqlm.data.sources.base import _DIGIT_WORDS, Source
from vqlm.errors import UserError

_CIFAR10_NAMES = (
  "airplane",
  "automobile",
  "bird",
  "cat",
  "deer",
  "dog",
  "frog",
  "horse",
  "ship",
  "truck",
)


def _article(noun: str) -> str:
  return "an" if noun[:1].lower() in "aeiou" else "a"


def _read_class_names(class_names: Sequence[str] | str, synsets: Sequence[str]) -> list[str]:
  """Class names in label order from a list, or a file of one name per line or of
  "n01443537 goldfish, Carassius auratus" lines (ImageNet's synset mapping, any order)."""
  if isinstance(class_names, (str, pathlib.Path)):
    lines = [l.strip() for l in pathlib.Path(class_names).read_text().splitlines() if l.strip()]
    mapping = dict(m.groups() for l in lines if (m := re.match(r"^(n\d{8})\s+(.+)$", l)))
    if mapping and len(mapping) == len(lines):
      missing = [s for s in synsets if s not in mapping]
      if missing:
        raise UserError(f"{class_names} lacks {len(missing)} synsets (first: {missing[0]})")
      return [mapping[s].split(",")[0].strip() for s in synsets]
    class_names = lines
  names = [str(n) for n in class_names]
  if len(names) != len(synsets):
    raise UserError(
      f"class_names has {len(names)} names but the data set has {len(synsets)} "
      "classes; give one name per class in label order"
    )
  return names


def _open_tfds(tfds_name: str, split: str, data_dir: str | None, *, code_needs_tf: bool):
  """`(random-access data source, DatasetInfo)` of a TFDS data set prepared as array_record."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  where = data_dir or "the default TFDS data_dir"
  prepare = (
    f"prepare it with `tfds build {tfds_name} --file_format=array_record"
    f"{' --data_dir=' + data_dir if data_dir else ''}`"
  )
  builder = None
  if not code_needs_tf:
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    except ImportError as e:
      if "tensorflow" not in str(e).lower():
        raise
  if builder is None:  # The builder's code imports TensorFlow: read the prepared files instead.
    try:
      builder = tfds.core.read_only_builder.builder_from_files(
        tfds_name, data_dir=data_dir, file_format="array_record"
      )
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(
        f"{tfds_name} is not prepared in {where}; {prepare} (its TFDS builder "
        "needs TensorFlow to prepare, but not to read)"
      ) from None
  try:
    return builder.as_data_source(split=split), builder.info
  except (KeyError, ValueError, NotImplementedError) as e:
    if not builder.info.splits:
      raise UserError(f"{tfds_name} is not prepared in {where}; {prepare}") from None
    if split.split("[")[0] not in builder.info.splits:
      raise UserError(
        f"unknown split {split!r} for {tfds_name}; valid: {', '.join(builder.info.splits)}"
      ) from None
    raise UserError(
      f"cannot read {tfds_name} split {split!r} from {where} ({e}); {prepare}"
    ) from None


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource(Source):
  """A TFDS data set (mnist, cifar10, imagenet2012, coco_captions) read with random access.

  Images are converted to RGB and resized (shorter side) + centre-cropped to `image_size`.
  Classification sets get captions from class names ("the digit seven", "a photo of a cat");
  imagenet2012 takes `class_names` (a list in label order, or a file: one name per line in label
  order, or ImageNet's "n01443537 goldfish, Carassius auratus" synset mapping); without it the
  captions use WordNet ids. coco_captions uses its first caption (`caption="first"`) or one drawn
  by `(seed, index)` (`caption="random"`); all of them are under "captions".
  """

  _KINDS = {
    "mnist": "digits",
    "cifar10": "cifar10",
    "imagenet2012": "imagenet",
    "coco_captions": "coco",
  }
  _SPLIT_ALIASES = {"coco_captions": {"validation": "val"}}

  def __init__(
    self,
    tfds_name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int = 32,
    method: str = "bicubic",
    class_names: Sequence[str] | str | None = None,
    caption: str = "first",
    seed: int = 0,
  ):
    if tfds_name not in self._KINDS:
      raise UserError(f"unknown TFDS source {tfds_name!r}; valid: {', '.join(self._KINDS)}")
    if caption not in ("first", "random"):
      raise UserError(f"caption must be 'first' or 'random', got {caption!r}")
    self.name, self.split, self.image_size = tfds_name, split, image_size
    self._kind = self._KINDS[tfds_name]
    self._method, self._caption, self._seed = method, caption, seed
    tfds_split = self._SPLIT_ALIASES.get(tfds_name, {}).get(split, split)
    self._data, info = _open_tfds(
      tfds_name, tfds_split, data_dir, code_needs_tf=self._kind == "coco"
    )
    self._class_texts: list[str] = []
    if self._kind == "digits":
      self._class_texts = [f"the digit {w}" for w in _DIGIT_WORDS]
    elif self._kind == "cifar10":
      self._class_texts = [f"a photo of {_article(n)} {n}" for n in _CIFAR10_NAMES]
    elif self._kind == "imagenet":
      synsets = list(info.features["label"].names)
      if class_names is None:
        warnings.warn(
          "imagenet2012 has no class_names: captions use WordNet ids; pass "
          "class_names=FILE (one name per line, or 'n01443537 goldfish' lines)",
          stacklevel=2,
        )
        names = synsets
      else:
        names = _read_class_names(class_names, synsets)
      self._class_texts = [f"a photo of {_article(n)} {n}" for n in names]

  def __len__(self) -> int:
    return len(self._data)

  def _get(self, index: int) -> dict[str, Any]:
    return self.convert(self._data[index], index)

  def convert(self, record: dict[str, Any], index: int) -> dict[str, Any]:
    """One TFDS record (as the data source returns it) -> a vqlm example."""
    image = np.asarray(record["image"])
    original_size = tuple(int(s) for s in image.shape[:2])
    image = transforms.to_rgb(image)
    image = transforms.resize_shorter_then_center_crop(image, self.image_size, self._method)
    example: dict[str, Any] = {"image": image, "original_size": original_size}
    if self._kind == "coco":
      captions = [_text(t) for t in record["captions"]["text"]]
      example["captions"] = captions
      if not captions:
        example["text"] = ""
      elif self._caption == "first":
        example["text"] = captions[0]
      else:
        rng = np.random.default_rng([self._seed, index])
        example["text"] = captions[int(rng.integers(len(captions)))]
    else:
      label = int(record["label"])
      example["label"] = label
      example["text"] = self._class_texts[label] if 0 <= label < len(self._class_texts) else ""
    return example
