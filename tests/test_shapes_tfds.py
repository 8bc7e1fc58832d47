"""Tests of the shapes TFDS builder (array_record, no TensorFlow)."""

import sys

import numpy as np
import pytest

from vqlm.data import shapes
from vqlm.data.sources import shapes_tfds

SIZES = {"train": 20, "validation": 20, "test": 20, "test_heldout": 20}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_build_and_read_each_split(data_dir, split):
  src = shapes_tfds.load_shapes(data_dir=data_dir, split=split, sizes=SIZES)
  assert len(src) == 20
  texts = []
  for i in range(len(src)):
    ex = src[i]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"], shapes.render(ex["scene"], 32))
    assert ex["text"] == shapes.caption(ex["scene"])
    pairs = {(o["color"], o["shape"]) for o in ex["scene"]}
    assert bool(pairs & set(shapes.HELDOUT_PAIRS)) == (split == "test_heldout")
    texts.append(ex["text"])
  # Same examples as the generator with the same seed (TFDS stores them in shuffled order).
  expected = [e["text"] for e in shapes.make_examples(split=split, num_examples=20, image_size=32)]
  assert sorted(texts) == sorted(expected)
  assert src[-1]["text"] == src[19]["text"]
  with pytest.raises(IndexError):
    src[20]
  assert "tensorflow" not in sys.modules


def test_64_and_three_objects(data_dir):
  src = shapes_tfds.load_shapes(
    data_dir=data_dir, image_size=64, max_objects=3, split="test", sizes=SIZES
  )
  ex = src[3]
  assert ex["image"].shape == (64, 64, 3)
  np.testing.assert_array_equal(ex["image"], shapes.render(ex["scene"], 64))
  assert max(len(src[i]["scene"]) for i in range(len(src))) == 3


def test_configs_and_errors():
  names = set(shapes_tfds.Shapes.builder_configs)
  assert {"32_obj1to2", "32_obj1to3", "64_obj1to2", "64_obj1to3"} <= names
  assert shapes_tfds.config_name(32, 1, 2) == "32_obj1to2"
  assert shapes_tfds.config_name(32, 1, 2, SIZES, seed=3) == "32_obj1to2_n20-20-20-20_seed3"
  with pytest.raises(ValueError, match="split must be one of"):
    shapes_tfds.load_shapes(data_dir="/nonexistent", split="dev")
  with pytest.raises(ValueError, match="split_sizes keys"):
    shapes_tfds.make_config(split_sizes={"training": 5})
  with pytest.raises(ValueError, match="image_size"):
    shapes_tfds.make_config(image_size=8)
