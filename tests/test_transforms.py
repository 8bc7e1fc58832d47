import numpy as np
import pytest

from vqlm.data import transforms


def _arange_image(h, w, c=3):
  return (np.arange(h * w * c) % 251).astype(np.uint8).reshape(h, w, c)


@pytest.mark.parametrize("shape", [(10, 14), (10, 14, 1), (10, 14, 2), (10, 14, 3), (10, 14, 4)])
def test_resize_shapes_and_dtype(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  out = transforms.resize(image, (7, 9))
  assert out.shape == (7, 9) + shape[2:] and out.dtype == np.uint8
  assert transforms.resize(image, 5).shape == (5, 5) + shape[2:]


def test_resize_values():
  image = np.array([[10, 20], [30, 40]], np.uint8)
  nearest = transforms.resize(image, 4, "nearest")
  np.testing.assert_array_equal(nearest, np.repeat(np.repeat(image, 2, 0), 2, 1))
  big = np.repeat(np.repeat(image, 3, 0), 3, 1)  # 6x6 of 3x3 blocks.
  np.testing.assert_array_equal(transforms.resize(big, 2, "box"), image)
  constant = np.full((9, 13, 3), 77, np.uint8)
  for method in ("bilinear", "bicubic", "lanczos", "area"):
    np.testing.assert_array_equal(transforms.resize(constant, (4, 6), method), 77)
  # RGBA channels are resized independently (no alpha premultiplication).
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 200
  np.testing.assert_array_equal(transforms.resize(rgba, 2, "bilinear")[..., 0], 200)
  # Same size returns an equal copy.
  copy = transforms.resize(big, (6, 6))
  np.testing.assert_array_equal(copy, big)
  assert copy is not big


def test_resize_float_keeps_values():
  image = np.linspace(-1, 1, 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
  out = transforms.resize(image, 4, "nearest")
  assert out.dtype == np.float32 and out.shape == (4, 4, 3)
  np.testing.assert_array_equal(out[::2, ::2], image)
  assert transforms.resize(image[..., 0], (3, 5)).shape == (3, 5)


def test_resize_errors():
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="unknown resize method 'cubic'"):
    transforms.resize(image, 2, "cubic")
  with pytest.raises(ValueError, match="size must be positive"):
    transforms.resize(image, 0)
  with pytest.raises(ValueError, match="int or a pair"):
    transforms.resize(image, (1, 2, 3))
  with pytest.raises(ValueError, match=r"expected an image .* got shape \(4,\)"):
    transforms.resize(np.zeros(4, np.uint8), 2)
  with pytest.raises(ValueError, match="uint8 or floating"):
    transforms.resize(np.zeros((4, 4), np.int32), 2)


def test_center_crop_picks_centre():
  image = _arange_image(6, 8)
  np.testing.assert_array_equal(transforms.center_crop(image, 2), image[2:4, 3:5])
  np.testing.assert_array_equal(transforms.center_crop(image, (4, 2)), image[1:5, 3:5])
  # Odd margins: the extra pixel goes to the bottom/right.
  odd = _arange_image(5, 5)
  np.testing.assert_array_equal(transforms.center_crop(odd, 2), odd[1:3, 1:3])
  np.testing.assert_array_equal(transforms.center_crop(image, (6, 8)), image)
  with pytest.raises(ValueError, match="crop 7x7 is larger than the image 6x8"):
    transforms.center_crop(image, 7)


def test_random_crop_is_a_seeded_window():
  image = _arange_image(10, 12)
  a = transforms.random_crop(image, 4, np.random.default_rng(3))
  b = transforms.random_crop(image, 4, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  corners = set()
  rng = np.random.default_rng(0)
  for _ in range(60):
    crop = transforms.random_crop(image, (4, 5), rng)
    assert crop.shape == (4, 5, 3)
    matches = [
      (t, l)
      for t in range(7)
      for l in range(8)
      if np.array_equal(image[t : t + 4, l : l + 5], crop)
    ]
    assert len(matches) == 1
    corners.add(matches[0])
  assert len(corners) > 20  # positions vary
  np.testing.assert_array_equal(transforms.random_crop(image, (10, 12), rng), image)
  with pytest.raises(ValueError, match="larger than the image"):
    transforms.random_crop(image, 11, rng)


def test_resize_shorter_then_center_crop():
  # 20x40 image: 10 black columns, 20 columns of 200, 10 black columns.
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 200
  out = transforms.resize_shorter_then_center_crop(image, 20)
  assert out.shape == (20, 20, 3)
  np.testing.assert_array_equal(out, 200)
  half = transforms.resize_shorter_then_center_crop(image, 10, "nearest")
  np.testing.assert_array_equal(half, 200)
  tall = transforms.resize_shorter_then_center_crop(np.transpose(image, (1, 0, 2)), 8, "nearest")
  assert tall.shape == (8, 8, 3)
  np.testing.assert_array_equal(tall, 200)
  up = transforms.resize_shorter_then_center_crop(_arange_image(3, 5), 9)
  assert up.shape == (9, 9, 3) and up.dtype == np.uint8


def test_to_rgb():
  gray = np.array([[0, 128], [255, 7]], np.uint8)
  rgb = transforms.to_rgb(gray)
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], gray)
  np.testing.assert_array_equal(transforms.to_rgb(gray[..., None]), rgb)
  color = _arange_image(2, 2)
  np.testing.assert_array_equal(transforms.to_rgb(color), color)

  rgba = np.zeros((1, 3, 4), np.uint8)
  rgba[..., :3] = [100, 50, 0]
  rgba[0, :, 3] = [0, 255, 128]  # transparent, opaque, half
  white = transforms.to_rgb(rgba)
  black = transforms.to_rgb(rgba, background="black")
  np.testing.assert_array_equal(white[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(black[0, 0], [0, 0, 0])
  np.testing.assert_array_equal(white[0, 1], [100, 50, 0])
  np.testing.assert_array_equal(black[0, 1], [100, 50, 0])
  a = 128 / 255
  np.testing.assert_array_equal(white[0, 2], np.round(np.array([100, 50, 0]) * a + 255 * (1 - a)))
  np.testing.assert_array_equal(black[0, 2], np.round(np.array([100, 50, 0]) * a))
  gray_alpha = np.stack([gray, np.zeros_like(gray)], -1)  # fully transparent
  np.testing.assert_array_equal(transforms.to_rgb(gray_alpha, background=40), 40)

  with pytest.raises(ValueError, match="1 to 4 channels"):
    transforms.to_rgb(np.zeros((2, 2, 5), np.uint8))
  with pytest.raises(ValueError, match="expects a uint8 image"):
    transforms.to_rgb(np.zeros((2, 2, 3), np.float32))
  with pytest.raises(ValueError, match="background"):
    transforms.to_rgb(rgba, background="gray")


def test_float_uint8_round_trip():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  floats = transforms.to_float(pixels)
  assert floats.dtype == np.float32
  assert floats.min() == -1.0 and floats.max() == 1.0
  np.testing.assert_array_equal(transforms.to_uint8(floats), pixels)
  np.testing.assert_array_equal(transforms.to_uint8(np.array([-3.0, 0.0, 5.0])), [0, 128, 255])
  with pytest.raises(ValueError, match="NaN"):
    transforms.to_uint8(np.array([np.nan], np.float32))
  with pytest.raises(ValueError, match="expects a uint8"):
    transforms.to_float(floats)
  with pytest.raises(ValueError, match="floating image"):
    transforms.to_uint8(pixels)


def test_random_shift_translates_and_fills_with_the_edge():
  background = np.full((12, 12, 3), 200, np.uint8)
  image = background.copy()
  image[5:7, 4:6] = (255, 0, 0)
  seen = set()
  rng = np.random.default_rng(0)
  for _ in range(400):
    out = transforms.random_shift(image, 2, rng)
    assert out.shape == image.shape and out.dtype == np.uint8
    ys, xs = np.nonzero((out == (255, 0, 0)).all(-1))
    assert len(ys) == 4  # the object moved whole; the uncovered pixels are background
    assert ((out == 200).all(-1).sum()) == 12 * 12 - 4
    seen.add((int(ys.min()) - 5, int(xs.min()) - 4))
  assert seen == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
  np.testing.assert_array_equal(transforms.random_shift(image, 0, rng), image)
  with pytest.raises(ValueError, match="max_shift must be >= 0"):
    transforms.random_shift(image, -1, rng)
