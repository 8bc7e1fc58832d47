"""SentencePiece training and the TextTokenizer wrapper."""

import itertools

import pytest

from vqlm import text as text_lib


def captions(n: int = 300) -> list[str]:
  sizes, colors = ["small", "large"], ["red", "green", "blue", "yellow"]
  shapes, places = ["circle", "square", "triangle"], ["top left", "bottom right", "center"]
  combos = itertools.product(sizes, colors, shapes, places)
  out = [f"a {s} {c} {sh} at the {p}" for s, c, sh, p in combos]
  return (out * (n // len(out) + 1))[:n]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("sp") / "text")
  return text_lib.train_sentencepiece(captions(), model_prefix=prefix, vocab_size=64)


def test_round_trip(model_path):
  tok = text_lib.TextTokenizer.load(model_path)
  assert tok.vocab_size == 64
  assert tok.unk_id == 0
  for caption in [
    "a large red circle at the top left",
    "a small blue triangle at the center",
    "a yellow square",
  ]:
    ids = tok.encode(caption)
    assert ids and all(0 < i < 64 for i in ids)  # Known characters never map to <unk>.
    assert tok.decode(ids) == caption
  # Merges happened: a seen caption takes fewer pieces than characters.
  assert len(tok.encode("a large red circle at the top left")) < 20


def test_no_reserved_pieces_but_unk(model_path):
  tok = text_lib.TextTokenizer.load(model_path)
  pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  assert pieces[0] == "<unk>"
  assert not any(p in ("<s>", "</s>", "<pad>", "<boi>") for p in pieces)


def test_unknown_character_is_unk_without_byte_fallback(model_path):
  tok = text_lib.TextTokenizer.load(model_path)
  assert 0 in tok.encode("a red Q")


def test_deterministic(tmp_path, model_path):
  again = text_lib.train_sentencepiece(
    iter(captions()), model_prefix=str(tmp_path / "again"), vocab_size=64
  )
  a, b = text_lib.TextTokenizer.load(model_path), text_lib.TextTokenizer.load(again)
  assert a.vocab_size == b.vocab_size
  assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [
    b.id_to_piece(i) for i in range(b.vocab_size)
  ]
  caption = "a large yellow triangle at the bottom right"
  assert a.encode(caption) == b.encode(caption)


@pytest.mark.parametrize("corpus", [[], ["", "   ", "\n"]])
def test_empty_corpus_raises(tmp_path, corpus):
  with pytest.raises(ValueError, match="empty or whitespace-only corpus"):
    text_lib.train_sentencepiece(corpus, model_prefix=str(tmp_path / "x"), vocab_size=32)


def test_too_large_vocab_lowers_with_warning(tmp_path):
  with pytest.warns(UserWarning, match="fewer than the requested vocab_size=400"):
    path = text_lib.train_sentencepiece(
      captions(), model_prefix=str(tmp_path / "big"), vocab_size=400, byte_fallback=False
    )
  tok = text_lib.TextTokenizer.load(path)
  assert 20 < tok.vocab_size < 400
  assert tok.decode(tok.encode("a small green square at the center")) == (
    "a small green square at the center"
  )


def test_too_small_vocab_raises(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=8 is below the .* pieces the corpus requires"):
    text_lib.train_sentencepiece(captions(), model_prefix=str(tmp_path / "s"), vocab_size=8)


def test_byte_fallback_auto(tmp_path):
  with pytest.warns(UserWarning, match="only supports"):  # 256 bytes + a small corpus < 512.
    path = text_lib.train_sentencepiece(
      captions(), model_prefix=str(tmp_path / "bf"), vocab_size=text_lib.BYTE_FALLBACK_MIN_VOCAB
    )
  tok = text_lib.TextTokenizer.load(path)
  ids = tok.encode("a red Qü")
  assert 0 not in ids
  assert tok.decode(ids) == "a red Qü"


def test_bad_arguments(tmp_path, model_path):
  with pytest.raises(ValueError, match="model_type"):
    text_lib.train_sentencepiece(
      captions(), model_prefix=str(tmp_path / "m"), vocab_size=64, model_type="wordpiece"
    )
  with pytest.raises(ValueError, match="expects strings"):
    text_lib.train_sentencepiece([b"bytes"], model_prefix=str(tmp_path / "m"), vocab_size=64)
  with pytest.raises(ValueError, match="does not exist"):
    text_lib.TextTokenizer.load(str(tmp_path / "missing.model"))
  tok = text_lib.TextTokenizer.load(model_path)
  with pytest.raises(ValueError, match="outside"):
    tok.decode([1, 64])
