"""Image grids and PNG files."""

import os

import numpy as np
from PIL import Image

from vqlm.errors import UserError


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [-1, 1] (any leading dims, [..., H, W, 3]) -> uint8 in [0, 255]."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(
  images: np.ndarray,
  *,
  columns: int | None = None,
  pad: int = 2,
  pad_value: int = 255,
  scale: int = 1,
) -> np.ndarray:
  """Tiles uint8 images [N, H, W, 3] into one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(f"expected uint8 images [N, H, W, 3], got shape {images.shape}")
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, _ = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), pad_value, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
    ] = image
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  """Writes uint8 [H, W, 3] to `path` (parents created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
  return path


def load_png(path: str) -> np.ndarray:
  """Reads any image file as uint8 [H, W, 3] (`read_image`)."""
  return read_image(path)


def read_image(path: str, what: str = "") -> np.ndarray:
  """Any image file PIL reads as uint8 RGB `[H, W, 3]`; a one-line UserError naming the file
  (`what`, e.g. "--image x.png"; default: the path) when it is missing, a directory or not a
  readable image."""
  what = what or str(path)
  if os.path.isdir(path):
    raise UserError(f"{what} is a directory; pass an image file")
  if not os.path.exists(path):
    raise UserError(f"{what} does not exist")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError, ...
    lines = str(e).strip().splitlines()
    reason = lines[0] if lines else type(e).__name__
    raise UserError(f"{what} is not a readable image ({reason}); pass a PNG or JPEG file") from None
