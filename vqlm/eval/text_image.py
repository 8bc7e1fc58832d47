"""Text-to-image and image-to-text accuracy on `shapes`, judged by the deterministic scene parser.

Text-to-image: each test caption is drawn `num_per_prompt` times; every image is parsed back into a
scene and compared with the caption's scene (object count, colour, shape, size, position, and the
whole scene). Image-to-text: each test image is captioned and the caption parsed back into a scene.
Both are reported overall and split by the number of objects in the true scene.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from vqlm.data import shapes
from vqlm.eval import scene_parser


def _by_count(results: list[dict], counts: list[int]) -> dict[str, dict[str, float]]:
  out = {}
  for n in sorted(set(counts)):
    chosen = [r for r, c in zip(results, counts) if c == n]
    out[f"{n}_objects"] = {"num": len(chosen), **scene_parser.summarize(chosen)}
  return out


def text_to_image(
  generator: Any,
  examples: Sequence[dict],
  *,
  num_per_prompt: int = 4,
  cfg_scale: float | None = None,
  sampling: Any = None,
  seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
  """Draws every example's caption and scores the images against the example's scene.

  Args:
    generator: a `vqlm.sample.api.Generator`.
    examples: dicts with "text" (caption) and "scene" (the truth), e.g. from the shapes source.
  Returns:
    (metrics, images uint8 [len(examples) * num_per_prompt, H, W, 3]).
  """
  prompts = [e["text"] for e in examples]
  images = generator.generate_images(
    prompts, num_per_prompt=num_per_prompt, cfg_scale=cfg_scale, sampling=sampling, seed=seed
  )
  results, counts = [], []
  for i, image in enumerate(images):
    truth = examples[i // num_per_prompt]["scene"]
    results.append(scene_parser.compare(scene_parser.parse_image(image), truth))
    counts.append(len(truth))
  metrics = {
    "num_prompts": len(prompts),
    "num_images": len(images),
    **scene_parser.summarize(results),
    "by_objects": _by_count(results, counts),
  }
  return metrics, images


def image_to_text(
  generator: Any, examples: Sequence[dict], *, seed: int = 0
) -> tuple[dict[str, Any], list[str]]:
  """Captions every example's image (greedy) and scores the parsed captions against its scene."""
  images = np.stack([e["image"] for e in examples])
  captions = generator.caption_images(images, greedy=True, seed=seed)
  results, counts = [], []
  for caption, example in zip(captions, examples):
    parsed = shapes.parse_caption(caption) or []
    results.append(scene_parser.compare(parsed, example["scene"]))
    counts.append(len(example["scene"]))
  parsed_rate = float(np.mean([shapes.parse_caption(c) is not None for c in captions]))
  metrics = {
    "num_images": len(captions),
    "parseable": parsed_rate,
    **scene_parser.summarize(results),
    "by_objects": _by_count(results, counts),
  }
  return metrics, captions


def chance_scene_accuracy(max_objects: int) -> float:
  """Probability that a uniformly random scene of 1..max_objects objects matches a given one
  (an upper bound of chance for "whole scene" accuracy; far below any trained model)."""
  per_object = len(shapes.COLORS) * len(shapes.SHAPES) * len(shapes.SIZES)
  positions = len(shapes.POSITIONS)
  return float(1.0 / (max_objects * per_object * positions))
