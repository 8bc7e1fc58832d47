"""The `Source` interface every data source implements, and helpers the families share."""

import abc
from collections.abc import Sequence
import operator
from typing import Any

from vqlm.errors import UserError

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Source(abc.ABC):
  """Random-access captioned images: `len(src)`, `src[i] -> {"image": uint8[S, S, 3], "text"}`."""

  name: str
  split: str
  image_size: int

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def _get(self, index: int) -> dict[str, Any]:
    """Example `index`, already checked to lie in [0, len)."""

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self)
    index = operator.index(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {self.name}/{self.split} with {n} examples")
    return self._get(index)

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
      f"image_size={self.image_size}, len={len(self)})"
    )


def _check_split(split: str, valid: Sequence[str], what: str) -> None:
  if split not in valid:
    raise UserError(f"unknown split {split!r} for {what}; valid: {', '.join(valid)}")
