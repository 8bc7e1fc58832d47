"""scene_reward: 1 exactly for the right scene, partial credit per attribute, penalties for missing
and extra objects; score_images through the scene parser."""

import numpy as np
import pytest

from vqlm.data import shapes
from vqlm.errors import UserError
from vqlm.eval import scene_parser
from vqlm.eval.scene_reward import PARTS, reward_parts, scene_reward, score_images


def obj(position, color="red", shape="circle", size="large"):
  return {"position": position, "color": color, "shape": shape, "size": size}


TRUTH = [obj("top left"), obj("center", "blue", "square", "small")]


def test_exact_scene_scores_one_in_any_order():
  assert scene_reward(TRUTH, TRUTH) == 1.0
  assert scene_reward(TRUTH[::-1], TRUTH) == 1.0
  parts = reward_parts(TRUTH[::-1], TRUTH)
  assert parts == dict.fromkeys(PARTS, 1.0) | {"missing": 0.0, "extra": 0.0}


@pytest.mark.parametrize(
  "pred, want",
  [
    ([obj("top left", "green"), TRUTH[1]], (8 - 1) / 4 / 2),  # one wrong colour
    ([obj("top left", "green", "triangle", "small"), TRUTH[1]], (8 - 3) / 4 / 2),
    ([TRUTH[0]], 4 / 4 / 2),  # one object missing
    ([TRUTH[0], obj("bottom", "blue", "square", "small")], 4 / 4 / 2),  # one in the wrong cell
    (TRUTH + [obj("right")], 8 / 4 / 3),  # an extra object
    ([], 0.0),
    ([obj("bottom"), obj("top")], 0.0),  # nothing where it belongs
  ],
)
def test_partial_credit_and_penalties(pred, want):
  got = scene_reward(pred, TRUTH)
  assert got == pytest.approx(want)
  assert got < 1.0
  assert scene_parser.compare(pred, TRUTH)["scene"] is False


def test_parts_count_attributes_missing_and_extra():
  pred = [obj("top left", "green", "circle", "small"), obj("right"), obj("bottom")]
  parts = reward_parts(pred, TRUTH)
  assert parts["reward"] == pytest.approx(2 / 4 / 3)  # top left: position + shape
  assert parts["position"] == 0.5 and parts["shape"] == 0.5
  assert parts["color"] == 0.0 and parts["size"] == 0.0
  assert parts["missing"] == 1.0 and parts["extra"] == 2.0 and parts["exact"] == 0.0


def test_every_wrong_scene_scores_below_one():
  rng = np.random.default_rng(0)
  for _ in range(200):
    truth = shapes.sample_scene(rng, max_objects=3)
    pred = shapes.sample_scene(rng, max_objects=3)
    r = scene_reward(pred, truth)
    assert 0.0 <= r <= 1.0
    assert (r == 1.0) == (shapes.canonical(pred) == shapes.canonical(truth))


def test_score_images_parses_drawings():
  wrong = [obj("top left", "green"), TRUTH[1]]
  images = np.stack([shapes.render(TRUTH, 32), shapes.render(wrong, 32)])
  rewards, parts = score_images(images, [TRUTH, TRUTH])
  np.testing.assert_allclose(rewards, [1.0, 7 / 8])
  np.testing.assert_allclose(parts["color"], [1.0, 0.5])
  assert set(parts) == set(PARTS) and rewards.dtype == np.float32
  with pytest.raises(UserError, match="one scene per image"):
    score_images(images, [TRUTH])
