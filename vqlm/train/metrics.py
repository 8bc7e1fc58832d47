"""Where training metrics go: TensorBoard event files and `metrics.jsonl`, from process 0 only."""

from collections.abc import Mapping
import json
import os

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to `WORKDIR/tb` (TensorBoard) and appends them to `WORKDIR/metrics.jsonl`."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # Light: needs no TensorFlow.

      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
    if not self._enabled:
      return
    clean = {f"{prefix}{k}": float(np.asarray(v)) for k, v in scalars.items()}
    for name, value in clean.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, 3]."""
    if self._enabled:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `WORKDIR/metrics.jsonl` (empty if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
