"""Image-editing accuracy of an LM trained on edit documents (`vqlm.data.edits`), judged exactly.

Each item is one edit of a shapes scene ("move the red circle to the right", "make the red circle
blue", "add a small green triangle at the bottom", "remove the red circle"): the source scene is
rendered at the image tokenizer's size and encoded, the LM is prompted with
`<bos> instruction <boi> src <eoi> <boi>` and draws exactly one image, and the image is right when
the scene parser reads it as the edited scene exactly (every object's colour, shape, size and
cell; `edits.apply` is the truth). An LM trained on reasoned edits (`config.data.edit.reason`) is
prompted without the last `<boi>`, writes its reason (greedy; `edits.reason`), then draws. With
reasons in the "caption_change" style and `choose_object` (the default), the object the reason
says the edit acts on is chosen among the objects of the model's own caption by the model's
likelihood (`vqlm.sample.edit`); `choose_object=False` measures the greedy reason alone.

Evaluator (`config.evals`, stage "lm"):

    evals = {"edit": {"type": "edit", "split": "test", "num_items": 200},
             "edit_heldout": {"type": "edit", "split": "test_heldout"}}

Metrics: `accuracy`, `by_kind` (accuracy per edit kind present), `counts`, `unchanged` (the
fraction of images that are the source scene again), `num_items`, `heldout_fraction`; with
reasons, `reason_right` (the scene the reason says, `edits.reasoned_scene`, is the edited one) and
`drawn_as_said` (the image is the scene the reason says), and when choosing, `free_reason_right`
(`reason_right` of the greedy reasons the choice started from).
"test_heldout" items hold a colour-shape pair never seen in training (`shapes.HELDOUT_PAIRS`) in
the source or the result.
Artefacts: `edit_<split>.json` (every item: instruction, source, truth, parsed scene, verdict) and
`edit_<split>.png` (rows of source | generated | true for the first 12 items).
"""

from collections.abc import Mapping, Sequence
import os
from typing import Any

import numpy as np

from vqlm.data import edits, shapes
from vqlm.errors import UserError
from vqlm.eval import chat_eval, evaluators, scene_parser
from vqlm.sample import edit as sample_edit

SPLITS = ("test", "test_heldout")
SHOWN = 12  # items in the png grid


def eval_items(
  num: int,
  *,
  split: str = "test",
  seed: int = 0,
  kinds: Sequence[str] = edits.KINDS,
  min_objects: int = 1,
  max_objects: int = 2,
) -> list[dict[str, Any]]:
  """The single-edit items the evaluator scores: `edits.edit_item(i, max_edits=1, ...)`."""
  return [
    edits.edit_item(
      i,
      seed=seed,
      split=split,
      kinds=tuple(kinds),
      min_objects=min_objects,
      max_objects=max_objects,
      max_edits=1,
    )
    for i in range(num)
  ]


def same_scene(a: Sequence[Mapping[str, str]], b: Sequence[Mapping[str, str]]) -> bool:
  """The scenes hold the same objects (as sets: order does not matter)."""
  return shapes.canonical(a) == shapes.canonical(b)


def is_right(image: np.ndarray, truth: Sequence[Mapping[str, str]]) -> bool:
  """The scene parser reads `image` (uint8 `[H, W, 3]`) as exactly the scene `truth`."""
  return same_scene(scene_parser.parse_image(image), truth)


def edit_accuracy(
  generator: Any,
  items: Sequence[Mapping[str, Any]],
  *,
  sampling: Any = None,
  seed: int = 0,
  batch_size: int | None = None,
  reason: bool | str = False,
  choose_object: bool = False,
) -> tuple[dict[str, Any], np.ndarray, list[list[dict]], list[str] | None]:
  """Draws one result image per single-edit item and judges it.

  Args:
    generator: a `vqlm.sample.api.Generator` (`encode_images`, `draw_ids`, `vocab`,
      `text_tokenizer`, `image_tokenizer.image_size`).
    items: `edits.edit_item(..., max_edits=1)` items.
    sampling: the image sampling settings (`draw_ids`'); seed: row i draws with `(seed, i)`.
    reason: the LM writes each edit's reason before its result (trained with
      `config.data.edit.reason`): its style (`edits.REASON_STYLES`; True is "scene"), or False.
    choose_object: with reasons of a style in `vqlm.sample.edit.CHOOSABLE`, the object the
      reason says the edit acts on is chosen among its caption's objects by the model's
      likelihood (`vqlm.sample.edit.choose_reasons`); `free_reason_right` then says how often the
      greedy reason alone was right.
  Returns:
    (metrics, images uint8 `[N, H, W, 3]`, the parsed scenes, the reasons or None):
    `accuracy`, `by_kind`, `counts`, `unchanged`, `num_items` and `heldout_fraction` (items with
    a held-out pair), with reasons `reason_right` and `drawn_as_said`.
  """
  if not items:
    raise UserError("edit_accuracy got no items; pass at least one edits.edit_item item.")
  several = next((i for i, item in enumerate(items) if len(item["instructions"]) != 1), None)
  if several is not None:
    raise UserError(
      f"edit item {several} has {len(items[several]['instructions'])} edits; the evaluator "
      "scores single edits (edits.edit_item(..., max_edits=1))"
    )
  style = "scene" if reason is True else str(reason or "")
  if style and style not in edits.REASON_STYLES:
    raise UserError(f"edit reason={reason!r}; use False or one of {edits.REASON_STYLES}")
  check = getattr(generator, "_check_reads_images", None)
  if check is not None:
    check("image editing")
  sources = chat_eval.scene_encoder(generator)([item["scenes"][0] for item in items])
  v, tok = generator.vocab, generator.text_tokenizer
  rows = [
    edits.prompt_ids(codes, item["instructions"][0], v, tok, reason=bool(style))
    for codes, item in zip(sources, items)
  ]
  reasons = free = None
  if style:
    images, reasons, free = sample_edit.draw_reasoned(
      generator,
      rows,
      style=style,
      choose_object=choose_object,
      sampling=sampling,
      seed=seed,
      batch_size=batch_size,
    )
  else:
    images = generator.draw_ids(rows, sampling=sampling, seed=seed, batch_size=batch_size)
  parsed = [scene_parser.parse_image(image) for image in images]
  right = [same_scene(p, item["scenes"][1]) for p, item in zip(parsed, items)]
  same = [same_scene(p, item["scenes"][0]) for p, item in zip(parsed, items)]
  groups: dict[str, list[bool]] = {}
  for item, ok in zip(items, right):
    groups.setdefault(item["kind"], []).append(ok)
  order = [k for k in edits.KINDS if k in groups]
  metrics = {
    "accuracy": float(np.mean(right)),
    "by_kind": {k: float(np.mean(groups[k])) for k in order},
    "counts": {k: len(groups[k]) for k in order},
    "unchanged": float(np.mean(same)),
    "num_items": len(items),
    "heldout_fraction": float(
      np.mean([bool(edits.pairs_used([it]) & set(shapes.HELDOUT_PAIRS)) for it in items])
    ),
  }
  if reasons is not None:
    said = [edits.reasoned_scene(r, it["scenes"][0], style) for r, it in zip(reasons, items)]
    metrics["reason_right"] = reasons_right(reasons, items, style)
    if choose_object:
      metrics["free_reason_right"] = reasons_right(free, items, style)
    metrics["drawn_as_said"] = float(
      np.mean([s is not None and same_scene(p, s) for s, p in zip(said, parsed)])
    )
  return metrics, np.asarray(images), parsed, reasons


def reasons_right(reasons: Sequence[str], items: Sequence[Mapping[str, Any]], style: str) -> float:
  """The fraction of reasons whose scene (`edits.reasoned_scene`) is the item's edited one."""
  said = [edits.reasoned_scene(r, it["scenes"][0], style) for r, it in zip(reasons, items)]
  return float(
    np.mean([s is not None and same_scene(s, it["scenes"][1]) for s, it in zip(said, items)])
  )


def run_reasons_edits(config: Any) -> str:
  """The reason style of the run's edit documents (`config.data.edit.reason` and
  `reason_style`), or "" when they have none (also for a config without them)."""
  data = config.get("data")
  edit = data.get("edit") if data is not None else None
  if edit is None or not edit.get("reason", False):
    return ""
  return str(edit.get("reason_style", "scene"))


class EditEval(evaluators.Evaluator):
  """Single edits of `split` ("test" or "test_heldout"), one image each, judged by the scene
  parser (`edit_accuracy`); artefacts `edit_<split>.json` and `edit_<split>.png`."""

  stage = "lm"

  def __init__(
    self,
    *,
    split: str = "test",
    num_items: int = 200,
    kinds: str | Sequence[str] = ",".join(edits.KINDS),
    min_objects: int = 1,
    max_objects: int = 2,
    seed: int = 0,
    temperature: float = 0.3,
    top_k: int = 0,
    batch_size: int = 32,
    choose_object: bool = True,
    log_fn=print,
  ):
    if split not in SPLITS:
      raise UserError(f"edit split={split!r}; use one of {SPLITS}")
    kinds = evaluators._names(kinds)
    if not kinds or any(k not in edits.KINDS for k in kinds):
      raise UserError(f"edit kinds={','.join(kinds)!r}; use a subset of {','.join(edits.KINDS)}")
    if num_items < 1:
      raise UserError(f"edit num_items={num_items} must be >= 1")
    super().__init__(
      log_fn,
      split=split,
      num_items=num_items,
      kinds=kinds,
      min_objects=min_objects,
      max_objects=max_objects,
      seed=seed,
      temperature=temperature,
      top_k=top_k,
      batch_size=batch_size,
      choose_object=bool(choose_object),
    )

  def items(self) -> list[dict[str, Any]]:
    s = self.settings
    return eval_items(
      s["num_items"],
      split=s["split"],
      seed=s["seed"],
      kinds=s["kinds"],
      min_objects=s["min_objects"],
      max_objects=s["max_objects"],
    )

  def run(self, run, artefacts=None):
    evaluators._shapes_data(run)
    s = self.settings
    items = self.items()
    generator = run.generator(batch_size=s["batch_size"])
    reason = run_reasons_edits(run.config)
    choose = s["choose_object"] and reason in sample_edit.CHOOSABLE
    metrics, images, parsed, reasons = edit_accuracy(
      generator,
      items,
      sampling=evaluators._sampling(s["temperature"], s["top_k"]),
      seed=s["seed"],
      batch_size=s["batch_size"],
      reason=reason,
      choose_object=choose,
    )
    metrics["split"] = s["split"]
    metrics["settings"] = {
      "image_temperature": s["temperature"],
      "image_top_k": s["top_k"],
      "reason": reason,
      "choose_object": choose,
    }
    if artefacts:
      size = int(generator.image_tokenizer.image_size)
      self._write(artefacts, items, images, parsed, size, reasons)
    return metrics

  def _write(self, artefacts, items, images, parsed, size: int, reasons=None) -> None:
    from vqlm import imaging

    name = f"edit_{self.settings['split']}"
    rows = [
      {
        "kind": item["kind"],
        "instruction": item["instructions"][0],
        "source": item["scenes"][0],
        "truth": item["scenes"][1],
        "parsed": scene,
        "right": same_scene(scene, item["scenes"][1]),
        **({"reason": reasons[i]} if reasons is not None else {}),
      }
      for i, (item, scene) in enumerate(zip(items, parsed))
    ]
    chat_eval._write_json(artefacts, f"{name}.json", rows)
    shown = min(SHOWN, len(items))
    tiles = []
    for item, image in zip(items[:shown], images[:shown]):
      tiles += [
        shapes.render(item["scenes"][0], size),
        image,
        shapes.render(item["scenes"][1], size),
      ]
    grid = imaging.make_grid(np.stack(tiles), columns=3, scale=3)
    self.log(f"wrote {imaging.save_png(grid, os.path.join(artefacts, f'{name}.png'))}")
