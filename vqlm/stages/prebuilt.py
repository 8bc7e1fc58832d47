"""Examples built once, up front, from shapes scenes: what the LM stage's chat instructions
(`vqlm.stages.chat_data`) and edit documents (`vqlm.stages.edit_data`) share.

Both draw the items of the "train" and "validation" splits from their settings, check that the
run's text model writes every text, render each distinct scene at the image tokenizer's size and
encode it once, build every item into a padded LM example (too-long ones dropped: more than 5% is
an error naming the seq_len that fits 99%), and record what they built in `RUN/<kind>_data.json`.
A `Kind` says what differs.
"""

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections

from vqlm.data import chat_source, shapes
from vqlm.errors import UserError
from vqlm.runs import TokenizerRun
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

SPLITS = ("train", "validation")
MAX_DROPPED = 0.05  # the largest fraction of examples of a split that may be dropped as too long

Item = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Kind:
  """One kind of prebuilt examples.

  Attributes:
    name: "chat" or "edit": its config section `config.data.<name>`, and the word in messages.
    texts_name: what its texts are called in messages ("instruction texts").
    texts: items -> every text in them (each must round-trip through the text model).
    scenes: items -> `{shapes.canonical(scene): scene}` of every image in them.
    build: `(items, vocab, tokenizer, *, codes, seq_len, text_weight, image_weight) -> BuiltChat`
      (e.g. `chat_source.build_examples`).
    lower: the field of `config.data.<name>` to lower when examples are too long.
    info: `(settings, items, built, *, seq_len, num_images) -> dict`: what the JSON file records.
  """

  name: str
  texts_name: str
  texts: Callable[[Sequence[Item]], list[str]]
  scenes: Callable[[Sequence[Item]], dict[tuple, Any]]
  build: Callable[..., chat_source.BuiltChat]
  lower: str
  info: Callable[..., dict[str, Any]]


@dataclasses.dataclass
class Prepared:
  """The built examples of both splits and what `RUN/<kind>_data.json` records."""

  train: chat_source.ChatExamples
  validation: chat_source.ChatExamples
  info: dict[str, Any]


def prepare(
  kind: Kind,
  settings: Any,
  *,
  vocab: Vocab,
  text_model: str,
  tokenizer_dir: str,
  seq_len: int,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
  batch_size: int = 256,
  progress: bool = True,
  log_fn=print,
) -> Prepared:
  """Builds the examples of both splits of `kind`.

  Args:
    kind: what to build (`chat_data.KIND`, `edit_data.KIND`).
    settings: its checked settings (`settings.items(split)` gives a split's items).
    vocab: the run's vocabulary.
    text_model: the run's SentencePiece model; it must round-trip every text.
    tokenizer_dir: the image tokenizer run that made the code shards.
    seq_len: tokens per training row.
  """
  start = time.perf_counter()
  items = {split: settings.items(split) for split in SPLITS}
  every = [item for split in SPLITS for item in items[split]]
  tokenizer = TextTokenizer.load(text_model)
  bad = chat_source.unwritable_texts(kind.texts(every), tokenizer)
  if bad:
    raise UserError(
      f"the text model {text_model} cannot write {len(bad)} {kind.texts_name} (e.g. {bad[0]!r} "
      f"reads back as {tokenizer.decode(tokenizer.encode(bad[0]))!r}); use a text model trained "
      "on them too: leave --config.data.text_model and --config.init_from empty"
    )
  run = TokenizerRun(tokenizer_dir)
  scenes = kind.scenes(every)
  codes = chat_source.encode_scenes(
    list(scenes.values()),
    run.encode,
    image_size=run.image_size,
    batch_size=batch_size,
    progress=progress and jax.process_index() == 0,
  )
  by_scene = dict(zip(scenes, codes))
  built = {
    split: kind.build(
      split_items,
      vocab,
      tokenizer,
      codes=by_scene,
      seq_len=seq_len,
      text_weight=text_weight,
      image_weight=image_weight,
    )
    for split, split_items in items.items()
  }
  for split, b in built.items():
    if b.dropped > MAX_DROPPED * len(b.kept) or not len(b.examples):
      raise UserError(
        f"{b.dropped} of {len(b.kept)} {split} {kind.name} examples are longer than "
        f"train.seq_len={seq_len}; set --config.train.seq_len={b.length_for(0.99)} (fits 99%) "
        f"or lower --config.data.{kind.name}.{kind.lower}"
      )
  seconds = time.perf_counter() - start
  log_fn(
    f"built {len(built['train'].examples)} + {len(built['validation'].examples)} {kind.name} "
    f"examples (train + validation; {built['train'].dropped} + {built['validation'].dropped} "
    f"longer than seq_len={seq_len} dropped, {len(scenes)} distinct images) in {seconds:.1f} s"
  )
  info = kind.info(settings, items, built, seq_len=seq_len, num_images=len(scenes))
  info["build_seconds"] = round(seconds, 2)
  return Prepared(built["train"].examples, built["validation"].examples, info)


def split_info(
  name: str,
  items: Mapping[str, Sequence[Item]],
  built: Mapping[str, chat_source.BuiltChat],
  *,
  pairs_used: Callable[[Sequence[Item]], set[tuple[str, str]]],
  counts: Callable[[Sequence[Item]], dict[str, Any]] | None = None,
) -> tuple[dict[str, dict], dict[str, set], set[tuple[str, str]]]:
  """Per split, what the kept items hold: `(splits, used, heldout)`.

  `splits[split]` counts `examples`, `requested`, `dropped_too_long`, `by_kind`, then
  `counts(kept items)` if given, and `max_length`; `used[split]` is `pairs_used(kept items)`;
  `heldout` the held-out colour-shape pairs (`shapes.HELDOUT_PAIRS`) any of them use: none, since
  the train and validation splits never draw them (an AssertionError otherwise).
  """
  splits, used = {}, {}
  for split, b in built.items():
    kept = [item for item, k in zip(items[split], b.kept) if k]
    used[split] = pairs_used(kept)
    splits[split] = {
      "examples": len(kept),
      "requested": len(b.kept),
      "dropped_too_long": b.dropped,
      "by_kind": dict(sorted(Counter(item["kind"] for item in kept).items())),
      **(counts(kept) if counts else {}),
      "max_length": int(b.lengths.max()),
    }
  heldout = (used["train"] | used["validation"]) & set(shapes.HELDOUT_PAIRS)
  if heldout:
    raise AssertionError(f"{name} examples use the held-out pairs {sorted(heldout)}")
  return splits, used, heldout


def write_info(workdir: str, filename: str, info: Mapping[str, Any]) -> str:
  """Writes `RUN/<filename>` (process 0; atomically) and returns its path."""
  path = os.path.join(workdir, filename)
  if jax.process_index() == 0:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(dict(info), f, indent=2)
    os.replace(tmp, path)
  return path


# ---- checking `config.data.<name>` ---------------------------------------------------------------


def check_kinds(c: ml_collections.ConfigDict, name: str, known: Sequence[str]) -> tuple[str, ...]:
  """`c.kinds` (a comma-separated string or a list) as a tuple of known kinds; a one-line
  UserError naming the flag otherwise."""
  kinds = c.kinds.split(",") if isinstance(c.kinds, str) else list(c.kinds)
  kinds = tuple(k.strip() for k in kinds if k.strip())
  bad = [k for k in kinds if k not in known]
  if bad or not kinds:
    raise UserError(
      f"config.data.{name}.kinds={c.kinds!r} has unknown kinds {bad}; pick from "
      f"{','.join(known)}, e.g. --config.data.{name}.kinds={','.join(known)}"
    )
  return kinds


def check_integers(
  c: ml_collections.ConfigDict,
  name: str,
  fields: Sequence[tuple[str, int, int]],
  *,
  allow_bool: bool = False,
) -> None:
  """Each `(field, least, example)`: `c[field]` must be an integer >= least (True and False are
  not integers unless `allow_bool`); a one-line UserError naming the flag otherwise."""
  for field, least, example in fields:
    value = c[field]
    if not isinstance(value, int) or (isinstance(value, bool) and not allow_bool) or value < least:
      raise UserError(
        f"config.data.{name}.{field}={value!r} must be an integer >= {least}; e.g. "
        f"--config.data.{name}.{field}={example}"
      )


def check_objects(c: ml_collections.ConfigDict, name: str, *, example: int) -> tuple[int, int]:
  """`(c.min_objects, c.max_objects)`, checked: 1 <= min <= max <= the cells of a scene."""
  lo, hi = c.min_objects, c.max_objects
  if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= len(shapes.POSITIONS)):
    raise UserError(
      f"config.data.{name}.min_objects={lo!r}, max_objects={hi!r} need 1 <= min_objects <= "
      f"max_objects <= {len(shapes.POSITIONS)}; e.g. --config.data.{name}.max_objects={example}"
    )
  return lo, hi
