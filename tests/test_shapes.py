"""Tests of the procedural shapes data (vqlm.data.shapes) and moving-shapes clips."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from vqlm.data import moving_shapes, shapes
from vqlm.errors import UserError


def _palette():
  return np.array([shapes.BACKGROUND] + list(shapes.COLORS.values()), np.int32)


def test_palette_is_separated_and_background_is_not_a_colour():
  pal = _palette()
  assert len(shapes.COLORS) >= 6
  assert tuple(shapes.BACKGROUND) not in set(shapes.COLORS.values())
  dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(pal, 2)]
  assert min(dists) >= 100


def test_layout_geometry():
  g32, g64 = shapes.layout(32), shapes.layout(64)
  assert (g32.cell, g32.offset, dict(g32.sides)) == (10, 1, {"small": 5, "large": 8})
  assert (g64.cell, g64.offset, dict(g64.sides)) == (21, 0, {"small": 9, "large": 17})
  for g in (g32, g64, shapes.layout(48), shapes.layout(128)):
    assert g.sides["small"] >= 5 and g.sides["large"] <= g.cell - 2
    assert g.sides["large"] ** 2 >= 2 * g.sides["small"] ** 2  # clearly distinguishable sizes
    assert g.offset + 3 * g.cell <= g.image_size
  with pytest.raises(ValueError, match="image_size must be"):
    shapes.layout(16)


def test_shape_masks_known_and_distinct():
  assert [int(shapes.shape_mask(s, 5).sum()) for s in shapes.SHAPES] == [21, 25, 17]
  tri = shapes.shape_mask("triangle", 5).astype(int)
  np.testing.assert_array_equal(tri.sum(1), [1, 3, 3, 5, 5])
  for side in (5, 8, 9, 17):
    masks = [shapes.shape_mask(s, side) for s in shapes.SHAPES]
    for m in masks:
      np.testing.assert_array_equal(m, m[:, ::-1])  # left-right symmetric
      assert m[-1].any() and m[:, 0].any()  # tight bounding box
    assert len({m.tobytes() for m in masks}) == 3
    np.testing.assert_array_equal(masks[0], masks[0][::-1])  # circle up-down symmetric
    assert masks[2][0].sum() < masks[2][-1].sum()  # triangle points up
  with pytest.raises(ValueError, match="shape must be one of"):
    shapes.shape_mask("hexagon", 5)


def test_render_known_pixels():
  scene = [{"shape": "square", "color": "red", "size": "large", "position": "top left"}]
  img = shapes.render(scene, 32)
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img[2:10, 2:10], np.broadcast_to(shapes.COLORS["red"], (8, 8, 3)))
  assert (img.sum(-1) > 0).sum() == 64


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_flat_no_overlap_no_touching(image_size):
  rng = np.random.default_rng(0)
  pal = _palette()
  for _ in range(200):
    scene = shapes.sample_scene(rng, min_objects=1, max_objects=9)
    img = shapes.render(scene, image_size)
    flat = img.reshape(-1, 1, 3).astype(np.int32)
    assert (flat == pal[None]).all(-1).any(-1).all()  # every pixel is a palette colour
    singles = [shapes.render([o], image_size).any(-1) for o in scene]
    total = np.sum(singles, axis=0)
    assert total.max() <= 1  # no overlaps
    assert (total > 0).sum() == img.any(-1).sum()
    for a, b in itertools.combinations(singles, 2):
      grown = ndimage.binary_dilation(a, structure=np.ones((3, 3), bool))
      assert not (grown & b).any()  # >= 1 px gap, even diagonally


def test_sample_scene_constraints():
  rng = np.random.default_rng(1)
  counts = set()
  for _ in range(500):
    scene = shapes.sample_scene(rng, min_objects=2, max_objects=4)
    counts.add(len(scene))
    shapes.validate_scene(scene)
    assert scene == shapes.sort_scene(scene)
  assert counts == {2, 3, 4}
  with pytest.raises(ValueError, match="min_objects"):
    shapes.sample_scene(rng, min_objects=3, max_objects=2)
  with pytest.raises(ValueError, match="split must be one of"):
    shapes.sample_scene(rng, split="dev")


def test_heldout_pairs_never_in_train_and_always_in_heldout():
  held = set(shapes.HELDOUT_PAIRS)
  assert 3 <= len(held) <= 4
  for split in ("train", "validation", "test"):
    seen = set()
    for ex in shapes.make_examples(
      split=split,
      num_examples=3000 if split == "train" else 1000,
      image_size=32,
      max_objects=3,
      seed=7,
    ):
      pairs = {(o["color"], o["shape"]) for o in ex["scene"]}
      assert not pairs & held
      seen |= pairs
    if split == "train":
      assert seen == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES} - held
  for ex in shapes.make_examples(split="test_heldout", num_examples=1000, image_size=32, seed=7):
    assert {(o["color"], o["shape"]) for o in ex["scene"]} & held


def test_caption_format_and_round_trip():
  scene = [
    {"shape": "square", "color": "blue", "size": "small", "position": "center"},
    {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
  ]
  assert shapes.caption(scene) == (
    "a large red circle at the top left and a small blue square in the center"
  )
  three = scene + [{"shape": "triangle", "color": "cyan", "size": "large", "position": "right"}]
  assert shapes.caption(three) == (
    "a large red circle at the top left, a small blue square in the"
    " center and a large cyan triangle on the right"
  )
  rng = np.random.default_rng(2)
  for _ in range(2000):
    s = shapes.sample_scene(rng, min_objects=1, max_objects=9, split=str(rng.choice(shapes.SPLITS)))
    assert shapes.parse_caption(shapes.caption(s)) == s
  # Non-canonical order parses to the canonical scene.
  assert shapes.parse_caption(
    "a small blue square in the center and a large red circle at the top left"
  ) == shapes.sort_scene(scene)


@pytest.mark.parametrize(
  "text",
  [
    "",
    "a red circle at the top left",
    "a large red circle at the top left and",
    "a large red circle at the top left, a small blue square in the center",
    "a large red circle at the top left and a small blue square at the top left",
    "a large red circle at the top left and a small blue square in the center and a small red "
    "square on the left",
    "a huge red circle at the top left",
    "a large red circle at the top middle",
  ],
)
def test_parse_caption_rejects_malformed(text):
  assert shapes.parse_caption(text) is None


def test_canonical_is_order_free_and_distinguishes_attributes():
  a = {"shape": "circle", "color": "red", "size": "large", "position": "top"}
  b = {"shape": "square", "color": "blue", "size": "small", "position": "left"}
  assert shapes.canonical([a, b]) == shapes.canonical([b, a])
  assert shapes.canonical([a, b]) != shapes.canonical([a, dict(b, size="large")])
  hash(shapes.canonical([a, b]))


def test_validate_scene_errors():
  a = {"shape": "circle", "color": "red", "size": "large", "position": "top"}
  with pytest.raises(ValueError, match="share position"):
    shapes.render([a, dict(a, color="blue")], 32)
  with pytest.raises(ValueError, match="color must be one of"):
    shapes.render([dict(a, color="purple")], 32)
  with pytest.raises(ValueError, match="keys"):
    shapes.caption([{"shape": "circle"}])


def test_make_examples_deterministic_and_split_dependent():
  kw = dict(num_examples=50, image_size=32, max_objects=3)
  a = list(shapes.make_examples(split="train", seed=3, **kw))
  b = list(shapes.make_examples(split="train", seed=3, **kw))
  c = list(shapes.make_examples(split="train", seed=4, **kw))
  d = list(shapes.make_examples(split="test", seed=3, **kw))
  assert [x["text"] for x in a] == [x["text"] for x in b]
  assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
  assert [x["text"] for x in a] != [x["text"] for x in c]
  assert [x["text"] for x in a] != [x["text"] for x in d]
  for ex in a:
    assert ex["text"] == shapes.caption(ex["scene"])
    np.testing.assert_array_equal(ex["image"], shapes.render(ex["scene"], 32))


# ---- moving shapes ------------------------------------------------------------------------------


def test_clips_shapes_text_and_determinism():
  clips = list(moving_shapes.make_clips(split="train", num_clips=40, num_frames=6, seed=0))
  again = list(moving_shapes.make_clips(split="train", num_clips=40, num_frames=6, seed=0))
  assert all(np.array_equal(a["frames"], b["frames"]) for a, b in zip(clips, again))
  directions = set()
  for c in clips:
    assert c["frames"].shape == (6, 32, 32, 3) and c["frames"].dtype == np.uint8
    assert len(c["scenes"]) == 6
    obj = c["scenes"][0][0]
    start, end = c["scenes"][0][0]["position"], c["scenes"][-1][0]["position"]
    assert c["text"] == (
      f"a {obj['size']} {obj['color']} {obj['shape']} moves {c['direction']} "
      f"from the {start} to the {end}"
    )
    # First and last frames are the grid renders of the start and end cells.
    np.testing.assert_array_equal(c["frames"][0], shapes.render(c["scenes"][0], 32))
    np.testing.assert_array_equal(c["frames"][-1], shapes.render(c["scenes"][-1], 32))
    directions.add(c["direction"])
  assert directions == set(moving_shapes.DIRECTIONS)
  with pytest.raises(ValueError, match="num_frames"):
    next(moving_shapes.make_clips(split="train", num_clips=1, num_frames=12))


def test_clips_move_smoothly_at_constant_speed():
  for c in moving_shapes.make_clips(split="validation", num_clips=60, num_frames=8, seed=1):
    dy, dx = moving_shapes.DIRECTIONS[c["direction"]]
    steps = np.diff(c["boxes"], axis=0)  # [T - 1, 2]
    np.testing.assert_array_equal(steps * np.array([[dx != 0, dy != 0]]), 0)  # one axis only
    along = steps @ np.array([dy, dx])
    assert (along >= 1).all()  # moves every frame, in `direction`
    assert along.max() - along.min() <= 1  # constant speed up to rounding
    assert along.max() < shapes.layout(32).cell  # pixel motion, not cell jumps
    obj = c["scenes"][0][0]
    assert (obj["color"], obj["shape"]) not in shapes.HELDOUT_PAIRS


def test_moving_shapes_source_is_random_access_and_deterministic():
  from vqlm.data.sources import get_source

  src = get_source("moving_shapes", split="train", image_size=32, num_clips=5, num_frames=4)
  assert len(src) == 5
  a, b = src[3], src[3]
  assert a["frames"].shape == (4, 32, 32, 3) and a["frames"].dtype == np.uint8
  np.testing.assert_array_equal(a["frames"], b["frames"])
  np.testing.assert_array_equal(a["image"], a["frames"][0])
  assert " moves " in a["text"]
  assert not np.array_equal(src[0]["frames"], src[1]["frames"]) or src[0]["text"] != src[1]["text"]


def test_reorder_and_shuffle_caption_keep_the_scene():
  text = (
    "a large red circle at the top left, a small blue square in the center and a large cyan "
    "triangle on the right"
  )
  assert shapes.reorder_caption(text, "reversed") == (
    "a large cyan triangle on the right, a small blue square in the center and a large red "
    "circle at the top left"
  )
  assert shapes.reorder_caption(text, [0, 1, 2]) == text
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(60):
    shuffled = shapes.shuffle_caption(text, rng)
    assert shapes.parse_caption(shuffled) == shapes.parse_caption(text)
    seen.add(shuffled)
  assert len(seen) == 6  # Every order of three objects comes up.
  one = "a small blue square in the center"
  assert shapes.shuffle_caption(one, rng) == one


@pytest.mark.parametrize(
  "text, order, message",
  [
    ("a photo of a dog", "reversed", "not a shapes caption"),
    ("a small blue square in the center", [0, 0], "not a permutation"),
    ("a small blue square in the center", "sorted", "must be 'reversed'"),
  ],
)
def test_reorder_caption_refuses_what_it_cannot_reorder(text, order, message):
  with pytest.raises(UserError, match=message):
    shapes.reorder_caption(text, order)
