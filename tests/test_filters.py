import json

import numpy as np
import pytest

from vqlm.data import filters
from vqlm.data.sources import Source


class ListSource(Source):
  name, split, image_size = "list", "train", 4

  def __init__(self, items):
    self.items = items
    self.reads = 0

  def __len__(self):
    return len(self.items)

  def _get(self, index):
    self.reads += 1
    return dict(self.items[index])


def _noise(seed):
  return np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)


def _item(text="a long enough caption", image=None, original_size=(64, 64), seed=0):
  return {
    "image": _noise(seed) if image is None else image,
    "text": text,
    "original_size": original_size,
  }


def _crafted():
  """Items and, for each, the first filter that rejects it (None: kept)."""
  return [
    (_item(seed=1), None),
    (_item(text="too short", seed=2), "min_caption_words"),
    (_item(original_size=(31, 200), seed=3), "min_image_size"),
    (_item(original_size=(40, 130), seed=4), "max_aspect_ratio"),
    (_item(image=np.full((4, 4, 3), 128, np.uint8)), "min_pixel_std"),
    (_item(seed=1, text="same pixels as the first"), "exact_duplicates"),
    (_item(text="", seed=5, original_size=(8, 8)), "min_caption_words"),  # counted once
    (_item(seed=6, original_size=(32, 96)), None),  # ratio 3 is allowed
  ]


CONFIG = {
  "min_caption_words": 3,
  "min_image_size": 32,
  "max_aspect_ratio": 3.0,
  "min_pixel_std": 2.0,
  "exact_duplicates": True,
}


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_counts_on_crafted_items(tmp_path, batch_size):
  crafted = _crafted()
  source = ListSource([item for item, _ in crafted])
  report = tmp_path / "sub" / "report.json"
  kept, counts = filters.apply_filters(
    source, filters.make_filters(CONFIG), report_path=str(report), batch_size=batch_size
  )
  expected_kept = [i for i, (_, why) in enumerate(crafted) if why is None]
  assert list(kept.indices) == expected_kept
  assert counts == {
    "total": 8,
    "kept": 2,
    "removed": {
      "min_caption_words": 2,
      "min_image_size": 1,
      "max_aspect_ratio": 1,
      "min_pixel_std": 1,
      "exact_duplicates": 1,
    },
  }
  assert json.loads(report.read_text()) == counts
  assert len(kept) == 2 and kept.counts == counts and kept.name == "list"
  np.testing.assert_array_equal(kept[1]["image"], crafted[7][0]["image"])
  assert source.reads == 8 + 1  # one pass, plus the read above


def test_original_size_falls_back_to_image_shape():
  item = {"image": np.zeros((10, 30, 3), np.uint8), "text": "x"}
  assert not filters.MaxAspectRatio(2.0).keep(item)
  assert filters.MaxAspectRatio(3.0).keep(item)
  assert filters.MinImageSize(10).keep(item) and not filters.MinImageSize(11).keep(item)


def test_duplicates_reset_between_passes():
  source = ListSource([_item(seed=1), _item(seed=1), _item(seed=2)])
  dedup = filters.ExactDuplicates()
  for _ in range(2):
    kept, counts = filters.apply_filters(source, [dedup], batch_size=2)
    assert list(kept.indices) == [0, 2] and counts["removed"] == {"exact_duplicates": 1}
  # Same bytes but a different shape is not a duplicate.
  flat = {"image": _item(seed=1)["image"].reshape(8, 2, 3), "text": ""}
  assert filters.ExactDuplicates().keep_batch([_item(seed=1), flat]).tolist() == [True, True]


def test_reconstruction_error_filter_with_fake_score():
  brightness = [10, 200, 90, 250, 100]
  source = ListSource([_item(image=np.full((4, 4, 3), b, np.uint8)) for b in brightness])
  calls = []

  def mean_brightness(images):
    calls.append(images.shape)
    assert images.dtype == np.uint8
    return images.reshape(len(images), -1).mean(axis=1).astype(np.float32)

  fs = filters.make_filters(
    {"reconstruction_error": 100.0, "min_pixel_std": None, "exact_duplicates": False},
    score_fns={"reconstruction_error": mean_brightness},
  )
  assert [f.name for f in fs] == ["reconstruction_error"]
  kept, counts = filters.apply_filters(source, fs, batch_size=2)
  assert list(kept.indices) == [0, 2, 4]
  assert counts["removed"] == {"reconstruction_error": 2}
  assert calls == [(2, 4, 4, 3), (2, 4, 4, 3), (1, 4, 4, 3)]
  stats = counts["scores"]["reconstruction_error"]
  assert stats["count"] == 5 and stats["max"] == 250 and stats["min"] == 10
  assert stats["p50"] == 100 and stats["mean"] == pytest.approx(130)


def test_score_filter_bounds_nan_and_shape():
  images = [_item(image=np.full((4, 4, 3), b, np.uint8)) for b in (0, 50, 100)]
  scores = {0: np.nan, 50: 0.5, 100: 0.9}
  fn = lambda x: np.array([scores[int(i[0, 0, 0])] for i in x], np.float32)
  keep = filters.ScoreFilter(fn, min_score=0.6, name="alignment").keep_batch(images)
  assert keep.tolist() == [False, False, True]
  bad = filters.ScoreFilter(lambda x: np.zeros([len(x), 1]), max_score=1.0)
  with pytest.raises(ValueError, match=r"one score per image, shape \[3\], got \(3, 1\)"):
    bad.keep_batch(images)
  with pytest.raises(ValueError, match="give min_score and/or max_score"):
    filters.ScoreFilter(fn)


def test_filters_only_see_survivors():
  seen = []

  def record(images):
    seen.append(len(images))
    return np.zeros(len(images), np.float32)

  source = ListSource([_item(text="x", seed=1), _item(seed=2), _item(text="y", seed=3)])
  fs = [filters.MinCaptionWords(2), filters.ReconstructionErrorFilter(record, max_score=1.0)]
  kept, _ = filters.apply_filters(source, fs)
  assert seen == [1] and list(kept.indices) == [1]


def test_make_filters_config_errors_and_order():
  fs = filters.make_filters({"exact_duplicates": True, "min_caption_words": 2})
  assert [f.name for f in fs] == ["min_caption_words", "exact_duplicates"]
  assert filters.make_filters({}) == []
  with pytest.raises(
    ValueError,
    match=r"unknown filter 'min_words'; valid: min_caption_words, "
    r"min_image_size, max_aspect_ratio, min_pixel_std, "
    r"exact_duplicates, reconstruction_error",
  ):
    filters.make_filters({"min_words": 3})
  with pytest.raises(ValueError, match="'reconstruction_error' needs a score function"):
    filters.make_filters({"reconstruction_error": 0.1})
  with pytest.raises(ValueError, match="min_caption_words takes a number"):
    filters.make_filters({"min_caption_words": True})
  with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
    filters.make_filters({"max_aspect_ratio": 0.5})
  with pytest.raises(ValueError, match="filter names must be unique"):
    filters.apply_filters(ListSource([]), [filters.MinImageSize(1), filters.MinImageSize(2)])


def test_filters_over_a_real_source(tmp_path):
  from vqlm.data import sources

  src = sources.get_source("digits", split="test", image_size=8)
  kept, counts = filters.apply_filters(
    src, filters.make_filters({"min_caption_words": 3, "exact_duplicates": True})
  )
  assert counts["total"] == 197 and counts["removed"]["min_caption_words"] == 0
  assert counts["kept"] == 197 - counts["removed"]["exact_duplicates"] == len(kept)
  assert kept[0]["text"].startswith("the digit")
