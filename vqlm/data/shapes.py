"""Procedural captioned shapes: scenes, flat-colour rendering, captions and their exact inverse.

A *scene* is a list of objects, each a dict `{"shape", "color", "size", "position"}` with values
from `SHAPES`, `COLORS`, `SIZES` and `POSITIONS`; no two objects share a position (a cell of a
3x3 grid).
Objects are drawn centred in their cell with a margin, so they never overlap or touch.

    scene = sample_scene(np.random.default_rng(0), max_objects=2)
    image = render(scene, 32)        # uint8[32, 32, 3], every pixel BACKGROUND or a COLORS value
    text = caption(scene)            # "a large red circle at the top left and a small ..."
    assert parse_caption(text) == scene

Held-out colour+shape pairs (`HELDOUT_PAIRS`) never occur in the `train`, `validation` and `test`
splits; every `test_heldout` scene contains at least one of them (compositional generalisation).
Splits draw from independent random streams, but the scene space is small (1-2 objects: ~32k
scenes), so identical scenes do occur in both train and test; nothing removes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import functools
import re

import numpy as np

from vqlm.errors import UserError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Flat, well separated colours (min pairwise RGB distance ~110, >= 200 from the background).
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (230, 40, 40),
  "green": (40, 200, 70),
  "blue": (50, 100, 240),
  "yellow": (240, 220, 40),
  "magenta": (220, 60, 220),
  "cyan": (40, 210, 230),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SIZES: tuple[str, ...] = ("small", "large")
# 3x3 grid cells in reading order; the index of a name is its cell index (row * 3 + col).
POSITIONS: tuple[str, ...] = (
  "top left",
  "top",
  "top right",
  "left",
  "center",
  "right",
  "bottom left",
  "bottom",
  "bottom right",
)
POSITION_PHRASES: dict[str, str] = {
  "top left": "at the top left",
  "top": "at the top",
  "top right": "at the top right",
  "left": "on the left",
  "center": "in the center",
  "right": "on the right",
  "bottom left": "at the bottom left",
  "bottom": "at the bottom",
  "bottom right": "at the bottom right",
}
# (color, shape) pairs that only the `test_heldout` split contains.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
  ("blue", "triangle"),
  ("green", "circle"),
  ("yellow", "square"),
)
SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_heldout")
MIN_IMAGE_SIZE = 30
KEYS: tuple[str, ...] = ("shape", "color", "size", "position")

_ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELDOUT_PAIRS)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Pixel geometry of the 3x3 grid at one image size.

  The grid is `3 * cell` pixels wide, centred (`offset` pixels from the top-left edge). An object
  of side `sides[size]` sits at `(cell - side) // 2` inside its cell, leaving >= 1 px margin.
  """

  image_size: int
  cell: int
  offset: int
  sides: Mapping[str, int]

  def cell_origin(self, position: str) -> tuple[int, int]:
    """Top-left pixel `(y, x)` of the cell named `position`."""
    row, col = divmod(POSITIONS.index(position), 3)
    return self.offset + row * self.cell, self.offset + col * self.cell

  def object_origin(self, position: str, size: str) -> tuple[int, int]:
    """Top-left pixel `(y, x)` of an object of `size` drawn in the cell `position`."""
    y, x = self.cell_origin(position)
    pad = (self.cell - self.sides[size]) // 2
    return y + pad, x + pad

  def cell_of(self, y: float, x: float) -> str:
    """Name of the cell containing the point `(y, x)` (in pixels; clipped to the grid)."""
    row = int(np.clip(np.floor((y - self.offset) / self.cell), 0, 2))
    col = int(np.clip(np.floor((x - self.offset) / self.cell), 0, 2))
    return POSITIONS[row * 3 + col]


@functools.cache
def layout(image_size: int) -> Layout:
  """Grid geometry for a square image of side `image_size` (>= 30; 32 and 64 are the usual).

  Large objects fill ~80% of a cell side (at most cell - 2), small ones ~45% (at least 5 px, so a
  small triangle, circle and square stay distinguishable at 32x32: 5 px vs 8 px there).
  """
  if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
    raise UserError(
      f"image_size must be an int >= {MIN_IMAGE_SIZE} (e.g. 32 or 64), got {image_size!r}"
    )
  image_size = int(image_size)
  cell = image_size // 3
  offset = (image_size - 3 * cell) // 2
  large = min(cell - 2, int(0.8 * cell + 0.5))
  small = max(5, int(0.45 * cell + 0.5))
  return Layout(
    image_size=image_size, cell=cell, offset=offset, sides={"small": small, "large": large}
  )


@functools.cache
def shape_mask(shape: str, side: int) -> np.ndarray:
  """Binary mask `bool[side, side]` of `shape` (sampled at pixel centres; read-only, cached).

  Triangles point up with rows of odd (even) width for odd (even) `side`, so they are symmetric.
  """
  if shape not in SHAPES:
    raise UserError(f"shape must be one of {SHAPES}, got {shape!r}")
  # Coordinates doubled so pixel centres are integers: u = 2x + 1 - side is in [-(side-1), side-1].
  u = 2 * np.arange(side) + 1 - side
  yy, xx = np.meshgrid(np.arange(side), u, indexing="ij")
  if shape == "square":
    mask = np.ones((side, side), bool)
  elif shape == "circle":
    mask = xx**2 + (2 * yy + 1 - side) ** 2 <= side**2
  else:  # triangle: half-width grows by half a pixel per row, apex at the top.
    mask = np.abs(xx) <= yy + 1
  mask.setflags(write=False)
  return mask


def validate_scene(scene: Sequence[Mapping[str, str]]) -> None:
  """Raise ValueError unless `scene` is a list of valid objects with distinct positions."""
  if not isinstance(scene, (list, tuple)):
    raise UserError(f"scene must be a list of object dicts, got {type(scene).__name__}")
  allowed = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "position": POSITIONS}
  seen = set()
  for obj in scene:
    if not isinstance(obj, Mapping) or set(obj) != set(KEYS):
      raise UserError(f"each object must be a dict with keys {KEYS}, got {obj!r}")
    for key, values in allowed.items():
      if obj[key] not in values:
        raise UserError(f"object {key} must be one of {values}, got {obj[key]!r}")
    if obj["position"] in seen:
      raise UserError(f"two objects share position {obj['position']!r}; positions must be distinct")
    seen.add(obj["position"])


def sort_scene(scene: Sequence[Mapping[str, str]]) -> list[dict]:
  """Objects as plain dicts in canonical order (by cell index, i.e. reading order)."""
  return [dict(obj) for obj in sorted(scene, key=lambda o: POSITIONS.index(o["position"]))]


def canonical(scene: Sequence[Mapping[str, str]]) -> tuple:
  """Hashable canonical form: tuple of `(position, color, size, shape)` sorted by cell index."""
  return tuple((o["position"], o["color"], o["size"], o["shape"]) for o in sort_scene(scene))


def sample_scene(
  rng: np.random.Generator, *, min_objects: int = 1, max_objects: int = 2, split: str = "train"
) -> list[dict]:
  """Sample a scene with `min_objects..max_objects` objects in distinct cells (canonical order).

  Positions, sizes and (color, shape) pairs are uniform; `train`/`validation`/`test` exclude
  `HELDOUT_PAIRS`; in `test_heldout` one object (chosen uniformly) has a held-out pair and the
  others have any pair.
  """
  if split not in SPLITS:
    raise UserError(f"split must be one of {SPLITS}, got {split!r}")
  if not 1 <= min_objects <= max_objects <= len(POSITIONS):
    raise UserError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
  n = int(rng.integers(min_objects, max_objects + 1))
  cells = np.sort(rng.choice(len(POSITIONS), size=n, replace=False))
  forced = int(rng.integers(n)) if split == "test_heldout" else -1
  scene = []
  for i, cell in enumerate(cells):
    if i == forced:
      pairs = HELDOUT_PAIRS
    elif split == "test_heldout":
      pairs = _ALL_PAIRS
    else:
      pairs = _SEEN_PAIRS
    color, shape = pairs[int(rng.integers(len(pairs)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    scene.append({"shape": shape, "color": color, "size": size, "position": POSITIONS[int(cell)]})
  return scene


def draw(image: np.ndarray, shape: str, color: str, side: int, top: int, left: int) -> None:
  """Paint `shape` of `side` px with the flat colour `color` into `image[H, W, 3]` in place."""
  mask = shape_mask(shape, side)
  region = image[top : top + side, left : left + side]
  if region.shape[:2] != mask.shape:
    raise UserError(f"object at ({top}, {left}) of side {side} does not fit in the image")
  region[mask] = COLORS[color]


def render(scene: Sequence[Mapping[str, str]], image_size: int) -> np.ndarray:
  """Draw `scene` as `uint8[image_size, image_size, 3]` with flat colours (no anti-aliasing)."""
  validate_scene(scene)
  geo = layout(image_size)
  image = np.empty((geo.image_size, geo.image_size, 3), np.uint8)
  image[...] = BACKGROUND
  for obj in scene:
    top, left = geo.object_origin(obj["position"], obj["size"])
    draw(image, obj["shape"], obj["color"], geo.sides[obj["size"]], top, left)
  return image


def object_phrase(obj: Mapping[str, str]) -> str:
  """'a large red circle at the top left'."""
  return f"a {obj['size']} {obj['color']} {obj['shape']} {POSITION_PHRASES[obj['position']]}"


def join_phrases(phrases: Sequence[str]) -> str:
  """'A', 'A and B', 'A, B and C'."""
  if len(phrases) <= 1:
    return "".join(phrases)
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Sequence[Mapping[str, str]]) -> str:
  """Caption listing the objects in canonical order, e.g.
  'a large red circle at the top left and a small blue square in the center'."""
  validate_scene(scene)
  if not scene:
    raise UserError("cannot caption an empty scene; sample with min_objects >= 1")
  return join_phrases([object_phrase(o) for o in sort_scene(scene)])


_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_OBJECT_RE = re.compile(
  r"a (?P<size>{}) (?P<color>{}) (?P<shape>{}) (?P<where>{})".format(
    "|".join(SIZES),
    "|".join(COLORS),
    "|".join(SHAPES),
    "|".join(sorted(POSITION_PHRASES.values(), key=len, reverse=True)),
  )
)


def parse_caption(text: str) -> list[dict] | None:
  """Inverse of `caption`: the scene in canonical order, or None if `text` is not a valid caption.

  Objects may be listed in any order (generated captions need not be canonical), but each object
  phrase and separator must be exact ('A', 'A and B', 'A, B and C'); repeated positions -> None.
  """
  if not isinstance(text, str):
    return None
  parts = text.strip().split(" and ")
  if len(parts) > 2:
    return None
  phrases = parts[0].split(", ") + parts[1:]
  if len(parts) == 1 and len(phrases) > 1:
    return None  # 'A, B' without a final 'and'.
  scene = []
  for phrase in phrases:
    m = _OBJECT_RE.fullmatch(phrase)
    if m is None:
      return None
    scene.append(
      {
        "shape": m["shape"],
        "color": m["color"],
        "size": m["size"],
        "position": _PHRASE_TO_POSITION[m["where"]],
      }
    )
  if len({o["position"] for o in scene}) != len(scene):
    return None
  return sort_scene(scene)


def reorder_caption(text: str, order: Sequence[int] | str) -> str:
  """The caption `text` with its objects listed in `order`: indices into its canonical order, or
  "reversed"; a text that is not a shapes caption -> UserError."""
  scene = _scene_to_reorder(text)
  if isinstance(order, str):
    if order != "reversed":
      raise UserError(f"order={order!r} must be 'reversed' or a list of indices")
    order = range(len(scene) - 1, -1, -1)
  if sorted(order) != list(range(len(scene))):
    raise UserError(
      f"order={list(order)} is not a permutation of the caption's {len(scene)} objects"
    )
  return join_phrases([object_phrase(scene[i]) for i in order])


def shuffle_caption(text: str, rng: np.random.Generator) -> str:
  """The caption `text` with its objects listed in a random order (as `reorder_caption`)."""
  scene = _scene_to_reorder(text)
  return join_phrases([object_phrase(scene[i]) for i in rng.permutation(len(scene))])


def _scene_to_reorder(text: str) -> list[dict]:
  scene = parse_caption(text)
  if scene is None:
    raise UserError(
      f"{text!r} is not a shapes caption; listing its objects in another order needs the shapes "
      "captions (leave data.shuffle_objects off / object_order canonical for other data)"
    )
  return scene


def split_rng(seed: int, split: str) -> np.random.Generator:
  """Independent random stream per (seed, split)."""
  if split not in SPLITS:
    raise UserError(f"split must be one of {SPLITS}, got {split!r}")
  return np.random.default_rng([int(seed), SPLITS.index(split)])


def make_examples(
  *,
  split: str,
  num_examples: int,
  image_size: int = 32,
  min_objects: int = 1,
  max_objects: int = 2,
  seed: int = 0,
) -> Iterator[dict]:
  """Yield `num_examples` dicts `{"image": uint8[H, W, 3], "text": str, "scene": list[dict]}`.

  Deterministic given `(seed, split)`; each split uses its own derived random stream.
  """
  layout(image_size)  # Validate before the first example.
  if num_examples < 0:
    raise UserError(f"num_examples must be >= 0, got {num_examples}")
  rng = split_rng(seed, split)
  for _ in range(num_examples):
    scene = sample_scene(rng, min_objects=min_objects, max_objects=max_objects, split=split)
    yield {"image": render(scene, image_size), "text": caption(scene), "scene": scene}
