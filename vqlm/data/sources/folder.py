"""The folder source: a directory of images, optionally captioned by captions.jsonl or
captions.csv."""

from collections.abc import Callable
import csv
import hashlib
import io
import json
import pathlib
import threading
from typing import Any
import warnings

import numpy as np
from PIL import Image, ImageOps

from vqlm.data import transforms
from vqlm.data.sources.base import Source, _check_split
from vqlm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CAPTION_FILES = ("captions.jsonl", "captions.csv")


def _read_captions(root: pathlib.Path) -> tuple[list[dict[str, str]], pathlib.Path] | None:
  """Rows {"file", "text"[, "split"]} of root's captions file, or None if it has none."""
  found = [root / f for f in _CAPTION_FILES if (root / f).is_file()]
  if len(found) > 1:
    raise UserError(f"{root} has both captions.jsonl and captions.csv; keep one")
  if not found:
    return None
  path = found[0]
  data = path.read_bytes()
  try:
    text = data.decode("utf-8-sig")  # A byte-order mark (Windows editors) is not content.
  except UnicodeDecodeError as e:
    lineno = data[: e.start].count(b"\n") + 1
    raise UserError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
  rows = []  # (line number, row)
  if path.suffix == ".jsonl":
    # JSON Lines ends lines with \n only: str.splitlines would also split inside a caption (at
    # U+2028, U+0085, ..., which JSON strings may hold unescaped).
    for lineno, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict) or not {"file", "text"} <= row.keys():
        raise UserError(
          f"{path}:{lineno}: each line needs keys 'file' and 'text', got "
          f"{sorted(row) if isinstance(row, dict) else type(row).__name__}"
        )
      rows.append((lineno, row))
  else:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
      if not {"file", "text"} <= set(reader.fieldnames or ()):
        raise UserError(
          f"{path} needs a header with columns 'file', 'text', got {reader.fieldnames}"
        )
      rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:  # e.g. a field over csv.field_size_limit()
      raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
  for lineno, row in rows:
    if not isinstance(row["file"], str) or not isinstance(row["text"], str):
      got = {k: row[k] for k in ("file", "text")}
      raise UserError(
        f"{path}:{lineno}: 'file' and 'text' must be strings (\"\" for no caption), got {got}"
      )
  return [
    {k: str(v) for k, v in row.items() if k in ("file", "text", "split") and v is not None}
    for _, row in rows
  ], path


def _hash_fraction(file: str) -> float:
  # surrogateescape: a name that is not UTF-8 on disk is listed with escapes; hash its bytes.
  digest = hashlib.blake2b(file.encode("utf-8", "surrogateescape"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def _image_files(root: pathlib.Path) -> list[str]:
  """The image files under root (recursively), as sorted posix paths relative to it."""
  return sorted(
    p.relative_to(root).as_posix()
    for p in root.rglob("*")
    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
  )


def _verify(path: pathlib.Path) -> str | None:
  """None if PIL can read the file's header, else the reason (one line)."""
  try:
    with Image.open(path) as image:
      image.verify()
  except Exception as e:  # pylint: disable=broad-except
    return _one_line(e)
  return None


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _some(files: list[str], limit: int = 3) -> str:
  return ", ".join(files[:limit]) + (
    f" and {len(files) - limit} more" if len(files) > limit else ""
  )


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
  columns `file,text` (paths relative to the folder; UTF-8, a byte-order mark is ignored). Only
  the listed files are used; a file listed several times gives several examples (one per
  caption). Without a captions file, every image under the folder (recursively) is used with
  empty text.

  Images under the folder that the captions file does not list are not used (one warning names
  them); a row with `"text": ""` uses its image without a caption, and blank lines are ignored.

  Splits: if every row has a "split" value, `split` selects those rows (any name). Otherwise a
  hash of the file name puts a `validation_fraction` of files in "validation", the rest in
  "train" (when the hash puts no readable file in "validation", the readable file of smallest
  hash goes there, so a small folder still has one; a folder of one image has none); "all"
  always selects everything. There is no "test" split unless the "split" column names one.

  Images are converted to RGB (grayscale repeated; alpha composited over `background`, white by
  default; palettes expanded; 16-bit scaled; EXIF rotation applied) and resized (shorter side) +
  centre-cropped to `image_size`. At construction every file's header is checked with PIL's
  `verify()`: unreadable or missing files are dropped (`skipped`, one warning). A file that still
  fails to decode in `__getitem__` is recorded in `failed` and the next readable example (in index
  order, wrapping) is returned instead, so an epoch never stops on a bad file.
  """

  def __init__(
    self,
    directory: str | pathlib.Path,
    *,
    split: str = "train",
    image_size: int = 32,
    validation_fraction: float = 0.05,
    method: str = "bicubic",
    background: str | int = "white",
    name: str = "folder",
  ):
    root = pathlib.Path(directory)
    if not root.is_dir():
      raise UserError(f"image folder {root} does not exist or is not a directory")
    if not 0.0 <= validation_fraction <= 1.0:
      raise UserError(f"validation_fraction must be in [0, 1], got {validation_fraction}")
    self.name, self.split, self.image_size = name, split, image_size
    self.root, self._method, self._background = root, method, background
    captions = _read_captions(root)
    if captions is None:
      rows = [{"file": f, "text": ""} for f in _image_files(root)]
      source_desc = str(root)
    else:
      rows, path = captions
      source_desc = str(path)
      listed = {pathlib.PurePosixPath(r["file"]).as_posix() for r in rows}
      uncaptioned = [f for f in _image_files(root) if f not in listed]
      if uncaptioned:
        warnings.warn(
          f"{path.name} has no line for {_count(len(uncaptioned), 'image')} in {root} "
          f"({_some(uncaptioned)}): not used; give each a line with an empty text to use it "
          "uncaptioned",
          stacklevel=2,
        )
    verified: dict[str, str | None] = {}  # file -> None if readable, else why not.

    def unreadable(file: str) -> str | None:
      if file not in verified:
        verified[file] = _verify(root / file)
      return verified[file]

    rows = self._select_split(rows, split, validation_fraction, source_desc, unreadable)
    self.skipped: dict[str, str] = {}  # file -> reason, found at construction.
    self.failed: dict[str, str] = {}  # file -> reason, found while reading examples.
    for file in dict.fromkeys(r["file"] for r in rows):
      reason = unreadable(file)
      if reason is not None:
        self.skipped[file] = reason
    if self.skipped:
      (first, reason), others = next(iter(self.skipped.items())), list(self.skipped)[1:]
      warnings.warn(
        f"skipped {_count(len(self.skipped), 'unreadable image')} in {root} "
        f"(first: {first}: {reason}" + (f"; also {_some(others)}" if others else "") + ")",
        stacklevel=2,
      )
    rows = [r for r in rows if r["file"] not in self.skipped]
    if not rows:
      raise UserError(
        f"no usable images in {root} for split {split!r} ({len(self.skipped)} unreadable)"
      )
    self._files = [r["file"] for r in rows]
    self._texts = [r["text"] for r in rows]
    self._lock = threading.Lock()

  @staticmethod
  def _select_split(
    rows: list[dict[str, str]],
    split: str,
    validation_fraction: float,
    where: str,
    unreadable: Callable[[str], str | None],
  ) -> list[dict[str, str]]:
    if split == "all":
      return rows
    with_split = [bool(r.get("split")) for r in rows]
    if rows and all(with_split):
      valid = sorted({r["split"] for r in rows})
      _check_split(split, valid + ["all"], f"the 'split' column of {where}")
      return [r for r in rows if r["split"] == split]
    if any(with_split):
      raise UserError(
        f"{where}: some rows have a 'split' value and some do not; fill them all or drop the column"
      )
    _check_split(split, ("train", "validation", "all"), where)
    files = sorted(dict.fromkeys(r["file"] for r in rows), key=_hash_fraction)
    validation = {f for f in files if _hash_fraction(f) < validation_fraction}
    if validation_fraction > 0 and all(unreadable(f) is not None for f in validation):
      # Too few files for the fraction: the readable file of smallest hash validates, as long as
      # another readable file is left to train on.
      readable = (f for f in files if f not in validation and unreadable(f) is None)
      first, second = next(readable, None), next(readable, None)
      if second is not None:
        validation.add(first)
    return [r for r in rows if (r["file"] in validation) == (split == "validation")]

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
            warnings.warn(
              f"image {file} in {self.root} failed to load ({_one_line(e)}); "
              "serving the next readable image instead (see .failed)",
              stacklevel=2,
            )
          self.failed[file] = _one_line(e)
        continue
      return {"image": image, "text": self._texts[j], "file": file, "original_size": original_size}
    raise UserError(
      f"none of the {n} images in {self.root} could be read "
      f"(first failure: {next(iter(self.failed.items()), '')})"
    )
