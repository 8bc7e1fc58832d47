"""Image-edit documents in the LM stage: `config.data.edit` -> edit examples built once, up front.

With an edit weight w > 0 in `config.data.mixture` (e.g. "t2i=0.4,i2t=0.4,edit=0.2"),
`num_examples` edit items (`vqlm.data.edits.edit_item`, split "train"; `validation_examples` of
split "validation") are built before training: each distinct scene is rendered at the image
tokenizer's size and encoded by it once, every item is laid out as `<bos> <boi> src <eoi>
instruction <boi> result <eoi> ... <eos>` (`edits.build`: loss only after the source image) and
padded to `train.seq_len`. The LM stage mixes them into the training rows at share w
(`vqlm.stages.lm_data`); with w = 0 (or no `config.data.edit`: a config saved before it existed)
nothing is built. The instructions must be writable by the run's text model: train it on
`texts(settings)` too.
"""

from collections import Counter
from collections.abc import Mapping
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vqlm.data import chat_source, edits, shapes
from vqlm.errors import UserError
from vqlm.runs import TokenizerRun
from vqlm.stages import lm_data
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

EDIT_DATA_FILE = "edit_data.json"
MAX_DROPPED = 0.05  # the largest fraction of edit examples that may be dropped as too long


@dataclasses.dataclass(frozen=True)
class EditSettings:
  """`config.data.edit` and the edit weight of `config.data.mixture`, checked."""

  weight: float
  num_examples: int
  validation_examples: int
  max_edits: int
  kinds: tuple[str, ...]
  min_objects: int
  max_objects: int
  seed: int

  def item(self, index: int, split: str) -> dict[str, Any]:
    return edits.edit_item(
      index,
      seed=self.seed,
      split=split,
      kinds=self.kinds,
      min_objects=self.min_objects,
      max_objects=self.max_objects,
      max_edits=self.max_edits,
    )

  def items(self, split: str) -> list[dict[str, Any]]:
    n = self.num_examples if split == "train" else self.validation_examples
    return [self.item(i, split) for i in range(n)]


def settings(config: ml_collections.ConfigDict) -> EditSettings | None:
  """The checked edit settings, or None when off (the mixture gives edit weight 0, or the config
  has no `data.edit`: saved before it existed). Bad values -> one-line UserError naming the flag
  (`lm_data.mixture_weights` checks the mixture)."""
  c = config.data.get("edit")
  if c is None:
    return None
  weight = lm_data.mixture_weights(config)["edit"]
  flag = "--config.data.edit."
  kinds = c.kinds.split(",") if isinstance(c.kinds, str) else list(c.kinds)
  kinds = tuple(k.strip() for k in kinds if k.strip())
  bad = [k for k in kinds if k not in edits.KINDS]
  if bad or not kinds:
    raise UserError(
      f"config.data.edit.kinds={c.kinds!r} has unknown kinds {bad}; pick from "
      f"{','.join(edits.KINDS)}, e.g. {flag}kinds={','.join(edits.KINDS)}"
    )
  for name, least, example in (
    ("num_examples", 1, 20_000),
    ("validation_examples", 1, 256),
    ("max_edits", 1, 1),
    ("seed", 0, 0),
  ):
    value = c[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise UserError(
        f"config.data.edit.{name}={value!r} must be an integer >= {least}; e.g. "
        f"{flag}{name}={example}"
      )
  lo, hi = c.min_objects, c.max_objects
  if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= len(shapes.POSITIONS)):
    raise UserError(
      f"config.data.edit.min_objects={lo!r}, max_objects={hi!r} need 1 <= min_objects <= "
      f"max_objects <= {len(shapes.POSITIONS)}; e.g. {flag}max_objects=2"
    )
  if weight == 0:
    return None
  return EditSettings(
    weight=float(weight),
    num_examples=c.num_examples,
    validation_examples=c.validation_examples,
    max_edits=c.max_edits,
    kinds=kinds,
    min_objects=lo,
    max_objects=hi,
    seed=c.seed,
  )


def texts(edit_settings: EditSettings, num: int | None = None) -> list[str]:
  """The instructions of the first `num` training items (all by default), in order, repeats
  kept: a corpus for a text model trained in the run (with the captions)."""
  n = edit_settings.num_examples if num is None else min(num, edit_settings.num_examples)
  return edits.texts(edit_settings.item(i, "train") for i in range(n))


@dataclasses.dataclass
class EditData:
  """The built edit examples of both splits and what `edit_data.json` records."""

  train: chat_source.ChatExamples
  validation: chat_source.ChatExamples
  info: dict[str, Any]


def build_examples(
  items: list[Mapping[str, Any]],
  vocab: Vocab,
  tokenizer: TextTokenizer,
  *,
  codes: Mapping[tuple, np.ndarray],
  seq_len: int,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
) -> chat_source.BuiltChat:
  """Edit items -> padded LM examples (`edits.build`); `codes` maps `shapes.canonical(scene)` to
  the scene's codes `[h, w]`; items longer than `seq_len` are dropped (`kept` is False)."""
  examples, kinds = [], []
  kept = np.zeros(len(items), bool)
  lengths = np.zeros(len(items), np.int64)
  for i, item in enumerate(items):
    item = edits.with_codes(item, lambda scene: codes[shapes.canonical(scene)])
    example = edits.build(
      item, vocab, tokenizer, text_weight=text_weight, image_weight=image_weight
    )
    lengths[i] = len(example["tokens"])
    if lengths[i] <= seq_len:
      kept[i] = True
      examples.append(example)
      kinds.append(item["kind"])
  padded = chat_source.ChatExamples.from_examples(
    examples, seq_len, pad_id=vocab.pad_id, kinds=kinds
  )
  return chat_source.BuiltChat(padded, kept, lengths)


def prepare(
  edit_settings: EditSettings,
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
) -> EditData:
  """Builds the edit examples of both splits: every distinct scene rendered at the image
  tokenizer's size and encoded once, `edits.build`, padded to `seq_len` (too-long examples
  dropped; more than 5% dropped is an error naming the seq_len that fits 99%).

  Args:
    edit_settings: `settings(config)`.
    vocab: the run's vocabulary.
    text_model: the run's SentencePiece model; it must round-trip every instruction.
    tokenizer_dir: the image tokenizer run that made the code shards.
    seq_len: tokens per training row.
  """
  start = time.perf_counter()
  items = {s: edit_settings.items(s) for s in ("train", "validation")}
  tokenizer = TextTokenizer.load(text_model)
  bad = chat_source.unwritable_texts(edits.texts(items["train"] + items["validation"]), tokenizer)
  if bad:
    raise UserError(
      f"the text model {text_model} cannot write {len(bad)} edit instructions (e.g. {bad[0]!r} "
      f"reads back as {tokenizer.decode(tokenizer.encode(bad[0]))!r}); use a text model trained "
      "on them too: leave --config.data.text_model and --config.init_from empty"
    )
  run = TokenizerRun(tokenizer_dir)
  scenes: dict[tuple, list[dict]] = {}
  for item in items["train"] + items["validation"]:
    for scene in item["scenes"]:
      scenes.setdefault(shapes.canonical(scene), scene)
  codes = chat_source.encode_scenes(
    list(scenes.values()),
    run.encode,
    image_size=run.image_size,
    batch_size=batch_size,
    progress=progress and jax.process_index() == 0,
  )
  by_scene = dict(zip(scenes, codes))
  built = {
    split: build_examples(
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
        f"{b.dropped} of {len(b.kept)} {split} edit examples are longer than train.seq_len="
        f"{seq_len}; set --config.train.seq_len={b.length_for(0.99)} (fits 99%) or lower "
        "--config.data.edit.max_edits"
      )
  seconds = time.perf_counter() - start
  log_fn(
    f"built {len(built['train'].examples)} + {len(built['validation'].examples)} edit examples "
    f"(train + validation; {built['train'].dropped} + {built['validation'].dropped} longer than "
    f"seq_len={seq_len} dropped, {len(scenes)} distinct images) in {seconds:.1f} s"
  )
  info = _info(edit_settings, items, built, seq_len=seq_len, num_images=len(scenes))
  info["build_seconds"] = round(seconds, 2)
  return EditData(built["train"].examples, built["validation"].examples, info)


def _info(edit_settings, items, built, *, seq_len: int, num_images: int) -> dict[str, Any]:
  splits, used = {}, {}
  for split, b in built.items():
    kept = [item for item, k in zip(items[split], b.kept) if k]
    used[split] = edits.pairs_used(kept)
    splits[split] = {
      "examples": len(kept),
      "requested": len(b.kept),
      "dropped_too_long": b.dropped,
      "by_kind": dict(sorted(Counter(item["kind"] for item in kept).items())),
      "edits_by_kind": dict(
        sorted(Counter(e["kind"] for item in kept for e in item["edits"]).items())
      ),
      "max_length": int(b.lengths.max()),
    }
  heldout = (used["train"] | used["validation"]) & set(shapes.HELDOUT_PAIRS)
  if heldout:  # edits.edit_item never draws them outside "test_heldout".
    raise AssertionError(f"edit examples use the held-out pairs {sorted(heldout)}")
  return {
    "weight": edit_settings.weight,
    "kinds": list(edit_settings.kinds),
    "max_edits": edit_settings.max_edits,
    "min_objects": edit_settings.min_objects,
    "max_objects": edit_settings.max_objects,
    "seed": edit_settings.seed,
    "seq_len": seq_len,
    "distinct_images": num_images,
    "splits": splits,
    "pairs_used": [list(p) for p in sorted(used["train"])],
    "heldout_pairs_used": [list(p) for p in sorted(heldout)],
  }


def write_info(workdir: str, info: Mapping[str, Any]) -> str:
  """Writes `RUN/edit_data.json` (process 0; atomically) and returns its path."""
  path = os.path.join(workdir, EDIT_DATA_FILE)
  if jax.process_index() == 0:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(dict(info), f, indent=2)
    os.replace(tmp, path)
  return path
