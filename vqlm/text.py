"""The text half of the vocabulary: training and using a SentencePiece model.

The SentencePiece model holds text pieces only. Its single reserved id is `<unk>` = 0; it has no
pad/bos/eos and no user-defined symbols. The LM's special tokens (`<bos>`, `<boi>`, ...) live in
`vqlm.vocab.Vocab` as ids after the text ids, so sequences are always built from ids, never by
joining strings (joined strings make SentencePiece emit stray `▁` pieces before the symbols).
"""

from collections.abc import Iterable, Iterator, Sequence
import itertools
import os
import re
import warnings

import sentencepiece as spm

from vqlm.errors import UserError

# Byte fallback adds 256 `<0xNN>` pieces; below this size they would crowd out the real pieces.
BYTE_FALLBACK_MIN_VOCAB = 512
_MODEL_TYPES = ("bpe", "unigram", "char", "word")


def _utf8(text: str) -> str:
  """`text` with what UTF-8 cannot encode (lone surrogates, e.g. from JSON's "\\ud800") replaced
  by "?": SentencePiece takes UTF-8 only."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return text.encode("utf-8", "replace").decode("utf-8")
  return text


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    if not isinstance(text, str):
      raise UserError(
        f"train_sentencepiece expects strings, got {type(text).__name__}; "
        "decode bytes to str first."
      )
    text = _utf8(text).strip()
    if text:
      yield text


def train_sentencepiece(
  texts: Iterable[str],
  *,
  model_prefix: str,
  vocab_size: int,
  model_type: str = "bpe",
  byte_fallback: bool | None = None,
  character_coverage: float = 1.0,
) -> str:
  """Trains a SentencePiece model on an in-memory stream of texts and returns the `.model` path.

  Args:
    texts: the corpus, one sentence (e.g. one caption) per item. Blank items are skipped.
    model_prefix: output path without extension; `{model_prefix}.model` and `.vocab` are written
      (parent folders are created).
    vocab_size: the requested number of pieces, `<unk>` included. If the corpus cannot fill it
      (a small or templated corpus), training still succeeds with fewer pieces and a `UserWarning`
      names the size reached: read the real size from `TextTokenizer.vocab_size`, never from the
      request.
    model_type: "bpe" (default; robust on templated captions), "unigram", "char" or "word".
    byte_fallback: encode unseen characters as UTF-8 byte pieces instead of `<unk>`. None picks
      True only when `vocab_size >= BYTE_FALLBACK_MIN_VOCAB` (the 256 byte pieces need room).
    character_coverage: fraction of characters the model must cover (1.0 for small alphabets).

  Returns:
    The path of the trained `.model` file. Training is deterministic: the same corpus and
    arguments give the same pieces and scores (the file also records `model_prefix`).

  Raises:
    ValueError: on an empty or whitespace-only corpus, a bad argument, or a `vocab_size` smaller
      than the corpus's required characters.
  """
  if model_type not in _MODEL_TYPES:
    raise UserError(f"model_type={model_type!r} is not one of {_MODEL_TYPES}.")
  if vocab_size < 2:
    raise UserError(f"vocab_size={vocab_size} is too small; use at least 2 (<unk> + one piece).")
  if not 0.0 < character_coverage <= 1.0:
    raise UserError(f"character_coverage={character_coverage} must be in (0, 1].")
  if byte_fallback is None:
    byte_fallback = vocab_size >= BYTE_FALLBACK_MIN_VOCAB

  stream = _non_empty(texts)
  first = next(stream, None)
  if first is None:
    raise UserError(
      "train_sentencepiece got an empty or whitespace-only corpus; pass at least "
      "one non-blank text (e.g. the data set's captions)."
    )
  parent = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(parent, exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=itertools.chain([first], stream),
      model_prefix=model_prefix,
      vocab_size=vocab_size,
      model_type=model_type,
      byte_fallback=byte_fallback,
      character_coverage=character_coverage,
      hard_vocab_limit=False,  # A corpus too small for vocab_size yields fewer pieces.
      unk_id=0,
      pad_id=-1,
      bos_id=-1,
      eos_id=-1,
      minloglevel=2,
    )
  except RuntimeError as e:
    match = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
    if match:
      raise UserError(
        f"vocab_size={vocab_size} is below the {match.group(2)} pieces the corpus requires "
        f"(its characters + <unk>{' + 256 byte pieces' if byte_fallback else ''}); raise "
        "vocab_size, lower character_coverage, or set byte_fallback=False."
      ) from e
    raise
  path = model_prefix + ".model"
  got = TextTokenizer.load(path).vocab_size
  if got < vocab_size:
    warnings.warn(
      f"SentencePiece: the corpus only supports {got} pieces, fewer than the "
      f"requested vocab_size={vocab_size}; the model has {got}.",
      stacklevel=2,
    )
  return path


class TextTokenizer:
  """A loaded SentencePiece model: text <-> SentencePiece ids in `[0, vocab_size)`.

  These ids are the text block of `vqlm.vocab.Vocab` unchanged (text comes first in the unified id
  space). Use `Vocab.encode_text` / `Vocab.decode_text` to go through the unified vocabulary.
  """

  def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
    self._sp = processor
    self.path = path

  @classmethod
  def load(cls, path: str) -> "TextTokenizer":
    """Loads a `.model` file written by `train_sentencepiece` (or any SentencePiece model).

    A JSON file (a `.json` path, or a run's `text.model` holding JSON: an imported run's Hugging
    Face tokenizer) loads as `vqlm.text_hf.HFTextTokenizer`, which has this class's interface."""
    if not os.path.isfile(path):
      raise UserError(
        f"SentencePiece model {path!r} does not exist; train one with "
        "vqlm.text.train_sentencepiece or fix the path."
      )
    from vqlm import text_hf

    if path.endswith(".json") or text_hf.is_json_file(path):
      return text_hf.HFTextTokenizer.load(path)
    return cls(spm.SentencePieceProcessor(model_file=path), path=path)

  @property
  def vocab_size(self) -> int:
    """The number of SentencePiece ids, `<unk>` included."""
    return self._sp.get_piece_size()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, text: str) -> list[int]:
    """`text` -> SentencePiece ids (whitespace is normalised: runs collapse, ends are trimmed;
    what UTF-8 cannot encode, such as a lone surrogate, reads as "?")."""
    return list(self._sp.encode(_utf8(text) if isinstance(text, str) else text))

  def decode(self, ids: Sequence[int]) -> str:
    """SentencePiece ids -> text. Raises ValueError on ids outside `[0, vocab_size)`."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise UserError(
        f"decode got ids {bad[:5]} outside [0, {self.vocab_size}); pass only "
        "SentencePiece ids (use Vocab.decode_text for unified-vocabulary ids)."
      )
    return self._sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))
