"""What the ladder measures in each latent space, judged by the scene parser.

    valid_scene(image)                 # True: 1-2 objects parsed and their re-render matches
    rerender_agreement(image)          # float: fraction of pixels the re-render explains
    reconstructions(run, images)       # side-by-side images + latent size and compression
    random_points(space, reference)    # images decoded from random points + valid-scene rate
    interpolations(space, pairs)       # strips + valid rate of the intermediate frames
    neighbours(space, queries, pool)   # top-1 attribute agreement (data set metadata)
    attribute_edits(space, ...)        # colour A -> colour B edits at the object, judged by the
                                       # parser, strength chosen on validation images

Images are uint8 `[N, H, W, 3]`; scenes are the data set's lists of object dicts.
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any

import numpy as np

from vqlm.data import shapes
from vqlm.eval import scene_parser

_F32 = np.float32
MIN_AGREEMENT = 0.95
# Attribute edits: the strengths tried on the validation images, and the RGB distance from the
# background beyond which a pixel belongs to an object (the palette's nearest colour is ~200 away).
STRENGTHS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
OBJECT_DISTANCE = 60.0


def rerender_agreement(
  image: np.ndarray, scene: Sequence[Mapping[str, str]] | None = None
) -> float:
  """Fraction of pixels whose palette label (`scene_parser.snap`) equals that of the parsed scene
  re-rendered (`shapes.render`); unknown pixels never agree. image uint8 `[H, W, 3]`."""
  image = np.asarray(image)
  if scene is None:
    scene = scene_parser.parse_image(image)
  rendered = shapes.render(scene, image.shape[0])
  snapped = scene_parser.snap(image)
  agree = (snapped == scene_parser.snap(rendered)) & (snapped != scene_parser.UNKNOWN)
  return float(np.mean(agree))


def valid_scene(
  image: np.ndarray,
  *,
  min_objects: int = 1,
  max_objects: int = 2,
  min_agreement: float = MIN_AGREEMENT,
) -> bool:
  """The parser's verdict "valid scene": `min_objects`..`max_objects` objects parsed, and the
  parsed scene re-rendered matches the palette-snapped image on >= `min_agreement` of pixels."""
  scene = scene_parser.parse_image(image)
  if not min_objects <= len(scene) <= max_objects:
    return False
  return rerender_agreement(image, scene) >= min_agreement


def valid_rate(images: np.ndarray) -> float:
  """Fraction of `images` `[N, H, W, 3]` that are valid scenes (0 for none)."""
  images = np.asarray(images)
  return float(np.mean([valid_scene(im) for im in images])) if len(images) else 0.0


def latent_size(run: Any) -> dict[str, Any]:
  """The latent of one image: its shape, numbers per pixel number, and bits for discrete codes."""
  size = run.image_size
  pixels = size * size * 3
  h, w, c = (int(v) for v in run.latent_shape)
  out = {"latent_shape": [h, w, c], "pixel_numbers": pixels}
  if run.is_discrete:
    gh, gw = (int(v) for v in run.grid)
    bits = gh * gw * math.log2(run.codebook_size)
    out.update(
      code_grid=[gh, gw],
      codebook_size=int(run.codebook_size),
      latent_numbers=gh * gw,
      bits=float(bits),
      bits_ratio=float(bits / (pixels * 8)),  # Of the image's 8-bit pixel values.
    )
  else:
    out["latent_numbers"] = h * w * c
  out["compression"] = float(out["latent_numbers"] / pixels)
  return out


def reconstructions(run: Any, images: np.ndarray) -> dict[str, Any]:
  """`run.reconstruct(images)` and their per-image PSNR / parser agreement is the evaluator's;
  here: the reconstructions `[N, H, W, 3]` and the latent size."""
  return {"images": run.reconstruct(images), **latent_size(run)}


def random_points(space: Any, num: int, *, reference: np.ndarray, seed: int = 0) -> np.ndarray:
  """`num` images decoded from random points of the latent space (`LatentSpace.sample`)."""
  return space.sample(num, seed=seed, reference=reference)


def interpolations(space: Any, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, frames: int):
  """(strips uint8 `[P, frames, H, W, 3]`, valid rate of the intermediate frames)."""
  strips = np.stack([space.interpolate(a, b, num=frames) for a, b in pairs])
  middle = strips[:, 1:-1].reshape(-1, *strips.shape[2:])
  return strips, valid_rate(middle)


def _has(scene: Sequence[Mapping[str, str]], obj: Mapping[str, str], keys: Sequence[str]) -> bool:
  return any(all(o[k] == obj[k] for k in keys) for o in scene)


def neighbours(
  space: Any,
  queries: np.ndarray,
  query_scenes: Sequence[Sequence[Mapping[str, str]]],
  pool: np.ndarray,
  pool_scenes: Sequence[Sequence[Mapping[str, str]]],
) -> dict[str, Any]:
  """Top-1 neighbours (pooled latents) of single-object queries among `pool`: the fraction whose
  scene has an object with the query object's colour, shape, size, cell, and all four at once."""
  found = space.neighbors(queries, pool, k=1)
  top = found.indices[:, 0]
  out = {"num_queries": int(len(queries)), "num_pool": int(len(pool))}
  checks = {"color": ("color",), "shape": ("shape",), "size": ("size",), "cell": ("position",)}
  checks["all"] = ("color", "shape", "size", "position")
  for name, keys in checks.items():
    hits = [_has(pool_scenes[j], scene[0], keys) for scene, j in zip(query_scenes, top)]
    out[name] = float(np.mean(hits)) if hits else 0.0
  out["top1"] = [int(j) for j in top]
  return out


def object_pixels(images: np.ndarray) -> np.ndarray:
  """bool `[N, H, W]`: the pixels of `images` (uint8 `[N, H, W, 3]`) that are not background
  (farther from `shapes.BACKGROUND` than half the smallest palette colour's distance to it)."""
  background = np.asarray(shapes.BACKGROUND, _F32)
  distance = np.linalg.norm(np.asarray(images, _F32) - background, axis=-1)
  return distance > OBJECT_DISTANCE


def _judge_edits(
  edited: np.ndarray, scenes: Sequence[Sequence[Mapping[str, str]]], target: str
) -> tuple[list[bool], list[bool], list[bool]]:
  """Per edit: (success, colour changed, shape and size kept) for single-object `scenes`."""
  success, colour, kept = [], [], []
  for image, scene in zip(edited, scenes):
    parsed = scene_parser.parse_image(image)
    obj = scene[0]
    same = [o for o in parsed if o["position"] == obj["position"]]
    colour.append(bool(same) and same[0]["color"] == target)
    kept.append(bool(same) and all(same[0][k] == obj[k] for k in ("shape", "size")))
    success.append(len(parsed) == 1 and colour[-1] and kept[-1])
  return success, colour, kept


def _mean(flags: Sequence[bool]) -> float:
  return float(np.mean(flags)) if len(flags) else 0.0


def attribute_edits(
  space: Any,
  *,
  with_images: np.ndarray,
  without_images: np.ndarray,
  validation: np.ndarray,
  validation_scenes: Sequence[Sequence[Mapping[str, str]]],
  queries: np.ndarray,
  query_scenes: Sequence[Sequence[Mapping[str, str]]],
  target: str,
  strengths: Sequence[float] = STRENGTHS,
) -> tuple[np.ndarray, dict[str, Any]]:
  """Colour edits in `space`'s latent. The attribute vector `[C]` is the mean latent over the
  object's positions (`LatentSpace.region_masks` of `object_pixels`) of `with_images` minus that
  of `without_images` (single-object training images of colour B and A); an edit adds
  `strength * vector` at the query object's positions. The strength is the one of `strengths`
  with the most successful edits of `validation` (more single-object training images of colour
  A, none of them in `without_images`); the test `queries` are edited once, with it. An edit
  succeeds when the parser sees one object, of colour `target`, with the query's shape, size
  and cell. Returns (edited queries `[Q, H, W, 3]`, rates)."""
  vector = space.attribute_vector(
    with_images,
    without_images,
    with_masks=space.region_masks(object_pixels(with_images)),
    without_masks=space.region_masks(object_pixels(without_images)),
  )

  def edit(images: np.ndarray, strength: float) -> np.ndarray:
    masks = space.region_masks(object_pixels(images))
    return space.attribute(images, vector, strength=strength, masks=masks)

  by_strength = {
    float(s): _mean(_judge_edits(edit(validation, s), validation_scenes, target)[0])
    for s in strengths
  }
  strength = max(by_strength, key=lambda s: (by_strength[s], -s))  # ties: the smaller
  edited = edit(queries, strength)
  success, colour, kept = _judge_edits(edited, query_scenes, target)
  rates = {
    "num_queries": int(len(queries)),
    "success": _mean(success),
    "color_changed": _mean(colour),
    "rest_kept": _mean(kept),
    "strength": strength,
    "validation": {f"{s:g}": rate for s, rate in by_strength.items()},
    "num_validation": int(len(validation)),
    "vector_norm": float(np.linalg.norm(vector.astype(_F32))),
  }
  return edited, rates
