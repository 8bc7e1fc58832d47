"""Chat examples as a random-access source, and a deterministic mixture of sources.

Instruction tuning trains on the usual data and chat examples side by side:

    codes = dict(zip(scenes, encode_scenes(list(scenes.values()), tokenizer_run.encode, ...)))
    built = build_examples(items, vocab, text_tokenizer, codes=codes, seq_len=S)  # drops too long
    source = MixtureSource({"usual": shards, "chat": built.examples}, {"usual": 0.5, "chat": 0.5})
    transform = MixtureTransform({"usual": ExampleTransform(...), "chat": None})
    batches = pipeline.make_iterator(source, transform=transform, ...)

`ChatExamples` holds padded LM examples `[N, S]` (built once, up front: the scene images are
rendered and encoded by the image tokenizer once per distinct scene). `MixtureSource` interleaves
named parts by weight: element i is `(name, part[j])` with `(name, j)` a pure function of
`(seed, i)`, so it works under grain's shuffling, in any worker, and after a resume from the
pipeline's checkpointed iterator state (see `MixtureSource` for the proportions it guarantees).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import math
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vqlm.data import chat, sequences, shapes
from vqlm.errors import UserError
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

Example = dict[str, np.ndarray]

# ---- a deterministic mixture of random-access sources ------------------------------------------

_MASK = (1 << 64) - 1
_GOLDEN = (math.sqrt(5) - 1) / 2


def _mix(x: int) -> int:
  """splitmix64's finaliser: a well-spread 64-bit hash of the integer `x`."""
  x = (x + 0x9E3779B97F4A7C15) & _MASK
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
  return x ^ (x >> 31)


class MixtureSource:
  """Named random-access sources interleaved by weight: `len`, `[i] -> (name, element)`.

  Positions come in blocks of `block` elements. In every block each part holds exactly
  `counts[name] = round(block * F_k) - round(block * F_{k-1})` elements (F: the cumulative
  normalised weights, in the order of `parts`), so proportions are exact per block, up to
  `1 / (2 * block)` of the requested weights (`weights_used`). Within block b, position p takes
  slot `(A * p + hash(seed, b)) mod block` with A coprime to `block` and near `block * 0.618`
  (a Weyl sequence), and slots `[round(block * F_{k-1}), round(block * F_k))` belong to part k:
  the parts are spread evenly, so any window of n consecutive elements (shuffled by grain or
  not) holds each part's share to within a few elements. Part k's j-th slot over the blocks
  reads its element `j mod len(part)`: a part with fewer elements than its share repeats them
  (with new global indices, so per-index randomness of a transform differs).

  Args:
    parts: `{name: source}` (each with `len` and `__getitem__`), in a fixed order.
    weights: `{name: weight >= 0}` for the same names (normalised here; a part of weight 0 is
      never read and may be empty).
    seed: the hash seed of the slot offsets.
    length: number of elements (default: whole blocks until every part with a weight has been
      read once; a part of length 0 with a weight is an error).
    block: positions per block (the resolution of the weights).
  """

  def __init__(
    self,
    parts: Mapping[str, Any],
    weights: Mapping[str, float],
    *,
    seed: int = 0,
    length: int | None = None,
    block: int = 1024,
  ):
    if set(parts) != set(weights) or not parts:
      raise UserError(
        f"MixtureSource needs one weight per part: parts {list(parts)}, weights {list(weights)}."
      )
    names = list(parts)
    w = np.asarray([float(weights[n]) for n in names], np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise UserError(f"mixture weights {dict(weights)} must be >= 0 with a positive sum.")
    if block < 1 or seed < 0:
      raise UserError(f"MixtureSource block={block} must be >= 1 and seed={seed} >= 0.")
    ends = np.rint(block * np.cumsum(w / w.sum())).astype(np.int64)
    ends[-1] = block
    counts = np.diff(ends, prepend=0)
    small = [n for n, c, x in zip(names, counts, w) if x > 0 and c == 0]
    if small:
      raise UserError(
        f"mixture weights of {small} are below 1/{block} of the total; raise them or the block."
      )
    empty = [n for n, c in zip(names, counts) if c > 0 and len(parts[n]) == 0]
    if empty:
      raise UserError(f"mixture parts {empty} have a weight but no elements.")
    self.parts, self.names, self.seed, self.block = dict(parts), names, int(seed), int(block)
    self._ends, self._counts = ends, counts
    self._lens = [len(parts[n]) for n in names]
    self._starts = ends - counts
    if length is None:
      blocks = max(math.ceil(n / c) for n, c in zip(self._lens, counts) if c > 0)
      length = blocks * block
    if length < 1:
      raise UserError(f"MixtureSource length={length} must be >= 1.")
    self.length = int(length)
    mult = max(1, round(block * _GOLDEN))
    while math.gcd(mult, block) != 1:
      mult += 1
    self._mult = mult
    self._seed_hash = _mix(self.seed)

  @property
  def counts(self) -> dict[str, int]:
    """Elements of each part per block."""
    return {n: int(c) for n, c in zip(self.names, self._counts)}

  @property
  def weights_used(self) -> dict[str, float]:
    """The weights the mixture realises: `counts / block`."""
    return {n: c / self.block for n, c in self.counts.items()}

  def __len__(self) -> int:
    return self.length

  def locate(self, index: int) -> tuple[str, int]:
    """Element `index` -> `(part name, index into that part)`."""
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(f"mixture index {index} out of range [0, {self.length}).")
    b, p = divmod(index, self.block)
    slot = (self._mult * p + _mix(self._seed_hash ^ b)) % self.block
    k = int(np.searchsorted(self._ends, slot, side="right"))
    j = b * int(self._counts[k]) + slot - int(self._starts[k])
    return self.names[k], j % self._lens[k]

  def __getitem__(self, index: int) -> tuple[str, Any]:
    name, j = self.locate(index)
    return name, self.parts[name][j]


class MixtureTransform:
  """`(index, (name, element)) -> transforms[name](index, element)`: the pipeline transform of a
  `MixtureSource`; a transform of None passes the element through (e.g. `ChatExamples`, whose
  elements are already LM examples). Every part must give the same keys and shapes."""

  def __init__(self, transforms: Mapping[str, Callable[[int, Any], Any] | None]):
    self.transforms = dict(transforms)

  def __call__(self, index: int, element: tuple[str, Any]) -> Any:
    name, value = element
    if name not in self.transforms:
      raise UserError(f"mixture part {name!r} has no transform (have {list(self.transforms)}).")
    fn = self.transforms[name]
    return value if fn is None else fn(index, value)


# ---- chat examples ----------------------------------------------------------------------------


class ChatExamples:
  """Padded LM examples held in memory: `[i]` gives the dict `sequences.pad` gives (`tokens`,
  `targets`, `loss_weights`, `segment_ids`, `positions`, each `[S]`).

  Args:
    tokens, targets: int32 `[N, S]`.
    loss_weights: float32 `[N, S]`.
    lengths: int32 `[N]`, the unpadded length of each example.
    kinds: the conversation kind of each example ("draw", ...), or empty.
  """

  def __init__(self, tokens, targets, loss_weights, lengths, kinds: Sequence[str] = ()):
    self.tokens = np.asarray(tokens, np.int32)
    self.targets = np.asarray(targets, np.int32)
    self.loss_weights = np.asarray(loss_weights, np.float32)
    self.lengths = np.asarray(lengths, np.int32)
    self.kinds = tuple(kinds)
    n, s = self.tokens.shape
    if self.targets.shape != (n, s) or self.loss_weights.shape != (n, s) or len(self.lengths) != n:
      raise UserError("ChatExamples arrays must be [N, S] with one length per row.")
    self._range = np.arange(s, dtype=np.int32)

  @classmethod
  def from_examples(
    cls, examples: Sequence[Example], seq_len: int, *, pad_id: int, kinds: Sequence[str] = ()
  ) -> "ChatExamples":
    """Unpadded examples (one segment each, length <= seq_len) -> padded arrays."""
    n = len(examples)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    lengths = np.zeros(n, np.int32)
    for i, ex in enumerate(examples):
      m = len(ex["tokens"])
      if m > seq_len:
        raise UserError(f"chat example {i} of {m} tokens exceeds seq_len={seq_len}.")
      tokens[i, :m], targets[i, :m], weights[i, :m] = (
        ex["tokens"],
        ex["targets"],
        ex["loss_weights"],
      )
      lengths[i] = m
    return cls(tokens, targets, weights, lengths, kinds)

  @property
  def seq_len(self) -> int:
    return int(self.tokens.shape[1])

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def __getitem__(self, index: int) -> Example:
    n = int(self.lengths[index])
    inside = self._range < n
    return {
      "tokens": self.tokens[index].copy(),
      "targets": self.targets[index].copy(),
      "loss_weights": self.loss_weights[index].copy(),
      "segment_ids": inside.astype(np.int32),
      "positions": np.where(inside, self._range, 0).astype(np.int32),
    }

  def batches(
    self, batch_size: int, *, process_index: int = 0, process_count: int = 1
  ) -> list[Example]:
    """Every example once, in order, as global batches of `batch_size` (the last one filled up
    with repeated examples of loss weight 0, so evaluation sums stay those of the N examples);
    each returned as this process's share `[batch_size // process_count, S]`."""
    if not len(self):
      raise UserError("no chat examples to batch.")
    if batch_size % process_count:
      raise UserError(f"batch size {batch_size} is not divisible by {process_count} processes.")
    local = batch_size // process_count
    out = []
    for start in range(0, len(self), batch_size):
      first = start + process_index * local
      rows = [self[i % len(self)] for i in range(first, first + local)]
      for r, i in enumerate(range(first, first + local)):
        if i >= len(self):
          rows[r]["loss_weights"][:] = 0.0
      out.append(sequences.stack(rows))
    return out


def distinct_scenes(items: Iterable[Mapping[str, Any]]) -> dict[tuple, list[dict]]:
  """`{shapes.canonical(scene): scene}` of every `SceneImage` in the items' turns, first seen
  first."""
  scenes: dict[tuple, list[dict]] = {}
  for item in items:
    for turn in item["turns"]:
      for part in turn["parts"]:
        if isinstance(part, chat.SceneImage) and part.scene not in scenes:
          scenes[part.scene] = part.objects()
  return scenes


def encode_scenes(
  scenes: Sequence[Sequence[Mapping[str, str]]],
  encode: Callable[[np.ndarray], np.ndarray],
  *,
  image_size: int,
  batch_size: int = 256,
  progress: bool = True,
) -> np.ndarray:
  """Renders each scene (`shapes.render` at `image_size`) and encodes the images in batches:
  `encode(uint8 [B, H, W, 3]) -> codes [B, h, w]` (e.g. `TokenizerRun.encode`). The last batch is
  padded to `batch_size` so `encode` sees one shape. Returns int32 codes `[len(scenes), h, w]`."""
  if not len(scenes):
    raise UserError("no scenes to encode.")
  out = []
  bar = tqdm(total=len(scenes), desc="encode chat images", disable=not progress, unit="img")
  for start in range(0, len(scenes), batch_size):
    chunk = scenes[start : start + batch_size]
    images = np.stack([shapes.render(s, image_size) for s in chunk])
    if len(chunk) < batch_size and start:
      fill = np.repeat(images[-1:], batch_size - len(chunk), axis=0)
      images = np.concatenate([images, fill])
    out.append(np.asarray(encode(images), np.int32)[: len(chunk)])
    bar.update(len(chunk))
  bar.close()
  return np.concatenate(out)


def unwritable_texts(texts: Iterable[str], tokenizer: TextTokenizer) -> list[str]:
  """The distinct texts the SentencePiece model does not round-trip (an `<unk>` piece, or a
  decode that differs from the text), in first-seen order."""
  bad = []
  for text in dict.fromkeys(texts):
    ids = tokenizer.encode(text)
    if 0 in ids or tokenizer.decode(ids) != text:
      bad.append(text)
  return bad


@dataclasses.dataclass
class BuiltChat:
  """What `build_examples` made.

  Attributes:
    examples: the kept examples (those of at most `seq_len` tokens), in item order.
    kept: bool `[len(items)]`, which items were kept.
    lengths: int `[len(items)]`, each item's example length (tokens per row, `L - 1`).
  """

  examples: ChatExamples
  kept: np.ndarray
  lengths: np.ndarray

  @property
  def dropped(self) -> int:
    return int((~self.kept).sum())

  def length_for(self, fraction: float) -> int:
    """The smallest `seq_len` that fits `fraction` of the items."""
    return int(np.ceil(np.quantile(self.lengths, fraction, method="higher")))


def build_examples(
  items: Sequence[Mapping[str, Any]],
  vocab: Vocab,
  tokenizer: TextTokenizer,
  *,
  codes: Mapping[tuple, np.ndarray],
  seq_len: int,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
) -> BuiltChat:
  """`chat.conversation` items -> padded LM examples (`chat.build`: loss only on assistant
  tokens). `codes` maps `shapes.canonical(scene)` to the scene's codes `[h, w]` (see
  `distinct_scenes`, `encode_scenes`); items longer than `seq_len` are dropped."""

  def build(item):
    turns = chat.with_codes(item["turns"], lambda scene: codes[shapes.canonical(scene)])
    return chat.build(turns, vocab, tokenizer, text_weight=text_weight, image_weight=image_weight)

  return build_padded(items, build, seq_len=seq_len, pad_id=vocab.pad_id)


def build_padded(
  items: Sequence[Mapping[str, Any]],
  build: Callable[[Mapping[str, Any]], Example],
  *,
  seq_len: int,
  pad_id: int,
) -> BuiltChat:
  """Items -> padded LM examples: `build(item)` gives an item's unpadded example; those longer
  than `seq_len` are dropped (`kept` False), the others padded in item order with the items'
  `kind`s."""
  examples, kinds = [], []
  kept = np.zeros(len(items), bool)
  lengths = np.zeros(len(items), np.int64)
  for i, item in enumerate(items):
    example = build(item)
    lengths[i] = len(example["tokens"])
    if lengths[i] <= seq_len:
      kept[i] = True
      examples.append(example)
      kinds.append(item["kind"])
  padded = ChatExamples.from_examples(examples, seq_len, pad_id=pad_id, kinds=kinds)
  return BuiltChat(padded, kept, lengths)
