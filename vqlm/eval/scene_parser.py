"""Deterministic scene parser for shapes images: image -> scene, scene features, scene comparison.

Pipeline of `parse_image` (numpy + scipy.ndimage only):
1. Palette snapping: each pixel takes the nearest of `BACKGROUND` + `COLORS` (float32 RGB distance);
   pixels farther than `max_distance` from every palette colour are "unknown" (ignored).
2. Connected components per colour (8-connectivity); components smaller than `min_area_frac` of
   the smallest object's area are noise and dropped.
3. Grouping: a component belongs to the cell containing its bounding-box centre; components of one
   colour in one cell are merged; per cell the colour with most pixels wins (one object per cell).
4. Shape and size jointly by template matching: the object's mask is compared with the exact
   rendered masks of every (shape, size) at this image size, aligned on bounding-box centres with
   +-1 px shifts; the best intersection-over-union wins (ties: first in SHAPES x SIZES order).
Clean renders parse back exactly; mild noise (Gaussian, stray pixels, slightly off sizes) does not
change the nearest palette colour or the best template.
`object_boxes` reads the same objects with the top-left corner of each one's pixels (the video
measures of `vqlm.eval.video_eval` compare it with the true frame's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from vqlm.data import shapes
from vqlm.errors import UserError

_PALETTE = np.array([shapes.BACKGROUND] + list(shapes.COLORS.values()), np.float32)  # [C + 1, 3]
_COLOR_NAMES = tuple(shapes.COLORS)
NUM_LABELS = len(_PALETTE) + 1  # background, colours, unknown.
UNKNOWN = len(_PALETTE)
_EIGHT = np.ones((3, 3), bool)
ATTRIBUTES = ("color", "shape", "size")


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise UserError(
      "image must be uint8[H, W, 3] (convert with "
      "np.clip(x, 0, 255).astype(np.uint8)),"
      f" got {image.dtype}{list(image.shape)}"
    )
  if image.shape[0] != image.shape[1]:
    raise UserError(f"image must be square, got {image.shape[:2]}")
  return image


def snap(image: np.ndarray, *, max_distance: float = 100.0) -> np.ndarray:
  """Palette labels `int32[H, W]`: 0 background, 1..C the COLORS in order, C+1 unknown."""
  image = _check_image(image)
  pix = image.astype(np.float32)
  d2 = np.sum((pix[:, :, None, :] - _PALETTE[None, None]) ** 2, axis=-1, dtype=np.float32)
  labels = np.argmin(d2, axis=-1).astype(np.int32)
  labels[np.min(d2, axis=-1) > np.float32(max_distance) ** 2] = UNKNOWN
  return labels


def _best_template(mask: np.ndarray, geo: shapes.Layout) -> tuple[str, str, float]:
  """(shape, size, iou) of the template best matching the cropped object `mask[h, w]`."""
  h, w = mask.shape
  area = int(mask.sum())
  best = ("", "", -1.0)
  for shape in shapes.SHAPES:
    for size in shapes.SIZES:
      tmpl = shapes.shape_mask(shape, geo.sides[size])
      s = tmpl.shape[0]
      t_area = int(tmpl.sum())
      # Template top-left relative to the mask's: centred, then +-1 px.
      cy, cx = (h - s) // 2, (w - s) // 2
      best_inter = 0
      for oy in range(cy - 1, cy + 2 + (h - s) % 2):
        for ox in range(cx - 1, cx + 2 + (w - s) % 2):
          y0, y1 = max(0, oy), min(h, oy + s)
          x0, x1 = max(0, ox), min(w, ox + s)
          if y1 <= y0 or x1 <= x0:
            continue
          inter = int(
            np.count_nonzero(mask[y0:y1, x0:x1] & tmpl[y0 - oy : y1 - oy, x0 - ox : x1 - ox])
          )
          best_inter = max(best_inter, inter)
      iou = best_inter / (area + t_area - best_inter)
      if iou > best[2]:
        best = (shape, size, iou)
  return best


def _cell_masks(
  image: np.ndarray, *, max_distance: float, min_area_frac: float
) -> list[tuple[str, int, np.ndarray]]:
  """Steps 1-3 of the pipeline: `(cell, colour index, bool mask [H, W])` of each object, in
  POSITIONS order (the mask: the kept components of the cell's winning colour)."""
  geo = shapes.layout(image.shape[0])
  labels = snap(image, max_distance=max_distance)
  min_area = min_area_frac * min(
    int(shapes.shape_mask(s, geo.sides["small"]).sum()) for s in shapes.SHAPES
  )
  # (cell, colour index) -> merged mask of the kept components.
  groups: dict[tuple[str, int], np.ndarray] = {}
  for ci in range(len(_COLOR_NAMES)):
    binary = labels == ci + 1
    if not binary.any():
      continue
    comp, n = ndimage.label(binary, structure=_EIGHT)
    for k, sl in enumerate(ndimage.find_objects(comp), start=1):
      piece = comp[sl] == k
      if piece.sum() < min_area:
        continue
      cy = (sl[0].start + sl[0].stop) / 2
      cx = (sl[1].start + sl[1].stop) / 2
      key = (geo.cell_of(cy, cx), ci)
      if key not in groups:
        groups[key] = np.zeros(labels.shape, bool)
      groups[key][sl] |= piece
  per_cell: dict[str, tuple[int, int]] = {}  # cell -> (area, colour index) of the winning colour.
  for (cell, ci), mask in groups.items():
    area = int(mask.sum())
    if cell not in per_cell or area > per_cell[cell][0]:
      per_cell[cell] = (area, ci)
  return [
    (cell, per_cell[cell][1], groups[(cell, per_cell[cell][1])])
    for cell in shapes.POSITIONS
    if cell in per_cell
  ]


def object_boxes(
  image: np.ndarray, *, max_distance: float = 100.0, min_area_frac: float = 0.3
) -> list[dict]:
  """The objects `parse_image` reads, each with the top-left corner of its pixels: `{"shape",
  "color", "size", "position", "top", "left"}`, where `top` / `left` (ints) are the smallest row
  and column of the object's palette-coloured mask (on a clean render, the drawn object's origin).
  Arguments as `parse_image`'s."""
  image = _check_image(image)
  geo = shapes.layout(image.shape[0])
  out = []
  for cell, ci, mask in _cell_masks(image, max_distance=max_distance, min_area_frac=min_area_frac):
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    shape, size, _ = _best_template(crop, geo)
    out.append(
      {
        "shape": shape,
        "color": _COLOR_NAMES[ci],
        "size": size,
        "position": cell,
        "top": int(rows[0]),
        "left": int(cols[0]),
      }
    )
  return out


def parse_image(
  image: np.ndarray, *, max_distance: float = 100.0, min_area_frac: float = 0.3
) -> list[dict]:
  """Scene read from `image` (uint8[H, W, 3], H == W >= 30), in canonical order.

  Args:
    image: a rendered, reconstructed or generated shapes image.
    max_distance: RGB distance beyond which a pixel matches no palette colour.
    min_area_frac: components with fewer pixels than this fraction of the smallest template's area
      are dropped as noise.
  """
  boxes = object_boxes(image, max_distance=max_distance, min_area_frac=min_area_frac)
  return [{k: o[k] for k in ("shape", "color", "size", "position")} for o in boxes]


NUM_OCCUPANCY = len(shapes.POSITIONS) * len(shapes.COLORS) * len(shapes.SHAPES) * len(shapes.SIZES)
NUM_FEATURES = NUM_OCCUPANCY + len(shapes.POSITIONS) * NUM_LABELS


def scene_features(image: np.ndarray) -> np.ndarray:
  """Parser features `float32[NUM_FEATURES]` of `image[H, W, 3]` (`[B, F]` of `[B, H, W, 3]`).

  Layout: one-hot occupancy `[9 cells, colours, shapes, sizes]` of the parsed scene, then the
  fraction of each cell's pixels per palette label `[9 cells, background + colours + unknown]`
  (continuous, so the Fréchet distance over these features has a usable covariance).
  """
  image = np.asarray(image)
  if image.ndim == 4:
    return (
      np.stack([scene_features(im) for im in image])
      if len(image)
      else np.zeros((0, NUM_FEATURES), np.float32)
    )
  image = _check_image(image)
  geo = shapes.layout(image.shape[0])
  occ = np.zeros(
    (len(shapes.POSITIONS), len(shapes.COLORS), len(shapes.SHAPES), len(shapes.SIZES)), np.float32
  )
  for o in parse_image(image):
    occ[
      shapes.POSITIONS.index(o["position"]),
      _COLOR_NAMES.index(o["color"]),
      shapes.SHAPES.index(o["shape"]),
      shapes.SIZES.index(o["size"]),
    ] = 1.0
  labels = snap(image)
  frac = np.zeros((len(shapes.POSITIONS), NUM_LABELS), np.float32)
  for i, cell in enumerate(shapes.POSITIONS):
    y, x = geo.cell_origin(cell)
    block = labels[y : y + geo.cell, x : x + geo.cell]
    frac[i] = np.bincount(block.ravel(), minlength=NUM_LABELS) / block.size
  return np.concatenate([occ.ravel(), frac.ravel()])


def compare(pred: Sequence[Mapping[str, str]], truth: Sequence[Mapping[str, str]]) -> dict:
  """Compare a predicted scene with the true one.

  Objects are matched by position (scenes have at most one object per cell). Returns:
    count: bool, same number of objects.
    position: bool, same set of occupied cells.
    color / shape / size: bool, every true object has a predicted object in its cell with that
      attribute right (extra predicted objects are ignored here; see `count`/`position`).
    scene: bool, exact equality of canonical forms.
    num_truth, num_pred, num_matched: ints (matched = true objects with a predicted object in the
      same cell); color_correct / shape_correct / size_correct: number of true objects whose
      attribute is right in the matched predicted object. Attribute accuracy over a data set is
      sum(<attr>_correct) / sum(num_truth).
  """
  by_pos = {}
  for o in pred:
    by_pos.setdefault(o["position"], o)
  out = {"num_truth": len(truth), "num_pred": len(pred), "num_matched": 0}
  for attr in ATTRIBUTES:
    out[f"{attr}_correct"] = 0
  for o in truth:
    p = by_pos.get(o["position"])
    if p is None:
      continue
    out["num_matched"] += 1
    for attr in ATTRIBUTES:
      out[f"{attr}_correct"] += int(p.get(attr) == o[attr])
  out["count"] = len(pred) == len(truth)
  out["position"] = {o["position"] for o in pred} == {o["position"] for o in truth}
  for attr in ATTRIBUTES:
    out[attr] = out[f"{attr}_correct"] == len(truth)
  out["scene"] = shapes.canonical(pred) == shapes.canonical(truth)
  return out


def summarize(results: Iterable[Mapping]) -> dict[str, float]:
  """Aggregate `compare` results: scene-level rates (`count`, `position`, `color`, `shape`, `size`,
  `scene`) and object-level accuracies (`<attr>_acc`, `position_acc` = matched / true objects)."""
  results = list(results)
  if not results:
    raise UserError("summarize needs at least one compare() result")
  out = {
    k: float(np.mean([r[k] for r in results]))
    for k in ("count", "position", "color", "shape", "size", "scene")
  }
  total = max(1, sum(r["num_truth"] for r in results))
  out["position_acc"] = sum(r["num_matched"] for r in results) / total
  for attr in ATTRIBUTES:
    out[f"{attr}_acc"] = sum(r[f"{attr}_correct"] for r in results) / total
  return out
