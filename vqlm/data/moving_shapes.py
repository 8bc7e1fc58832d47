"""Moving shapes: short video clips of one object translating at constant speed.

The object starts centred in a grid cell (as `shapes.render` draws it) and moves left, right, up
or down by one or two cells, reaching the target cell on the last frame. Intermediate frames place
it at rounded pixel positions, so motion is smooth (cell / (T - 1) px per frame or more), not cell
jumps. Text: "a large red circle moves right from the top left to the top right".
The per-frame scene puts the object in the cell that contains its bounding-box centre (the rule
`scene_parser.parse_image` uses). Held-out colour+shape pairs follow `shapes.sample_scene`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vqlm.data import shapes
from vqlm.errors import UserError

DIRECTIONS: dict[str, tuple[int, int]] = {
  "left": (0, -1),
  "right": (0, 1),
  "up": (-1, 0),
  "down": (1, 0),
}
MIN_FRAMES, MAX_FRAMES = 4, 8


def clip_caption(obj: dict, direction: str, start: str, end: str) -> str:
  """'a large red circle moves right from the top left to the top right'."""
  return (
    f"a {obj['size']} {obj['color']} {obj['shape']} moves {direction} from the {start} to the {end}"
  )


def sample_clip(
  rng: np.random.Generator, *, num_frames: int = 6, image_size: int = 32, split: str = "train"
) -> dict:
  """One clip: `{"frames": uint8[T, H, W, 3], "text": str, "scenes": [T] scenes, "direction": str,
  "boxes": int32[T, 2] (top, left) of the object per frame}`."""
  if not MIN_FRAMES <= num_frames <= MAX_FRAMES:
    raise UserError(f"num_frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {num_frames}")
  geo = shapes.layout(image_size)
  obj = shapes.sample_scene(rng, min_objects=1, max_objects=1, split=split)[0]
  direction = tuple(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
  dy, dx = DIRECTIONS[direction]
  # Start cells that leave at least one cell of room in `direction`.
  starts = [i for i in range(9) if 0 <= i // 3 + dy <= 2 and 0 <= i % 3 + dx <= 2]
  start = starts[int(rng.integers(len(starts)))]
  row, col = divmod(start, 3)
  room = max(r for r in (1, 2) if 0 <= row + r * dy <= 2 and 0 <= col + r * dx <= 2)
  dist = int(rng.integers(1, room + 1))
  end = (row + dist * dy) * 3 + col + dist * dx
  side = geo.sides[obj["size"]]
  y0, x0 = geo.object_origin(shapes.POSITIONS[start], obj["size"])
  steps = np.rint(np.linspace(0.0, dist * geo.cell, num_frames)).astype(np.int32)
  boxes = np.stack([y0 + dy * steps, x0 + dx * steps], axis=-1).astype(np.int32)
  frames = np.empty((num_frames, image_size, image_size, 3), np.uint8)
  frames[...] = shapes.BACKGROUND
  scenes = []
  for t, (top, left) in enumerate(boxes):
    shapes.draw(frames[t], obj["shape"], obj["color"], side, int(top), int(left))
    cell = geo.cell_of(top + side / 2, left + side / 2)
    scenes.append([dict(obj, position=cell)])
  text = clip_caption(obj, direction, shapes.POSITIONS[start], shapes.POSITIONS[end])
  return {"frames": frames, "text": text, "scenes": scenes, "direction": direction, "boxes": boxes}


def make_clips(
  *, split: str, num_clips: int, num_frames: int = 6, image_size: int = 32, seed: int = 0
) -> Iterator[dict]:
  """Yield `num_clips` clips (see `sample_clip`); deterministic given `(seed, split)`."""
  if num_clips < 0:
    raise UserError(f"num_clips must be >= 0, got {num_clips}")
  if split not in shapes.SPLITS:
    raise UserError(f"split must be one of {shapes.SPLITS}, got {split!r}")
  # A stream distinct from the still images' (`shapes.split_rng`) for the same seed and split.
  rng = np.random.default_rng([int(seed), shapes.SPLITS.index(split), 1])
  for _ in range(num_clips):
    yield sample_clip(rng, num_frames=num_frames, image_size=image_size, split=split)


DEFAULT_NUM_CLIPS = {"train": 10000, "validation": 500, "test": 500, "test_heldout": 500}


class MovingShapesSource:
  """Random-access clips (the `moving_shapes` data source).

  Item i is `sample_clip` seeded by `(seed, split, i)`, so any item can be read in any order, by
  any process, again after a restart. Items: {"frames": uint8 [T, H, W, 3], "text", "scenes",
  "image": frames[0]} ("image" lets image-only consumers such as tokenizer training read clips).
  """

  def __init__(
    self,
    *,
    split: str = "train",
    image_size: int = 32,
    num_clips: int | None = None,
    num_frames: int = 6,
    seed: int = 0,
  ):
    if split not in shapes.SPLITS:
      raise UserError(f"split must be one of {shapes.SPLITS}, got {split!r}")
    if not MIN_FRAMES <= num_frames <= MAX_FRAMES:
      raise UserError(f"num_frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {num_frames}")
    self.name, self.split, self.image_size = "moving_shapes", split, image_size
    self.num_frames, self.seed = num_frames, seed
    self._len = DEFAULT_NUM_CLIPS[split] if num_clips is None else int(num_clips)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not -self._len <= index < self._len:
      raise IndexError(f"clip {index} out of range for {self._len} clips")
    index %= self._len
    rng = np.random.default_rng([self.seed, shapes.SPLITS.index(self.split), 2, index])
    clip = sample_clip(
      rng, num_frames=self.num_frames, image_size=self.image_size, split=self.split
    )
    clip["image"] = clip["frames"][0]
    return clip
