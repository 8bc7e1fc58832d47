import io
import json
import pickle
import sys

import numpy as np
from PIL import Image
import pytest

from vqlm.data import sources
from vqlm.data.sources import base
from vqlm.data.sources import tfds as tfds_sources

S = 16


def _check_item(item, size=S):
  assert item["image"].shape == (size, size, 3)
  assert item["image"].dtype == np.uint8
  assert isinstance(item["text"], str)


def test_unknown_source_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown dataset 'foo'; valid: shapes, digits, photos"):
    sources.get_source("foo", split="train", image_size=S)
  with pytest.raises(ValueError, match="image_size must be a positive int"):
    sources.get_source("digits", split="train", image_size=0)


# ---------------------------------------------------------------------------------------- digits


def test_digits_splits_captions_and_pixels():
  from sklearn.datasets import load_digits

  digits = load_digits()
  lengths = {
    s: len(sources.get_source("digits", split=s, image_size=S))
    for s in ("train", "validation", "test")
  }
  assert lengths == {"train": 1400, "validation": 200, "test": 197}
  src = sources.get_source("digits", split="validation", image_size=S, method="nearest")
  assert isinstance(src, sources.Source) and src.name == "digits"
  item = src[7]
  _check_item(item)
  label = int(digits.target[1407])
  assert item["label"] == label
  assert item["text"] == "the digit " + base._DIGIT_WORDS[label]
  expected = np.round(digits.images[1407] * 255 / 16).astype(np.uint8)
  np.testing.assert_array_equal(item["image"][::2, ::2, 0], expected)  # nearest 8 -> 16
  np.testing.assert_array_equal(item["image"][..., 0], item["image"][..., 2])
  np.testing.assert_array_equal(src[-1]["image"], src[199]["image"])
  with pytest.raises(IndexError):
    src[200]
  with pytest.raises(ValueError, match="unknown split 'dev' for digits; valid: train"):
    sources.get_source("digits", split="dev", image_size=S)


# ---------------------------------------------------------------------------------------- photos


def test_photos_deterministic_held_out_and_picklable():
  src = sources.get_source("photos", split="train", image_size=S, num_examples=6)
  assert len(src) == 6
  items = [src[i] for i in range(6)]
  for item in items:
    _check_item(item)
    assert item["photo"] in sources.PHOTO_SPLITS["train"]
    assert item["text"] == item["photo"].replace("_", " ")
    assert item["original_size"][0] >= S
  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again[3]["image"], items[3]["image"])
  assert not np.array_equal(items[0]["image"], items[1]["image"])
  other_seed = sources.get_source("photos", split="train", image_size=S, num_examples=6, seed=1)
  assert any(not np.array_equal(other_seed[i]["image"], items[i]["image"]) for i in range(6))
  test = sources.get_source("photos", split="test", image_size=S, num_examples=4)
  assert {test[i]["photo"] for i in range(4)} <= set(sources.PHOTO_SPLITS["test"])
  assert not set(sources.PHOTO_SPLITS["test"]) & set(sources.PHOTO_SPLITS["train"])
  # min_scale=1 crops the whole shorter side.
  one = sources.get_source(
    "photos", split="test", image_size=S, num_examples=2, photos=["chelsea"], min_scale=1.0
  )
  assert one[0]["original_size"] == (300, 300)
  with pytest.raises(ValueError, match="unknown photo 'lena'"):
    sources.get_source("photos", split="train", image_size=S, photos=["lena"])


# ------------------------------------------------------------------------------------------ TFDS


@pytest.fixture()
def mock_tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    yield


@pytest.mark.parametrize("name,split", [("mnist", "train"), ("cifar10", "test")])
def test_tfds_classification_mock(mock_tfds, name, split):
  src = sources.get_source(name, split=split, image_size=S, data_dir="/nonexistent")
  assert len(src) == 5 and src.name == name
  for i in range(len(src)):
    item = src[i]
    _check_item(item)
    assert 0 <= item["label"] < 10
    word = (base._DIGIT_WORDS if name == "mnist" else tfds_sources._CIFAR10_NAMES)[item["label"]]
    assert item["text"].endswith(" " + word)
  assert src[0]["original_size"] == ((28, 28) if name == "mnist" else (32, 32))
  assert "tensorflow" not in sys.modules  # read without TensorFlow


def test_imagenet_mock_class_names(mock_tfds, tmp_path):
  import tensorflow_datasets as tfds

  synsets = tfds.builder("imagenet2012").info.features["label"].names
  names = [f"thing{i}" for i in range(1000)]
  names[0] = "apple"
  src = sources.get_source("imagenet2012", split="train", image_size=S, class_names=names)
  for i in range(len(src)):
    item = src[i]
    _check_item(item)  # mock images have random odd sizes
    assert item["text"] == f"a photo of a thing{item['label']}"
  assert src.convert({"image": np.zeros((9, 30, 3), np.uint8), "label": 0}, 0)["text"] == (
    "a photo of an apple"
  )
  mapping = tmp_path / "synsets.txt"
  lines = [f"{s} name{i}, other" for i, s in enumerate(synsets)]
  mapping.write_text("\n".join(reversed(lines)))  # any order
  src = sources.get_source(
    "imagenet2012", split="validation", image_size=S, class_names=str(mapping)
  )
  item = src[0]
  assert item["text"] == f"a photo of a name{item['label']}"
  with pytest.raises(ValueError, match="class_names has 2 names but the data set has 1000"):
    sources.get_source("imagenet2012", split="train", image_size=S, class_names=["a", "b"])
  with pytest.warns(UserWarning, match="imagenet2012 has no class_names"):
    src = sources.get_source("imagenet2012", split="train", image_size=S)
  assert src[0]["text"].startswith("a photo of a n")


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(ValueError, match=r"mnist is not prepared in .*tfds build mnist"):
    sources.get_source("mnist", split="train", image_size=S, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="coco_captions is not prepared"):
    sources.get_source("coco_captions", split="val", image_size=S, data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  """A tiny array_record data set with coco_captions' name, config, version and features.

  tfds.testing.mock_data cannot serve coco_captions without TensorFlow (its builder's `_info`
  uses tf.int64), so this builds real files that the source reads from disk, as it would read
  the prepared data set.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")

  with tfds.core.registered.skip_registration():

    class CocoCaptions(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.1.0")
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

      def _info(self):
        return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
            {
              "image": tfds.features.Image(encoding_format="jpeg"),
              "image/filename": tfds.features.Text(),
              "image/id": np.int64,
              "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }
          ),
        )

      def _split_generators(self, dl_manager):
        return {"val": self._generate_examples(3)}

      def _generate_examples(self, n):
        for i in range(n):
          image = Image.fromarray(np.full((20 + i, 30, 3), 60 * i, np.uint8))
          yield (
            i,
            {
              "image": image,
              "image/filename": f"{i}.jpg",
              "image/id": i,
              "captions": {
                "text": [f"image {i} first", f"image {i} second"],
                "id": [2 * i, 2 * i + 1],
              },
            },
          )

  CocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_coco_captions_from_prepared_files(coco_dir):
  src = sources.get_source("coco_captions", split="validation", image_size=S, data_dir=coco_dir)
  assert len(src) == 3
  seen = set()
  for i in range(3):
    item = src[i]
    _check_item(item)
    k = int(item["captions"][0].split()[1])
    seen.add(k)
    assert item["text"] == f"image {k} first"
    assert item["captions"] == [f"image {k} first", f"image {k} second"]
    assert item["original_size"] == (20 + k, 30)
    assert abs(int(item["image"].mean()) - 60 * k) <= 2  # JPEG round trip
  assert seen == {0, 1, 2}
  assert "tensorflow" not in sys.modules
  rand = sources.get_source(
    "coco_captions", split="val", image_size=S, data_dir=coco_dir, caption="random", seed=3
  )
  texts = [rand[i]["text"] for i in range(3)]
  assert texts == [rand[i]["text"] for i in range(3)]  # deterministic
  assert all(t in rand[i]["captions"] for i, t in enumerate(texts))
  with pytest.raises(ValueError, match="unknown split 'train' for coco_captions; valid: val"):
    sources.get_source("coco_captions", split="train", image_size=S, data_dir=coco_dir)


# ---------------------------------------------------------------------------------------- folder


def _png_bytes(image, **kwargs):
  buf = io.BytesIO()
  image.save(buf, "PNG", **kwargs)
  return buf.getvalue()


@pytest.fixture()
def image_dir(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "good.png")
  Image.fromarray(np.full((25, 25), 90, np.uint8)).save(tmp_path / "gray.png")
  rgba = np.zeros((30, 30, 4), np.uint8)
  rgba[..., 0] = 255  # red, fully transparent -> white
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  palette = Image.new("P", (21, 33))
  palette.putpalette([0, 0, 255] + [0] * 765)  # index 0 = blue
  palette.save(tmp_path / "palette.png")
  Image.fromarray(rng.integers(0, 256, (17, 91, 3), dtype=np.uint8)).save(tmp_path / "odd.jpg")
  Image.fromarray(np.full((20, 20), 257 * 100, np.uint16)).save(tmp_path / "sixteen.png")
  clear = Image.new("P", (20, 20))
  clear.putpalette([255, 0, 0] + [0] * 765)
  clear.save(tmp_path / "palette_clear.png", transparency=0)  # index 0: red, transparent
  (tmp_path / "sub").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "sub" / "nested.bmp")
  truncated = _png_bytes(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
  (tmp_path / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
  (tmp_path / "random.jpg").write_bytes(rng.bytes(300))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
  (tmp_path / "zbroken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  (tmp_path / "notes.txt").write_text("not an image")
  return tmp_path


def test_folder_without_captions(image_dir):
  with pytest.warns(UserWarning, match=r"skipped 2 unreadable images in .* \(first: random.jpg"):
    src = sources.get_source("folder", split="all", data_dir=str(image_dir), image_size=S)
  assert sorted(src.skipped) == ["random.jpg", "truncated.png"]
  files = [
    "good.png",
    "gray.png",
    "odd.jpg",
    "palette.png",
    "palette_clear.png",
    "rgba.png",
    "sixteen.png",
    "sub/nested.bmp",
    "zbroken.jpg",
  ]
  assert src._files == files  # zbroken.jpg passes verify() and fails when decoded
  items = {}
  with pytest.warns(UserWarning, match="image zbroken.jpg .* failed to load"):
    for i in range(len(src)):
      item = src[i]
      _check_item(item)
      assert item["text"] == ""
      items[item["file"]] = item
  # The broken JPEG (last) was replaced by the next readable example, wrapping to the first.
  assert list(src.failed) == ["zbroken.jpg"]
  assert src[len(src) - 1]["file"] == "good.png"
  np.testing.assert_array_equal(items["gray.png"]["image"], 90)
  np.testing.assert_array_equal(items["rgba.png"]["image"], 255)  # transparent over white
  np.testing.assert_array_equal(
    items["palette.png"]["image"], np.broadcast_to([0, 0, 255], (S, S, 3))
  )
  np.testing.assert_array_equal(items["sixteen.png"]["image"], 100)
  np.testing.assert_array_equal(items["palette_clear.png"]["image"], 255)
  assert items["odd.jpg"]["original_size"] == (17, 91)
  assert items["good.png"]["original_size"] == (40, 60)
  with pytest.warns(UserWarning, match="skipped 2"):
    black = sources.get_source(
      "folder", split="all", data_dir=str(image_dir), image_size=S, background="black"
    )
  np.testing.assert_array_equal(black[black._files.index("rgba.png")]["image"], 0)
  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again[0]["image"], items["good.png"]["image"])


def test_folder_hash_split_partitions_files(tmp_path):
  for i in range(40):
    Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / f"{i:02d}.png")
  kwargs = dict(data_dir=str(tmp_path), image_size=4, validation_fraction=0.3)
  train = sources.get_source("folder", split="train", **kwargs)
  val = sources.get_source("folder", split="validation", **kwargs)
  assert not set(train._files) & set(val._files)
  assert len(train) + len(val) == 40 and 4 <= len(val) <= 20
  assert val._files == sources.get_source("folder", split="validation", **kwargs)._files
  with pytest.raises(ValueError, match="unknown split 'test'"):
    sources.get_source("folder", split="test", **kwargs)


def test_folder_captions_jsonl(image_dir):
  rows = [
    {"file": "good.png", "text": "a noisy picture"},
    {"file": "gray.png", "text": "gray"},
    {"file": "good.png", "text": "second caption"},
    {"file": "random.jpg", "text": "corrupt"},
    {"file": "missing.png", "text": "gone"},
  ]
  (image_dir / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  with pytest.warns(UserWarning, match="skipped 2 unreadable images"):
    src = sources.get_source("folder", split="all", data_dir=str(image_dir), image_size=S)
  assert sorted(src.skipped) == ["missing.png", "random.jpg"]
  assert [src[i]["text"] for i in range(len(src))] == ["a noisy picture", "gray", "second caption"]
  (image_dir / "captions.jsonl").write_text('{"file": "good.png", "text": "ok"}\n{"file": 3\n')
  with pytest.raises(ValueError, match=r"captions.jsonl:2: not valid JSON"):
    sources.get_source("folder", split="all", data_dir=str(image_dir), image_size=S)
  (image_dir / "captions.jsonl").write_text('{"file": "good.png", "caption": "ok"}\n')
  with pytest.raises(ValueError, match=r"captions.jsonl:1: each line needs keys 'file' and 'text'"):
    sources.get_source("folder", split="all", data_dir=str(image_dir), image_size=S)


def test_folder_captions_csv_and_split_column(image_dir):
  (image_dir / "captions.csv").write_text(
    'file,text,split\ngood.png,"a picture, noisy",train\ngray.png,gray,test\nodd.jpg,odd,train\n'
  )
  train = sources.get_source("folder", split="train", data_dir=str(image_dir), image_size=S)
  assert [train[i]["text"] for i in range(len(train))] == ["a picture, noisy", "odd"]
  test = sources.get_source("folder", split="test", data_dir=str(image_dir), image_size=S)
  assert len(test) == 1 and test[0]["file"] == "gray.png"
  with pytest.raises(ValueError, match="unknown split 'validation'.*valid: test, train, all"):
    sources.get_source("folder", split="validation", data_dir=str(image_dir), image_size=S)
  (image_dir / "captions.csv").write_text("file,caption\ngood.png,x\n")
  with pytest.raises(ValueError, match="captions.csv needs a header with columns 'file', 'text'"):
    sources.get_source("folder", split="all", data_dir=str(image_dir), image_size=S)
  (image_dir / "captions.jsonl").write_text("")
  with pytest.raises(ValueError, match="both captions.jsonl and captions.csv"):
    sources.get_source("folder", split="all", data_dir=str(image_dir), image_size=S)


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match=f"no usable images in {tmp_path}"):
    sources.get_source("folder", split="all", data_dir=str(tmp_path), image_size=S)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"\(1 unreadable\)"):
    sources.get_source("folder", split="all", data_dir=str(tmp_path), image_size=S)
  with pytest.raises(ValueError, match="does not exist"):
    sources.get_source("folder", split="all", data_dir=str(tmp_path / "nope"), image_size=S)
  with pytest.raises(ValueError, match="folder source needs data_dir"):
    sources.get_source("folder", split="all", image_size=S)


# ---------------------------------------------------------------------------------------- shapes


def test_shapes_wrapper(tmp_path):
  pytest.importorskip("vqlm.data.sources.shapes_tfds")
  sizes = {"train": 3, "validation": 2, "test": 2, "test_heldout": 2}
  src = sources.get_source(
    "shapes", split="validation", data_dir=str(tmp_path), image_size=32, sizes=sizes
  )
  assert isinstance(src, sources.Source)
  assert len(src) == 2 and src.name == "shapes" and src.image_size == 32
  item = src[1]
  _check_item(item, 32)
  assert item["text"] and isinstance(item["scene"], list)


def test_folder_big_jpeg_and_exif_rotation(tmp_path):
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 100:] = 255  # left half black, right half white
  Image.fromarray(image).save(tmp_path / "big.jpg", quality=95)
  exif = Image.Exif()
  exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
  Image.fromarray(image).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
  src = sources.get_source("folder", split="all", data_dir=str(tmp_path), image_size=S)
  big, rotated = src[0], src[1]
  assert big["original_size"] == (100, 200)  # not the reduced size decoded by draft()
  assert rotated["original_size"] == (200, 100)
  assert big["image"][:, : S // 2 - 1].max() < 30 and big["image"][:, S // 2 + 1 :].min() > 225
  # After the rotation the white half is at the bottom.
  assert rotated["image"][: S // 2 - 1].max() < 30 and rotated["image"][S // 2 + 1 :].min() > 225
