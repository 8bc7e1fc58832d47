import numpy as np
import pytest

from vqlm.data import pipeline


class Numbers:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"x": np.asarray(i, np.int32)}


def _take(transform_index=False):
  def transform(index, example):
    out = {"x": example["x"]}
    if transform_index:
      out["index"] = np.asarray(index, np.int64)
    return out

  return transform


def test_two_processes_cover_each_example_once_per_epoch():
  seen = []
  for pid in range(2):
    ds = pipeline.make_dataset(
      Numbers(40),
      global_batch_size=8,
      transform=_take(),
      seed=3,
      process_index=pid,
      process_count=2,
      num_epochs=1,
    )
    batches = [b["x"] for b in ds]
    assert all(b.shape == (4,) for b in batches)  # Each process gets half of every global batch.
    seen.append(np.concatenate(batches))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(40))


def test_epochs_are_reshuffled_and_complete():
  ds = pipeline.make_dataset(
    Numbers(12),
    global_batch_size=4,
    transform=_take(),
    seed=0,
    process_index=0,
    process_count=1,
    num_epochs=2,
  )
  values = np.concatenate([b["x"] for b in ds])
  first, second = values[:12], values[12:]
  assert sorted(first) == sorted(second) == list(range(12))
  assert list(first) != list(second)


def test_iterator_state_resumes_at_the_same_batch():
  kwargs = dict(global_batch_size=4, transform=_take(True), seed=1, num_threads=0)
  it = pipeline.make_iterator(Numbers(30), **kwargs)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = pipeline.make_iterator(Numbers(30), **kwargs)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["x"], want["x"])
    np.testing.assert_array_equal(got["index"], want["index"])


def test_per_example_index_does_not_depend_on_process_count():
  one = pipeline.make_dataset(
    Numbers(16),
    global_batch_size=4,
    transform=_take(True),
    seed=5,
    process_index=0,
    process_count=1,
    num_epochs=1,
  )
  pairs_one = {int(i): int(x) for b in one for i, x in zip(b["index"], b["x"])}
  pairs_two = {}
  for pid in range(2):
    ds = pipeline.make_dataset(
      Numbers(16),
      global_batch_size=4,
      transform=_take(True),
      seed=5,
      process_index=pid,
      process_count=2,
      num_epochs=1,
    )
    pairs_two.update({int(i): int(x) for b in ds for i, x in zip(b["index"], b["x"])})
  assert pairs_one == pairs_two


def test_empty_and_too_small_data_sets_fail_clearly():
  with pytest.raises(ValueError, match="the data set is empty"):
    pipeline.make_dataset(Numbers(0), global_batch_size=4, transform=_take(), seed=0)
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_dataset(Numbers(3), global_batch_size=4, transform=_take(), seed=0)
  with pytest.raises(ValueError, match="not divisible by 2 processes"):
    pipeline.make_dataset(
      Numbers(30), global_batch_size=5, transform=_take(), seed=0, process_index=0, process_count=2
    )


def test_image_transform_scales_to_unit_range():
  out = pipeline.image_transform()(0, {"image": np.array([[[0, 255, 127]]], np.uint8)})
  np.testing.assert_allclose(out["image"], [[[-1.0, 1.0, 127 / 127.5 - 1]]], rtol=1e-6)


def test_image_transform_shifts_are_seeded_by_the_example_index():
  image = np.full((8, 8, 3), 10, np.uint8)
  image[3, 3] = 250
  shifted = pipeline.image_transform(max_shift=2, seed=1)
  first = [shifted(i, {"image": image})["image"] for i in range(20)]
  again = [shifted(i, {"image": image})["image"] for i in range(20)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  bright = {tuple(np.argwhere(x[..., 0] > 0.9)[0]) for x in first}
  assert len(bright) > 5 and all(1 <= y <= 5 and 1 <= x <= 5 for y, x in bright)
  plain = pipeline.image_transform()(7, {"image": image})["image"]
  assert tuple(np.argwhere(plain[..., 0] > 0.9)[0]) == (3, 3)
  half = pipeline.image_transform(max_shift=2, shift_fraction=0.5, seed=1)
  moved = [not np.array_equal(half(i, {"image": image})["image"], plain) for i in range(200)]
  assert 60 < sum(moved) < 140  # about half (a drawn shift of (0, 0) leaves an image in place)
  with pytest.raises(ValueError, match="config.data.max_shift must be >= 0"):
    pipeline.image_transform(max_shift=-1)
  with pytest.raises(ValueError, match="shift_fraction must be in"):
    pipeline.image_transform(max_shift=2, shift_fraction=1.5)
