"""Hugging Face `tokenizer.json` text models: the text half of an imported run's vocabulary.

An imported LM (Llama, Chameleon, Janus) reads text with its own Hugging Face tokenizer, whose ids
are laid out differently from vqlm's (`vqlm.vocab`): bos / eos / pad / begin- and end-of-image
are text-tokenizer ids there, and Chameleon's image tokens sit at scattered ids inside its BPE
vocabulary. The importer permutes ids with a bijection (`source id -> vqlm id`); this module
keeps the text part of it, so `HFTextTokenizer` speaks vqlm text ids `[0, text_size)` exactly as
the SentencePiece `vqlm.text.TextTokenizer` does, and everything built on `TextTokenizer`
(sequences, the sampler, `LMRun.generate/caption/continue_sequence`) works unchanged.

The run's `text.model` is then one JSON file, self-contained so that copying it (as
`config.init_from` does) copies the whole text model:

```
{"format": "vqlm.hf_text/1",
 "source_ids": [s_0, s_1, ...],     source id of vqlm text id i, for i in [0, text_size)
 "special_ids": {"s": vqlm_id},     source ids that encode emits as a vqlm special (e.g. </s>)
 "tokenizer": {...}}                the tokenizer.json itself (or "tokenizer_file": a path
                                    relative to this file, for a hand-made descriptor)
```

Encoding never adds special tokens (no <s>: sequences add vqlm's own). A source id that the text
map does not contain (a special's string such as "</s>" written in the text, which the Hugging
Face tokenizer matches as its special token) becomes its vqlm special when `special_ids` names
one, and is otherwise dropped (e.g. Chameleon's image tokens, or a source special vqlm has no
role for). A plain `tokenizer.json` (no descriptor) loads with every id a text id, in order.

Needs the `tokenizers` package (`pip install 'vqlm[interop]'`), imported only when a model is
read.
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

import numpy as np

from vqlm.errors import UserError

FORMAT = "vqlm.hf_text/1"
INSTALL = "pip install 'vqlm[interop]'"


def _tokenizers() -> Any:
  try:
    import tokenizers
  except ImportError:
    raise UserError(
      f"this run's text model is a Hugging Face tokenizer.json, read with the `tokenizers` "
      f"package; install it: {INSTALL}"
    ) from None
  return tokenizers


def _utf8(text: str) -> str:
  """`text` with what UTF-8 cannot encode (lone surrogates) replaced by "?", as vqlm.text does."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return text.encode("utf-8", "replace").decode("utf-8")
  return text


def is_json_file(path: str) -> bool:
  """Whether the file at `path` is JSON (its first non-blank byte is `{`): a tokenizer.json or a
  descriptor, never a SentencePiece model (a protobuf, which starts with a field tag)."""
  with open(path, "rb") as f:
    head = f.read(64).lstrip()
  return head.startswith(b"{")


class HFTextTokenizer:
  """A Hugging Face tokenizer speaking vqlm text ids: text <-> ids in `[0, vocab_size)`.

  The same interface as `vqlm.text.TextTokenizer` (`vocab_size`, `unk_id`, `encode`, `decode`,
  `id_to_piece`, `path`).

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
    source_ids: int `[text_size]`, the source (Hugging Face) id of each vqlm text id.
    special_ids: {source id: vqlm id >= text_size} that `encode` emits for those source ids.
    path: the file it was read from (None when built in memory).
  """

  def __init__(
    self,
    tokenizer: Any,
    source_ids: Sequence[int],
    special_ids: Mapping[int, int] | None = None,
    path: str | None = None,
  ):
    self._tok = tokenizer
    self.path = path
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    source = np.asarray(source_ids, np.int64).reshape(-1)
    specials = {int(k): int(v) for k, v in (special_ids or {}).items()}
    where = f" ({path})" if path else ""
    if not source.size:
      raise UserError(f"the text model{where} maps no source ids to text ids; re-import the run")
    if source.min() < 0 or source.max() >= size or np.unique(source).size != source.size:
      raise UserError(
        f"the text model{where} maps text ids to source ids outside [0, {size}) or twice; "
        "re-import the run with the tokenizer.json it came with"
      )
    bad = [s for s, v in specials.items() if not 0 <= s < size or v < source.size]
    if bad or set(specials) & set(source.tolist()):
      raise UserError(
        f"the text model{where} has special_ids {bad or sorted(set(specials) & set(source))} "
        f"that are not source ids in [0, {size}) outside the text map sent to ids >= "
        f"{source.size}; re-import the run"
      )
    self._source = source
    self._to_vqlm = np.full(size, -1, np.int64)  # source id -> vqlm id (-1: dropped)
    self._to_vqlm[source] = np.arange(source.size)
    for s, v in specials.items():
      self._to_vqlm[s] = v
    self.special_ids = specials

  # ---- reading ----------------------------------------------------------------------------

  @classmethod
  def load(cls, path: str) -> "HFTextTokenizer":
    """Reads a descriptor (`FORMAT`, see the module docstring) or a plain tokenizer.json."""
    if not os.path.isfile(path):
      raise UserError(f"text model {path!r} does not exist; fix the path or re-import the run")
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      raise UserError(f"{path} is not valid JSON ({e}); restore the run's text model") from None
    if not isinstance(data, dict):
      raise UserError(f"{path} is neither a tokenizer.json nor a {FORMAT} text model")
    tokenizers = _tokenizers()
    if "format" not in data:  # a plain tokenizer.json: every id is a text id
      tokenizer = _from_str(tokenizers, json.dumps(data), path)
      size = tokenizer.get_vocab_size(with_added_tokens=True)
      return cls(tokenizer, np.arange(size), path=path)
    if data["format"] != FORMAT:
      raise UserError(f"{path} has text model format {data['format']!r}, not {FORMAT!r}")
    if "tokenizer" in data:
      tokenizer = _from_str(tokenizers, json.dumps(data["tokenizer"]), path)
    elif "tokenizer_file" in data:
      file = os.path.join(os.path.dirname(os.path.abspath(path)), data["tokenizer_file"])
      if not os.path.isfile(file):
        raise UserError(f"{path} names {data['tokenizer_file']}, which is missing; copy it back")
      with open(file, encoding="utf-8") as f:
        tokenizer = _from_str(tokenizers, f.read(), file)
    else:
      raise UserError(f"{path} has neither 'tokenizer' nor 'tokenizer_file'; re-import the run")
    specials = {int(k): int(v) for k, v in data.get("special_ids", {}).items()}
    return cls(tokenizer, data.get("source_ids", []), specials, path=path)

  # ---- the TextTokenizer interface -----------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """The number of vqlm text ids (`Vocab.text_size`)."""
    return int(self._source.size)

  @property
  def unk_id(self) -> int:
    """The vqlm text id of the source's unknown token; -1 when it has none (byte-level BPE)."""
    token = getattr(self._tok.model, "unk_token", None)
    source = self._tok.token_to_id(token) if token else None
    if source is None or self._to_vqlm[source] < 0 or self._to_vqlm[source] >= self.vocab_size:
      return -1
    return int(self._to_vqlm[source])

  def encode(self, text: str) -> list[int]:
    """`text` -> vqlm ids: text ids `[0, vocab_size)`, and a vqlm special where the text holds a
    source special named in `special_ids`; other source ids outside the map are dropped. No
    special tokens are added (no <s>)."""
    if not isinstance(text, str):
      raise UserError(f"encode expects a str, got {type(text).__name__}; decode bytes first")
    ids = self._tok.encode(_utf8(text), add_special_tokens=False).ids
    mapped = self._to_vqlm[np.asarray(ids, np.int64)] if ids else np.zeros(0, np.int64)
    return [int(i) for i in mapped if i >= 0]

  def decode(self, ids: Sequence[int]) -> str:
    """vqlm text ids -> text (source specials among them are written out, e.g. "<unk>").
    Raises a UserError on ids outside `[0, vocab_size)`."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise UserError(
        f"decode got ids {bad[:5]} outside [0, {self.vocab_size}); pass only text ids (use "
        "Vocab.decode_text for unified-vocabulary ids)"
      )
    return self._tok.decode(self._source[ids].tolist(), skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    """The source tokenizer's token string of vqlm text id `i`."""
    i = int(i)
    if not 0 <= i < self.vocab_size:
      raise UserError(f"id {i} is outside the text ids [0, {self.vocab_size})")
    return self._tok.id_to_token(int(self._source[i]))

  def source_id(self, i: int) -> int:
    """The Hugging Face tokenizer's id of vqlm text id `i`."""
    return int(self._source[int(i)])


def _from_str(tokenizers: Any, text: str, path: str) -> Any:
  try:
    return tokenizers.Tokenizer.from_str(text)
  except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions on bad files.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(
      f"{path} is not a tokenizer.json the tokenizers package reads ({first})"
    ) from None


def hf_text_model(
  tokenizer_json: str | bytes, id_map: Sequence[int], *, text_size: int | None = None
) -> bytes:
  """The run's `text.model` (a `FORMAT` descriptor, see the module docstring) as bytes.

  Args:
    tokenizer_json: the path of a Hugging Face tokenizer.json, or its contents.
    id_map: int `[n]`, the vqlm id of each source id `s < n` (source ids past `n` and entries -1
      are dropped). Entries in `[0, text_size)` are the text ids and must be each of them once;
      entries `>= text_size` are emitted by `encode` for that source id (pass vqlm specials only,
      e.g. the source's </s> -> `vocab.eos_id`).
    text_size: `Vocab.text_size` (default: every non-negative entry is a text id).
  """
  if isinstance(tokenizer_json, bytes):
    content = tokenizer_json.decode("utf-8")
  elif isinstance(tokenizer_json, str) and tokenizer_json.lstrip().startswith("{"):
    content = tokenizer_json
  else:
    if not os.path.isfile(tokenizer_json):
      raise UserError(f"{tokenizer_json} does not exist; pass the source's tokenizer.json")
    with open(tokenizer_json, encoding="utf-8") as f:
      content = f.read()
  id_map = np.asarray(id_map, np.int64).reshape(-1)
  if text_size is None:
    text_size = int((id_map >= 0).sum())
  text = np.nonzero((id_map >= 0) & (id_map < text_size))[0]
  source_ids = np.empty(text_size, np.int64)
  if text.size != text_size or np.unique(id_map[text]).size != text_size:
    raise UserError(
      f"id_map sends {text.size} source ids to {np.unique(id_map[text]).size} distinct text ids "
      f"but text_size is {text_size}; every text id must come from exactly one source id"
    )
  source_ids[id_map[text]] = text
  specials = {str(s): int(id_map[s]) for s in np.nonzero(id_map >= text_size)[0]}
  tokenizer = json.loads(content)
  # Build it once here, so a file the tokenizers package cannot read fails at import, not later.
  HFTextTokenizer(_from_str(_tokenizers(), content, "tokenizer.json"), source_ids, specials)
  data = {"format": FORMAT, "source_ids": source_ids.tolist(), "special_ids": specials}
  data["tokenizer"] = tokenizer
  return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
