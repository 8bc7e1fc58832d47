"""Image-edit documents over shapes scenes: edits, their instructions, and their LM layout.

An *edit* changes a scene (`vqlm.data.shapes`) in one step and is said by one instruction:

```
move     "move the red circle to the right"          an object to the adjacent empty cell
                                                     (to the right, to the left, up, down)
recolor  "make the red circle blue"                  an object's colour
add      "add a small green triangle at the bottom"  a new object in an empty cell
remove   "remove the red circle"                     an object
```

An edit is a dict: `{"kind", "object"}` (the object acted on as it is before the edit; for "add",
the new object) plus `"direction"` (move) or `"color"` (recolor). Objects are named by colour and
shape, with the size in front only when two objects share both ("the large red circle"); an object
that shares colour, shape and size with another is never edited. `apply(scene, edit)` is the
ground truth, `instruction(scene, edit)` the text and `interpret(scene, text)` its exact inverse.

`edit_item(index, seed=..., split=...)` draws a source scene and 1..max_edits edits applied in a
row (a "story" when there are several), deterministic in `(seed, split, index)`:

    item = edit_item(3, seed=0, split="train", max_edits=1)
    item["kind"], item["instructions"]   # "move", ["move the red circle to the right"]
    item["scenes"]                       # [source, result]
    assert item["scenes"][1] == apply(item["scenes"][0], item["edits"][0])

Splits follow `shapes`: "train", "validation" and "test" never hold a held-out colour-shape pair
(`shapes.HELDOUT_PAIRS`) in any scene (recolours and additions draw from the seen pairs);
every "test_heldout" item holds one in its source or in a result (half the sources are drawn with
one, the other half without; items are drawn again from the same stream until one holds).

Layout (plain LM, no chat specials), loss only on the targets after the source image:

```
<bos> instruction_1 <boi> src <eoi> <boi> result_1 <eoi> [instruction_2 <boi> result_2 <eoi>
      ...] <eos>
prompt (one edit):  <bos> instruction <boi> src <eoi> <boi>        (`prompt_ids`)
```

The first instruction precedes the source so that no edit document starts as an image-to-text
one does (`<bos> <boi> image <eoi>` then text, always a caption): with the instruction after the
source, a model trained on both wrote edit instructions as captions of some images.
`build` gives the unpadded LM example (`sequences.to_example` with the prompt `<bos>
instruction_1 <boi> src <eoi>` masked), `parse` reads ids back into code grids and instructions.

Reasoned edits (`with_reasons`, `config.data.edit.reason`): before each result the document says
what the edit does in words, the scene before and the scene after as captions joined by
`REASON_WORD`, then draws the result from that:

```
<bos> instruction <boi> src <eoi> caption(src) so caption(result) <boi> result <eoi> <eos>
prompt (one edit):  <bos> instruction <boi> src <eoi>          (`prompt_ids(..., reason=True)`)
```

The model then reads the source as it captions images, edits a sentence, and draws the result
from its caption as it draws captions, rather than editing codes in place. On the video demo it
made fewer edits right than the plain layout: the sentence edit was the weak step
(docs/evaluation.md). The "change" style (`REASON_STYLES`) says only the object the edit changes,
before and after (`a small blue square at the bottom left so a small blue square at the bottom`,
`nothing` for the missing side of an addition or a removal): the model names the object it acts
on as it captions it, then edits the source's codes where the reason says; "caption_change"
writes the source's caption first, then that change.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import re
from typing import Any

import numpy as np

from vqlm.data import sequences, shapes
from vqlm.errors import UserError
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

KINDS = ("move", "recolor", "add", "remove")
STORY = "story"  # the kind of an item with several edits
REASON_WORD = "so"  # joins the captions of the scene before and after an edit in its reason
EMPTY_SCENE = "nothing"  # the caption of a scene with no object left (a reason's text)
# How a reason says an edit: the captions of the whole scene before and after ("scene"), the one
# object the edit changes, before and after ("change"), the source's caption and then that
# change ("caption_change"), or the source's caption, the words that name the changed object,
# then the change ("focus_change").
REASON_STYLES = ("scene", "change", "caption_change", "focus_change")
# direction -> (row, column) step on the 3x3 grid, and its words in an instruction.
DIRECTIONS: dict[str, tuple[int, int]] = {
  "right": (0, 1),
  "left": (0, -1),
  "up": (-1, 0),
  "down": (1, 0),
}
DIRECTION_WORDS: dict[str, str] = {
  "right": "to the right",
  "left": "to the left",
  "up": "up",
  "down": "down",
}
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in shapes.COLORS for s in shapes.SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
  p for p in ALL_PAIRS if p not in shapes.HELDOUT_PAIRS
)
MAX_TRIES = 1000  # draws of one item before giving up (only impossible settings get there)
_STREAM = 20  # the last entry of each item's seed: edit items draw from their own streams

Scene = list[dict]
Edit = dict[str, Any]

# ---- edits --------------------------------------------------------------------------------------


def neighbour(position: str, direction: str) -> str | None:
  """The cell next to `position` in `direction` ("right", ...), or None off the grid."""
  row, col = divmod(shapes.POSITIONS.index(position), 3)
  dr, dc = DIRECTIONS[direction]
  row, col = row + dr, col + dc
  return shapes.POSITIONS[row * 3 + col] if 0 <= row < 3 and 0 <= col < 3 else None


def reference(scene: Sequence[Mapping[str, str]], obj: Mapping[str, str]) -> str | None:
  """How an instruction names `obj` in `scene`: 'red circle' when no other object is a red
  circle, else 'large red circle' when no other is a large one, else None (not nameable)."""
  same = [o for o in scene if (o["color"], o["shape"]) == (obj["color"], obj["shape"])]
  if len(same) == 1:
    return f"{obj['color']} {obj['shape']}"
  if sum(o["size"] == obj["size"] for o in same) == 1:
    return f"{obj['size']} {obj['color']} {obj['shape']}"
  return None


def _check_edit(edit: Mapping[str, Any]) -> None:
  keys = {"move": "direction", "recolor": "color"}
  kind = edit.get("kind") if isinstance(edit, Mapping) else None
  want = {"kind", "object", *([keys[kind]] if kind in keys else [])}
  if kind not in KINDS or set(edit) != want:
    raise UserError(f"an edit is a dict with keys {sorted(want)} and a kind in {KINDS}: {edit!r}")
  shapes.validate_scene([edit["object"]])


def apply(scene: Sequence[Mapping[str, str]], edit: Mapping[str, Any]) -> Scene:
  """The scene after `edit`, in canonical order (a new list; `scene` is unchanged).

  Raises UserError when the edit does not fit the scene: its object is not in it (move, recolor,
  remove), its target cell is taken or off the grid (move, add), or the colour is unknown.
  """
  shapes.validate_scene(scene)
  _check_edit(edit)
  scene = shapes.sort_scene(scene)
  obj, kind = dict(edit["object"]), edit["kind"]
  taken = {o["position"] for o in scene}
  if kind == "add":
    if obj["position"] in taken:
      raise UserError(f"cannot add an object at the taken cell {obj['position']!r}")
    return shapes.sort_scene(scene + [obj])
  if obj not in scene:
    raise UserError(f"the edited object {obj} is not in the scene {scene}")
  rest = [o for o in scene if o != obj]
  if kind == "remove":
    return rest
  if kind == "recolor":
    if edit["color"] not in shapes.COLORS:
      raise UserError(f"recolor color must be one of {tuple(shapes.COLORS)}: {edit['color']!r}")
    return shapes.sort_scene(rest + [dict(obj, color=edit["color"])])
  if edit["direction"] not in DIRECTIONS:
    raise UserError(f"move direction must be one of {tuple(DIRECTIONS)}: {edit['direction']!r}")
  target = neighbour(obj["position"], edit["direction"])
  if target is None or target in taken:
    raise UserError(f"cannot move the object at {obj['position']!r} {edit['direction']}")
  return shapes.sort_scene(rest + [dict(obj, position=target)])


def instruction(scene: Sequence[Mapping[str, str]], edit: Mapping[str, Any]) -> str:
  """The instruction text of `edit` on `scene` ("move the red circle to the right", ...)."""
  _check_edit(edit)
  obj = edit["object"]
  if edit["kind"] == "add":
    return (
      f"add a {obj['size']} {obj['color']} {obj['shape']} "
      f"{shapes.POSITION_PHRASES[obj['position']]}"
    )
  name = reference(scene, obj) if obj in scene else None
  if name is None:
    raise UserError(f"the object {obj} is not uniquely nameable in the scene {list(scene)}")
  if edit["kind"] == "move":
    return f"move the {name} {DIRECTION_WORDS[edit['direction']]}"
  if edit["kind"] == "recolor":
    return f"make the {name} {edit['color']}"
  return f"remove the {name}"


_WORD = {
  "size": "|".join(shapes.SIZES),
  "color": "|".join(shapes.COLORS),
  "shape": "|".join(shapes.SHAPES),
}
_NAME = r"(?:(?P<size>{size}) )?(?P<color>{color}) (?P<shape>{shape})".format(**_WORD)
_WHERE_TO_POSITION = {v: k for k, v in shapes.POSITION_PHRASES.items()}
_WORDS_TO_DIRECTION = {v: k for k, v in DIRECTION_WORDS.items()}
_PATTERNS = {
  "move": re.compile(rf"move the {_NAME} (?P<direction>{'|'.join(DIRECTION_WORDS.values())})"),
  "recolor": re.compile(rf"make the {_NAME} (?P<new>{_WORD['color']})"),
  "add": re.compile(
    r"add a (?P<size>{size}) (?P<color>{color}) (?P<shape>{shape}) (?P<where>{where})".format(
      where="|".join(sorted(_WHERE_TO_POSITION, key=len, reverse=True)), **_WORD
    )
  ),
  "remove": re.compile(rf"remove the {_NAME}"),
}


def interpret(scene: Sequence[Mapping[str, str]], text: str) -> Edit | None:
  """Inverse of `instruction`: the edit `text` says on `scene`, or None when it is not an
  instruction, names no object or several, or asks for a taken or off-grid cell."""
  scene = shapes.sort_scene(scene)
  for kind, pattern in _PATTERNS.items():
    m = pattern.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
      continue
    if kind == "add":
      obj = {
        "shape": m["shape"],
        "color": m["color"],
        "size": m["size"],
        "position": _WHERE_TO_POSITION[m["where"]],
      }
      edit: Edit = {"kind": kind, "object": obj}
    else:
      named = [
        o
        for o in scene
        if (o["color"], o["shape"]) == (m["color"], m["shape"]) and m["size"] in (None, o["size"])
      ]
      if len(named) != 1:
        return None
      edit = {"kind": kind, "object": named[0]}
      if kind == "move":
        edit["direction"] = _WORDS_TO_DIRECTION[m["direction"]]
      elif kind == "recolor":
        edit["color"] = m["new"]
    try:
      apply(scene, edit)
    except UserError:
      return None
    return edit
  return None


def sample_edit(
  scene: Sequence[Mapping[str, str]],
  rng: np.random.Generator,
  *,
  kinds: Sequence[str] = KINDS,
  pairs: Sequence[tuple[str, str]] = SEEN_PAIRS,
) -> Edit | None:
  """A random edit of `scene`: a kind drawn uniformly among those of `kinds` that fit the scene,
  then uniformly among that kind's edits; colour-shape pairs that recolours and additions make
  are drawn from `pairs`. None when no kind fits (e.g. only "add" on a full grid)."""
  scene = shapes.sort_scene(scene)
  nameable = [o for o in scene if reference(scene, o) is not None]
  free = [p for p in shapes.POSITIONS if p not in {o["position"] for o in scene}]
  options: dict[str, list[Edit]] = {
    "move": [
      {"kind": "move", "object": o, "direction": d}
      for o in nameable
      for d in DIRECTIONS
      if neighbour(o["position"], d) in free
    ],
    "recolor": [
      {"kind": "recolor", "object": o, "color": c}
      for o in nameable
      for c in shapes.COLORS
      if c != o["color"] and (c, o["shape"]) in pairs
    ],
    "remove": [{"kind": "remove", "object": o} for o in nameable],
  }
  fits = [k for k in kinds if (bool(free and pairs) if k == "add" else bool(options[k]))]
  if not fits:
    return None
  kind = fits[int(rng.integers(len(fits)))]
  if kind != "add":
    return options[kind][int(rng.integers(len(options[kind])))]
  color, shape = pairs[int(rng.integers(len(pairs)))]
  size = shapes.SIZES[int(rng.integers(len(shapes.SIZES)))]
  position = free[int(rng.integers(len(free)))]
  return {
    "kind": "add",
    "object": {"shape": shape, "color": color, "size": size, "position": position},
  }


def pairs_used(items: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
  """The `(color, shape)` pairs in any scene of the items (sources and results)."""
  return {(o["color"], o["shape"]) for item in items for scene in item["scenes"] for o in scene}


def edit_item(
  index: int,
  *,
  seed: int = 0,
  split: str = "train",
  kinds: Sequence[str] = KINDS,
  min_objects: int = 1,
  max_objects: int = 2,
  max_edits: int = 1,
) -> dict[str, Any]:
  """Edit item `index` of `(seed, split)`: `{"kind", "scenes", "instructions", "edits"}`.

  `scenes` is `[source, result_1, ..., result_n]` (canonical order) with n drawn uniformly in
  `1..max_edits`; `edits[k]` turns `scenes[k]` into `scenes[k + 1]` and `instructions[k]` says
  it; `kind` is the edit's kind, or "story" when n > 1. The source follows
  `shapes.sample_scene(min_objects=..., max_objects=...)`; see the module docstring for splits.
  """
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise UserError(f"kinds={list(kinds)} must be a non-empty subset of {KINDS}.")
  if index < 0 or seed < 0 or max_edits < 1:
    raise UserError(f"index={index}, seed={seed} must be >= 0 and max_edits={max_edits} >= 1.")
  if split not in shapes.SPLITS:
    raise UserError(f"split must be one of {shapes.SPLITS}, got {split!r}")
  heldout = split == "test_heldout"
  pairs = ALL_PAIRS if heldout else SEEN_PAIRS
  rng = np.random.default_rng([int(seed), shapes.SPLITS.index(split), int(index), _STREAM])
  for _ in range(MAX_TRIES):
    num = int(rng.integers(1, max_edits + 1))
    source_split = "test" if heldout and rng.random() < 0.5 else split
    scenes = [
      shapes.sample_scene(rng, min_objects=min_objects, max_objects=max_objects, split=source_split)
    ]
    steps, texts = [], []
    for _ in range(num):
      edit = sample_edit(scenes[-1], rng, kinds=kinds, pairs=pairs)
      if edit is None:
        break
      texts.append(instruction(scenes[-1], edit))
      steps.append(edit)
      scenes.append(apply(scenes[-1], edit))
    item = {
      "kind": steps[0]["kind"] if num == 1 and steps else STORY,
      "scenes": scenes,
      "instructions": texts,
      "edits": steps,
    }
    if len(steps) == num and (not heldout or pairs_used([item]) & set(shapes.HELDOUT_PAIRS)):
      return item
  raise UserError(
    f"found no {split} edit item with kinds={list(kinds)} and {min_objects}..{max_objects} "
    f"objects in {MAX_TRIES} draws; allow more kinds or fewer objects"
  )


def scene_caption(scene: Sequence[Mapping[str, str]]) -> str:
  """`shapes.caption(scene)`, or `EMPTY_SCENE` for a scene with no objects."""
  return shapes.caption(scene) if scene else EMPTY_SCENE


def reason(
  before: Sequence[Mapping[str, str]], after: Sequence[Mapping[str, str]], style: str = "scene"
) -> str:
  """An edit said in words. Style "scene": `"<caption of before> so <caption of after>"`; style
  "change": the object the edit changes, as it is before and after (`"a small blue square at the
  bottom left so a small blue square at the bottom"`; `EMPTY_SCENE` for the missing side of an
  addition or a removal); style "caption_change": the caption of before, `REASON_WORD`, then the
  change, so that the model names the changed object by copying it from its own caption; style
  "focus_change": the caption of before, the object's name (`focus`), then the change ("a large
  red circle at the top and a small blue square on the left so blue square so a small blue
  square on the left so a small blue square in the center"): the change is then looked up in
  the caption by the words just before it, not by the instruction's far back."""
  if style not in REASON_STYLES:
    raise UserError(f"reason style {style!r}; use one of {REASON_STYLES}")
  if style == "scene":
    return f"{scene_caption(before)} {REASON_WORD} {scene_caption(after)}"
  old = [o for o in shapes.sort_scene(before) if o not in after]
  new = [o for o in shapes.sort_scene(after) if o not in before]
  change = f"{scene_caption(old)} {REASON_WORD} {scene_caption(new)}"
  if style == "change":
    return change
  if style == "focus_change":
    change = f"{focus(before, old, new)} {REASON_WORD} {change}"
  return f"{scene_caption(before)} {REASON_WORD} {change}"


def focus(
  before: Sequence[Mapping[str, str]],
  old: Sequence[Mapping[str, str]],
  new: Sequence[Mapping[str, str]],
) -> str:
  """The words that name an edit's object: its `reference` in the scene `before` (the object
  the edit moves, recolours or removes: `old`), or the size, colour and shape of an added one
  (`new`)."""
  if old:
    name = reference(before, old[0])
    if name is not None:
      return name
  obj = (old or new)[0]
  return f"{obj['size']} {obj['color']} {obj['shape']}"


def reasoned_result(text: str) -> str:
  """The caption of the result in a reason (`reason`): the text after its last `REASON_WORD`,
  stripped (the whole text when it has none)."""
  marker = f" {REASON_WORD} "
  return text.rsplit(marker, 1)[1].strip() if marker in text else text.strip()


def _caption_scene(text: str) -> list[dict] | None:
  text = text.strip()
  return [] if text == EMPTY_SCENE else shapes.parse_caption(text)


def reasoned_scene(
  text: str, source: Sequence[Mapping[str, str]] | None = None, style: str = "scene"
) -> list[dict] | None:
  """The scene a reason says the edit makes, or None when its text does not parse. Style
  "scene": its result caption (`reasoned_result`); styles "change" and "caption_change":
  `source` without the object before the change and with the object after it (None also when
  `source` lacks the former)."""
  if style == "scene":
    return _caption_scene(reasoned_result(text))
  parts = text.split(f" {REASON_WORD} ")
  want = {"change": 2, "caption_change": 3, "focus_change": 4}
  if style not in want or source is None or len(parts) != want[style]:
    return None
  old, new = (_caption_scene(part) for part in parts[-2:])
  if old is None or new is None or any(o not in source for o in old):
    return None
  scene = [o for o in source if o not in old] + new
  if len({o["position"] for o in scene}) != len(scene):
    return None
  return shapes.sort_scene(scene)


def with_reasons(item: Mapping[str, Any], style: str = "scene") -> dict[str, Any]:
  """The item with `"reasons"`: `reason(scenes[k - 1], scenes[k], style)` for each edit."""
  scenes = item["scenes"]
  return {**item, "reasons": [reason(a, b, style) for a, b in zip(scenes[:-1], scenes[1:])]}


def texts(items: Iterable[Mapping[str, Any]]) -> list[str]:
  """Every instruction of the items, in order (a corpus for the SentencePiece model)."""
  return [text for item in items for text in item["instructions"]]


# ---- layout -------------------------------------------------------------------------------------


def with_codes(item: Mapping[str, Any], encode: Callable[[Scene], np.ndarray]) -> dict[str, Any]:
  """The item with `"codes"`: `encode(scene)` (codes `[h, w]`) of each of its scenes."""
  return {**item, "codes": [encode(scene) for scene in item["scenes"]]}


def _image(codes: np.ndarray, vocab: Vocab) -> list[int]:
  flat = vocab.image_token(vocab.check_codes(codes).reshape(-1))
  return [vocab.boi_id, *np.asarray(flat).tolist(), vocab.eoi_id]


def _text(text: str, vocab: Vocab, tokenizer: TextTokenizer) -> list[int]:
  ids = vocab.encode_text(tokenizer, text)
  if not ids:
    raise UserError(f"instruction {text!r} encodes to no ids; drop empty instructions.")
  return list(ids)


def segment(
  codes: Sequence[np.ndarray],
  instructions: Sequence[str],
  vocab: Vocab,
  tokenizer: TextTokenizer,
  reasons: Sequence[str] | None = None,
) -> sequences.Segment:
  """`<bos> instructions[0] <boi> codes[0] <eoi> <boi> codes[1] <eoi> instructions[1] <boi>
  codes[2] <eoi> ... <eos>`; the prompt is `<bos> instructions[0] <boi> codes[0] <eoi>`. Needs one
  more code grid `[h, w]` than instructions. With `reasons` (one per instruction, `reason`), each
  result's `<boi>` follows its reason: `... codes[0] <eoi> reasons[0] <boi> codes[1] <eoi>
  instructions[1] reasons[1] <boi> codes[2] ...` (one text run of both).

  The first instruction comes before the source image so that no edit document starts like an
  image-to-text one (`<bos> <boi> image <eoi> text`): after an image at the start, text is always
  its caption."""
  if len(codes) != len(instructions) + 1 or not instructions:
    raise UserError(
      f"an edit document needs n >= 1 instructions and n + 1 images, got {len(instructions)} "
      f"and {len(codes)}."
    )
  if reasons is not None and len(reasons) != len(instructions):
    raise UserError(f"an edit document needs one reason per instruction, got {len(reasons)}.")
  ids = [vocab.bos_id, *_text(instructions[0], vocab, tokenizer), *_image(codes[0], vocab)]
  prompt_len = len(ids)
  runs = ["", *instructions[1:]]
  for k, (run, grid) in enumerate(zip(runs, codes[1:])):
    text = " ".join(t for t in (run, reasons[k] if reasons is not None else "") if t)
    ids += (_text(text, vocab, tokenizer) if text else []) + _image(grid, vocab)
  ids.append(vocab.eos_id)
  return sequences.Segment(np.asarray(ids, np.int32), prompt_len)


def build(
  item: Mapping[str, Any],
  vocab: Vocab,
  tokenizer: TextTokenizer,
  *,
  text_weight: float = 1.0,
  image_weight: float = 1.0,
) -> sequences.Example:
  """An item with `"codes"` (`with_codes`) -> unpadded LM example of length L - 1: weight 0 on
  the targets through the source image's `<eoi>` (the first instruction and the source),
  `text_weight` / `image_weight` after it (the results, later instructions and `<eos>`). An item
  with `"reasons"` (`with_reasons`) gets the reasoned layout."""
  if "codes" not in item:
    raise UserError("the edit item has no 'codes'; call edits.with_codes(item, encode) first.")
  seg = segment(item["codes"], item["instructions"], vocab, tokenizer, item.get("reasons"))
  return sequences.to_example(
    seg, vocab, text_weight=text_weight, image_weight=image_weight, mask_prompt=True
  )


def prompt_ids(
  src_codes: np.ndarray,
  instruction: str,
  vocab: Vocab,
  tokenizer: TextTokenizer,
  *,
  reason: bool = False,
) -> list[int]:
  """The prompt of one edit: `<bos> instruction <boi> src <eoi> <boi>` (the sampler draws the
  result's codes and `<eoi>`); with `reason`, without the last `<boi>` (the model writes its
  reason first)."""
  ids = [vocab.bos_id, *_text(instruction, vocab, tokenizer), *_image(src_codes, vocab)]
  return ids if reason else ids + [vocab.boi_id]


def parse(
  ids: Sequence[int], vocab: Vocab, tokenizer: TextTokenizer, *, reasoned: bool = False
) -> tuple[list[np.ndarray], list[str]]:
  """Inverse of `segment`: ids (a leading `<bos>` optional; read up to the first `<eos>` or
  `<pad>`) -> (code grids int32 `[h, w]`, instructions). `reasoned` (a document with reasons):
  the texts are every text run, the reason after the source included (`[instructions[0],
  reasons[0], instructions[1] + " " + reasons[1], ...]`).

  Raises UserError unless the ids are text, the source image, its result, then (text, image)
  pairs: a `<boi>` not followed by `h*w` codes and `<eoi>`, text missing or where an image must
  be, or other specials.
  """
  ids = [int(i) for i in np.asarray(ids, np.int64).reshape(-1)]
  if ids and ids[0] == vocab.bos_id:
    ids = ids[1:]
  codes: list[np.ndarray] = []
  texts: list[str] = []
  run: list[int] = []
  i, hw = 0, vocab.tokens_per_image
  while i < len(ids) and ids[i] not in (vocab.eos_id, vocab.pad_id):
    t = ids[i]
    if vocab.is_text(t):
      if len(codes) == 1 and not reasoned:
        raise UserError("the source image of an edit document is followed by its result, not text.")
      run.append(t)
      i += 1
      continue
    if t != vocab.boi_id:
      raise UserError(f"unexpected {vocab.token_name(t)} at position {i} of an edit document.")
    grid = ids[i + 1 : i + 1 + hw]
    if len(grid) < hw or not all(vocab.is_image(c) for c in grid) or i + 1 + hw >= len(ids):
      raise UserError(f"the image at position {i} is not <boi> + {hw} codes + <eoi>.")
    if ids[i + 1 + hw] != vocab.eoi_id:
      raise UserError(f"the image at position {i} is not closed by <eoi> after {hw} codes.")
    if (len(codes) != 1 or reasoned) and not run:
      raise UserError(f"the image at position {i} has no instruction before it.")
    if run:
      texts.append(tokenizer.decode(run))
      run = []
    codes.append(vocab.image_code(np.asarray(grid)).reshape(vocab.grid).astype(np.int32))
    i += hw + 2
  if run:
    raise UserError("an edit document ends with an instruction and no image after it.")
  if len(codes) < 2:
    raise UserError("an edit document needs its source image and at least one result.")
  return codes, texts
