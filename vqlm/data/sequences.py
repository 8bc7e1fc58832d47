"""Text ids + image code grids -> LM examples (host side, NumPy only).

A record is `{"text_ids": list[int], "codes": int32[h, w]}` (`[T, h, w]` for video); `text_ids` are
SentencePiece ids, which are already unified ids (text comes first in `vqlm.vocab.Vocab`).

Layouts (one `Segment` each; `prompt` is what a sampler is given, used by `mask_prompt`):

```
t2i       <bos> caption <boi> codes <eoi> <eos>            prompt: <bos> caption <boi>
  dropped <bos> <boi> codes <eoi> <eos>                    prompt: <bos> <boi>
i2t       <bos> <boi> codes <eoi> caption <eos>            prompt: <bos> <boi> codes <eoi>
document  <bos> pair_1 ... pair_n <eos>
          pair = caption <boi> codes <eoi>  or  <boi> codes <eoi> caption
          (order drawn per pair, p = 1/2; no prompt, no caption dropout)
video     <bos> caption <boi> f_1 <eoi> <frame> <boi> f_2 <eoi> ... <frame> <boi> f_T <eoi> <eos>
          (`<frame>` separates frames; none after the last)   prompt: <bos> caption <boi>
chat      <bos> <user> parts <assistant> parts <user> ... <eos>   (`chat`, not a builder mode)
          part = text ids  or  <boi> codes <eoi>;   prompt: up to the first <assistant>
          loss only on assistant turns: their parts and the token closing each (<user> or <eos>)
```

An LM example of a segment `s` of length L has length L - 1 (no position is wasted):
`tokens = s[:-1]`, `targets = s[1:]` (int32), `loss_weights` (float32) = `image_weight` where the
target is an image id, else `text_weight` (specials count as text), and 0 on targets inside the
prompt when `mask_prompt` (t2i: caption and `<boi>` targets; i2t: `<boi>`, codes and `<eoi>`
targets), `segment_ids` = 1 and `positions` = 0..L-2. Padding rows carry `tokens = targets =
<pad>`, weight 0, segment 0, position 0. Packing puts several examples in a row with segment ids
1, 2, ... and positions restarting at 0.

Too long: an example longer than `seq_len` raises ValueError (a truncated image is useless);
pick `seq_len >= needed_seq_len(...)` in the config.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from vqlm.errors import UserError
from vqlm.vocab import Vocab

Example = dict[str, np.ndarray]
MODES = ("t2i", "i2t", "mix", "document", "video")
_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")


class Segment(NamedTuple):
  """One unpadded token sequence.

  Attributes:
    tokens: int32[L] unified ids, `<bos> ... <eos>`.
    prompt_len: number of leading tokens a sampler would be given (0: none).
  """

  tokens: np.ndarray
  prompt_len: int


def _text(record: Mapping[str, Any], vocab: Vocab) -> np.ndarray:
  ids = np.asarray(record.get("text_ids", ()), dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab.text_size):
    raise UserError(
      f"text_ids span [{ids.min()}, {ids.max()}], outside the text ids [0, "
      f"{vocab.text_size}); store plain SentencePiece ids of this vocab's model."
    )
  return ids.astype(np.int32)


def _codes(record: Mapping[str, Any], vocab: Vocab, ndim: int) -> np.ndarray:
  if "codes" not in record:
    raise UserError("record has no 'codes'; encode the images with the image tokenizer first.")
  codes = vocab.check_codes(record["codes"])
  if codes.ndim != ndim:
    hint = "use mode='video'" if codes.ndim == 3 else "video records need codes [T, h, w]"
    raise UserError(f"codes of shape {codes.shape} need {ndim} dims here; {hint}.")
  return codes


def _image(codes: np.ndarray, vocab: Vocab) -> np.ndarray:
  """`[h, w]` codes -> `<boi> ids... <eoi>`."""
  return np.concatenate(
    [[vocab.boi_id], vocab.image_token(codes.reshape(-1)), [vocab.eoi_id]]
  ).astype(np.int32)


def _join(*parts: Sequence[int]) -> np.ndarray:
  return np.concatenate([np.asarray(p, dtype=np.int32).reshape(-1) for p in parts])


def t2i(record: Mapping[str, Any], vocab: Vocab, *, drop_caption: bool = False) -> Segment:
  """`<bos> caption <boi> codes <eoi> <eos>` (caption omitted when `drop_caption`)."""
  text = _text(record, vocab)[: 0 if drop_caption else None]
  image = _image(_codes(record, vocab, 2), vocab)
  return Segment(_join([vocab.bos_id], text, image, [vocab.eos_id]), len(text) + 2)


def i2t(record: Mapping[str, Any], vocab: Vocab) -> Segment:
  """`<bos> <boi> codes <eoi> caption <eos>`."""
  text = _text(record, vocab)
  image = _image(_codes(record, vocab, 2), vocab)
  return Segment(_join([vocab.bos_id], image, text, [vocab.eos_id]), len(image) + 1)


def mixed(
  record: Mapping[str, Any],
  vocab: Vocab,
  rng: np.random.Generator,
  *,
  t2i_ratio: float = 0.5,
  caption_dropout: float = 0.0,
) -> Segment:
  """t2i with probability `t2i_ratio` (caption dropped with probability `caption_dropout`), else
  i2t. Always draws two numbers from `rng` (mode, then dropout)."""
  u_mode, u_drop = rng.random(2)
  if u_mode < t2i_ratio:
    return t2i(record, vocab, drop_caption=bool(u_drop < caption_dropout))
  return i2t(record, vocab)


def document(
  records: Sequence[Mapping[str, Any]], vocab: Vocab, rng: np.random.Generator
) -> Segment:
  """`<bos> pair_1 ... pair_n <eos>`; each pair is text-then-image or image-then-text (p = 1/2,
  one draw per pair)."""
  if not records:
    raise UserError("document needs at least one record; group records with GroupedSource.")
  parts = [[vocab.bos_id]]
  for record in records:
    text, image = _text(record, vocab), _image(_codes(record, vocab, 2), vocab)
    parts += [text, image] if rng.random() < 0.5 else [image, text]
  parts.append([vocab.eos_id])
  return Segment(_join(*parts), 0)


def video(record: Mapping[str, Any], vocab: Vocab, *, drop_caption: bool = False) -> Segment:
  """`<bos> caption <boi> f_1 <eoi> <frame> <boi> f_2 <eoi> ... <boi> f_T <eoi> <eos>`."""
  text = _text(record, vocab)[: 0 if drop_caption else None]
  frames = _codes(record, vocab, 3)
  parts = [[vocab.bos_id], text]
  for t, frame in enumerate(frames):
    if t:
      parts.append([vocab.frame_id])
    parts.append(_image(frame, vocab))
  parts.append([vocab.eos_id])
  return Segment(_join(*parts), len(text) + 2)


CHAT_ROLES = ("user", "assistant")


def _role_id(role: Any, vocab: Vocab) -> int:
  if role not in CHAT_ROLES:
    raise UserError(f"turn role {role!r} is not one of {CHAT_ROLES}.")
  if role not in vocab.specials:
    raise UserError(
      f"the vocab has no <{role}> special; use vocab.with_specials(vqlm.vocab.CHAT_SPECIALS)."
    )
  return vocab.special(role)


def _chat_part(part: Any, vocab: Vocab) -> np.ndarray:
  """Text ids `int[n]` (n >= 1) or codes `[h, w]` -> ids of the part."""
  array = np.asarray(part)
  if array.ndim == 2:
    return _image(vocab.check_codes(array), vocab)
  if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
    raise UserError(
      f"a chat part must be non-empty text ids int[n] or image codes [h, w], got shape "
      f"{array.shape} of {array.dtype}."
    )
  return _text({"text_ids": array}, vocab)


def chat(
  turns: Sequence[Mapping[str, Any]], vocab: Vocab, *, eos: bool = True
) -> tuple[Segment, np.ndarray]:
  """Turns -> `<bos> <user> parts <assistant> parts ... <eos>` and its assistant mask.

  Args:
    turns: `[{"role": "user" | "assistant", "parts": [text ids int[n] | codes [h, w], ...]}]`;
      two text parts must not be adjacent (they would read back as one).
    vocab: a vocab with the chat specials (`vocab.with_specials(CHAT_SPECIALS)`).
    eos: end with `<eos>` (False: a prompt, e.g. turns then a final empty assistant turn).

  Returns:
    The segment (prompt: through the first `<assistant>`; 0 if none) and `bool[L]`, True on the
    tokens of assistant parts and on the token after each assistant turn (the next `<user>` or
    `<eos>`): the model learns to end its turn. Role markers of the assistant are False.
  """
  if not turns:
    raise UserError("a chat needs at least one turn.")
  ids, mask, prompt_len = [[vocab.bos_id]], [[False]], 0
  assistant = False
  for turn in turns:
    if not isinstance(turn, Mapping) or set(turn) != {"role", "parts"}:
      raise UserError(f"a turn must be a dict with keys 'role' and 'parts', got {turn!r:.80}.")
    role = _role_id(turn["role"], vocab)
    ids.append([role])
    mask.append([assistant])  # <user> closes the previous assistant turn
    if turn["role"] == "assistant" and not prompt_len:
      prompt_len = sum(len(i) for i in ids)
    assistant = turn["role"] == "assistant"
    last_text = False
    for part in turn["parts"]:
      part_ids = _chat_part(part, vocab)
      is_text = np.asarray(part).ndim == 1
      if is_text and last_text:
        raise UserError("two adjacent text parts in a turn; join them into one string.")
      last_text = is_text
      ids.append(part_ids)
      mask.append(np.full(part_ids.size, assistant))
  if eos:
    ids.append([vocab.eos_id])
    mask.append([assistant])
  tokens = _join(*ids)
  return Segment(tokens, prompt_len), np.concatenate([np.asarray(m, bool) for m in mask])


def chat_example(
  segment: Segment,
  assistant: np.ndarray,
  vocab: Vocab,
  *,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
) -> Example:
  """A `chat` segment and its mask `bool[L]` -> unpadded example of length L - 1: `to_example`
  with weight 0 wherever the target is not an assistant token."""
  assistant = np.asarray(assistant, bool)
  if assistant.shape != np.shape(segment.tokens):
    raise UserError(f"mask of shape {assistant.shape} does not match the segment's tokens.")
  example = to_example(segment, vocab, text_weight=text_weight, image_weight=image_weight)
  example["loss_weights"] = np.where(assistant[1:], example["loss_weights"], 0).astype(np.float32)
  return example


def needed_seq_len(
  vocab: Vocab, *, max_text_len: int, mode: str = "t2i", frames: int = 1, pairs: int = 1
) -> int:
  """Example length (tokens per row) needed for captions of up to `max_text_len` ids."""
  image = vocab.tokens_per_image + 2
  if mode in ("t2i", "i2t", "mix"):
    length = 2 + max_text_len + image
  elif mode == "document":
    length = 2 + pairs * (max_text_len + image)
  elif mode == "video":
    length = 2 + max_text_len + frames * image + (frames - 1)
  else:
    raise UserError(f"mode={mode!r} is not one of {MODES}.")
  return length - 1


def to_example(
  segment: Segment,
  vocab: Vocab,
  *,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
  mask_prompt: bool = False,
) -> Example:
  """Segment of length L -> unpadded example of length L - 1 (see the module docstring)."""
  seq = np.asarray(segment.tokens, dtype=np.int32)
  if seq.ndim != 1 or seq.size < 2:
    raise UserError(f"a segment needs >= 2 tokens, got shape {seq.shape}.")
  targets = seq[1:]
  weights = np.where(
    vocab.is_image(targets), np.float32(image_weight), np.float32(text_weight)
  ).astype(np.float32)
  if mask_prompt and segment.prompt_len > 1:
    weights[: segment.prompt_len - 1] = 0.0
  n = seq.size - 1
  return {
    "tokens": seq[:-1].copy(),
    "targets": targets.copy(),
    "loss_weights": weights,
    "segment_ids": np.ones(n, np.int32),
    "positions": np.arange(n, dtype=np.int32),
  }


def _length(example: Example) -> int:
  return int(np.asarray(example["tokens"]).shape[0])


def _check_fits(n: int, seq_len: int):
  if n > seq_len:
    raise UserError(
      f"an example of {n} tokens exceeds seq_len={seq_len}; raise seq_len to at "
      f"least {n} (see needed_seq_len) or shorten the captions."
    )


def pad(example: Example, seq_len: int, *, pad_id: int) -> Example:
  """Pads one example (one or more segments) to `[seq_len]`; too long -> ValueError."""
  n = _length(example)
  _check_fits(n, seq_len)
  fill = {
    "tokens": pad_id,
    "targets": pad_id,
    "loss_weights": 0.0,
    "segment_ids": 0,
    "positions": 0,
  }
  out = {}
  for key in _KEYS:
    value = np.asarray(example[key])
    out[key] = np.concatenate([value, np.full(seq_len - n, fill[key], value.dtype)])
  return out


def pack(examples: Sequence[Example], seq_len: int, *, pad_id: int) -> list[Example]:
  """First-fit packing: each example goes into the first row with room, else a new row.

  Returns padded rows `[seq_len]` in which segment k (1-based, in placement order) has
  `segment_ids == k` and positions 0..len-1. Attention must not cross segments (the LM masks with
  `segment_ids`). Any example longer than `seq_len` -> ValueError.
  """
  rows: list[list[Example]] = []
  used: list[int] = []
  for example in examples:
    n = _length(example)
    _check_fits(n, seq_len)
    for r, u in enumerate(used):
      if u + n <= seq_len:
        rows[r].append(example)
        used[r] += n
        break
    else:
      rows.append([example])
      used.append(n)
  out = []
  for row in rows:
    merged = {key: np.concatenate([np.asarray(e[key]) for e in row]) for key in _KEYS}
    merged["segment_ids"] = np.concatenate(
      [np.full(_length(e), k + 1, np.int32) for k, e in enumerate(row)]
    )
    merged["positions"] = np.concatenate([np.arange(_length(e), dtype=np.int32) for e in row])
    out.append(pad(merged, seq_len, pad_id=pad_id))
  return out


def stack(examples: Sequence[Example]) -> Example:
  """List of equal-length examples -> a batch dict of `[B, S]` arrays."""
  return {key: np.stack([e[key] for e in examples]) for key in _KEYS}


class GroupedSource:
  """Random-access source whose element i is records `[i*k, (i+1)*k)` of `source`: feeds the
  "document" mode (one element = one document of k pairs). The tail that does not fill a group is
  dropped."""

  def __init__(self, source: Sequence[Any], k: int):
    if k < 1:
      raise UserError(f"GroupedSource k={k} must be >= 1.")
    self.source, self.k = source, k

  def __len__(self) -> int:
    return len(self.source) // self.k

  def __getitem__(self, i: int) -> list[Any]:
    if not 0 <= i < len(self):
      raise IndexError(f"group {i} out of range [0, {len(self)}).")
    return [self.source[j] for j in range(i * self.k, (i + 1) * self.k)]


class SequenceBuilder:
  """Record + index -> LM example, deterministic in `(seed, index)`.

  `builder(record, index)` draws from `np.random.default_rng([seed, index])` only, so it can run in
  any order, in any worker, and again after a restart (use `ds.map_with_index(
  builder.map_with_index)` in grain). In "document" mode a record is a list of records (see
  `GroupedSource`).

  With `pack=False` the call returns a row padded to `[seq_len]`; with `pack=True` it returns the
  unpadded example (length <= seq_len) for a later `pack`; `build_packed` does both steps for a
  batch of records.
  """

  def __init__(
    self,
    *,
    vocab: Vocab,
    mode: str = "t2i",
    seq_len: int,
    t2i_ratio: float = 0.5,
    caption_dropout: float = 0.0,
    text_weight: float = 1.0,
    image_weight: float = 1.0,
    mask_prompt: bool = False,
    pack: bool = False,
    seed: int = 0,
  ):
    if mode not in MODES:
      raise UserError(f"mode={mode!r} is not one of {MODES}.")
    if seq_len < 1:
      raise UserError(f"seq_len={seq_len} must be >= 1.")
    if not 0.0 <= t2i_ratio <= 1.0:
      raise UserError(f"t2i_ratio={t2i_ratio} must be in [0, 1].")
    if not 0.0 <= caption_dropout <= 1.0:
      raise UserError(f"caption_dropout={caption_dropout} must be in [0, 1].")
    if text_weight < 0 or image_weight < 0:
      raise UserError(f"text_weight={text_weight}, image_weight={image_weight} must be >= 0.")
    if seed < 0:
      raise UserError(f"seed={seed} must be >= 0.")
    self.vocab, self.mode, self.seq_len = vocab, mode, seq_len
    self.t2i_ratio, self.caption_dropout = t2i_ratio, caption_dropout
    self.text_weight, self.image_weight = text_weight, image_weight
    self.mask_prompt, self.pack, self.seed = mask_prompt, pack, seed

  def rng(self, index: int) -> np.random.Generator:
    if index < 0:
      raise UserError(f"index={index} must be >= 0.")
    return np.random.default_rng([self.seed, int(index)])

  def segment(self, record: Any, index: int) -> Segment:
    """The token layout of `record` at `index` (before shifting and padding)."""
    rng, vocab = self.rng(index), self.vocab
    if self.mode == "document":
      if isinstance(record, Mapping):
        raise UserError(
          "mode='document' takes a list of records per element; wrap the source "
          "in GroupedSource(source, k)."
        )
      return document(record, vocab, rng)
    if self.mode == "mix":
      return mixed(
        record, vocab, rng, t2i_ratio=self.t2i_ratio, caption_dropout=self.caption_dropout
      )
    if self.mode == "i2t":
      return i2t(record, vocab)
    drop = bool(rng.random() < self.caption_dropout)
    if self.mode == "t2i":
      return t2i(record, vocab, drop_caption=drop)
    return video(record, vocab, drop_caption=drop)

  def example(self, record: Any, index: int) -> Example:
    """Unpadded example of `record` at `index`; longer than seq_len -> ValueError."""
    example = to_example(
      self.segment(record, index),
      self.vocab,
      text_weight=self.text_weight,
      image_weight=self.image_weight,
      mask_prompt=self.mask_prompt,
    )
    _check_fits(_length(example), self.seq_len)
    return example

  def __call__(self, record: Any, index: int) -> Example:
    example = self.example(record, index)
    return example if self.pack else pad(example, self.seq_len, pad_id=self.vocab.pad_id)

  def map_with_index(self, index: int, record: Any) -> Example:
    """grain's `MapDataset.map_with_index` argument order."""
    return self(record, index)

  def build_packed(
    self, records: Sequence[Any], indices: Sequence[int] | None = None
  ) -> list[Example]:
    """Builds the examples of `records` (at `indices`, default 0..n-1) and packs them into rows
    `[seq_len]` (first fit, in order)."""
    if indices is None:
      indices = range(len(records))
    if len(indices) != len(records):
      raise UserError(f"{len(records)} records but {len(indices)} indices; pass one per record.")
    examples = [self.example(r, i) for r, i in zip(records, indices)]
    return pack(examples, self.seq_len, pad_id=self.vocab.pad_id)
