"""TFDS builder of the shapes data set (array_record, built offline, read without TensorFlow).

    src = load_shapes(data_dir="data/tfds", image_size=32, split="train")
    ex = src[0]    # {"image": uint8[32, 32, 3], "text": str, "scene": list[dict]}

Configs are named `{image_size}_obj{min}to{max}` (e.g. "32_obj1to2", the demo's) with the default
split sizes; other sizes or seeds get a custom config whose name encodes them, so data sets of
different sizes never share a directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import io
import json
from typing import Any

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vqlm.data import shapes
from vqlm.errors import UserError

DEFAULT_SPLIT_SIZES: dict[str, int] = {
  "train": 20000,
  "validation": 1000,
  "test": 1000,
  "test_heldout": 1000,
}


def config_name(
  image_size: int,
  min_objects: int,
  max_objects: int,
  split_sizes: Mapping[str, int] | None = None,
  seed: int = 0,
) -> str:
  """'32_obj1to2', with '_n{train}-{validation}-{test}-{heldout}' / '_seed{s}' when not default."""
  name = f"{image_size}_obj{min_objects}to{max_objects}"
  sizes = _full_sizes(split_sizes)
  if sizes != DEFAULT_SPLIT_SIZES:
    name += "_n" + "-".join(str(sizes[s]) for s in shapes.SPLITS)
  if seed:
    name += f"_seed{seed}"
  return name


def _full_sizes(split_sizes: Mapping[str, int] | None) -> dict[str, int]:
  sizes = dict(DEFAULT_SPLIT_SIZES)
  if split_sizes:
    unknown = set(split_sizes) - set(shapes.SPLITS)
    if unknown:
      raise UserError(f"split_sizes keys must be among {shapes.SPLITS}, got {sorted(unknown)}")
    sizes.update({k: int(v) for k, v in split_sizes.items()})
  if any(v < 1 for v in sizes.values()):
    raise UserError(f"every split size must be >= 1, got {sizes}")
  return sizes


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """One shapes variant: image size, object count range, split sizes and the generator seed."""

  image_size: int = 32
  min_objects: int = 1
  max_objects: int = 2
  split_sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))
  seed: int = 0


def make_config(
  *,
  image_size: int = 32,
  min_objects: int = 1,
  max_objects: int = 2,
  split_sizes: Mapping[str, int] | None = None,
  seed: int = 0,
) -> ShapesConfig:
  """A validated `ShapesConfig` named by `config_name`."""
  shapes.layout(image_size)
  if not 1 <= min_objects <= max_objects <= len(shapes.POSITIONS):
    raise UserError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}, {max_objects}")
  sizes = _full_sizes(split_sizes)
  return ShapesConfig(
    name=config_name(image_size, min_objects, max_objects, sizes, seed),
    description=(
      f"{image_size}x{image_size} images, {min_objects}-{max_objects} objects, "
      f"splits {sizes}, seed {seed}"
    ),
    image_size=image_size,
    min_objects=min_objects,
    max_objects=max_objects,
    split_sizes=sizes,
    seed=seed,
  )


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Procedural captioned shapes with exact scene descriptions (see `vqlm.data.shapes`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    make_config(image_size=s, min_objects=1, max_objects=m) for s in (32, 64) for m in (2, 3)
  ]
  DEFAULT_CONFIG_NAME = "32_obj1to2"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources` (not installed) for classes inside a package.
    return epath.Path(__file__)

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description="Flat-colour shapes on a 3x3 grid with captions and exact scene JSON.",
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
          "text": tfds.features.Text(),
          "scene": tfds.features.Text(),
        }
      ),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # Procedural: nothing to download.
    return {split: self._generate_examples(split) for split in shapes.SPLITS}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    examples = shapes.make_examples(
      split=split,
      num_examples=cfg.split_sizes[split],
      image_size=cfg.image_size,
      min_objects=cfg.min_objects,
      max_objects=cfg.max_objects,
      seed=cfg.seed,
    )
    for i, ex in enumerate(examples):
      yield i, {"image": _png(ex["image"]), "text": ex["text"], "scene": json.dumps(ex["scene"])}


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ShapesSource:
  """Random-access view of one split: `src[i]` -> {"image": uint8[H, W, 3], "text", "scene"}."""

  def __init__(self, source: Sequence[Mapping[str, Any]]):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    ex = self._source[index % len(self)]
    return {
      "image": np.asarray(ex["image"], np.uint8),
      "text": _text(ex["text"]),
      "scene": json.loads(_text(ex["scene"])),
    }

  def __repr__(self) -> str:
    return f"ShapesSource({len(self)} examples)"


def load_shapes(
  *,
  data_dir: str,
  image_size: int = 32,
  min_objects: int = 1,
  max_objects: int = 2,
  split: str = "train",
  sizes: Mapping[str, int] | None = None,
  seed: int = 0,
) -> ShapesSource:
  """Build the data set under `data_dir` if absent (offline) and return one split's source.

  Args:
    data_dir: TFDS data directory (created if missing).
    image_size, min_objects, max_objects: the variant; see `make_config`.
    split: one of "train", "validation", "test", "test_heldout".
    sizes: examples per split, overriding DEFAULT_SPLIT_SIZES for the splits it names.
    seed: generator seed (0 is the published default).
  """
  if split not in shapes.SPLITS:
    raise UserError(f"split must be one of {shapes.SPLITS}, got {split!r}")
  cfg = make_config(
    image_size=image_size,
    min_objects=min_objects,
    max_objects=max_objects,
    split_sizes=sizes,
    seed=seed,
  )
  if cfg.name in Shapes.builder_configs:
    cfg = Shapes.builder_configs[cfg.name]  # TFDS rejects a copy named like a built-in config.
  builder = Shapes(data_dir=data_dir, config=cfg)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return ShapesSource(builder.as_data_source(split=split))
