"""Edit documents in the LM stage (`config.data.edit`): settings, and the examples `prepare` builds
(with a stand-in image tokenizer: the codes name the rendered image)."""

import json
import re
import zlib

import numpy as np
import pytest

from vqlm.data import edits, shapes
from vqlm.errors import UserError
from vqlm.stages import edit_data, prebuilt
from vqlm.stages.lm_config import get_config
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import Vocab

GRID, K, SIZE = (2, 2), 16, 32


def _config(mixture="t2i=0.4,i2t=0.4,edit=0.2", **fields):
  config = get_config("size=tiny")
  config.data.mixture = mixture
  config.data.edit.update(fields)
  return config


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(kinds="move,rotate"), r"unknown kinds \['rotate'\]"),
    (dict(kinds=" , "), "unknown kinds"),
    (dict(num_examples=0), r"num_examples=0 must be an integer >= 1"),
    (dict(validation_examples=-1), r"validation_examples=-1 must be an integer >= 1"),
    (dict(max_edits=0), r"max_edits=0 must be an integer >= 1"),
    (dict(seed=-2), r"seed=-2 must be an integer >= 0"),
    (dict(min_objects=3, max_objects=2), "1 <= min_objects <= max_objects <= 9"),
    (dict(max_objects=10), "max_objects <= 9"),
  ],
)
def test_bad_settings_are_one_line_errors(fields, match):
  for mixture in ("t2i=1", "t2i=0.5,edit=0.5"):  # checked when off too
    with pytest.raises(UserError, match=match) as info:
      edit_data.settings(_config(mixture, **fields))
    assert "\n" not in str(info.value) and "--config.data.edit." in str(info.value)


def test_settings():
  assert edit_data.settings(_config("t2i=0.5,i2t=0.5")) is None  # edit weight 0: off
  config = _config()
  with config.unlocked():
    del config.data["edit"]  # a config saved before data.edit existed
  assert edit_data.settings(config) is None
  s = edit_data.settings(_config(kinds=" add, move ", max_edits=2, seed=4))
  assert (s.weight, s.kinds, s.max_edits, s.min_objects, s.max_objects) == (
    0.2,
    ("add", "move"),
    2,
    1,
    2,
  )
  assert s.item(5, "validation") == edits.edit_item(
    5, seed=4, split="validation", kinds=("add", "move"), max_edits=2
  )
  texts = edit_data.texts(s, 7)
  assert texts == edits.texts(s.item(i, "train") for i in range(7)) and len(texts) >= 7


class FakeTokenizerRun:
  """The interface `prepare` uses; codes `[2, 2]` that name the rendered image."""

  image_size = SIZE
  encoded = 0

  def __init__(self, workdir):
    assert workdir == "TOK"

  def encode(self, images):
    assert images.shape[1:] == (SIZE, SIZE, 3)
    FakeTokenizerRun.encoded += len(images)
    return np.stack([image_codes(image) for image in images])


def image_codes(image):
  digest = zlib.crc32(np.ascontiguousarray(image).tobytes())
  return np.array([(digest >> (4 * i)) % K for i in range(4)], np.int32).reshape(GRID)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
  s = edit_data.settings(_config(max_edits=2, num_examples=200))
  corpus = edit_data.texts(s) + ["a large red circle at the top left"]
  return train_sentencepiece(
    corpus, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=64
  )


def test_prepare_builds_documents_once_per_scene(text_model, monkeypatch, tmp_path):
  monkeypatch.setattr(prebuilt, "TokenizerRun", FakeTokenizerRun)
  tokenizer = TextTokenizer.load(text_model)
  vocab = Vocab(text_size=tokenizer.vocab_size, image_size=K, grid=GRID, num_reserved=2, pad_to=16)
  s = edit_data.settings(_config(max_edits=2, num_examples=40, validation_examples=8, seed=1))
  kwargs = dict(vocab=vocab, text_model=text_model, tokenizer_dir="TOK", progress=False)
  FakeTokenizerRun.encoded = 0
  data = edit_data.prepare(
    s, seq_len=64, image_weight=2.0, batch_size=16, log_fn=lambda _: None, **kwargs
  )
  assert (len(data.train), len(data.validation)) == (40, 8)
  info = data.info
  assert info["heldout_pairs_used"] == [] and info["splits"]["train"]["dropped_too_long"] == 0
  assert sum(info["splits"]["train"]["by_kind"].values()) == 40
  assert set(info["splits"]["train"]["by_kind"]) <= set(edits.KINDS) | {edits.STORY}
  items = s.items("train")
  distinct = {shapes.canonical(sc) for it in items + s.items("validation") for sc in it["scenes"]}
  assert info["distinct_images"] == len(distinct)
  assert FakeTokenizerRun.encoded == 16 * -(-len(distinct) // 16)  # padded batches of 16
  assert {tuple(p) for p in info["pairs_used"]} == edits.pairs_used(items)
  assert data.train.kinds == tuple(it["kind"] for it in items)
  hw = vocab.tokens_per_image
  for k, item in enumerate(items):
    ex = data.train[k]
    n = int(ex["segment_ids"].sum())
    ids = np.concatenate([ex["tokens"][:n], ex["targets"][n - 1 : n]])
    codes, texts = edits.parse(ids, vocab, tokenizer)
    assert texts == item["instructions"]
    for got, scene in zip(codes, item["scenes"], strict=True):
      np.testing.assert_array_equal(got, image_codes(shapes.render(scene, SIZE)))
    m = len(vocab.encode_text(tokenizer, item["instructions"][0])) + hw + 2  # through the source
    assert not ex["loss_weights"][:m].any() and ex["loss_weights"][m:n].min() >= 1.0
    assert ex["loss_weights"][n:].sum() == 0 and ex["loss_weights"].max() == 2.0
  path = edit_data.write_info(str(tmp_path), info)
  with open(path) as f:
    assert json.load(f)["splits"]["validation"]["examples"] == 8
  # Too long: one line naming the seq_len that fits 99% of the documents (and that works).
  with pytest.raises(UserError, match=r"--config.train.seq_len=\d+ \(fits 99%\)") as err:
    edit_data.prepare(s, seq_len=20, **kwargs, log_fn=lambda _: None)
  assert "\n" not in str(err.value) and "--config.data.edit.max_edits" in str(err.value)
  need = int(re.search(r"seq_len=(\d+) \(fits", str(err.value))[1])
  fits = edit_data.prepare(s, seq_len=need, **kwargs, log_fn=lambda _: None).info["splits"]
  assert fits["train"]["max_length"] <= need and fits["train"]["dropped_too_long"] <= 1


def test_prepare_refuses_a_text_model_without_the_instructions(monkeypatch, tmp_path):
  monkeypatch.setattr(prebuilt, "TokenizerRun", FakeTokenizerRun)
  captions = [shapes.caption(shapes.sample_scene(np.random.default_rng(i))) for i in range(50)]
  path = train_sentencepiece(captions, model_prefix=str(tmp_path / "captions"), vocab_size=48)
  vocab = Vocab(text_size=TextTokenizer.load(path).vocab_size, image_size=K, grid=GRID)
  s = edit_data.settings(_config(num_examples=10, validation_examples=2))
  with pytest.raises(UserError, match="cannot write .* edit instructions") as err:
    edit_data.prepare(s, vocab=vocab, text_model=path, tokenizer_dir="TOK", seq_len=64)
  assert "\n" not in str(err.value)
