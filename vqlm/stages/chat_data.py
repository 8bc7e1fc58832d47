"""Instruction tuning (SFT) in the LM stage: `config.data.chat` -> chat examples mixed into the
training data, their validation loss, and `RUN/chat_data.json`.

With `config.data.chat.weight = w > 0` the vocabulary gains the chat specials (`<user>`,
`<assistant>`), `num_examples` shapes instructions (`vqlm.data.chat.conversation`, split
"train"; `validation_examples` of split "validation") are built once up front (each distinct
scene rendered at the image tokenizer's size and encoded by it once), and a fraction w of the
training examples are chat examples (`vqlm.data.chat_source.MixtureSource`). With w = 0 nothing
changes.
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

from vqlm.data import chat, chat_source, shapes
from vqlm.errors import UserError
from vqlm.runs import TokenizerRun
from vqlm.text import TextTokenizer
from vqlm.vocab import CHAT_SPECIALS, Vocab

CHAT_DATA_FILE = "chat_data.json"
MIXTURE_BLOCK = 1024
MAX_DROPPED = 0.05  # the largest fraction of chat examples that may be dropped as too long


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

  def conversation(self, index: int, split: str) -> dict[str, Any]:
    return chat.conversation(
      index,
      seed=self.seed,
      split=split,
      kinds=self.kinds,
      min_objects=self.min_objects,
      max_objects=self.max_objects,
      restate=self.restate,
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
  kinds = c.kinds.split(",") if isinstance(c.kinds, str) else list(c.kinds)
  kinds = tuple(k.strip() for k in kinds if k.strip())
  bad = [k for k in kinds if k not in chat.KINDS]
  if bad or not kinds:
    raise UserError(
      f"config.data.chat.kinds={c.kinds!r} has unknown kinds {bad}; pick from "
      f"{','.join(chat.KINDS)}, e.g. {flag}kinds={','.join(chat.KINDS)}"
    )
  for name, least, example in (
    ("num_examples", 1, 20_000),
    ("validation_examples", 1, 256),
    ("seed", 0, 0),
  ):
    value = c[name]
    if not isinstance(value, int) or value < least:
      raise UserError(
        f"config.data.chat.{name}={value!r} must be an integer >= {least}; e.g. "
        f"{flag}{name}={example}"
      )
  lo, hi = c.min_objects, c.max_objects
  if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= len(shapes.POSITIONS)):
    raise UserError(
      f"config.data.chat.min_objects={lo!r}, max_objects={hi!r} need 1 <= min_objects <= "
      f"max_objects <= {len(shapes.POSITIONS)}; e.g. {flag}max_objects=3"
    )
  restate = c.get("restate", False)
  if not isinstance(restate, bool):
    raise UserError(f"config.data.chat.restate={restate!r} must be True or False")
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


@dataclasses.dataclass
class ChatData:
  """The built chat examples of both splits and what `chat_data.json` records."""

  train: chat_source.ChatExamples
  validation: chat_source.ChatExamples
  info: dict[str, Any]


def prepare(
  chat_settings: ChatSettings,
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
) -> ChatData:
  """Builds the chat examples: instructions of both splits, their scene images rendered at the
  image tokenizer's size and encoded once per distinct scene, `chat.build`, padded to `seq_len`
  (too-long examples dropped; more than 5% dropped is an error naming the seq_len that fits 99%).

  Args:
    chat_settings: `settings(config)`.
    vocab: the run's vocabulary (with the chat specials).
    text_model: the run's SentencePiece model; it must round-trip every instruction text.
    tokenizer_dir: the image tokenizer run that made the code shards.
    seq_len: tokens per training row.
  """
  start = time.perf_counter()
  items = {s: chat_settings.items(s) for s in ("train", "validation")}
  tokenizer = TextTokenizer.load(text_model)
  texts = chat.texts(items["train"] + items["validation"])
  bad = chat_source.unwritable_texts(texts, tokenizer)
  if bad:
    raise UserError(
      f"the text model {text_model} cannot write {len(bad)} instruction texts (e.g. "
      f"{bad[0]!r} reads back as {tokenizer.decode(tokenizer.encode(bad[0]))!r}); use a text "
      "model trained on them too: leave --config.data.text_model and --config.init_from empty"
    )
  run = TokenizerRun(tokenizer_dir)
  scenes = chat_source.distinct_scenes(items["train"] + items["validation"])
  codes = chat_source.encode_scenes(
    list(scenes.values()),
    run.encode,
    image_size=run.image_size,
    batch_size=batch_size,
    progress=progress and jax.process_index() == 0,
  )
  by_scene = dict(zip(scenes, codes))
  built = {
    split: chat_source.build_examples(
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
        f"{b.dropped} of {len(b.kept)} {split} chat examples are longer than train.seq_len="
        f"{seq_len}; set --config.train.seq_len={b.length_for(0.99)} (fits 99%) or lower "
        "--config.data.chat.max_objects"
      )
  seconds = time.perf_counter() - start
  log_fn(
    f"built {len(built['train'].examples)} + {len(built['validation'].examples)} chat examples "
    f"(train + validation; {built['train'].dropped} + {built['validation'].dropped} longer than "
    f"seq_len={seq_len} dropped, {len(scenes)} distinct images) in {seconds:.1f} s"
  )
  info = _info(chat_settings, items, built, seq_len=seq_len, num_images=len(scenes))
  info["build_seconds"] = round(seconds, 2)
  return ChatData(built["train"].examples, built["validation"].examples, info)


def _info(chat_settings, items, built, *, seq_len: int, num_images: int) -> dict[str, Any]:
  splits, used = {}, {}
  for split, b in built.items():
    kept = [item for item, k in zip(items[split], b.kept) if k]
    used[split] = chat.pairs_used(kept)
    splits[split] = {
      "examples": len(kept),
      "requested": len(b.kept),
      "dropped_too_long": b.dropped,
      "by_kind": dict(sorted(Counter(item["kind"] for item in kept).items())),
      "max_length": int(b.lengths.max()),
    }
  heldout = (used["train"] | used["validation"]) & set(shapes.HELDOUT_PAIRS)
  if heldout:  # The train and validation splits never draw them (shapes.sample_scene).
    raise AssertionError(f"chat examples use the held-out pairs {sorted(heldout)}")
  return {
    "weight": chat_settings.weight,
    "kinds": list(chat_settings.kinds),
    "min_objects": chat_settings.min_objects,
    "max_objects": chat_settings.max_objects,
    "seed": chat_settings.seed,
    "restate": chat_settings.restate,
    "seq_len": seq_len,
    "distinct_images": num_images,
    "splits": splits,
    "pairs_used": [list(p) for p in sorted(used["train"])],
    "validation_pairs_used": [list(p) for p in sorted(used["validation"])],
    "heldout_pairs_used": [list(p) for p in sorted(heldout)],
  }


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
  path = os.path.join(workdir, CHAT_DATA_FILE)
  data = dict(info)
  data["mixture"] = {
    "weights_used": source.weights_used,
    "length": len(source),
    "usual_elements": len(source.parts["usual"]),
  }
  if jax.process_index() == 0:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2)
    os.replace(tmp, path)
  return path
