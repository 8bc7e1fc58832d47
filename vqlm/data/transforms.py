"""Image transforms on NumPy arrays (resize, crops, channel and range conversion).

Images are `[H, W, C]` arrays (or `[H, W]` for grayscale). Pixel images are `uint8` in [0, 255];
model inputs are `float32` in [-1, 1] (`to_float` / `to_uint8` convert between the two). Resizing
goes through PIL, whose filters are antialiased when shrinking.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image

from vqlm.errors import UserError

Size = int | Sequence[int]

_METHODS = {
  "nearest": Image.Resampling.NEAREST,
  "bilinear": Image.Resampling.BILINEAR,
  "bicubic": Image.Resampling.BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
  "box": Image.Resampling.BOX,
  "area": Image.Resampling.BOX,
  "hamming": Image.Resampling.HAMMING,
}


def _size_hw(size: Size) -> tuple[int, int]:
  """`size` (an int for a square, or `(h, w)`) as a validated `(h, w)` pair."""
  if isinstance(size, (int, np.integer)):
    h = w = int(size)
  else:
    try:
      h, w = (int(s) for s in size)
    except (TypeError, ValueError):
      raise UserError(f"size must be an int or a pair (h, w), got {size!r}") from None
  if h <= 0 or w <= 0:
    raise UserError(f"size must be positive, got {size!r}")
  return h, w


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
    raise UserError(f"expected an image [H, W] or [H, W, C], got shape {image.shape}")
  if image.ndim == 3 and image.shape[-1] == 0:
    raise UserError(f"expected an image [H, W, C] with C >= 1, got shape {image.shape}")
  return image


def resize(image: np.ndarray, size: Size, method: str = "bicubic") -> np.ndarray:
  """Resizes `image` `[H, W]` or `[H, W, C]` to `size` (int: square; or `(h, w)`).

  `method` is one of nearest, bilinear, bicubic, lanczos, box (= area), hamming. uint8 images keep
  their dtype (values rounded and clipped); floating images are resized per channel in float32.
  """
  image = _check_image(image)
  h, w = _size_hw(size)
  if method not in _METHODS:
    raise UserError(f"unknown resize method {method!r}; valid: {', '.join(_METHODS)}")
  if image.shape[:2] == (h, w):
    return image.copy()
  resample = _METHODS[method]
  if image.dtype == np.uint8:
    if image.ndim == 2 or image.shape[-1] == 3:
      return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), resample))
    # Other channel counts (and RGBA, which PIL would premultiply by alpha) go channel by channel.
    return np.stack(
      [resize(image[..., c], (h, w), method) for c in range(image.shape[-1])], axis=-1
    )
  if np.issubdtype(image.dtype, np.floating):
    channels = image[..., None] if image.ndim == 2 else image
    out = np.stack(
      [
        np.array(
          Image.fromarray(np.ascontiguousarray(channels[..., c], np.float32)).resize(
            (w, h), resample
          )
        )
        for c in range(channels.shape[-1])
      ],
      axis=-1,
    )
    return out[..., 0] if image.ndim == 2 else out
  raise UserError(f"resize supports uint8 or floating images, got dtype {image.dtype}")


def center_crop(image: np.ndarray, size: Size) -> np.ndarray:
  """The centred `size` window of `image` `[H, W, ...]`; odd margins put the extra pixel last."""
  image = _check_image(image)
  h, w = _size_hw(size)
  height, width = image.shape[:2]
  if h > height or w > width:
    raise UserError(f"crop {h}x{w} is larger than the image {height}x{width}; resize first")
  top, left = (height - h) // 2, (width - w) // 2
  return image[top : top + h, left : left + w].copy()


def random_crop(image: np.ndarray, size: Size, rng: np.random.Generator) -> np.ndarray:
  """A `size` window of `image` `[H, W, ...]` at a uniformly random position drawn from `rng`."""
  image = _check_image(image)
  h, w = _size_hw(size)
  height, width = image.shape[:2]
  if h > height or w > width:
    raise UserError(f"crop {h}x{w} is larger than the image {height}x{width}; resize first")
  top = int(rng.integers(0, height - h + 1))
  left = int(rng.integers(0, width - w + 1))
  return image[top : top + h, left : left + w].copy()


def random_shift(image: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """`image` `[H, W, ...]` translated by a random `(dy, dx)`, each uniform in
  `[-max_shift, max_shift]`; the pixels it uncovers repeat the nearest edge pixel (for a plain
  background, more background). Same shape as `image`."""
  image = _check_image(image)
  if max_shift < 0:
    raise UserError(f"max_shift must be >= 0, got {max_shift}")
  if max_shift == 0:
    return image.copy()
  pad = [(max_shift, max_shift)] * 2 + [(0, 0)] * (image.ndim - 2)
  return random_crop(np.pad(image, pad, mode="edge"), image.shape[:2], rng)


def resize_shorter_then_center_crop(
  image: np.ndarray, size: int, method: str = "bicubic"
) -> np.ndarray:
  """Scales `image` so its shorter side is `size`, then takes the centred `[size, size]` window."""
  image = _check_image(image)
  size = _size_hw(size)[0]
  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_h = max(size, round(height * scale))
  new_w = max(size, round(width * scale))
  return center_crop(resize(image, (new_h, new_w), method), size)


def to_rgb(image: np.ndarray, background: str | int = "white") -> np.ndarray:
  """A uint8 `[H, W, 3]` RGB copy of a uint8 `[H, W]`, `[H, W, 1|2|3|4]` image.

  Grayscale channels are repeated. An alpha channel (gray + alpha `[H, W, 2]` or RGBA) is
  composited over a plain `background`: "white" (255, the default: transparent areas of logos and
  scans usually mean paper), "black" (0), or a gray level 0..255.
  """
  image = _check_image(image)
  if image.dtype != np.uint8:
    raise UserError(f"to_rgb expects a uint8 image, got dtype {image.dtype}; use to_uint8 first")
  if isinstance(background, str):
    if background not in ("white", "black"):
      raise UserError(f"background must be 'white', 'black' or 0..255, got {background!r}")
    background = 255 if background == "white" else 0
  if not 0 <= int(background) <= 255:
    raise UserError(f"background must be 'white', 'black' or 0..255, got {background!r}")
  if image.ndim == 2:
    image = image[..., None]
  channels = image.shape[-1]
  if channels not in (1, 2, 3, 4):
    raise UserError(f"to_rgb expects 1 to 4 channels, got shape {image.shape}")
  color = image[..., : 1 if channels <= 2 else 3]
  if channels in (2, 4):
    alpha = image[..., -1:].astype(np.float32) / 255.0
    mixed = color.astype(np.float32) * alpha + float(background) * (1.0 - alpha)
    color = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
  if color.shape[-1] == 1:
    color = np.repeat(color, 3, axis=-1)
  return np.ascontiguousarray(color)


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 pixels `[..., C]` -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise UserError(f"to_float expects a uint8 image, got dtype {image.dtype}")
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float pixels in [-1, 1] -> uint8 (values outside are clipped; NaN raises ValueError)."""
  image = np.asarray(image)
  if not np.issubdtype(image.dtype, np.floating):
    raise UserError(f"to_uint8 expects a floating image in [-1, 1], got dtype {image.dtype}")
  if np.isnan(image).any():
    raise UserError("to_uint8 got NaN pixels; check the model output")
  scaled = (np.clip(image.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
  return np.round(scaled).astype(np.uint8)
