"""Answers to questions about an image, chosen among what the model's own caption says.

A chat LM tuned on reasoned replies (`vqlm.data.chat.reasoned`) answers a question about an image
by captioning the image first, then "so", then the answer:

    what shape is at the top left?
    -> a small red circle at the top left and a large blue square in the center so circle

Written freely (greedy), the caption is nearly always right; the answer after it is where such a
model errs: it reads the other object's shape or size, or restates a cell in other words. The
answer has few possible values: a colour, shape, size or cell phrase of one of the objects its
caption lists, or a number up to how many objects it lists. `choose_answers` lets the model write
its reply (greedy); where the reply is reasoned, it scores each of those candidates after the
caption with the model itself (the summed log-probability of `caption so candidate <eos>`,
`choice.likeliest`) and keeps the likeliest. Only the model's own words and likelihoods
go in: the image's scene, the question's kind and the truth are never read. Replies without
"so" (descriptions) are kept as written.

A model tuned to name the object a question asks about before answering (`data.chat.focus` with
`focus_style="object"`: "caption so a large blue circle at the top right so blue") has that
object chosen first, among its caption's objects, by the likelihood of `caption so object so`:
written greedily, the object's first words (size, colour) come before the cell that tells which
object the question means, and the model can commit to the wrong one.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from vqlm.data import chat, shapes
from vqlm.sample import chat as sample_chat
from vqlm.sample.choice import likeliest

SO = f" {chat.REASON_WORD} "


def candidates(caption: str) -> list[str]:
  """What may follow `caption so` in a reasoned reply: the colour, shape, size and cell phrase of
  each object of the caption (`shapes.parse_caption`), then the numbers from "zero" to the
  number of objects; [] when the caption does not parse."""
  objects = shapes.parse_caption(caption)
  if not objects:
    return []
  out: list[str] = []
  for o in objects:
    for word in (o["color"], o["shape"], o["size"], shapes.POSITION_PHRASES[o["position"]]):
      if word not in out:
        out.append(word)
  return out + [n for n in chat.NUMBERS[: len(objects) + 1] if n not in out]


def focus_candidates(reply: str) -> list[str]:
  """For a reply focused on one object ("caption so OBJECT so answer", `chat.question`'s
  focus="object"): `caption so PHRASE so` for the caption phrase of each object of its caption;
  [] for any other reply."""
  parts = reply.split(SO)
  objects = shapes.parse_caption(parts[0]) if len(parts) == 3 else None
  named = shapes.parse_caption(parts[1]) if objects else None
  if not objects or not named or len(named) != 1:
    return []
  return [f"{parts[0]}{SO}{shapes.object_phrase(o)}{SO.rstrip()}" for o in objects]


def choose_answers(
  generator: Any,
  conversations: Sequence[Sequence[Mapping[str, Any]]],
  *,
  max_len: int = 48,
  batch_size: int | None = None,
) -> tuple[list[str], list[str]]:
  """The reply to each conversation, its answer chosen by likelihood (module docstring).

  A reply focused on one object (`focus_candidates`) first has that object chosen among its
  caption's objects the same way; the model then writes the rest of its reply (greedy) from
  there, and the answer is chosen after it.

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM tuned on reasoned replies.
    conversations: turn lists ending with a user turn (as `sample_chat.reply` takes).
    max_len: most ids per free reply.
  Returns:
    (replies, free_replies): the replies with chosen answers, and the greedy replies.
  """
  bs = batch_size or generator.batch_size
  prompts = sample_chat.reply_prompts(generator, conversations)
  free = sample_chat.write_replies(generator, prompts, max_len=max_len, batch_size=bs)
  v, tok = generator.vocab, generator.text_tokenizer
  replies = list(free)
  starts = likeliest(generator, prompts, [focus_candidates(r) for r in free], batch_size=bs)
  focused = [row for row, start in enumerate(starts) if start]
  if focused:
    rests = generator.write_ids(
      [prompts[row] + list(v.encode_text(tok, starts[row])) for row in focused],
      greedy=True,
      max_len=max_len,
      batch_size=bs,
      desc="answers",
    )
    for row, rest in zip(focused, rests):
      replies[row] = f"{starts[row]} {rest.strip()}"
  prefixes = [reply.rsplit(SO, 1)[0].strip() if SO in reply else None for reply in replies]
  captions = [p.split(SO)[0] if p else None for p in prefixes]
  chosen = likeliest(
    generator,
    prompts,
    [[f"{p}{SO}{a}" for a in candidates(c)] if p else [] for p, c in zip(prefixes, captions)],
    end_ids=[v.eos_id],
    batch_size=bs,
  )
  return [c or reply for c, reply in zip(chosen, replies)], free


__all__ = ["candidates", "choose_answers", "focus_candidates"]
