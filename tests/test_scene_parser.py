"""Tests of the deterministic shapes scene parser (vqlm.data.scene_parser)."""

import numpy as np
import pytest

from vqlm.data import moving_shapes, shapes
from vqlm.eval import scene_parser


def _accuracy(image_size, *, sigma=0.0, num=1000, max_objects=3, seed=5):
  noise_rng = np.random.default_rng(123)
  results = []
  for ex in shapes.make_examples(
    split="test",
    num_examples=num,
    image_size=image_size,
    min_objects=1,
    max_objects=max_objects,
    seed=seed,
  ):
    img = ex["image"]
    if sigma:
      img = np.clip(img + noise_rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)
    results.append(scene_parser.compare(scene_parser.parse_image(img), ex["scene"]))
  return scene_parser.summarize(results)


@pytest.mark.parametrize("image_size", [32, 64])
def test_parser_reads_back_clean_scenes_exactly(image_size):
  acc = _accuracy(image_size)
  print(f"clean {image_size}x{image_size}, 1-3 objects: {acc}")
  assert acc["scene"] == 1.0  # The parser is exact on clean images.


@pytest.mark.parametrize("image_size", [32, 64])
def test_parser_robust_to_gaussian_noise(image_size):
  acc = _accuracy(image_size, sigma=8.0, num=1000 if image_size == 32 else 400)
  print(f"noise sigma 8/255 {image_size}x{image_size}: {acc}")
  assert acc["scene"] >= 0.97  # Headroom below what it reaches (docs/evaluation.md).


def test_parser_full_grid_and_stray_pixels():
  rng = np.random.default_rng(9)
  pal = np.array([shapes.BACKGROUND] + list(shapes.COLORS.values()), np.uint8)
  for _ in range(100):
    scene = shapes.sample_scene(rng, min_objects=9, max_objects=9)
    img = shapes.render(scene, 32)
    flip = rng.random(img.shape[:2]) < 0.03
    img[flip] = pal[rng.integers(len(pal), size=int(flip.sum()))]
    assert shapes.canonical(scene_parser.parse_image(img)) == shapes.canonical(scene)


def test_parser_empty_and_off_palette():
  img = np.zeros((32, 32, 3), np.uint8)
  assert scene_parser.parse_image(img) == []
  img[5:15, 5:15] = (128, 128, 128)  # far from every palette colour -> unknown, ignored
  assert scene_parser.parse_image(img) == []
  labels = scene_parser.snap(img)
  assert labels[6, 6] == scene_parser.UNKNOWN and labels[0, 0] == 0
  with pytest.raises(ValueError, match="uint8"):
    scene_parser.parse_image(img.astype(np.float32))


def test_parser_reads_moving_frames():
  for clip in moving_shapes.make_clips(split="test", num_clips=30, num_frames=8, seed=2):
    for frame, scene in zip(clip["frames"], clip["scenes"]):
      assert scene_parser.parse_image(frame) == scene


def test_compare_semantics():
  truth = [
    {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
    {"shape": "square", "color": "blue", "size": "small", "position": "center"},
  ]
  assert all(
    scene_parser.compare(truth, truth)[k]
    for k in ("count", "position", "color", "shape", "size", "scene")
  )
  pred = [
    dict(truth[0], color="green"),
    {"shape": "triangle", "color": "cyan", "size": "small", "position": "bottom"},
  ]
  r = scene_parser.compare(pred, truth)
  assert r["count"] and not r["position"] and not r["scene"]
  got = (r["num_matched"], r["color_correct"], r["shape_correct"], r["size_correct"])
  assert got == (1, 0, 1, 1)
  assert not r["color"] and not r["shape"] and not r["size"]  # the center object is missing
  s = scene_parser.summarize([r, scene_parser.compare(truth, truth)])
  assert s["scene"] == 0.5 and s["color_acc"] == 2 / 4 and s["shape_acc"] == 3 / 4
  assert s["position_acc"] == 3 / 4


def test_scene_features():
  exs = list(shapes.make_examples(split="train", num_examples=4, image_size=32, seed=0))
  imgs = np.stack([e["image"] for e in exs])
  feats = scene_parser.scene_features(imgs)
  assert feats.shape == (4, scene_parser.NUM_FEATURES) and feats.dtype == np.float32
  np.testing.assert_array_equal(feats[1], scene_parser.scene_features(imgs[1]))
  occ = feats[:, : scene_parser.NUM_OCCUPANCY]
  frac = feats[:, scene_parser.NUM_OCCUPANCY :].reshape(4, 9, scene_parser.NUM_LABELS)
  np.testing.assert_allclose(frac.sum(-1), 1.0, rtol=1e-6)
  for e, o in zip(exs, occ):
    assert o.sum() == len(e["scene"])
    obj = e["scene"][0]
    idx = np.ravel_multi_index(
      (
        shapes.POSITIONS.index(obj["position"]),
        list(shapes.COLORS).index(obj["color"]),
        shapes.SHAPES.index(obj["shape"]),
        shapes.SIZES.index(obj["size"]),
      ),
      (9, len(shapes.COLORS), len(shapes.SHAPES), len(shapes.SIZES)),
    )
    assert o[idx] == 1.0
