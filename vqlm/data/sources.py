"""Data sources: random-access captioned images behind one interface, chosen by name.

Every source is a `Source`: `len(source)` and `source[i] -> {"image": uint8 [S, S, 3], "text": str,
...}`, with attributes `name`, `split` and `image_size` (= S). Items may carry more keys:
"label" (int), "original_size" ((h, w) of the image content before resizing, read by the size
filters in `vqlm.data.filters`), "scene" (shapes), "file" (folder), "captions" (coco_captions: all
of them). Access is deterministic: `source[i]` is the same item every time, in every process.

`get_source(name, split=..., data_dir=..., image_size=...)` builds one of:
  shapes         procedural captioned shapes (`vqlm.data.shapes_tfds`), stored as a TFDS data set
  digits         scikit-learn's bundled 8x8 digits, upscaled; "the digit seven"
  photos         seeded random crops of scikit-image's bundled photos; text is the photo's name
  mnist, cifar10, imagenet2012, coco_captions
                 TFDS data sets prepared as array_record, read with random access (no TensorFlow)
  folder         a directory of images, optionally with captions.jsonl or captions.csv
"""
import abc
import csv
import functools
import hashlib
import json
import operator
import pathlib
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from vqlm.data import transforms

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")


class Source(abc.ABC):
  """Random-access captioned images: `len(src)`, `src[i] -> {"image": uint8[S, S, 3], "text"}`."""

  name: str
  split: str
  image_size: int

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def _get(self, index: int) -> dict[str, Any]:
    """Example `index`, already checked to lie in [0, len)."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    index = operator.index(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {self.name}/{self.split} "
                       f"with {n} examples")
    return self._get(index)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
            f"image_size={self.image_size}, len={len(self)})")


def _check_split(split: str, valid: Sequence[str], what: str) -> None:
  if split not in valid:
    raise ValueError(f"unknown split {split!r} for {what}; valid: {', '.join(valid)}")


def _article(noun: str) -> str:
  return "an" if noun[:1].lower() in "aeiou" else "a"


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
  from vqlm.data import shapes_tfds  # pylint: disable=import-outside-toplevel
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
    self._images = np.stack([transforms.to_rgb(transforms.resize(x, image_size, method))
                             for x in images[start:stop]])  # [N, S, S, 3]

  def __len__(self) -> int:
    return len(self._labels)

  def _get(self, index: int) -> dict[str, Any]:
    label = int(self._labels[index])
    return {"image": self._images[index].copy(), "text": f"the digit {_DIGIT_WORDS[label]}",
            "label": label, "original_size": (8, 8)}


# ---------------------------------------------------------------------------------------- photos

# Photos that ship inside the scikit-image package (no download), held out by split.
PHOTO_SPLITS = {
    "train": ("astronaut", "camera", "coffee", "rocket", "hubble_deep_field",
              "immunohistochemistry", "retina", "coins", "moon", "brick", "grass", "cell"),
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

  def __init__(self, *, split: str = "train", image_size: int = 32,
               num_examples: int | None = None, seed: int = 0, min_scale: float = 0.25,
               photos: Sequence[str] | None = None, method: str = "bicubic"):
    _check_split(split, tuple(PHOTO_SPLITS), "photos")
    known = sorted(set().union(*PHOTO_SPLITS.values()))
    photos = tuple(photos) if photos is not None else PHOTO_SPLITS[split]
    for photo in photos:
      if photo not in known:
        raise ValueError(f"unknown photo {photo!r}; valid: {', '.join(known)}")
    if not photos:
      raise ValueError("photos must name at least one photo")
    if not 0.0 < min_scale <= 1.0:
      raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    self.name, self.split, self.image_size = "photos", split, image_size
    self.photos = photos
    self._num = _PHOTO_EXAMPLES[split] if num_examples is None else int(num_examples)
    if self._num <= 0:
      raise ValueError(f"num_examples must be positive, got {num_examples}")
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
    return {"image": crop, "text": name.replace("_", " "), "photo": name,
            "original_size": (side, side)}


# ------------------------------------------------------------------------------------------ TFDS

def _read_class_names(class_names: Sequence[str] | str, synsets: Sequence[str]) -> list[str]:
  """Class names in label order from a list, or a file of one name per line or of
  "n01443537 goldfish, Carassius auratus" lines (ImageNet's synset mapping, any order)."""
  if isinstance(class_names, (str, pathlib.Path)):
    lines = [l.strip() for l in pathlib.Path(class_names).read_text().splitlines() if l.strip()]
    mapping = dict(m.groups() for l in lines if (m := re.match(r"^(n\d{8})\s+(.+)$", l)))
    if mapping and len(mapping) == len(lines):
      missing = [s for s in synsets if s not in mapping]
      if missing:
        raise ValueError(f"{class_names} lacks {len(missing)} synsets (first: {missing[0]})")
      return [mapping[s].split(",")[0].strip() for s in synsets]
    class_names = lines
  names = [str(n) for n in class_names]
  if len(names) != len(synsets):
    raise ValueError(f"class_names has {len(names)} names but the data set has {len(synsets)} "
                     "classes; give one name per class in label order")
  return names


def _open_tfds(tfds_name: str, split: str, data_dir: str | None, *, code_needs_tf: bool):
  """`(random-access data source, DatasetInfo)` of a TFDS data set prepared as array_record."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  where = data_dir or "the default TFDS data_dir"
  prepare = (f"prepare it with `tfds build {tfds_name} --file_format=array_record"
             f"{' --data_dir=' + data_dir if data_dir else ''}`")
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
          tfds_name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f"{tfds_name} is not prepared in {where}; {prepare} (its TFDS builder "
                       "needs TensorFlow to prepare, but not to read)") from None
  try:
    return builder.as_data_source(split=split), builder.info
  except (KeyError, ValueError, NotImplementedError) as e:
    if not builder.info.splits:
      raise ValueError(f"{tfds_name} is not prepared in {where}; {prepare}") from None
    if split.split("[")[0] not in builder.info.splits:
      raise ValueError(f"unknown split {split!r} for {tfds_name}; valid: "
                       f"{', '.join(builder.info.splits)}") from None
    raise ValueError(f"cannot read {tfds_name} split {split!r} from {where} ({e}); {prepare}"
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

  _KINDS = {"mnist": "digits", "cifar10": "cifar10", "imagenet2012": "imagenet",
            "coco_captions": "coco"}
  _SPLIT_ALIASES = {"coco_captions": {"validation": "val"}}

  def __init__(self, tfds_name: str, *, split: str = "train", data_dir: str | None = None,
               image_size: int = 32, method: str = "bicubic",
               class_names: Sequence[str] | str | None = None, caption: str = "first",
               seed: int = 0):
    if tfds_name not in self._KINDS:
      raise ValueError(f"unknown TFDS source {tfds_name!r}; valid: {', '.join(self._KINDS)}")
    if caption not in ("first", "random"):
      raise ValueError(f"caption must be 'first' or 'random', got {caption!r}")
    self.name, self.split, self.image_size = tfds_name, split, image_size
    self._kind = self._KINDS[tfds_name]
    self._method, self._caption, self._seed = method, caption, seed
    tfds_split = self._SPLIT_ALIASES.get(tfds_name, {}).get(split, split)
    self._data, info = _open_tfds(tfds_name, tfds_split, data_dir,
                                  code_needs_tf=self._kind == "coco")
    self._class_texts: list[str] = []
    if self._kind == "digits":
      self._class_texts = [f"the digit {w}" for w in _DIGIT_WORDS]
    elif self._kind == "cifar10":
      self._class_texts = [f"a photo of {_article(n)} {n}" for n in _CIFAR10_NAMES]
    elif self._kind == "imagenet":
      synsets = list(info.features["label"].names)
      if class_names is None:
        warnings.warn("imagenet2012 has no class_names: captions use WordNet ids; pass "
                      "class_names=FILE (one name per line, or 'n01443537 goldfish' lines)")
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


# ---------------------------------------------------------------------------------------- folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CAPTION_FILES = ("captions.jsonl", "captions.csv")


def _read_captions(root: pathlib.Path) -> tuple[list[dict[str, str]], pathlib.Path] | None:
  """Rows {"file", "text"[, "split"]} of root's captions file, or None if it has none."""
  found = [root / f for f in _CAPTION_FILES if (root / f).is_file()]
  if len(found) > 1:
    raise ValueError(f"{root} has both captions.jsonl and captions.csv; keep one")
  if not found:
    return None
  path = found[0]
  rows = []
  if path.suffix == ".jsonl":
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict) or not {"file", "text"} <= row.keys():
        raise ValueError(f"{path}:{lineno}: each line needs keys 'file' and 'text', got "
                         f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
      rows.append(row)
  else:
    with path.open(newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if not {"file", "text"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{path} needs a header with columns 'file', 'text', got "
                         f"{reader.fieldnames}")
      rows = list(reader)
  for row in rows:
    if not isinstance(row["file"], str) or not isinstance(row["text"], str):
      raise ValueError(f"{path}: 'file' and 'text' must be strings, got {row}")
  return [{k: str(v) for k, v in row.items() if k in ("file", "text", "split") and v is not None}
          for row in rows], path


def _hash_fraction(file: str) -> float:
  digest = hashlib.blake2b(file.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def _one_line(error: BaseException) -> str:
  text = str(error).splitlines()[0] if str(error) else ""
  return f"{type(error).__name__}: {text}"[:200]


def _pil_to_array(image: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> uint8 `[H, W]`, `[H, W, 2]` (gray + alpha), RGB or RGBA."""
  mode = image.mode
  if mode in ("L", "LA", "RGB", "RGBA"):
    return np.array(image)
  if mode in ("P", "PA"):
    has_alpha = mode == "PA" or "transparency" in image.info
    return np.array(image.convert("RGBA" if has_alpha else "RGB"))
  if mode in ("RGBa", "La"):
    return np.array(image.convert(mode.upper()))
  if mode == "1":
    return np.array(image.convert("L"))
  if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale.
    values = np.asarray(image, np.float64)
    if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
      values = values / 257.0
    elif mode == "F" and values.max(initial=0) <= 1.0:
      values = values * 255.0
    return np.clip(np.round(values), 0, 255).astype(np.uint8)
  return np.array(image.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, ...


class FolderSource(Source):
  """A directory of images, with captions from `captions.jsonl` or `captions.csv`.

  Captions: `captions.jsonl` lines `{"file": "a.png", "text": "..."}` or `captions.csv` with
  columns `file,text` (paths relative to the folder). Only the listed files are used; a file
  listed several times gives several examples (one per caption). Without a captions file, every
  image under the folder (recursively) is used with empty text.

  Splits: if every row has a "split" value, `split` selects those rows (any name). Otherwise a
  hash of the file name puts a `validation_fraction` of files in "validation", the rest in
  "train"; "all" always selects everything.

  Images are converted to RGB (grayscale repeated; alpha composited over `background`, white by
  default; palettes expanded; 16-bit scaled; EXIF rotation applied) and resized (shorter side) +
  centre-cropped to `image_size`. At construction every file's header is checked with PIL's
  `verify()`: unreadable or missing files are dropped (`skipped`, one warning). A file that still
  fails to decode in `__getitem__` is recorded in `failed` and the next readable example (in index
  order, wrapping) is returned instead, so an epoch never stops on a bad file.
  """

  def __init__(self, directory: str | pathlib.Path, *, split: str = "train",
               image_size: int = 32, validation_fraction: float = 0.05,
               method: str = "bicubic", background: str | int = "white", name: str = "folder"):
    root = pathlib.Path(directory)
    if not root.is_dir():
      raise ValueError(f"image folder {root} does not exist or is not a directory")
    if not 0.0 <= validation_fraction <= 1.0:
      raise ValueError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    self.name, self.split, self.image_size = name, split, image_size
    self.root, self._method, self._background = root, method, background
    captions = _read_captions(root)
    if captions is None:
      files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
      rows = [{"file": f, "text": ""} for f in files]
      source_desc = str(root)
    else:
      rows, path = captions
      source_desc = str(path)
    rows = self._select_split(rows, split, validation_fraction, source_desc)
    self.skipped: dict[str, str] = {}  # file -> reason, found at construction.
    self.failed: dict[str, str] = {}  # file -> reason, found while reading examples.
    readable = set()
    for file in dict.fromkeys(r["file"] for r in rows):
      try:
        with Image.open(root / file) as image:
          image.verify()
        readable.add(file)
      except Exception as e:  # pylint: disable=broad-except
        self.skipped[file] = _one_line(e)
    if self.skipped:
      first, reason = next(iter(self.skipped.items()))
      warnings.warn(f"skipped {len(self.skipped)} unreadable images in {root} "
                    f"(first: {first}: {reason})")
    rows = [r for r in rows if r["file"] in readable]
    if not rows:
      raise ValueError(f"no usable images in {root} for split {split!r} "
                       f"({len(self.skipped)} unreadable)")
    self._files = [r["file"] for r in rows]
    self._texts = [r["text"] for r in rows]
    self._lock = threading.Lock()

  @staticmethod
  def _select_split(rows: list[dict[str, str]], split: str, validation_fraction: float,
                    where: str) -> list[dict[str, str]]:
    if split == "all":
      return rows
    with_split = [bool(r.get("split")) for r in rows]
    if rows and all(with_split):
      valid = sorted({r["split"] for r in rows})
      _check_split(split, valid + ["all"], f"the 'split' column of {where}")
      return [r for r in rows if r["split"] == split]
    if any(with_split):
      raise ValueError(f"{where}: some rows have a 'split' value and some do not; fill them all "
                       "or drop the column")
    _check_split(split, ("train", "validation", "all"), where)
    in_validation = [_hash_fraction(r["file"]) < validation_fraction for r in rows]
    return [r for r, v in zip(rows, in_validation) if v == (split == "validation")]

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_lock": None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._files)

  def load_image(self, file: str) -> tuple[np.ndarray, tuple[int, int]]:
    """`(uint8 [S, S, 3], original (h, w))` of one file; raises on unreadable files."""
    size = self.image_size
    with Image.open(self.root / file) as image:
      width, height = image.size
      if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation turns it 90 degrees.
        width, height = height, width
      if image.format == "JPEG":  # Decode big JPEGs at a reduced scale (still >= size).
        image.draft(image.mode, (size, size))
      image = ImageOps.exif_transpose(image)
      array = _pil_to_array(image)
    original = (height, width)
    array = transforms.to_rgb(array, self._background)
    return transforms.resize_shorter_then_center_crop(array, size, self._method), original

  def _get(self, index: int) -> dict[str, Any]:
    n = len(self._files)
    for offset in range(n):
      j = (index + offset) % n
      file = self._files[j]
      if file in self.failed:
        continue
      try:
        image, original_size = self.load_image(file)
      except Exception as e:  # pylint: disable=broad-except
        with self._lock:
          if not self.failed:
            warnings.warn(f"image {file} in {self.root} failed to load ({_one_line(e)}); "
                          "serving the next readable image instead (see .failed)")
          self.failed[file] = _one_line(e)
        continue
      return {"image": image, "text": self._texts[j], "file": file,
              "original_size": original_size}
    raise ValueError(f"none of the {n} images in {self.root} could be read "
                     f"(first failure: {next(iter(self.failed.items()), '')})")


# -------------------------------------------------------------------------------------- registry

def _folder_source(*, split: str, data_dir: str | None, image_size: int, **kwargs) -> Source:
  if data_dir is None:
    raise ValueError("the folder source needs data_dir=DIR (a folder of images, optionally with "
                     "captions.jsonl or captions.csv)")
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
        split=split, image_size=image_size, **kw),
}
SOURCE_NAMES = tuple(_SOURCES)


def get_source(name: str, *, split: str, data_dir: str | None = None, image_size: int,
               **kwargs: Any) -> Source:
  """The data source `name` (one of `SOURCE_NAMES`); `kwargs` go to that source's constructor.

  `data_dir`: the TFDS data directory for shapes (built there if absent) and the TFDS sets (None:
  TFDS's default); the image folder for folder; unused by digits and photos. Extra kwargs: shapes
  (min_objects, max_objects, sizes, seed), digits (method), photos (num_examples, seed,
  min_scale, photos, method), TFDS sets (method, class_names, caption, seed), folder
  (validation_fraction, method, background, name).
  """
  if name not in _SOURCES:
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(SOURCE_NAMES)}")
  if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  return _SOURCES[name](split=split, data_dir=data_dir, image_size=int(image_size), **kwargs)
