"""Instruction-following accuracy of a chat LM on shapes, judged exactly.

Draw requests (`chat.conversation(kinds=("draw",))`: "please draw a little red circle in the
middle and ...") are answered with images; each is parsed with the deterministic scene parser and
compared with the request's scene (`draw_accuracy`, the metrics of `text_image.text_to_image`).
Questions and description requests about an image (its codes in the user turn) are answered
with text: a question is right when the reply is exactly its one-phrase answer, a description when
`shapes.parse_caption` reads the reply back as the image's scene (`answer_accuracy`).

Evaluators (`config.evals`, stage "lm"; both refuse an LM without chat turns in one line):

    evals = {"chat_draw": {"type": "chat_draw", "split": "test_heldout", "cfg_scale": 2.0},
             "chat_qa": {"type": "chat_qa", "num_items": 200}}

Their items are `chat.conversation(i, seed=1000 + seed, split=...)`, not the instruction-tuning
items (split "train"); every result lists the colour-shape pairs its prompts used, and which of
them are held out of training (`shapes.HELDOUT_PAIRS`: every "test_heldout" scene has one).
"""

from collections.abc import Callable, Mapping, Sequence
import json
import os
from typing import Any

import numpy as np

from vqlm.data import chat, shapes
from vqlm.errors import UserError
from vqlm.eval import evaluators, scene_parser, text_image
from vqlm.sample import answer as sample_answer
from vqlm.sample import chat as sample_chat

QUESTION_KINDS = ("color", "shape", "size", "position", "count")
ITEM_SEED_OFFSET = 1000  # Evaluation items use seed 1000 + seed: not the tuning items.
ENCODE_BATCH = 256


def pairs_summary(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The colour-shape pairs the items use: `pairs_used` ("red circle", ...), those of them held
  out of training (`heldout_pairs_used`) and the fraction of items with a held-out pair."""
  heldout = set(shapes.HELDOUT_PAIRS)
  used = chat.pairs_used(items)
  with_heldout = [bool(chat.pairs_used([item]) & heldout) for item in items]
  return {
    "pairs_used": [f"{c} {s}" for c, s in sorted(used)],
    "heldout_pairs_used": [f"{c} {s}" for c, s in sorted(used & heldout)],
    "heldout_fraction": float(np.mean(with_heldout)) if items else 0.0,
  }


def _check_kinds(items: Sequence[Mapping[str, Any]], kinds: Sequence[str], what: str) -> None:
  if not items:
    raise UserError(f"{what} got no items; pass at least one chat.conversation item.")
  bad = next((i for i, item in enumerate(items) if item.get("kind") not in kinds), None)
  if bad is not None:
    raise UserError(
      f"{what}: item {bad} is a {items[bad].get('kind')!r} item; it scores {'/'.join(kinds)} "
      f"items (chat.conversation(..., kinds={tuple(kinds)}))."
    )


def draw_accuracy(
  generator: Any,
  items: Sequence[Mapping[str, Any]],
  *,
  num_per_prompt: int = 2,
  cfg_scale: float | None = None,
  sampling: Any = None,
  seed: int = 0,
  restate: bool = False,
  chat_uncond: bool = False,
) -> tuple[dict[str, Any], np.ndarray]:
  """Draws every request `num_per_prompt` times (`vqlm.sample.chat.draw`) and scores each image
  against its item's scene with the scene parser.

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM.
    items: `chat.conversation(..., kinds=("draw",))` items.
    restate: the model restates each request as a caption before drawing (`instruction_settings`);
      the metrics then also hold `restated`, the fraction of captions that are exactly the scene's.
    chat_uncond: guidance against an empty request (`vqlm.sample.chat.draw`; a model tuned with
      `data.chat.drop_request`).
  Returns:
    (metrics, images uint8 `[len(items) * num_per_prompt, H, W, 3]`): the metrics of
    `text_image.text_to_image` (`num_prompts`, `num_images`, `scene_parser.summarize`,
    `by_objects`) and `pairs_summary`.
  """
  _check_kinds(items, ("draw",), "draw_accuracy")
  requests = [[item["turns"][0]] for item in items]
  captions = sample_chat.restate(generator, requests) if restate else None
  images = sample_chat.draw(
    generator,
    requests,
    num_per_prompt=num_per_prompt,
    cfg_scale=cfg_scale,
    sampling=sampling,
    seed=seed,
    captions=captions,
    chat_uncond=chat_uncond,
  )
  results, counts = [], []
  for i, image in enumerate(images):
    truth = items[i // num_per_prompt]["scene"]
    results.append(scene_parser.compare(scene_parser.parse_image(image), truth))
    counts.append(len(truth))
  metrics = {
    "num_prompts": len(items),
    "num_images": len(images),
    **scene_parser.summarize(results),
    "by_objects": text_image._by_count(results, counts),
    **pairs_summary(items),
    **_restated(items, captions),
  }
  return metrics, images


def scene_encoder(generator: Any) -> Callable[[Sequence[Sequence[Mapping[str, Any]]]], list]:
  """`encode(scenes) -> [codes [h, w], ...]`: each scene rendered at the image tokenizer's size
  and encoded with `generator.encode_images` (distinct scenes once, in batches)."""
  size = int(generator.image_tokenizer.image_size)

  def encode(scenes):
    keys = [shapes.canonical(s) for s in scenes]
    distinct = list(dict.fromkeys(keys))
    codes = {}
    for start in range(0, len(distinct), ENCODE_BATCH):
      chunk = distinct[start : start + ENCODE_BATCH]
      images = np.stack([shapes.render(chat.SceneImage(k).objects(), size) for k in chunk])
      codes.update(zip(chunk, generator.encode_images(images)))
    return [codes[k] for k in keys]

  return encode


def with_image_codes(generator: Any, items: Sequence[Mapping[str, Any]]) -> list[list[dict]]:
  """The user turn of each item with its `SceneImage`s replaced by the image tokenizer's codes."""
  scenes = [
    p.objects()
    for item in items
    for p in item["turns"][0]["parts"]
    if isinstance(p, chat.SceneImage)
  ]
  codes = dict(zip((shapes.canonical(s) for s in scenes), scene_encoder(generator)(scenes)))
  return [
    chat.with_codes(item["turns"][:1], lambda s: codes[shapes.canonical(s)]) for item in items
  ]


def is_right(item: Mapping[str, Any], reply: str) -> bool:
  """A question's answer is exactly the item's (stripped; after the description of a reasoned
  reply, `chat.final_answer`); a description parses back (`shapes.parse_caption`) into the item's
  scene."""
  reply = reply.strip()
  if item["kind"] == "describe":
    parsed = shapes.parse_caption(reply)
    return parsed is not None and shapes.canonical(parsed) == shapes.canonical(item["scene"])
  return chat.final_answer(reply) == item["answer"]


def answer_accuracy(
  generator: Any,
  items: Sequence[Mapping[str, Any]],
  *,
  batch_size: int | None = None,
  max_len: int = 48,
  choose_answer: bool = False,
) -> tuple[dict[str, Any], list[str]]:
  """Greedy replies (`vqlm.sample.chat.reply`) to "question" / "describe" items, scored exactly.

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM.
    items: `chat.conversation(..., kinds=("question", "describe"))` items; their images are
      rendered and encoded (`with_image_codes`).
    max_len: most ids per reply.
    choose_answer: the answer of each reasoned reply is chosen among what its caption says by the
      model's likelihood (`vqlm.sample.answer.choose_answers`); `free_accuracy` then says how
      often the greedy replies were right.
  Returns:
    (metrics, replies): `accuracy` over all items, the accuracy per question kind (`color`,
    `shape`, `size`, `position`, `count`) and of `describe` (groups present only), `num_items`,
    `counts` (items per group), `describe_parseable` (the fraction of descriptions that are valid
    captions), `free_accuracy` when choosing, and `pairs_summary`.
  """
  _check_kinds(items, ("question", "describe"), "answer_accuracy")
  conversations = with_image_codes(generator, items)
  free = None
  if choose_answer:
    replies, free = sample_answer.choose_answers(
      generator, conversations, batch_size=batch_size, max_len=max_len
    )
  else:
    replies = sample_chat.reply(generator, conversations, batch_size=batch_size, max_len=max_len)
  right = [is_right(item, r) for item, r in zip(items, replies)]
  groups: dict[str, list[bool]] = {}
  for item, ok in zip(items, right):
    group = item["kind"] if item["kind"] == "describe" else item.get("question_kind")
    if group not in QUESTION_KINDS + ("describe",):
      raise UserError(f"question item without a question_kind ({item['turns'][0]['parts']}).")
    groups.setdefault(group, []).append(ok)
  order = [g for g in QUESTION_KINDS + ("describe",) if g in groups]
  metrics: dict[str, Any] = {
    "num_items": len(items),
    "accuracy": float(np.mean(right)),
    **{g: float(np.mean(groups[g])) for g in order},
    "counts": {g: len(groups[g]) for g in order},
  }
  if free is not None:
    metrics["free_accuracy"] = float(np.mean([is_right(it, r) for it, r in zip(items, free)]))
  described = [r for item, r in zip(items, replies) if item["kind"] == "describe"]
  if described:
    metrics["describe_parseable"] = float(
      np.mean([shapes.parse_caption(r) is not None for r in described])
    )
  metrics.update(pairs_summary(items))
  return metrics, replies


# ---- evaluators ---------------------------------------------------------------------------------


def request_items(
  num: int,
  *,
  split: str,
  seed: int = 0,
  kinds: Sequence[str] = ("draw",),
  min_objects: int = 1,
  max_objects: int = 3,
) -> list[dict]:
  """The items the chat evaluators of `seed` use: `chat.conversation(i, seed=ITEM_SEED_OFFSET +
  seed, ...)` for i < num (never the tuning items, whose seeds are small)."""
  return list(
    chat.conversations(
      num,
      seed=ITEM_SEED_OFFSET + int(seed),
      split=split,
      kinds=tuple(kinds),
      min_objects=min_objects,
      max_objects=max_objects,
    )
  )


def _items(settings: Mapping[str, Any], num: int, kinds: Sequence[str]) -> list[dict]:
  return request_items(
    num,
    split=settings["split"],
    seed=settings["seed"],
    kinds=kinds,
    min_objects=settings["min_objects"],
    max_objects=settings["max_objects"],
  )


def _write_json(artefacts: str, name: str, value: Any) -> None:
  os.makedirs(artefacts, exist_ok=True)
  with open(os.path.join(artefacts, name), "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)


def instruction_settings(config: Any) -> Mapping[str, Any]:
  """The `data.chat` settings a chat LM was instruction-tuned with: its config's, or those of the
  run it was tuned from (`init_from`, followed back to the instruction-tuned run); {} if none.
  They say how to sample it: `restate` (requests restated before drawing), `drop_request` > 0
  (guidance against an empty request)."""
  from vqlm import runs

  seen = set()
  while config is not None:
    chat_config = (config.get("data") or {}).get("chat") if "data" in config else None
    if chat_config is not None and float(chat_config.get("weight", 0.0)) > 0:
      return chat_config
    source = config.get("init_from")
    if not source or source in seen:
      return {}
    seen.add(source)
    try:
      config = runs.load_config(source)
    except FileNotFoundError:
      return {}
  return {}


def run_restates(run: Any) -> bool:
  """Whether a chat LM run restates requests before drawing (`instruction_settings`)."""
  return bool(instruction_settings(run.config).get("restate", False))


def run_chat_uncond(config: Any) -> bool:
  """Whether a chat LM run learnt to draw with no request (`data.chat.drop_request` > 0), so
  guidance for chat drawing is against an empty request."""
  return float(instruction_settings(config).get("drop_request", 0.0)) > 0


def _restated(items: Sequence[Mapping[str, Any]], captions: Sequence[str] | None) -> dict:
  if captions is None:
    return {}
  right = [c == shapes.caption(item["scene"]) for item, c in zip(items, captions)]
  return {"restated": float(np.mean(right)), "captions": list(captions)}


class ChatDraw(evaluators._Generation):
  """Draw requests of `split` ("test" or "test_heldout"), `images_per_prompt` images each, judged
  by the scene parser (`draw_accuracy`); artefacts: a grid of the first 12 requests' images
  (`NAME.png`) and their texts (`NAME.json`). `restate` None: as the run was tuned
  (`run_restates`)."""

  SPLITS = ("test", "test_heldout")

  def __init__(
    self,
    *,
    split: str = "test",
    num_prompts: int = 100,
    images_per_prompt: int = 2,
    min_objects: int = 1,
    max_objects: int = 3,
    restate: bool | None = None,
    **kwargs,
  ):
    if split not in self.SPLITS:
      raise UserError(f"chat_draw split={split!r}; use one of {self.SPLITS}")
    super().__init__(
      split=split, num_prompts=num_prompts, images_per_prompt=images_per_prompt, **kwargs
    )
    self.settings.update(min_objects=min_objects, max_objects=max_objects, restate=restate)

  def run(self, run, artefacts=None):
    from vqlm import imaging

    sample_chat.require_chat_vocab(run.vocab)
    evaluators._shapes_data(run)
    s = self.settings
    items = _items(s, s["num_prompts"], ("draw",))
    restate = run_restates(run) if s["restate"] is None else bool(s["restate"])
    metrics, images = draw_accuracy(
      run.generator(batch_size=s["batch_size"]),
      items,
      num_per_prompt=s["images_per_prompt"],
      cfg_scale=s["cfg_scale"],
      sampling=evaluators._sampling(s["temperature"], s["top_k"]),
      seed=s["seed"],
      restate=restate,
      chat_uncond=run_chat_uncond(run.config),
    )
    metrics["split"] = s["split"]
    metrics["settings"] = {
      "image_temperature": s["temperature"],
      "image_top_k": s["top_k"],
      "cfg_scale": s["cfg_scale"],
    }
    if artefacts:
      name = s.get("name", "chat_draw")
      shown = min(12, len(items))
      os.makedirs(artefacts, exist_ok=True)
      grid = imaging.make_grid(
        images[: shown * s["images_per_prompt"]], columns=s["images_per_prompt"], scale=3
      )
      imaging.save_png(grid, os.path.join(artefacts, f"{name}.png"))
      texts = [p for item in items[:shown] for p in item["turns"][0]["parts"]]
      _write_json(artefacts, f"{name}.json", texts)
    return metrics


class ChatQA(evaluators.Evaluator):
  """Questions and description requests about images of `split` (`answer_accuracy`, greedy
  replies; `choose_answer`: each reasoned reply's answer chosen by the model's likelihood, and
  `free_accuracy` beside it); artefacts: every item's request, truth and reply (`NAME.json`)."""

  stage = "lm"

  def __init__(
    self,
    *,
    split: str = "test",
    num_items: int = 200,
    kinds: str | Sequence[str] = "question,describe",
    min_objects: int = 1,
    max_objects: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    max_len: int = 48,
    choose_answer: bool = False,
    log_fn=print,
  ):
    kinds = evaluators._names(kinds)
    if not kinds or any(k not in ("question", "describe") for k in kinds):
      raise UserError(f"chat_qa kinds={','.join(kinds)!r}; use 'question', 'describe' or both")
    if split not in shapes.SPLITS:
      raise UserError(f"chat_qa split={split!r}; use one of {shapes.SPLITS}")
    super().__init__(
      log_fn,
      split=split,
      num_items=num_items,
      kinds=kinds,
      min_objects=min_objects,
      max_objects=max_objects,
      seed=seed,
      batch_size=batch_size,
      max_len=max_len,
      choose_answer=bool(choose_answer),
    )

  def run(self, run, artefacts=None):
    sample_chat.require_chat_vocab(run.vocab)
    evaluators._shapes_data(run)
    s = self.settings
    items = _items(s, s["num_items"], s["kinds"])
    metrics, replies = answer_accuracy(
      run.generator(batch_size=s["batch_size"]),
      items,
      max_len=s["max_len"],
      choose_answer=s.get("choose_answer", False),
    )
    metrics["split"] = s["split"]
    if artefacts:
      rows = [
        {
          "kind": item["question_kind"] or item["kind"],
          "request": next(p for p in item["turns"][0]["parts"] if isinstance(p, str)),
          "truth": item["answer"],
          "reply": reply,
          "right": is_right(item, reply),
        }
        for item, reply in zip(items, replies)
      ]
      _write_json(artefacts, f"{s.get('name', 'chat_qa')}.json", rows)
    return metrics
