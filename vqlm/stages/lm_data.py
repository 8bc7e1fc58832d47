"""The LM stage's training data: `config.data.mixture` (mode -> weight) -> one random-access
source of packed rows `[seq_len]`.

Modes and where their examples come from (layouts in `vqlm.data.sequences`):

```
t2i       a record of `data.codes`             <bos> caption <boi> codes <eoi> <eos>
i2t       a record of `data.codes`             <bos> <boi> codes <eoi> caption <eos>
document  `pairs_per_document` records         <bos> pair_1 ... pair_n <eos>
video     a clip of `data.video_codes`         <bos> caption <boi> f_1 <eoi> <frame> ... <eos>
edit      an edit document (`data.edit`)       <bos> instruction <boi> src <eoi> <boi> result ...
```

A weight is the share of training rows of that mode (normalised; 0 = off). Each row holds
examples of one mode only, packed first-fit: as many as the longest example of the mode allows
(`per_row`), with segment ids 1, 2, ... so attention stays within an example. Rows of short
modes (t2i at seq_len 432: four examples per row) thus cost no more than one video row. The
parts are interleaved by `chat_source.MixtureSource` (exact shares per block of 1024 rows,
deterministic, resumable).

`data.mixture` is a string `"t2i=0.5,i2t=0.5"` (or a mapping in Python); a config saved before
it existed (`data.mode`, `data.t2i_ratio`) reads as the same mixture.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import ml_collections
import numpy as np

from vqlm.data import chat, shapes
from vqlm.data.chat_source import MixtureSource, MixtureTransform
from vqlm.data.code_shards import CodeShards, read_manifest
from vqlm.data.sequences import GroupedSource, SequenceBuilder, needed_seq_len, pack
from vqlm.errors import UserError
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

MODES = ("t2i", "i2t", "document", "video", "edit")
IMAGE_MODES = ("t2i", "i2t", "document")  # read the image records of `data.codes`
MIXTURE_FLAG = "--config.data.mixture"
MIXTURE_BLOCK = 1024
Example = dict[str, np.ndarray]


def parse_mixture(value: str | Mapping[str, float]) -> dict[str, float]:
  """`"t2i=0.5,i2t=0.5"` (or `{"t2i": 0.5, ...}`) -> `{mode: weight}` over every mode of `MODES`
  (absent ones 0), checked: known modes, weights >= 0, at least one > 0."""
  if isinstance(value, Mapping):
    pairs = [(str(k), v) for k, v in value.items()]
  else:
    pairs = []
    for item in str(value).split(","):
      if not item.strip():
        continue
      name, eq, number = item.partition("=")
      if not eq:
        raise UserError(
          f"config.data.mixture={value!r}: {item.strip()!r} is not mode=weight; e.g. "
          f"{MIXTURE_FLAG}=t2i=0.4,i2t=0.4,video=0.2"
        )
      pairs.append((name.strip(), number.strip()))
  weights = dict.fromkeys(MODES, 0.0)
  for name, number in pairs:
    if name not in MODES:
      raise UserError(
        f"config.data.mixture names an unknown mode {name!r}; modes: {', '.join(MODES)} "
        f"(e.g. {MIXTURE_FLAG}=t2i=0.5,i2t=0.5)"
      )
    try:
      weight = float(number)
    except (TypeError, ValueError):
      raise UserError(
        f"config.data.mixture: the weight of {name} is {number!r}, not a number; e.g. "
        f"{MIXTURE_FLAG}={name}=0.5"
      ) from None
    if not weight >= 0.0:  # also rejects NaN
      raise UserError(f"config.data.mixture: {name}={number} must be >= 0")
    weights[name] = weight
  if sum(weights.values()) <= 0:
    raise UserError(
      f"config.data.mixture={value!r} gives every mode weight 0; e.g. "
      f"{MIXTURE_FLAG}=t2i=0.5,i2t=0.5"
    )
  return weights


def mixture_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The checked `config.data.mixture`; a config saved before it existed maps `data.mode` /
  `data.t2i_ratio` onto it ("mix" -> t2i / i2t at t2i_ratio)."""
  d = config.data
  if "mixture" in d:
    return parse_mixture(d.mixture)
  mode = d.get("mode", "mix")
  if mode == "mix":
    ratio = float(d.get("t2i_ratio", 0.5))
    return parse_mixture({"t2i": ratio, "i2t": 1.0 - ratio})
  return parse_mixture({mode: 1.0})


def active_modes(config: ml_collections.ConfigDict) -> list[str]:
  """The modes of weight > 0, in `MODES` order."""
  return [m for m, w in mixture_weights(config).items() if w > 0]


def shard_modes(config: ml_collections.ConfigDict) -> list[str]:
  """The active modes that read code shards: all but edit (built up front, `data.edit`)."""
  return [m for m in active_modes(config) if m != "edit"]


def codes_dir(config: ml_collections.ConfigDict, mode: str) -> str:
  """The code shards a mode reads: `data.video_codes` for video (falling back on `data.codes`,
  so a video-only run may name its clips there), else `data.codes`."""
  if mode == "video":
    return config.data.get("video_codes", "") or config.data.codes
  return config.data.codes


def pairs_per_document(config: ml_collections.ConfigDict) -> int:
  k = int(config.data.get("pairs_per_document", 2))
  if k < 1:
    raise UserError(
      f"config.data.pairs_per_document={k} must be >= 1; e.g. --config.data.pairs_per_document=2"
    )
  return k


def per_row(need: int, seq_len: int) -> int:
  """How many examples of at most `need` tokens one row of `seq_len` holds (>= 1)."""
  return max(1, seq_len // max(1, need))


def _frames_and_pairs(config: ml_collections.ConfigDict, mode: str) -> tuple[int, int]:
  """Images per clip (video) and image-caption pairs per example (document) of a mode."""
  frames = int(config.data.get("frames", 1)) if mode == "video" else 1
  pairs = pairs_per_document(config) if mode == "document" else 1
  return frames, pairs


def needed(config: ml_collections.ConfigDict, vocab: Vocab, mode: str) -> int:
  """Tokens per row an example of an image/video mode needs (captions up to max_text_len)."""
  frames, pairs = _frames_and_pairs(config, mode)
  return needed_seq_len(
    vocab, max_text_len=text_limit(config, mode)[0], mode=mode, frames=frames, pairs=pairs
  )


def unpadded(example: Mapping[str, np.ndarray]) -> Example:
  """A padded single-segment row (e.g. a `ChatExamples` item) cut to its segment."""
  n = int((np.asarray(example["segment_ids"]) > 0).sum())
  return {k: np.asarray(v)[:n] for k, v in example.items()}


class ExampleTransform:
  """(index, element) -> unpadded LM example of one mode: the caption(s) encoded, then the
  sequence layout. An element is a shard record, or in document mode a list of them."""

  def __init__(
    self,
    *,
    text_model: str,
    builder: SequenceBuilder,
    max_text_len: int,
    shuffle_objects: bool = False,
    reword_prompts: float = 0.0,
  ):
    self.text_model = text_model
    self.builder = builder
    self.max_text_len = max_text_len
    # Shapes captions with their objects in a random order, or (a `reword_prompts` share of the
    # examples) reworded as requests name scenes; seeded by the example's index.
    self.shuffle_objects = shuffle_objects
    self.reword_prompts = float(reword_prompts)
    self._tokenizer = None

  def __call__(self, index: int, element: Mapping | list) -> Example:
    if self._tokenizer is None:
      self._tokenizer = TextTokenizer.load(self.text_model)
    if isinstance(element, Mapping):
      return self.builder(self._record(element, index), index)
    return self.builder([self._record(r, index) for r in element], index)

  def _record(self, record: Mapping[str, Any], index: int) -> dict[str, Any]:
    vocab, text = self.builder.vocab, record["text"]
    if self.shuffle_objects or self.reword_prompts:
      rng = np.random.default_rng([self.builder.seed, int(index), 7])
      if self.reword_prompts and rng.random() < self.reword_prompts:
        ids = vocab.encode_text(self._tokenizer, chat.reworded_caption(text, rng))
        # A rewording longer than the caption limit is not cut: the caption stands instead.
        if len(ids) <= self.max_text_len:
          return {"text_ids": ids, "codes": record["codes"]}
      elif self.shuffle_objects:
        text = shapes.shuffle_caption(text, rng)
    # Captions beyond max_text_len are cut (checked up front on the training split, so this
    # only guards against rare outliers; an over-long example must never stop an epoch).
    text_ids = vocab.encode_text(self._tokenizer, text)[: self.max_text_len]
    return {"text_ids": text_ids, "codes": record["codes"]}


class PackedRows:
  """(index, [element, ...]) -> one padded row `[seq_len]` holding each element's example as its
  own segment (first fit; the group is sized so that they always fit). Element j of group i is
  built with index `i * group + j`, so every example keeps its own deterministic randomness."""

  def __init__(
    self,
    build: Callable[[int, Any], Example],
    *,
    group: int,
    seq_len: int,
    pad_id: int,
  ):
    self.build, self.group, self.seq_len, self.pad_id = build, group, seq_len, pad_id

  def __call__(self, index: int, elements: Sequence[Any]) -> Example:
    examples = [self.build(index * self.group + j, e) for j, e in enumerate(elements)]
    rows = pack(examples, self.seq_len, pad_id=self.pad_id)
    if len(rows) != 1:
      raise UserError(
        f"{len(examples)} examples did not fit one row of {self.seq_len} tokens; raise "
        "--config.train.seq_len"
      )
    return rows[0]


@dataclasses.dataclass
class Part:
  """One mode's rows: `source[i]` is a group of `group` elements, `transform(i, group)` a row."""

  source: Any
  transform: PackedRows
  group: int


def caption_dropout(config: ml_collections.ConfigDict, mode: str) -> float:
  """The chance that an example drops its caption: t2i `caption_dropout` (for guidance), video
  `video_caption_dropout` (continuing from frames alone), none in the other modes."""
  if mode == "video":
    return float(config.data.get("video_caption_dropout", config.data.caption_dropout))
  return float(config.data.caption_dropout) if mode == "t2i" else 0.0


def shuffles_objects(config: ml_collections.ConfigDict, mode: str) -> bool:
  """Whether `mode`'s captions list their objects in a random order: t2i prompts when
  `data.shuffle_objects`; never a caption the LM is taught to write."""
  return mode == "t2i" and bool(config.data.get("shuffle_objects", False))


def reword_share(config: ml_collections.ConfigDict, mode: str) -> float:
  """The share of `mode`'s captions reworded as a request would name the scene (t2i prompts,
  `data.reword_prompts`; never a caption the LM is taught to write)."""
  share = float(config.data.get("reword_prompts", 0.0)) if mode == "t2i" else 0.0
  if not 0.0 <= share <= 1.0:
    raise UserError(f"config.data.reword_prompts={share} must be in [0, 1]; e.g. 0.5")
  return share


def builder(config, vocab: Vocab, *, mode: str, seed: int) -> SequenceBuilder:
  d = config.data
  return SequenceBuilder(
    vocab=vocab,
    mode=mode,
    seq_len=config.train.seq_len,
    caption_dropout=caption_dropout(config, mode),
    text_weight=config.loss.text_weight,
    image_weight=config.loss.image_weight,
    mask_prompt=d.mask_prompt,
    pack=True,
    seed=seed,
  )


def records(config: ml_collections.ConfigDict, mode: str, split: str):
  """The split's random-access elements of an image/video mode: shard records, or in document
  mode groups of `pairs_per_document` consecutive records (the tail that fills no group is
  dropped)."""
  shards = CodeShards(codes_dir(config, mode), split)
  if mode != "document":
    return shards
  k = pairs_per_document(config)
  if len(shards) < k:
    raise UserError(
      f"the '{split}' split of {config.data.codes} has {len(shards)} records, fewer than one "
      f"document of config.data.pairs_per_document={k}; lower --config.data.pairs_per_document"
    )
  return GroupedSource(shards, k)


def make_parts(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  vocab: Vocab,
  text_model: str,
  seed: int,
  edit_examples: Any = None,
) -> dict[str, Part]:
  """`{mode: Part}` of every active mode for `split` (`edit_examples`: the split's built edit
  documents, a `ChatExamples`, needed when edit is active)."""
  seq_len = config.train.seq_len
  parts = {}
  for mode in active_modes(config):
    if mode == "edit":
      if edit_examples is None:
        raise UserError("mixture.edit > 0 but no edit examples were built (config.data.edit)")
      group = per_row(int(edit_examples.lengths.max()), seq_len)
      source = edit_examples

      def build(index, element):
        del index
        return unpadded(element)

    else:
      group = per_row(needed(config, vocab, mode), seq_len)
      source = records(config, mode, split)
      build = ExampleTransform(
        text_model=text_model,
        builder=builder(config, vocab, mode=mode, seed=seed),
        max_text_len=text_limit(config, mode)[0],
        shuffle_objects=shuffles_objects(config, mode),
        reword_prompts=reword_share(config, mode),
      )
    if len(source) < group:
      group = max(1, len(source))
    parts[mode] = Part(
      GroupedSource(source, group),
      PackedRows(build, group=group, seq_len=seq_len, pad_id=vocab.pad_id),
      group,
    )
  return parts


def make_source(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  vocab: Vocab,
  text_model: str,
  seed: int,
  edit_examples: Any = None,
) -> tuple[Any, Callable[[int, Any], Example]]:
  """The split's rows as `(source, transform)` for `pipeline.make_iterator`: one mode's part
  alone, or the parts interleaved by weight (`MixtureSource`)."""
  parts = make_parts(
    config, split, vocab=vocab, text_model=text_model, seed=seed, edit_examples=edit_examples
  )
  if len(parts) == 1:
    (part,) = parts.values()
    return part.source, part.transform
  weights = mixture_weights(config)
  source = MixtureSource(
    {m: p.source for m, p in parts.items()},
    {m: weights[m] for m in parts},
    seed=seed,
    block=MIXTURE_BLOCK,
  )
  return source, MixtureTransform({m: p.transform for m, p in parts.items()})


def check_data(config: ml_collections.ConfigDict) -> None:
  """Fails early if an active mode's first training record does not suit it: images `[h, w]`
  for t2i / i2t / document, clips `[frames, h, w]` of `data.frames` frames for video."""
  d = config.data
  modes = active_modes(config)
  if "document" in modes:
    pairs_per_document(config)
  for mode in shard_modes(config):
    directory = codes_dir(config, mode)
    shards = CodeShards(directory, "train")
    if not len(shards):
      continue
    shape = tuple(np.shape(shards[0]["codes"]))
    if mode == "video":
      if len(shape) != 3:
        raise UserError(
          f"mixture video needs clips of codes [frames, h, w] but {directory} holds images of "
          f"codes {list(shape)}; encode a video source (`vqlm encode --data moving_shapes`) "
          "and pass it as --config.data.video_codes=DIR"
        )
      frames = d.get("frames", 1)
      if shape[0] != frames:
        raise UserError(
          f"the clips in {directory} have {shape[0]} frames but config.data.frames={frames}; "
          f"set --config.data.frames={shape[0]}"
        )
    elif len(shape) != 2:
      raise UserError(
        f"{directory} holds video clips of codes {list(shape)} but mixture {mode} reads images; "
        f"set {MIXTURE_FLAG}=video=1 --config.data.frames={shape[0]}"
      )
  if "video" in modes and codes_dir(config, "video") != d.codes and d.codes:
    image, video = read_manifest(d.codes), read_manifest(codes_dir(config, "video"))
    if tuple(image["grid"]) != tuple(video["grid"]) or (
      image["codebook_size"] != video["codebook_size"]
    ):
      raise UserError(
        f"{d.video_codes} and {d.codes} were encoded by different image tokenizers; encode "
        "both with the same run"
      )


def caption_texts(config: ml_collections.ConfigDict, limit: int) -> list[str]:
  """Up to `limit` training captions of each code directory the active modes read (the text
  model's training corpus)."""
  texts = []
  for directory in dict.fromkeys(codes_dir(config, m) for m in shard_modes(config)):
    shards = CodeShards(directory, "train")
    texts += [shards[i]["text"] for i in range(min(len(shards), limit))]
  return [t for t in texts if t.strip()]


def check_seq_len(config: ml_collections.ConfigDict, vocab: Vocab, text_model: str) -> None:
  """Fails early if the captions (first 2000 training ones per code directory) or an active
  mode's sequences (pairs per document, frames per clip) do not fit train.seq_len."""
  tokenizer = TextTokenizer.load(text_model)
  longest = {}
  for mode in shard_modes(config):
    directory = codes_dir(config, mode)
    if directory not in longest:
      shards = CodeShards(directory, "train")
      texts = (shards[i]["text"] for i in range(min(len(shards), 2000)))
      longest[directory] = max((len(tokenizer.encode(t)) for t in texts), default=0)
    limit, field = text_limit(config, mode)
    if longest[directory] > limit:
      raise UserError(
        f"{mode} captions of up to {longest[directory]} text ids exceed {field}={limit}; set "
        f"--config.{field}={longest[directory]}"
      )
  for mode in shard_modes(config):
    need = needed(config, vocab, mode)
    if need > config.train.seq_len:
      frames, pairs = _frames_and_pairs(config, mode)
      per = f"{pairs} x (" if pairs > 1 else ""
      images = f"{frames} x " if frames > 1 else ""
      raise UserError(
        f"{mode} sequences need {need} tokens ({per}captions up to "
        f"{text_limit(config, mode)[0]} ids + {images}{vocab.tokens_per_image} image codes"
        f"{')' if per else ''} + specials) but train.seq_len is {config.train.seq_len}; set "
        f"--config.train.seq_len={need}"
      )


def text_limit(config: ml_collections.ConfigDict, mode: str) -> tuple[int, str]:
  """The most caption ids an example of `mode` keeps, and the config field that sets it: video
  clips `data.video_max_text_len` when set (their captions tell the motion too, so they may be
  longer than the images'), else `data.max_text_len`."""
  if mode == "video" and int(config.data.get("video_max_text_len", 0)) > 0:
    return int(config.data.video_max_text_len), "data.video_max_text_len"
  return int(config.data.max_text_len), "data.max_text_len"
