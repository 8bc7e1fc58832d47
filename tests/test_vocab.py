"""The unified vocabulary: layout, id conversion, text round trips, persistence."""

import dataclasses
import os

import numpy as np
import pytest

from vqlm import text as text_lib
from vqlm.vocab import DEFAULT_SPECIALS, Vocab

CAPTIONS = [
  f"a {s} {c} {sh} at the {p}"
  for s in ["small", "large"]
  for c in ["red", "green", "blue"]
  for sh in ["circle", "square", "triangle"]
  for p in ["top left", "bottom right", "center"]
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("run")
  text_lib.train_sentencepiece(CAPTIONS, model_prefix=str(d / "text"), vocab_size=48)
  return str(d)


@pytest.fixture(scope="module")
def tok(run_dir):
  return text_lib.TextTokenizer.load(os.path.join(run_dir, "text.model"))


def make(**kw) -> Vocab:
  args = dict(text_size=100, image_size=512, grid=(8, 8), num_reserved=10)
  args.update(kw)
  return Vocab(**args)


def test_layout():
  v = make()
  assert [v.pad_id, v.bos_id, v.eos_id, v.boi_id, v.eoi_id, v.frame_id] == list(range(100, 106))
  assert v.image_offset == 100 + 6 + 10 == 116
  assert v.size == 116 + 512
  assert v.padded_size == 640 and v.padded_size % 128 == 0
  assert make(pad_to=1).padded_size == v.size
  assert v.tokens_per_image == 64
  assert v.special("boi") == v.boi_id


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(text_size=1, image_size=1, grid=(1, 1), num_reserved=0),
    dict(text_size=32000, image_size=16384),
  ],
)
def test_ids_partition_the_space(kw):
  v = make(**kw)
  ids = np.arange(v.size)
  text, special, image = v.is_text(ids), v.is_special(ids), v.is_image(ids)
  # Every used id is exactly one kind.
  np.testing.assert_array_equal(text.astype(int) + special + image, np.ones(v.size))
  assert text.sum() == v.text_size and image.sum() == v.image_size
  assert special.sum() == len(v.specials) + v.num_reserved
  specials = [v.special(n) for n in v.specials]
  assert len(set(specials)) == len(specials) and all(v.is_special(i) for i in specials)
  codes = np.arange(v.image_size)
  tokens = v.image_token(codes)
  assert tokens.min() >= v.image_offset and tokens.max() == v.size - 1 < v.padded_size
  assert not v.is_image(v.size) and not v.is_text(-1)


def test_image_token_round_trip():
  v = make()
  assert v.image_token(0) == v.image_offset and isinstance(v.image_token(3), int)
  assert v.image_code(v.image_token(511)) == 511
  codes = np.random.default_rng(0).integers(0, 512, size=(2, 8, 8))
  tokens = v.image_token(codes)
  assert tokens.dtype == np.int32 and tokens.shape == (2, 8, 8)
  np.testing.assert_array_equal(v.image_code(tokens), codes)
  assert v.is_image(tokens).all()
  with pytest.raises(ValueError, match="outside"):
    v.image_token(512)
  with pytest.raises(ValueError, match="outside"):
    v.image_token(np.array([0, -1]))
  with pytest.raises(ValueError, match="not an image token"):
    v.image_code(v.boi_id)
  with pytest.raises(ValueError, match="image range"):
    v.image_code(np.array([v.image_offset, 5]))


def test_image_token_on_jax_arrays():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  v = make()
  codes = jnp.arange(4, dtype=jnp.int32)
  np.testing.assert_array_equal(v.image_token(codes), np.arange(4) + v.image_offset)
  np.testing.assert_array_equal(v.image_code(v.image_token(codes)), np.arange(4))
  np.testing.assert_array_equal(v.is_image(v.image_token(codes)), np.ones(4, bool))


def test_validation():
  with pytest.raises(ValueError, match="image_size=0"):
    make(image_size=0)
  with pytest.raises(ValueError, match="grid"):
    make(grid=(8,))
  with pytest.raises(ValueError, match="grid"):
    make(grid=(8, 0))
  with pytest.raises(ValueError, match="text_size"):
    make(text_size=0)
  with pytest.raises(ValueError, match="lacks"):
    make(specials=("pad", "bos", "eos"))
  with pytest.raises(ValueError, match="unique"):
    make(specials=DEFAULT_SPECIALS + ("pad",))
  with pytest.raises(ValueError, match="Unknown special"):
    make().special("mask")
  v = make(grid=(4, 4))
  with pytest.raises(ValueError, match="grid"):
    v.check_codes(np.zeros((8, 8), np.int32))
  assert v.check_codes(np.zeros((3, 4, 4), np.int64)).dtype == np.int32


def test_extra_special_takes_a_reserved_slot():
  v = make()
  w = make(specials=DEFAULT_SPECIALS + ("mask",), num_reserved=9)
  assert w.image_offset == v.image_offset and w.special("mask") == 106
  assert v.token_name(106) == "<reserved_0>" and w.token_name(106) == "<mask>"


def test_json_round_trip(tmp_path):
  v = make(specials=DEFAULT_SPECIALS + ("mask",), num_reserved=3, text_model="sp/text.model")
  assert Vocab.from_json(v.to_json()) == v
  v.save(str(tmp_path / "vocab.json"))
  loaded = Vocab.load(str(tmp_path / "vocab.json"))
  assert loaded == v and loaded.grid == (8, 8) and isinstance(loaded.specials, tuple)
  d = v.to_dict()
  d["codebook"] = 5
  with pytest.raises(ValueError, match="unknown vocab keys"):
    Vocab.from_dict(d)
  with pytest.raises(dataclasses.FrozenInstanceError):
    v.text_size = 5  # type: ignore[misc]


def test_text_round_trip_through_vocab(run_dir, tok):
  v = Vocab(text_size=tok.vocab_size, image_size=16, grid=(2, 2), num_reserved=2)
  caption = "a large red circle at the top left"
  ids = v.encode_text(tok, caption)
  assert ids and all(v.is_text(i) and not v.is_special(i) and not v.is_image(i) for i in ids)
  assert max(ids) < v.pad_id  # Text ids sit below every special and image id.
  assert v.decode_text(tok, ids) == caption
  seq = (
    [v.bos_id]
    + ids
    + [v.boi_id]
    + list(v.image_token(np.array([3, 0, 15, 1])))
    + [v.eoi_id, v.eos_id]
  )
  assert v.decode_text(tok, seq) == caption
  assert v.decode_text(tok, seq, keep_specials=True) == (
    "<bos>" + caption + "<boi><img:3><img:0><img:15><img:1><eoi><eos>"
  )
  two = ids + [v.boi_id, v.eoi_id] + v.encode_text(tok, "a blue square")
  assert v.decode_text(tok, two) == caption + " a blue square"
  assert v.decode_text(tok, np.array(two), keep_specials=True) == (
    caption + "<boi><eoi>a blue square"
  )
  with pytest.raises(ValueError, match="outside the vocab"):
    v.decode_text(tok, [v.size])
  assert v.text_tokenizer(run_dir).vocab_size == tok.vocab_size


def test_tokenizer_size_mismatch(tok):
  v = Vocab(text_size=tok.vocab_size + 1, image_size=16, grid=(2, 2))
  with pytest.raises(ValueError, match="load the SentencePiece model saved with this vocab"):
    v.encode_text(tok, "a red circle")
