"""Instruction (chat) data: turns of text and images <-> LM ids, and instructions about shapes.

A *turn* is `{"role": "user" | "assistant", "parts": [str | codes [h, w], ...]}`; a conversation is
a list of turns. `build` lays it out with `vqlm.data.sequences.chat` (`<bos> <user> parts
<assistant> parts ... <eos>`, loss only on assistant turns) and `parse` reads ids back:

    vocab = vocab.with_specials(CHAT_SPECIALS)       # <user>, <assistant> in reserved slots
    example = build(turns, vocab, tokenizer)         # unpadded example, like sequences.to_example
    assert equal_turns(parse(segment(turns, vocab, tokenizer).tokens, vocab, tokenizer), turns)

Text round-trips when SentencePiece does (single spaces, no leading/trailing space, characters the
text model covers: train it on `texts(conversations)` too, or the pieces fall back to `<unk>`).

Instructions from the shapes data set (`conversation(index, seed=...)`, deterministic per
`(seed, split, index)`): "draw" requests (objects in any order, synonyms: big/large, little/small,
middle/center, corner phrasings) answered with the scene's image; "question"s about an image
(colour, shape, size, position of one object; counts) with exact one-phrase answers; "describe"
requests answered with `shapes.caption`. Images are `SceneImage` placeholders until `with_codes`
swaps in the codes of the rendered scene. `preference_pair` adds a rejected answer (a wrong answer
or a perturbed scene) for DPO; `pairs_used` lists the colour-shape pairs a set of prompts uses.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import dataclasses
import re
from typing import Any

import numpy as np

from vqlm.data import sequences, shapes
from vqlm.errors import UserError
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

Turn = dict[str, Any]
KINDS = ("draw", "question", "describe")

# ---- turns <-> ids ------------------------------------------------------------------------------


def encode_turns(
  turns: Sequence[Mapping[str, Any]], vocab: Vocab, tokenizer: TextTokenizer
) -> list[Turn]:
  """Text parts -> SentencePiece ids (int32[n]); image parts -> int32 codes `[h, w]`."""
  out = []
  for turn in turns:
    if not isinstance(turn, Mapping) or "parts" not in turn:
      raise UserError(f"a turn must be a dict with 'role' and 'parts', got {turn!r:.80}.")
    parts = []
    for part in turn["parts"]:
      if isinstance(part, str):
        ids = vocab.encode_text(tokenizer, part)
        if not ids:
          raise UserError(f"text part {part!r} encodes to no ids; drop empty text parts.")
        parts.append(np.asarray(ids, np.int32))
      elif isinstance(part, SceneImage):
        raise UserError("a SceneImage part has no codes yet; call with_codes(turns, encode) first.")
      else:
        parts.append(vocab.check_codes(part))
    out.append({"role": turn.get("role"), "parts": parts})
  return out


def segment(
  turns: Sequence[Mapping[str, Any]], vocab: Vocab, tokenizer: TextTokenizer, *, eos: bool = True
) -> tuple[sequences.Segment, np.ndarray]:
  """`sequences.chat` of the encoded turns: the segment and its assistant mask `bool[L]`."""
  return sequences.chat(encode_turns(turns, vocab, tokenizer), vocab, eos=eos)


def build(
  turns: Sequence[Mapping[str, Any]],
  vocab: Vocab,
  tokenizer: TextTokenizer,
  *,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
) -> sequences.Example:
  """Turns -> unpadded LM example (`tokens`, `targets`, ... of length L - 1; weights only on
  assistant tokens). Pad with `sequences.pad` or pack with `sequences.pack`."""
  seg, mask = segment(turns, vocab, tokenizer)
  return sequences.chat_example(
    seg, mask, vocab, text_weight=text_weight, image_weight=image_weight
  )


def prompt(
  turns: Sequence[Mapping[str, Any]], vocab: Vocab, tokenizer: TextTokenizer
) -> np.ndarray:
  """The sampler's prompt int32[P]: the turns, then `<assistant>` (no `<eos>`). The reply ends at
  the model's `<eos>` (or `<user>`)."""
  turns = list(turns) + [{"role": "assistant", "parts": []}]
  return segment(turns, vocab, tokenizer, eos=False)[0].tokens


def parse(ids: Sequence[int], vocab: Vocab, tokenizer: TextTokenizer) -> list[Turn]:
  """Inverse of `segment`: ids (a leading `<bos>` optional; read up to the first `<eos>` or
  `<pad>`) -> turns with text parts as str and image parts as int32 codes `[h, w]`.

  Raises UserError on tokens before the first role marker, a `<boi>` not followed by exactly
  `h*w` codes and `<eoi>`, stray image codes or other specials.
  """
  ids = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
  if ids and ids[0] == vocab.bos_id:
    ids = ids[1:]
  roles = {vocab.special(r): r for r in sequences.CHAT_ROLES if r in vocab.specials}
  turns: list[Turn] = []
  run: list[int] = []

  def flush():
    if run:
      turns[-1]["parts"].append(tokenizer.decode(run))
      run.clear()

  n, i, hw = len(ids), 0, vocab.tokens_per_image
  while i < n:
    t = ids[i]
    if t in (vocab.eos_id, vocab.pad_id):
      break
    if t in roles:
      if turns:
        flush()
      turns.append({"role": roles[t], "parts": []})
      i += 1
      continue
    if not turns:
      raise UserError(f"chat ids start with {_name(vocab, t)}, not a <user>/<assistant> marker.")
    if vocab.is_text(t):
      run.append(t)
      i += 1
    elif t == vocab.boi_id:
      flush()
      codes = ids[i + 1 : i + 1 + hw]
      if len(codes) < hw or not all(vocab.is_image(c) for c in codes) or i + 1 + hw >= n:
        raise UserError(f"the image at position {i} is not <boi> + {hw} codes + <eoi>.")
      if ids[i + 1 + hw] != vocab.eoi_id:
        raise UserError(f"the image at position {i} is not closed by <eoi> after {hw} codes.")
      turns[-1]["parts"].append(vocab.image_code(np.asarray(codes)).reshape(vocab.grid))
      i += hw + 2
    else:
      raise UserError(f"unexpected {_name(vocab, t)} at position {i} of a chat.")
  if turns:
    flush()
  return turns


def _name(vocab: Vocab, t: int) -> str:
  return f"text id {t}" if vocab.is_text(t) else vocab.token_name(t)


def equal_turns(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
  """Turn lists with equal roles, texts and codes (arrays compared by value)."""
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    if x["role"] != y["role"] or len(x["parts"]) != len(y["parts"]):
      return False
    for p, q in zip(x["parts"], y["parts"]):
      if isinstance(p, str) or isinstance(q, str):
        if p != q:
          return False
      elif not np.array_equal(np.asarray(p), np.asarray(q)):
        return False
  return True


# ---- instructions about shapes scenes -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneImage:
  """Placeholder for the image of a shapes scene inside a turn (`with_codes` replaces it).

  Attributes:
    scene: `shapes.canonical(scene)`: `(position, color, size, shape)` tuples in cell order.
  """

  scene: tuple

  @classmethod
  def of(cls, scene: Sequence[Mapping[str, str]]) -> "SceneImage":
    shapes.validate_scene(scene)
    return cls(shapes.canonical(scene))

  def objects(self) -> list[dict]:
    """The scene as `shapes` object dicts (canonical order)."""
    return [dict(position=p, color=c, size=s, shape=sh) for p, c, s, sh in self.scene]


SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
WHERE_WORDS = {
  "top left": ("at the top left", "in the top left corner", "in the upper left"),
  "top": ("at the top", "at the top middle"),
  "top right": ("at the top right", "in the top right corner", "in the upper right"),
  "left": ("on the left", "at the left"),
  "center": ("in the center", "in the middle"),
  "right": ("on the right", "at the right"),
  "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
  "bottom": ("at the bottom", "at the bottom middle"),
  "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
DRAW_TEMPLATES = (
  "draw {}",
  "please draw {}",
  "make an image of {}",
  "show me {}",
  "paint {}",
  "can you draw {}",
  "generate a picture of {}",
  "create an image with {}",
  "i want to see {}",
)
DESCRIBE_TEMPLATES = (
  "describe the image",
  "describe this picture",
  "what is in the image",
  "what do you see",
  "list the shapes in this image",
)
# Separates a reasoned reply's description of the image from its answer (no caption or answer
# holds the word).
REASON_WORD = "so"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_QUESTIONS = ("color", "shape", "size", "position", "count")
# What a focused reply names between its caption and its answer (`question`): what the question
# asks, in the captions' words ("question"), or the caption phrase of the object it asks about
# ("object").
FOCUS_STYLES = ("question", "object")


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _join(phrases: Sequence[str], rng: np.random.Generator) -> str:
  if len(phrases) <= 2:
    return " and ".join(phrases)
  sep = ", " if rng.random() < 0.5 else " and "
  return sep.join(phrases[:-1]) + " and " + phrases[-1]


def draw_request(scene: Sequence[Mapping[str, str]], rng: np.random.Generator) -> str:
  """'draw a big red circle in the middle and a small blue square at the top left' (objects in a
  random order, synonyms and a template drawn from `rng`); every attribute is named."""
  phrases = _object_phrases(scene, rng)
  return _pick(rng, DRAW_TEMPLATES).format(_join(phrases, rng))


def _object_phrases(scene: Sequence[Mapping[str, str]], rng: np.random.Generator) -> list[str]:
  objects = [scene[int(k)] for k in rng.permutation(len(scene))]
  return [
    f"a {_pick(rng, SIZE_WORDS[o['size']])} {o['color']} {o['shape']} "
    f"{_pick(rng, WHERE_WORDS[o['position']])}"
    for o in objects
  ]


def reworded(scene: Sequence[Mapping[str, str]], rng: np.random.Generator) -> str:
  """The scene described as a request names it, without the request's template: 'a big red
  circle in the middle and a little blue square in the upper left' (objects in a random order,
  size and position synonyms drawn from `rng`)."""
  return _join(_object_phrases(scene, rng), rng)


def reworded_caption(text: str, rng: np.random.Generator) -> str:
  """A shapes caption reworded (`reworded`); a text that is not one -> UserError."""
  scene = shapes.parse_caption(text)
  if scene is None:
    raise UserError(
      f"{text!r} is not a shapes caption; data.reword_prompts works on shapes captions only "
      "(set --config.data.reword_prompts=0 for other data)"
    )
  return reworded(scene, rng)


def question(
  scene: Sequence[Mapping[str, str]], rng: np.random.Generator, *, focus: str = "question"
) -> tuple[str, str, str, str]:
  """A question about the scene's image, its exact answer and its focus:
  `(kind, question, answer, focus)`.

  Kinds: "color", "shape", "size" (of the object at a named cell: 'red', 'circle', 'large'),
  "position" (of a colour-shape pair that occurs once: 'at the top left', as in captions) and
  "count" (all objects, one colour or one shape: 'two', 'zero').

  The focus restates what the question asks in the captions' words, next to what the caption
  says about it, so a reasoned reply can answer from the words just before it (`reasoned`):
  "color in the center" (the attribute and the cell's caption phrase), "blue square" (the pair
  whose position is asked; its caption phrase follows it there too), "red in blue red" (the
  counted colour or shape, or "shapes", then that attribute of every object in caption order).
  With `focus="object"` the focus of a question about one object (colour, shape, size,
  position) is that object's caption phrase instead ("a large red circle at the top left"), so
  the answer is copied from the phrase just before it; counts keep theirs. The same `rng` draws
  the same question either way.
  """
  if focus not in FOCUS_STYLES:
    raise UserError(f"question focus={focus!r}; use one of {FOCUS_STYLES}")
  obj = scene[int(rng.integers(len(scene)))]
  where = _pick(rng, WHERE_WORDS[obj["position"]])
  unique = [
    o
    for o in scene
    if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in scene) == 1
  ]
  kind = _pick(rng, _QUESTIONS if unique else tuple(q for q in _QUESTIONS if q != "position"))
  cell = f"{kind} {shapes.POSITION_PHRASES[obj['position']]}"

  def named(o: Mapping[str, str], question_focus: str) -> str:
    return shapes.object_phrase(o) if focus == "object" else question_focus

  if kind == "color":
    text = _pick(rng, ("what color is the shape {}", "what colour is the object {}"))
    return kind, text.format(where), obj["color"], named(obj, cell)
  if kind == "shape":
    text = _pick(rng, ("what shape is {}", "which shape is {}"))
    return kind, text.format(where), obj["shape"], named(obj, cell)
  if kind == "size":
    text = _pick(rng, ("is the shape {} big or small", "how big is the object {}"))
    return kind, text.format(where), obj["size"], named(obj, cell)
  if kind == "position":
    obj = _pick(rng, unique)
    text = _pick(rng, ("where is the {} {}", "where is the {} {} in the image"))
    pair = f"{obj['color']} {obj['shape']}"
    return (
      kind,
      text.format(obj["color"], obj["shape"]),
      shapes.POSITION_PHRASES[obj["position"]],
      named(obj, pair),
    )
  which = _pick(rng, ("all", "color", "shape"))
  if which == "all":
    text = _pick(rng, ("how many shapes are there", "how many objects are in the image"))
    n, counted, attribute = len(scene), "shapes", "shape"
  elif which == "color":
    counted = _pick(rng, tuple(shapes.COLORS))
    text, attribute = f"how many {counted} shapes are there", "color"
    n = sum(o["color"] == counted for o in scene)
  else:
    counted = _pick(rng, shapes.SHAPES)
    text, attribute = f"how many {counted}s are there", "shape"
    n = sum(o["shape"] == counted for o in scene)
  listed = " ".join(o[attribute] for o in shapes.sort_scene(scene))
  return kind, text, NUMBERS[n], f"{counted} in {listed}"


def conversation(
  index: int,
  *,
  seed: int = 0,
  split: str = "train",
  kinds: Sequence[str] = KINDS,
  min_objects: int = 1,
  max_objects: int = 2,
  restate: bool = False,
  reason: bool = False,
  focus: bool | str = False,
  drop_request: float = 0.0,
) -> dict[str, Any]:
  """Instruction `index` of `(seed, split)`: `{"kind", "scene", "turns", "answer",
  "question_kind", "focus"}` (the `question` kind of a "question" item, else None; the focus of
  a focused reply, else None).

  `turns` is one user turn and one assistant turn; images are `SceneImage`s. `answer` is the
  exact reply text (questions, descriptions) or None (draw: the reply is the scene's image). The
  scene follows `shapes.sample_scene(split=...)` (held-out pairs only in "test_heldout"). The
  kind is drawn uniformly from `kinds`: a kind named twice is drawn twice as often.
  With `restate`, a draw reply first restates the request as the scene's caption
  (`shapes.caption`: objects in cell order, canonical words), then the image. With `reason`, a
  question's reply first describes the image (its caption), then gives the answer after
  `REASON_WORD` ("a large red circle at the top left so red"; `final_answer` reads it back);
  `answer` stays the answer alone. With `focus` too, the question's focus (`question`) comes
  between the description and the answer ("a large red circle at the top left so color at the
  top left so red"); `focus="object"` names the asked-about object by its caption phrase instead
  (`question`: "... so a large red circle at the top left so red"). With probability
  `drop_request` a draw item's user turn is empty (`<bos> <user> <assistant> <boi> image`): the
  model learns to draw with no request, the unconditional prompt of guidance for chat drawing
  (`vqlm.sample.chat.chat_uncond_ids`). The same index gives the same scene and request either
  way.
  """
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise UserError(f"kinds={list(kinds)} must be a non-empty subset of {KINDS}.")
  if index < 0 or seed < 0:
    raise UserError(f"index={index} and seed={seed} must be >= 0.")
  if focus not in (False, True) + FOCUS_STYLES:
    raise UserError(f"focus={focus!r}; use False, True or one of {FOCUS_STYLES}")
  if focus and not reason:
    raise UserError("focus=True needs reason=True (the focus sits inside a reasoned reply).")
  rng = np.random.default_rng([int(seed), shapes.SPLITS.index(split), int(index)])
  scene = shapes.sample_scene(rng, min_objects=min_objects, max_objects=max_objects, split=split)
  kind = _pick(rng, tuple(kinds))
  image, question_kind, focus_text = SceneImage.of(scene), None, None
  if kind == "draw":
    user, reply, answer = [draw_request(scene, rng)], [image], None
    if restate:
      reply = [shapes.caption(scene), image]
  else:
    if kind == "describe":
      text, answer = _pick(rng, DESCRIBE_TEMPLATES), shapes.caption(scene)
    else:
      style = focus if isinstance(focus, str) else "question"
      question_kind, text, answer, focus_text = question(scene, rng, focus=style)
      focus_text = focus_text if focus else None
    user, reply = ([image, text] if rng.random() < 0.5 else [text, image]), [answer]
    if reason and kind == "question":
      reply = [reasoned(scene, answer, focus_text)]
  if kind == "draw" and drop_request > 0 and rng.random() < drop_request:
    user = []
  turns = [{"role": "user", "parts": user}, {"role": "assistant", "parts": reply}]
  return {
    "kind": kind,
    "scene": scene,
    "turns": turns,
    "answer": answer,
    "question_kind": question_kind,
    "focus": focus_text,
  }


def reasoned(scene: Sequence[Mapping[str, str]], answer: str, focus: str | None = None) -> str:
  """A question's reply that reads the image first: the scene's caption, `REASON_WORD`, then the
  answer; with a `focus` (`question`), the focus and `REASON_WORD` come before the answer."""
  if focus:
    return f"{shapes.caption(scene)} {REASON_WORD} {focus} {REASON_WORD} {answer}"
  return f"{shapes.caption(scene)} {REASON_WORD} {answer}"


def reply_focus(settings: Mapping[str, Any]) -> bool | str:
  """The `focus` of `conversation` for `data.chat` settings (`focus`, `focus_style`): False, True
  (the question's focus) or "object"."""
  if not settings.get("focus", False):
    return False
  return "object" if settings.get("focus_style", "question") == "object" else True


def final_answer(reply: str) -> str:
  """The answer of a reply: the text after the last `REASON_WORD` of a reasoned reply
  (`reasoned`), else the whole reply; stripped."""
  marker = f" {REASON_WORD} "
  reply = reply.strip()
  return reply.rsplit(marker, 1)[1].strip() if marker in reply else reply


def conversations(num: int, **kwargs) -> Iterator[dict[str, Any]]:
  """`conversation(i, **kwargs)` for i in 0..num-1."""
  for i in range(num):
    yield conversation(i, **kwargs)


def perturb_scene(
  scene: Sequence[Mapping[str, str]], rng: np.random.Generator, *, split: str = "train"
) -> list[dict]:
  """The scene with one attribute of one object changed (colour, shape, size or a free cell);
  colour-shape pairs stay within those `split` allows (no held-out pair outside test_heldout)."""
  scene = shapes.sort_scene(scene)
  allowed = shapes._ALL_PAIRS if split == "test_heldout" else shapes._SEEN_PAIRS
  free = [p for p in shapes.POSITIONS if p not in {o["position"] for o in scene}]
  for _ in range(100):
    obj = scene[int(rng.integers(len(scene)))]
    key = _pick(rng, ("color", "shape", "size", "position"))
    if key == "position" and not free:
      continue
    values = {
      "color": tuple(shapes.COLORS),
      "shape": shapes.SHAPES,
      "size": shapes.SIZES,
      "position": tuple(free),
    }[key]
    new = dict(obj, **{key: _pick(rng, tuple(v for v in values if v != obj[key]))})
    if (new["color"], new["shape"]) in allowed:
      return shapes.sort_scene([new if o is obj else o for o in scene])
  raise UserError(f"found no valid perturbation of scene {scene}.")  # pragma: no cover


def preference_pair(item: Mapping[str, Any], *, seed: int = 0, index: int = 0) -> dict[str, Any]:
  """`{"prompt": [user turn], "chosen": [assistant turn], "rejected": [assistant turn]}` for a
  `conversation` item: rejected is a wrong answer of the same kind (another colour, shape, size,
  cell or number; a description or image of a perturbed scene). Deterministic in (seed, index)."""
  rng = np.random.default_rng([int(seed), int(index), 7])
  user, chosen = item["turns"][0], item["turns"][1]
  answer = item["answer"]
  split = "test_heldout" if pairs_used([item]) & set(shapes.HELDOUT_PAIRS) else "train"
  if item["kind"] == "draw":
    wrong: Any = SceneImage.of(perturb_scene(item["scene"], rng, split=split))
  elif item["kind"] == "describe":
    wrong = shapes.caption(perturb_scene(item["scene"], rng, split=split))
  else:
    for values in (
      tuple(shapes.COLORS),
      shapes.SHAPES,
      shapes.SIZES,
      tuple(shapes.POSITION_PHRASES.values()),
      NUMBERS[:4],
    ):
      if answer in values:
        wrong = _pick(rng, tuple(v for v in values if v != answer))
        break
    else:
      raise UserError(f"no wrong answer for {answer!r}.")
    if chosen["parts"][0] != answer:
      # A reasoned reply: the same description of the image (and focus), then the wrong answer.
      wrong = reasoned(item["scene"], wrong, item.get("focus"))
  rejected = {"role": "assistant", "parts": [wrong]}
  return {"prompt": [user], "chosen": [chosen], "rejected": [rejected]}


def with_codes(
  turns: Sequence[Mapping[str, Any]], encode: Callable[[list[dict]], np.ndarray]
) -> list[Turn]:
  """Turns with each `SceneImage` replaced by `encode(scene)` (codes `[h, w]`, e.g. the image
  tokenizer's codes of `shapes.render(scene, size)`)."""
  return [
    {
      "role": t["role"],
      "parts": [encode(p.objects()) if isinstance(p, SceneImage) else p for p in t["parts"]],
    }
    for t in turns
  ]


def texts(items: Iterable[Any]) -> list[str]:
  """Every text part of conversations / turn lists (a corpus for the SentencePiece model)."""
  out = []
  for turn in _turns(items):
    out += [p for p in turn["parts"] if isinstance(p, str)]
  return out


def _turns(items: Iterable[Any]) -> Iterator[Mapping[str, Any]]:
  for item in items:
    if isinstance(item, Mapping) and "turns" in item:
      yield from item["turns"]
    elif isinstance(item, Mapping) and "parts" in item:
      yield item
    elif isinstance(item, Mapping) and "prompt" in item:
      yield from _turns([item[k] for k in ("prompt", "chosen", "rejected") if k in item])
    elif isinstance(item, (list, tuple)):
      yield from _turns(item)


_PAIR_RE = re.compile(r"\b({})\s+({})s?\b".format("|".join(shapes.COLORS), "|".join(shapes.SHAPES)))


def pairs_used(items: Iterable[Any]) -> set[tuple[str, str]]:
  """The `(color, shape)` pairs that prompts use: named in a text ('a big red circle') or drawn
  in a scene (`SceneImage` parts, a conversation's "scene"). Items are strings, turns, turn
  lists, `conversation` items or `preference_pair`s. Keep `HELDOUT_PAIRS` out of training with
  `not pairs_used([item]) & set(shapes.HELDOUT_PAIRS)`."""
  pairs: set[tuple[str, str]] = set()
  for item in items:
    if isinstance(item, str):
      pairs |= {(m[1], m[2]) for m in _PAIR_RE.finditer(item.lower())}
      continue
    if isinstance(item, Mapping) and "scene" in item:
      pairs |= {(o["color"], o["shape"]) for o in item["scene"]}
    for turn in _turns([item]):
      for part in turn["parts"]:
        if isinstance(part, SceneImage):
          pairs |= {(c, sh) for _, c, _, sh in part.scene}
        elif isinstance(part, str):
          pairs |= pairs_used([part])
  return pairs
