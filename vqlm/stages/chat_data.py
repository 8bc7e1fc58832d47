"""Instruction tuning (SFT) in the LM stage: `config.data.chat` -> chat examples mixed into the
training data, their validation loss, and `RUN/chat_data.json`.

With `config.data.chat.weight = w > 0` the vocabulary gains the chat specials (`<user>`,
`<assistant>`), `num_examples` shapes instructions (`vqlm.data.chat.conversation`, split
"train"; `validation_examples` of split "validation") are built once up front (each distinct
scene rendered at the image tokenizer's size and encoded by it once), and a fraction w of the
training examples are chat examples (`vqlm.data.chat_source.MixtureSource`). With w = 0 nothing
changes.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import ml_collections

from vqlm.data import chat, chat_source
from vqlm.errors import UserError
from vqlm.stages import prebuilt
from vqlm.vocab import CHAT_SPECIALS, Vocab

CHAT_DATA_FILE = "chat_data.json"
MIXTURE_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class ChatSettings:
  """`config.data.chat`, checked (see `vqlm.stages.lm_config`)."""

  weight: float
  num_examples: int
  validation_examples: int
  kinds: tuple[str, ...]
  min_objects: int
  max_objects: int
  seed: int
  restate: bool = False
  reason: bool = False
  focus: bool | str = False  # `chat.reply_focus`: False, True or "object"
  drop_request: float = 0.0

  def conversation(self, index: int, split: str) -> dict[str, Any]:
    return chat.conversation(
      index,
      seed=self.seed,
      split=split,
      kinds=self.kinds,
      min_objects=self.min_objects,
      max_objects=self.max_objects,
      restate=self.restate,
      reason=self.reason,
      focus=self.focus,
      drop_request=self.drop_request,
    )

  def items(self, split: str) -> list[dict[str, Any]]:
    n = self.num_examples if split == "train" else self.validation_examples
    return [self.conversation(i, split) for i in range(n)]


def settings(config: ml_collections.ConfigDict) -> ChatSettings | None:
  """The checked `config.data.chat`, or None when it is off (weight 0, or absent: a config saved
  before it existed). Bad values -> one-line UserError naming the flag."""
  c = config.data.get("chat")
  if c is None:
    return None
  flag = "--config.data.chat."
  weight = float(c.weight)
  if not 0.0 <= weight < 1.0:
    raise UserError(
      f"config.data.chat.weight={c.weight} must be in [0, 1) (the fraction of chat examples; "
      f"0 is off); e.g. {flag}weight=0.5"
    )
  kinds = prebuilt.check_kinds(c, "chat", chat.KINDS)
  # True and False pass as the integers 1 and 0 here (config.data.edit refuses them).
  prebuilt.check_integers(
    c,
    "chat",
    (("num_examples", 1, 20_000), ("validation_examples", 1, 256), ("seed", 0, 0)),
    allow_bool=True,
  )
  lo, hi = prebuilt.check_objects(c, "chat", example=3)
  restate, reason = c.get("restate", False), c.get("reason", False)
  focus = c.get("focus", False)
  for name, value in (("restate", restate), ("reason", reason), ("focus", focus)):
    if not isinstance(value, bool):
      raise UserError(f"config.data.chat.{name}={value!r} must be True or False")
  style = c.get("focus_style", "question")
  if style not in chat.FOCUS_STYLES:
    raise UserError(
      f"config.data.chat.focus_style={style!r}; use one of {chat.FOCUS_STYLES}, "
      f"e.g. {flag}focus_style=object"
    )
  if focus and not reason:
    raise UserError(
      "config.data.chat.focus=True needs reasoned replies; add --config.data.chat.reason=True"
    )
  drop_request = float(c.get("drop_request", 0.0))
  if not 0.0 <= drop_request < 1.0:
    raise UserError(
      f"config.data.chat.drop_request={c.get('drop_request')} must be in [0, 1) (the fraction "
      f"of draw instructions with no request); e.g. {flag}drop_request=0.1"
    )
  if weight == 0.0:
    return None
  return ChatSettings(
    weight=weight,
    num_examples=c.num_examples,
    validation_examples=c.validation_examples,
    kinds=kinds,
    min_objects=lo,
    max_objects=hi,
    seed=c.seed,
    restate=restate,
    reason=reason,
    focus=chat.reply_focus(c),
    drop_request=drop_request,
  )


def with_chat_specials(vocab: Vocab, *, existing: str | None = None) -> Vocab:
  """`vocab` with `<user>`/`<assistant>`. `existing`: the path of a saved vocab.json that must
  already hold them (its ids are fixed; a run cannot grow specials after training started)."""
  if all(s in vocab.specials for s in CHAT_SPECIALS):
    return vocab
  if existing is not None:
    raise UserError(
      f"{existing} has no <user>/<assistant> specials (the run was made without "
      "config.data.chat); tune into a new --workdir with --config.init_from=THIS_RUN"
    )
  return vocab.with_specials(CHAT_SPECIALS)


def corpus(chat_settings: ChatSettings, num: int) -> list[str]:
  """The texts of the first `num` training instructions (for a text model trained in the run)."""
  n = min(num, chat_settings.num_examples)
  return chat.texts(chat_settings.conversation(i, "train") for i in range(n))


def prepare(chat_settings: ChatSettings, **kwargs: Any) -> prebuilt.Prepared:
  """Builds the chat examples (`prebuilt.prepare` of `KIND`, same keyword arguments):
  instructions of both splits, their scene images rendered at the image tokenizer's size and
  encoded once per distinct scene, `chat.build`, padded to `seq_len` (too-long examples dropped;
  more than 5% dropped is an error naming the seq_len that fits 99%). `vocab` must hold the chat
  specials."""
  return prebuilt.prepare(KIND, chat_settings, **kwargs)


def _info(chat_settings, items, built, *, seq_len: int, num_images: int) -> dict[str, Any]:
  splits, used, heldout = prebuilt.split_info("chat", items, built, pairs_used=chat.pairs_used)
  return {
    "weight": chat_settings.weight,
    "kinds": list(chat_settings.kinds),
    "min_objects": chat_settings.min_objects,
    "max_objects": chat_settings.max_objects,
    "seed": chat_settings.seed,
    "restate": chat_settings.restate,
    "reason": chat_settings.reason,
    "focus": chat_settings.focus,
    "drop_request": chat_settings.drop_request,
    "seq_len": seq_len,
    "distinct_images": num_images,
    "splits": splits,
    "pairs_used": [list(p) for p in sorted(used["train"])],
    "validation_pairs_used": [list(p) for p in sorted(used["validation"])],
    "heldout_pairs_used": [list(p) for p in sorted(heldout)],
  }


KIND = prebuilt.Kind(
  name="chat",
  texts_name="instruction texts",
  texts=chat.texts,
  scenes=chat_source.distinct_scenes,
  build=chat_source.build_examples,
  lower="max_objects",
  info=_info,
)


def mixture(
  usual: Any,
  usual_transform: Any,
  examples: chat_source.ChatExamples,
  *,
  weight: float,
  seed: int,
) -> tuple[chat_source.MixtureSource, chat_source.MixtureTransform]:
  """The training source and transform: `usual` (with its transform) at weight 1 - w, the chat
  examples at w."""
  source = chat_source.MixtureSource(
    {"usual": usual, "chat": examples},
    {"usual": 1.0 - weight, "chat": weight},
    seed=seed,
    block=MIXTURE_BLOCK,
  )
  transform = chat_source.MixtureTransform({"usual": usual_transform, "chat": None})
  return source, transform


def write_info(workdir: str, info: Mapping[str, Any], source: chat_source.MixtureSource) -> str:
  """Writes `RUN/chat_data.json` (process 0) with the mixture's realised weights and length."""
  data = dict(info)
  data["mixture"] = {
    "weights_used": source.weights_used,
    "length": len(source),
    "usual_elements": len(source.parts["usual"]),
  }
  return prebuilt.write_info(workdir, CHAT_DATA_FILE, data)
