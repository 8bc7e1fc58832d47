"""A reward in [0, 1] for drawing a shapes scene, from the exact scene parser's reading.

The predicted scene (`vqlm.eval.scene_parser.parse_image` of a drawn image) is compared with the
requested one object by object. A true object is *matched* when the prediction has an object in
its cell (scenes hold at most one object per cell, as in `scene_parser.compare`); a matched object
earns a quarter for its position and a quarter for each of its colour, shape and size that is
right. The sum is divided by the larger of the two object counts, so a missing object (no credit)
and an extra one (a larger divisor) both cost:

    reward = 1                                                   if the scenes are equal
           = sum_{matched o} (1 + [colour] + [shape] + [size]) / 4 / max(n_true, n_pred)  otherwise

The second line is below 1 whenever the scenes differ, so a reward of 1 means exactly
`compare(pred, truth)["scene"]`. Examples: one object drawn in the wrong colour: 0.75; two objects
asked, one drawn right and nothing else: 0.5; one asked, drawn right plus a stray object: 0.5;
nothing drawn (or everything in the wrong cells): 0.

`reward_parts` also reports each attribute's share (the fraction of true objects matched with that
attribute right), the missing and extra object counts and exactness, for training curves.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from vqlm.errors import UserError
from vqlm.eval import scene_parser

Scene = Sequence[Mapping[str, str]]
PARTS = ("reward", "exact", "position", "color", "shape", "size", "missing", "extra")


def reward_parts(pred_scene: Scene, true_scene: Scene) -> dict[str, float]:
  """The reward and its parts for one drawn scene.

  Returns:
    `reward` (the module's formula), `exact` (1.0 when the scenes are equal), `position` (true
    objects with a predicted object in their cell / true objects), `color`, `shape`, `size` (true
    objects matched with that attribute right / true objects), `missing` (true objects with no
    predicted object in their cell) and `extra` (predicted objects in no true object's cell); all
    floats. With no true objects the attribute shares are 1.
  """
  result = scene_parser.compare(pred_scene, true_scene)
  n_true, n_pred, matched = result["num_truth"], result["num_pred"], result["num_matched"]
  true_cells = {o["position"] for o in true_scene}
  extra = sum(o["position"] not in true_cells for o in pred_scene)
  share = lambda k: k / n_true if n_true else 1.0  # noqa: E731
  if result["scene"]:
    reward = 1.0
  else:
    credit = matched + sum(result[f"{a}_correct"] for a in scene_parser.ATTRIBUTES)
    reward = credit / 4 / max(n_true, n_pred, 1)
  parts = {
    "reward": float(reward),
    "exact": float(result["scene"]),
    "position": share(matched),
    "missing": float(n_true - matched),
    "extra": float(extra),
  }
  for attr in scene_parser.ATTRIBUTES:
    parts[attr] = share(result[f"{attr}_correct"])
  return {k: parts[k] for k in PARTS}


def scene_reward(pred_scene: Scene, true_scene: Scene) -> float:
  """The reward in [0, 1] of drawing `pred_scene` when `true_scene` was asked for (module
  docstring); 1.0 exactly when `scene_parser.compare(pred_scene, true_scene)["scene"]`."""
  return reward_parts(pred_scene, true_scene)["reward"]


def score_images(
  images: np.ndarray, true_scenes: Sequence[Scene]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Parses each drawn image and scores it against its scene.

  Args:
    images: uint8 `[N, H, W, 3]`.
    true_scenes: N requested scenes.
  Returns:
    rewards float32 `[N]` and the parts (`PARTS`, each float32 `[N]`).
  """
  images = np.asarray(images)
  if len(images) != len(true_scenes):
    raise UserError(
      f"{len(images)} images for {len(true_scenes)} scenes; pass one scene per image."
    )
  rows = [reward_parts(scene_parser.parse_image(im), s) for im, s in zip(images, true_scenes)]
  parts = {k: np.asarray([r[k] for r in rows], np.float32) for k in PARTS}
  return parts["reward"], parts
