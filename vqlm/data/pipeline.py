"""Input pipeline: per-process sharding, seeded per-epoch shuffling, batching, checkpointable state.

Built on grain's `MapDataset` over any random-access source (`len` + `__getitem__`). Order of
operations: shuffle the global index space (a new permutation every epoch), take this process's
strided slice (so processes see disjoint examples and, together, each example once per epoch), map
each example by `(index, example)` (so per-example randomness is a function of the index, and a
resumed run recomputes exactly the same batches), then batch.

The iterator's state is a small JSON dict saved in the same Orbax checkpoint as the train state.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np

from vqlm.data import transforms
from vqlm.errors import UserError

Example = Mapping[str, Any]


class BatchIterator:
  """Host-local batches `{key: np.ndarray[B_local, ...]}` with `get_state` / `set_state`."""

  def __init__(self, dataset: "grain.MapDataset", *, num_threads: int = 2, prefetch: int = 4):
    self._dataset = dataset
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._iter = iter(dataset.to_iter_dataset(options))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict:
    return dict(self._iter.get_state())

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iter.set_state(dict(state))


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_dataset(
  source: Any,
  *,
  global_batch_size: int,
  transform: Callable[[int, Example], dict],
  seed: int,
  shuffle: bool = True,
  num_epochs: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  drop_remainder: bool = True,
) -> "grain.MapDataset":
  """A grain MapDataset of host-local batches.

  Args:
    source: random-access data (`len`, `__getitem__`).
    global_batch_size: examples per step over all processes; each process gets an equal share.
    transform: `(global_index, example) -> dict of np arrays` (e.g. image to float, or an LM
      example); `global_index` counts over epochs, so randomness seeded by it differs per epoch.
    seed: shuffling seed.
    num_epochs: None repeats forever.
  """
  if len(source) == 0:
    raise UserError("the data set is empty; check the source name, split and data_dir")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise UserError(
      f"batch size {global_batch_size} is not divisible by {process_count} "
      "processes; change config.train.batch_size"
    )
  local_batch = global_batch_size // process_count
  if len(source) < global_batch_size and drop_remainder:
    raise UserError(
      f"the data set has {len(source)} examples, fewer than one batch of "
      f"{global_batch_size}; lower config.train.batch_size"
    )
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  # Number the (shuffled, repeated) stream globally, then let each process take a strided slice:
  # the numbering, and so every per-example random choice, does not depend on the process count.
  ds = ds.map_with_index(lambda i, x: (i, x))
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = ds.map(lambda pair: transform(pair[0], pair[1]))
  return ds.batch(local_batch, drop_remainder=drop_remainder, batch_fn=_stack)


def make_iterator(source: Any, **kwargs) -> BatchIterator:
  """`make_dataset(...)` wrapped in a checkpointable iterator. See `make_dataset` for arguments."""
  num_threads = kwargs.pop("num_threads", 2)
  return BatchIterator(make_dataset(source, **kwargs), num_threads=num_threads)


def image_transform(
  image_key: str = "image", *, max_shift: int = 0, shift_fraction: float = 1.0, seed: int = 0
) -> Callable[[int, Example], dict]:
  """The tokenizer's per-example transform: uint8 [H, W, 3] -> float32 [H, W, 3] in [-1, 1].

  `max_shift` > 0 translates a `shift_fraction` of the images by up to that many pixels on each
  axis (`transforms.random_shift`), drawn from `(seed, index)`: the same stream after a restart
  and on any number of processes. It shows a tokenizer objects where the data set never draws
  them, e.g. the in-between positions of a moving object."""
  if max_shift < 0:
    raise UserError(f"config.data.max_shift must be >= 0, got {max_shift}")
  if not 0.0 <= shift_fraction <= 1.0:
    raise UserError(f"config.data.shift_fraction must be in [0, 1], got {shift_fraction}")

  def transform(index: int, example: Example) -> dict:
    image = np.asarray(example[image_key])
    if max_shift:
      rng = np.random.default_rng([int(seed), int(index)])
      if rng.random() < shift_fraction:
        image = transforms.random_shift(image, max_shift, rng)
    return {"image": image.astype(np.float32) / 127.5 - 1.0}

  return transform
