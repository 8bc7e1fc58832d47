"""Image-edit documents in the LM stage: `config.data.edit` -> edit examples built once, up front.

With an edit weight w > 0 in `config.data.mixture` (e.g. "t2i=0.4,i2t=0.4,edit=0.2"),
`num_examples` edit items (`vqlm.data.edits.edit_item`, split "train"; `validation_examples` of
split "validation") are built before training: each distinct scene is rendered at the image
tokenizer's size and encoded by it once, every item is laid out as `<bos> instruction <boi> src
<eoi> <boi> result <eoi> ... <eos>` (`edits.build`: loss only after the source image) and
padded to `train.seq_len`. The LM stage mixes them into the training rows at share w
(`vqlm.stages.lm_data`); with w = 0 (or no `config.data.edit`: a config saved before it existed)
nothing is built. The instructions must be writable by the run's text model: train it on
`texts(settings)` too.
"""

from collections import Counter
from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import ml_collections
import numpy as np

from vqlm.data import chat_source, edits, shapes
from vqlm.errors import UserError
from vqlm.stages import lm_data, prebuilt
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
  # How documents say each edit in words before its result (`edits.REASON_STYLES`); "": they
  # do not (`edits.reason`).
  reason: str = ""

  def item(self, index: int, split: str) -> dict[str, Any]:
    item = edits.edit_item(
      index,
      seed=self.seed,
      split=split,
      kinds=self.kinds,
      min_objects=self.min_objects,
      max_objects=self.max_objects,
      max_edits=self.max_edits,
    )
    return edits.with_reasons(item, self.reason) if self.reason else item

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
  kinds = prebuilt.check_kinds(c, "edit", edits.KINDS)
  prebuilt.check_integers(
    c,
    "edit",
    (
      ("num_examples", 1, 20_000),
      ("validation_examples", 1, 256),
      ("max_edits", 1, 1),
      ("seed", 0, 0),
    ),
  )
  lo, hi = prebuilt.check_objects(c, "edit", example=2)
  reason = c.get("reason", False)
  if not isinstance(reason, bool):
    raise UserError(f"--config.data.edit.reason={reason!r}: use true or false")
  style = c.get("reason_style", "scene")
  if style not in edits.REASON_STYLES:
    raise UserError(
      f"--config.data.edit.reason_style={style!r}: use one of {', '.join(edits.REASON_STYLES)}"
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
    reason=style if reason else "",
  )


def texts(edit_settings: EditSettings, num: int | None = None) -> list[str]:
  """The instructions of the first `num` training items (all by default), in order, repeats
  kept: a corpus for a text model trained in the run (with the captions)."""
  n = edit_settings.num_examples if num is None else min(num, edit_settings.num_examples)
  return edits.texts(edit_settings.item(i, "train") for i in range(n))


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

  def build(item):
    item = edits.with_codes(item, lambda scene: codes[shapes.canonical(scene)])
    return edits.build(item, vocab, tokenizer, text_weight=text_weight, image_weight=image_weight)

  return chat_source.build_padded(items, build, seq_len=seq_len, pad_id=vocab.pad_id)


def prepare(edit_settings: EditSettings, **kwargs: Any) -> prebuilt.Prepared:
  """Builds the edit examples of both splits (`prebuilt.prepare` of `KIND`, same keyword
  arguments): every distinct scene rendered at the image tokenizer's size and encoded once,
  `edits.build`, padded to `seq_len` (too-long examples dropped; more than 5% dropped is an error
  naming the seq_len that fits 99%)."""
  return prebuilt.prepare(KIND, edit_settings, **kwargs)


def _distinct_scenes(items: Sequence[Mapping[str, Any]]) -> dict[tuple, list[dict]]:
  """`{shapes.canonical(scene): scene}` of every scene of the items, first seen first."""
  scenes: dict[tuple, list[dict]] = {}
  for item in items:
    for scene in item["scenes"]:
      scenes.setdefault(shapes.canonical(scene), scene)
  return scenes


def _edits_by_kind(kept: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  counts = Counter(e["kind"] for item in kept for e in item["edits"])
  return {"edits_by_kind": dict(sorted(counts.items()))}


def _info(edit_settings, items, built, *, seq_len: int, num_images: int) -> dict[str, Any]:
  splits, used, heldout = prebuilt.split_info(
    "edit", items, built, pairs_used=edits.pairs_used, counts=_edits_by_kind
  )
  return {
    "weight": edit_settings.weight,
    "kinds": list(edit_settings.kinds),
    "max_edits": edit_settings.max_edits,
    "min_objects": edit_settings.min_objects,
    "max_objects": edit_settings.max_objects,
    "seed": edit_settings.seed,
    "reason": edit_settings.reason,
    "seq_len": seq_len,
    "distinct_images": num_images,
    "splits": splits,
    "pairs_used": [list(p) for p in sorted(used["train"])],
    "heldout_pairs_used": [list(p) for p in sorted(heldout)],
  }


KIND = prebuilt.Kind(
  name="edit",
  texts_name="edit instructions",
  texts=edits.texts,
  scenes=_distinct_scenes,
  build=build_examples,
  lower="max_edits",
  info=_info,
)


def write_info(workdir: str, info: Mapping[str, Any]) -> str:
  """Writes `RUN/edit_data.json` (process 0; atomically) and returns its path."""
  return prebuilt.write_info(workdir, EDIT_DATA_FILE, info)
