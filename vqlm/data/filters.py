"""Quality filters over a source: heuristic rules and model-based scores, with counts.

    filters = make_filters({"min_caption_words": 3, "min_image_size": 64, "exact_duplicates": True})
    kept, counts = apply_filters(source, filters, report_path="runs/x/filter_report.json")
    # counts == {"total": N, "kept": M, "removed": {"min_caption_words": 12, ...}, ...}

Each example goes through the filters in order and is counted under the FIRST filter that rejects
it, so the removed counts add up to `total - kept`. Heuristic filters look at one example:
caption length in words, the size and aspect ratio of the ORIGINAL image (the item's
"original_size" (h, w) if the source gives one, else the image's own shape), pixel standard
deviation (near-constant images), exact duplicates (a hash of the pixels; the first copy stays).
Model-based filters (`ScoreFilter`, `ReconstructionErrorFilter`) score a batch of images with a
function the caller provides (e.g. the image tokenizer's reconstruction error) and keep the scores
within bounds; their score statistics go into the report too.
"""

import abc
from collections.abc import Callable, Mapping, Sequence
import hashlib
import json
import pathlib
from typing import Any

import numpy as np

from vqlm.data.sources import Source
from vqlm.errors import UserError

ScoreFn = Callable[[np.ndarray], np.ndarray]  # uint8 [B, H, W, 3] -> float32 [B]


class Filter(abc.ABC):
  """Decides which examples to keep. `name` is the key of its count in the report."""

  name: str = "filter"

  def reset(self) -> None:  # noqa: B027 - optional hook: a no-op for stateless filters
    """Forgets state from an earlier pass (e.g. hashes already seen); a no-op by default."""

  @abc.abstractmethod
  def keep_batch(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """bool `[B]`: which of `examples` (in source order) to keep."""


class ExampleFilter(Filter):
  """A filter that looks at one example at a time."""

  @abc.abstractmethod
  def keep(self, example: Mapping[str, Any]) -> bool:
    """Whether to keep `example`."""

  def keep_batch(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([bool(self.keep(e)) for e in examples], dtype=bool)


def _original_size(example: Mapping[str, Any]) -> tuple[int, int]:
  if "original_size" in example:
    height, width = example["original_size"]
    return int(height), int(width)
  shape = np.shape(example["image"])
  return int(shape[0]), int(shape[1])


class MinCaptionWords(ExampleFilter):
  """Keeps captions with at least `min_words` whitespace-separated words."""

  name = "min_caption_words"

  def __init__(self, min_words: int):
    if min_words < 0:
      raise UserError(f"min_caption_words must be >= 0, got {min_words}")
    self.min_words = int(min_words)

  def keep(self, example: Mapping[str, Any]) -> bool:
    return len(str(example.get("text", "")).split()) >= self.min_words


class MinImageSize(ExampleFilter):
  """Keeps images whose original shorter side is at least `min_size` pixels."""

  name = "min_image_size"

  def __init__(self, min_size: int):
    if min_size < 1:
      raise UserError(f"min_image_size must be >= 1, got {min_size}")
    self.min_size = int(min_size)

  def keep(self, example: Mapping[str, Any]) -> bool:
    return min(_original_size(example)) >= self.min_size


class MaxAspectRatio(ExampleFilter):
  """Keeps images whose original longer / shorter side is at most `max_ratio`."""

  name = "max_aspect_ratio"

  def __init__(self, max_ratio: float):
    if max_ratio < 1.0:
      raise UserError(f"max_aspect_ratio must be >= 1, got {max_ratio}")
    self.max_ratio = float(max_ratio)

  def keep(self, example: Mapping[str, Any]) -> bool:
    height, width = _original_size(example)
    return max(height, width) <= self.max_ratio * min(height, width)


class MinPixelStd(ExampleFilter):
  """Drops near-constant images: keeps those whose pixel standard deviation (over all pixels and
  channels, in uint8 units 0..255) is at least `min_std`."""

  name = "min_pixel_std"

  def __init__(self, min_std: float):
    if min_std < 0:
      raise UserError(f"min_pixel_std must be >= 0, got {min_std}")
    self.min_std = float(min_std)

  def keep(self, example: Mapping[str, Any]) -> bool:
    return float(np.asarray(example["image"], np.float32).std()) >= self.min_std


class ExactDuplicates(ExampleFilter):
  """Keeps the first example of each set with identical pixels (shape, dtype and bytes)."""

  name = "exact_duplicates"

  def __init__(self):
    self._seen: set[bytes] = set()

  def reset(self) -> None:
    self._seen = set()

  def keep(self, example: Mapping[str, Any]) -> bool:
    image = np.ascontiguousarray(example["image"])
    digest = hashlib.blake2b(f"{image.shape}{image.dtype}".encode(), digest_size=16)
    digest.update(image.tobytes())
    key = digest.digest()
    if key in self._seen:
      return False
    self._seen.add(key)
    return True


class ScoreFilter(Filter):
  """Keeps images whose score lies within [`min_score`, `max_score`] (NaN scores are dropped).

  `score_fn(images uint8 [B, H, W, 3]) -> float32 [B]` is provided by the caller (e.g. a model).
  The scores seen in a pass are kept in `scores` for the report.
  """

  def __init__(
    self,
    score_fn: ScoreFn,
    *,
    min_score: float | None = None,
    max_score: float | None = None,
    name: str = "score",
  ):
    if min_score is None and max_score is None:
      raise UserError(f"{name}: give min_score and/or max_score")
    self.score_fn, self.min_score, self.max_score, self.name = score_fn, min_score, max_score, name
    self.scores: list[float] = []

  def reset(self) -> None:
    self.scores = []

  def keep_batch(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    if not examples:
      return np.zeros([0], bool)
    images = np.stack([np.asarray(e["image"]) for e in examples])
    scores = np.asarray(self.score_fn(images), np.float32)
    if scores.shape != (len(examples),):
      raise UserError(
        f"{self.name}: score_fn must return one score per image, shape "
        f"[{len(examples)}], got {scores.shape}"
      )
    self.scores.extend(scores.tolist())
    keep = ~np.isnan(scores)
    if self.min_score is not None:
      keep &= scores >= self.min_score
    if self.max_score is not None:
      keep &= scores <= self.max_score
    return keep

  def stats(self) -> dict[str, float]:
    """Summary of the scores seen in the last pass (for choosing thresholds)."""
    scores = np.asarray(self.scores, np.float64)
    scores = scores[~np.isnan(scores)]
    if not scores.size:
      return {"count": 0}
    p5, p50, p95 = np.percentile(scores, [5, 50, 95])
    return {
      "count": int(scores.size),
      "mean": float(scores.mean()),
      "min": float(scores.min()),
      "p5": float(p5),
      "p50": float(p50),
      "p95": float(p95),
      "max": float(scores.max()),
    }


class ReconstructionErrorFilter(ScoreFilter):
  """Drops images the image tokenizer reconstructs badly: keeps score <= `max_score`.

  `score_fn(images uint8 [B, H, W, 3]) -> float32 [B]` is e.g. the per-image mean squared error
  of encode -> decode, computed by the caller with a trained tokenizer.
  """

  def __init__(self, score_fn: ScoreFn, max_score: float, name: str = "reconstruction_error"):
    super().__init__(score_fn, max_score=max_score, name=name)


class FilteredSource(Source):
  """The examples of `source` at `indices` (in order), with the same attributes."""

  def __init__(self, source: Source, indices: Sequence[int], counts: dict[str, Any] | None = None):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.counts = counts or {}
    self.name = getattr(source, "name", "filtered")
    self.split = getattr(source, "split", "")
    self.image_size = getattr(source, "image_size", 0)

  def __len__(self) -> int:
    return len(self.indices)

  def _get(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]


def apply_filters(
  source: Source, filters: Sequence[Filter], *, report_path: str | None = None, batch_size: int = 64
) -> tuple[FilteredSource, dict[str, Any]]:
  """Runs `filters` over every example of `source` once.

  Returns the kept examples (a `FilteredSource`) and counts
  `{"total": N, "kept": M, "removed": {filter name: count, ...}, "scores": {...}}`, also written
  as JSON to `report_path` when given. Examples are read in batches of `batch_size` (the unit of a
  model-based filter's `score_fn` call).
  """
  names = [f.name for f in filters]
  if len(set(names)) != len(names):
    raise UserError(f"filter names must be unique, got {names}; pass name=... to score filters")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  for f in filters:
    f.reset()
  removed = {name: 0 for name in names}
  kept: list[int] = []
  total = len(source)
  for start in range(0, total, batch_size):
    indices = list(range(start, min(start + batch_size, total)))
    examples = [source[i] for i in indices]
    alive = np.ones(len(indices), bool)
    for f in filters:
      positions = np.flatnonzero(alive)
      if not positions.size:
        break
      keep = np.asarray(f.keep_batch([examples[p] for p in positions]), bool)
      removed[f.name] += int((~keep).sum())
      alive[positions[~keep]] = False
    kept.extend(i for i, a in zip(indices, alive) if a)
  counts: dict[str, Any] = {"total": total, "kept": len(kept), "removed": removed}
  scores = {f.name: f.stats() for f in filters if isinstance(f, ScoreFilter)}
  if scores:
    counts["scores"] = scores
  if report_path is not None:
    path = pathlib.Path(report_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(counts, indent=2) + "\n")
  return FilteredSource(source, kept, counts), counts


# Filters in the order they run (cheap ones first); these four take one number each.
_NUMBER_FILTERS: dict[str, Callable[[Any], Filter]] = {
  "min_caption_words": MinCaptionWords,
  "min_image_size": MinImageSize,
  "max_aspect_ratio": MaxAspectRatio,
  "min_pixel_std": MinPixelStd,
}
_SCORE_FILTERS = ("reconstruction_error",)
FILTER_NAMES = (*_NUMBER_FILTERS, "exact_duplicates", *_SCORE_FILTERS)


def make_filters(
  config: Mapping[str, Any], *, score_fns: Mapping[str, ScoreFn] | None = None
) -> list[Filter]:
  """Filters from a plain config, e.g. `{"min_caption_words": 3, "exact_duplicates": True}`.

  Keys (see `FILTER_NAMES`): min_caption_words (int), min_image_size (pixels), max_aspect_ratio
  (float), min_pixel_std (0..255 units), exact_duplicates (bool), reconstruction_error (maximum
  score; needs `score_fns={"reconstruction_error": fn}`). A value of None or False disables a
  filter. The filters run in the order of `FILTER_NAMES` whatever the order of the keys.
  """
  unknown = sorted(set(config) - set(FILTER_NAMES))
  if unknown:
    raise UserError(f"unknown filter {unknown[0]!r}; valid: {', '.join(FILTER_NAMES)}")
  score_fns = dict(score_fns or {})
  filters: list[Filter] = []
  for name in FILTER_NAMES:
    value = config.get(name)
    if value is None or value is False:
      continue
    if name in _SCORE_FILTERS:
      if name not in score_fns:
        raise UserError(
          f"filter {name!r} needs a score function: pass "
          f"score_fns={{{name!r}: fn}} (uint8 [B, H, W, 3] -> float32 [B])"
        )
      filters.append(ReconstructionErrorFilter(score_fns[name], max_score=float(value)))
    elif name == "exact_duplicates":
      if value is not True:
        raise UserError(f"exact_duplicates takes True or False, got {value!r}")
      filters.append(ExactDuplicates())
    else:
      if isinstance(value, bool):
        raise UserError(f"{name} takes a number, got {value!r}")
      filters.append(_NUMBER_FILTERS[name](value))
  return filters
