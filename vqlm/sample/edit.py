"""Reasoned image edits, with the object the edit acts on chosen among the objects of the caption.

An LM trained on reasoned edit documents (`vqlm.data.edits`, style "caption_change") writes, after
`<bos> instruction <boi> source <eoi>`, the source's caption, the changed object as it is before
the edit, and the object after it, then draws the result:

    a small yellow circle in the center and a large cyan circle at the bottom left
    so a large cyan circle at the bottom left so a large blue circle at the bottom left <boi> ...

Written freely (greedy), the middle part is where the demo's mixed LM errs: it names the object of
the instruction with the other object's size or cell ("so a large cyan circle in the center"),
and the drawing follows the wrong words. That part has only a few right answers: one of the
objects its own caption lists, or "nothing" (an addition). `choose_reasons` therefore lets the
model write its caption (greedy), scores each of those candidates after it with the model itself
(the summed log-probability of `caption so candidate so`, `choice.likeliest`), keeps
the likeliest, and lets the model write the rest of the reason (greedy) from there. Nothing but
the model's own words and likelihoods goes in: the source scene, the instruction's parse and the
truth are never read. `docs/evaluation.md` ("Video and image editing") has what the choice
changes on the video demo.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from vqlm.data import edits, shapes
from vqlm.errors import UserError
from vqlm.sample import chat as sample_chat
from vqlm.sample.choice import likeliest

# The reason styles whose middle part `choose_reasons` picks: the source's caption comes first.
CHOOSABLE = ("caption_change",)
SO = f" {edits.REASON_WORD} "


def candidates(caption: str) -> list[str]:
  """What may follow `caption so` in a "caption_change" reason: each object of the caption on
  its own (`edits.scene_caption([object])`), then `edits.EMPTY_SCENE`; only the latter when the
  caption does not parse."""
  objects = shapes.parse_caption(caption) or []
  return [edits.scene_caption([o]) for o in objects] + [edits.EMPTY_SCENE]


def choose_reasons(
  generator: Any,
  prompts: list[list[int]],
  *,
  style: str = "caption_change",
  batch_size: int | None = None,
) -> tuple[list[str], list[str]]:
  """The reason of each edit prompt, its middle part chosen by likelihood (module docstring).

  Args:
    generator: a `vqlm.sample.api.Generator` of an LM trained on reasoned edits of `style`.
    prompts: `edits.prompt_ids(source_codes, instruction, ..., reason=True)` rows.
    style: the run's reason style (`config.data.edit.reason_style`); one of `CHOOSABLE`.
  Returns:
    (reasons, free_reasons): the chosen reasons and the freely written (greedy) ones.
  """
  if style not in CHOOSABLE:
    raise UserError(
      f"choosing the edited object needs reasons in a style of {CHOOSABLE}, not {style!r}; "
      "draw this run's edits with free reasons (choose_object=False)"
    )
  v, tok = generator.vocab, generator.text_tokenizer
  bs = batch_size or generator.batch_size
  free = sample_chat.text_before_image(generator, prompts, batch_size=bs)
  captions = [reason.split(SO)[0].strip() for reason in free]
  starts = likeliest(
    generator,
    prompts,
    [[f"{c}{SO}{candidate}{SO.rstrip()}" for candidate in candidates(c)] for c in captions],
    batch_size=bs,
  )
  rests = sample_chat.text_before_image(
    generator,
    [prompt + list(v.encode_text(tok, start)) for prompt, start in zip(prompts, starts)],
    batch_size=bs,
  )
  return [f"{start} {rest}".strip() for start, rest in zip(starts, rests)], free


def edit_images(
  generator: Any,
  instructions: Sequence[str],
  images: np.ndarray,
  *,
  style: str = "caption_change",
  choose_object: bool = True,
  sampling: Any = None,
  seed: int = 0,
  batch_size: int | None = None,
) -> tuple[np.ndarray, list[str]]:
  """Edits each image as its instruction says, with an LM trained on reasoned edits.

  Args:
    generator: a `vqlm.sample.api.Generator`.
    instructions: one instruction per image ("make the red circle blue").
    images: uint8 `[N, H, W, 3]` at the image tokenizer's size.
    style: the run's reason style (`vqlm.eval.edit_eval.run_reasons_edits(run.config)`).
    choose_object: choose the reason's middle part by likelihood (`choose_reasons`); False: the
      reason as the model writes it (greedy).
    sampling: the result image's sampling settings (`draw_ids`'); row i draws with `(seed, i)`.
  Returns:
    (edited images uint8 `[N, H, W, 3]`, the reasons).
  """
  images = np.asarray(images)
  if len(instructions) != len(images):
    raise UserError(f"{len(instructions)} instructions for {len(images)} images; pass one each.")
  if style not in edits.REASON_STYLES:
    raise UserError(f"reason style {style!r}; use one of {edits.REASON_STYLES}")
  v, tok = generator.vocab, generator.text_tokenizer
  codes = generator.encode_images(images)
  rows = [
    edits.prompt_ids(c, instruction, v, tok, reason=True)
    for c, instruction in zip(codes, instructions)
  ]
  return draw_reasoned(
    generator,
    rows,
    style=style,
    choose_object=choose_object,
    sampling=sampling,
    seed=seed,
    batch_size=batch_size,
  )[:2]


def draw_reasoned(
  generator: Any,
  rows: list[list[int]],
  *,
  style: str,
  choose_object: bool,
  sampling: Any = None,
  seed: int = 0,
  batch_size: int | None = None,
) -> tuple[np.ndarray, list[str], list[str]]:
  """Reasons (chosen or free), then one image after each: uint8 `[N, H, W, 3]`, the reasons,
  and the free reasons (the same list when not choosing)."""
  if choose_object:
    reasons, free = choose_reasons(generator, rows, style=style, batch_size=batch_size)
  else:
    reasons = free = sample_chat.text_before_image(generator, rows, batch_size=batch_size)
  v, tok = generator.vocab, generator.text_tokenizer
  draw = [row + list(v.encode_text(tok, r)) + [v.boi_id] for row, r in zip(rows, reasons)]
  images = generator.draw_ids(draw, sampling=sampling, seed=seed, batch_size=batch_size)
  return np.asarray(images), reasons, free


__all__ = ["CHOOSABLE", "candidates", "choose_reasons", "draw_reasoned", "edit_images"]
