"""Image-edit documents: items per split, each kind's ground truth, instructions, the LM layout."""

from collections import Counter
import zlib

import numpy as np
import pytest

from vqlm.data import edits, shapes
from vqlm.errors import UserError
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import Vocab

HELDOUT = set(shapes.HELDOUT_PAIRS)
GRID, K = (2, 2), 16


def obj(color, shape, position, size="large"):
  return {"shape": shape, "color": color, "size": size, "position": position}


def items(split, num=150, **kwargs):
  return [edits.edit_item(i, split=split, **kwargs) for i in range(num)]


def check_item(item):
  """The scenes follow from the edits, and each instruction says its edit exactly."""
  scenes, steps = item["scenes"], item["edits"]
  assert len(scenes) == len(steps) + 1 == len(item["instructions"]) + 1
  assert item["kind"] == (steps[0]["kind"] if len(steps) == 1 else edits.STORY)
  for k, (edit, text) in enumerate(zip(steps, item["instructions"])):
    assert scenes[k + 1] == edits.apply(scenes[k], edit) == shapes.sort_scene(scenes[k + 1])
    assert edits.interpret(scenes[k], text) == edit and edits.instruction(scenes[k], edit) == text
    assert shapes.canonical(scenes[k + 1]) != shapes.canonical(scenes[k])


def test_items_are_deterministic_and_keep_the_splits_apart():
  train = items("train", max_objects=3)
  assert train == items("train", max_objects=3)
  assert train != items("train", max_objects=3, seed=1)
  assert [i["scenes"][0] for i in train] != [i["scenes"][0] for i in items("test", max_objects=3)]
  assert set(Counter(i["kind"] for i in train)) == set(edits.KINDS)
  for item in train:
    check_item(item)
    assert 1 <= len(item["scenes"][0]) <= 3
  for split in ("train", "validation", "test"):
    assert not edits.pairs_used(items(split, max_edits=2)) & HELDOUT
  held = items("test_heldout", max_edits=2)
  source_has = [bool(edits.pairs_used([{"scenes": i["scenes"][:1]}]) & HELDOUT) for i in held]
  assert all(edits.pairs_used([i]) & HELDOUT for i in held)
  assert 0.2 < np.mean(source_has) < 1.0  # some held-out pairs appear only in a result
  for item in held:
    check_item(item)
  # Stories: 1..max_edits edits in a row; each kind alone; impossible settings fail in one line.
  stories = items("train", max_edits=3)
  assert {len(i["edits"]) for i in stories} == {1, 2, 3}
  assert Counter(i["kind"] for i in stories)[edits.STORY] > 50
  for item in stories:
    check_item(item)
  for kind in edits.KINDS:
    assert {i["kind"] for i in items("test", num=20, kinds=(kind,))} == {kind}
  with pytest.raises(UserError, match="found no train edit item"):
    edits.edit_item(0, kinds=("add",), min_objects=9, max_objects=9)
  with pytest.raises(UserError, match="kinds"):
    edits.edit_item(0, kinds=("rotate",))


def test_apply_each_kind():
  circle, square = obj("red", "circle", "center"), obj("blue", "square", "right", "small")
  scene = [square, circle]
  move = {"kind": "move", "object": circle, "direction": "up"}
  assert edits.apply(scene, move) == [obj("red", "circle", "top"), square]
  assert scene == [square, circle]  # unchanged
  left = {"kind": "move", "object": circle, "direction": "left"}
  assert edits.apply(scene, left) == [obj("red", "circle", "left"), square]
  recolor = {"kind": "recolor", "object": square, "color": "green"}
  assert edits.apply(scene, recolor) == [circle, obj("green", "square", "right", "small")]
  new = obj("yellow", "triangle", "bottom left", "small")
  assert edits.apply(scene, {"kind": "add", "object": new}) == [circle, square, new]
  assert edits.apply(scene, {"kind": "remove", "object": circle}) == [square]
  assert edits.apply([circle], {"kind": "remove", "object": circle}) == []
  for bad, match in (
    ({"kind": "move", "object": circle, "direction": "right"}, "cannot move"),  # taken
    ({"kind": "move", "object": square, "direction": "right"}, "cannot move"),  # off the grid
    ({"kind": "add", "object": obj("red", "square", "center")}, "taken cell"),
    ({"kind": "remove", "object": obj("red", "circle", "top")}, "not in the scene"),
    ({"kind": "recolor", "object": circle, "color": "pink"}, "recolor color"),
    ({"kind": "spin", "object": circle}, "kind in"),
    ({"kind": "move", "object": circle}, "keys"),
  ):
    with pytest.raises(UserError, match=match):
      edits.apply(scene, bad)
  assert edits.neighbour("top left", "up") is None and edits.neighbour("top", "down") == "center"


def test_instructions_name_each_object_uniquely():
  big, small = obj("red", "circle", "top left"), obj("red", "circle", "top", "small")
  square = obj("blue", "square", "center")
  scene = [big, small, square]
  assert edits.reference(scene, square) == "blue square"
  assert edits.reference(scene, big) == "large red circle"
  assert (
    edits.instruction(scene, {"kind": "remove", "object": small}) == "remove the small red circle"
  )
  move = {"kind": "move", "object": square, "direction": "right"}
  assert edits.instruction(scene, move) == "move the blue square to the right"
  recolor = {"kind": "recolor", "object": big, "color": "blue"}
  assert edits.instruction(scene, recolor) == "make the large red circle blue"
  add = {"kind": "add", "object": obj("green", "triangle", "bottom", "small")}
  assert edits.instruction(scene, add) == "add a small green triangle at the bottom"
  assert edits.interpret(scene, "remove the red circle") is None  # two red circles
  assert edits.interpret(scene, "move the blue square up") is None  # to a taken cell
  assert edits.interpret(scene, "paint the blue square") is None
  assert edits.interpret(scene, "remove the blue square") == {"kind": "remove", "object": square}
  # Two large red circles: neither is nameable, so neither is edited (only the square or adds).
  twins = [big, obj("red", "circle", "bottom right"), square]
  assert edits.reference(twins, big) is None
  with pytest.raises(UserError, match="not uniquely nameable"):
    edits.instruction(twins, {"kind": "remove", "object": big})
  rng = np.random.default_rng(0)
  for _ in range(100):
    edit = edits.sample_edit(twins, rng, kinds=("move", "recolor", "remove"))
    assert edit["object"] == square
    if edit["kind"] == "recolor":
      assert (edit["color"], "square") not in HELDOUT
  full = [obj("red", "circle", p) for p in shapes.POSITIONS]
  assert edits.sample_edit(full, rng, kinds=("add", "move")) is None


@pytest.fixture(scope="module")
def text(tmp_path_factory):
  corpus = edits.texts(items("train", num=300, max_edits=2)) + edits.texts(items("test_heldout"))
  corpus += [edits.with_reasons(item)["reasons"][0] for item in items("train", num=100)]
  path = train_sentencepiece(
    corpus, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=64
  )
  tokenizer = TextTokenizer.load(path)
  vocab = Vocab(text_size=tokenizer.vocab_size, image_size=K, grid=GRID, num_reserved=2, pad_to=16)
  return vocab, tokenizer


def fake_codes(scene):
  """Codes `[2, 2]` that tell scenes apart (a stand-in for the image tokenizer)."""
  digest = zlib.crc32(repr(shapes.canonical(scene)).encode())
  return np.array([(digest >> (4 * i)) % K for i in range(4)], np.int32).reshape(GRID)


def test_layout_round_trip_and_loss_after_the_source(text):
  vocab, tokenizer = text
  hw = vocab.tokens_per_image
  for item in items("train", num=20, max_edits=3):
    item = edits.with_codes(item, fake_codes)
    example = edits.build(item, vocab, tokenizer, text_weight=1.0, image_weight=2.0)
    ids = np.concatenate([example["tokens"], example["targets"][-1:]])
    codes, instructions = edits.parse(ids, vocab, tokenizer)
    assert instructions == item["instructions"]
    assert len(codes) == len(item["codes"])
    for got, want in zip(codes, item["codes"]):
      np.testing.assert_array_equal(got, want)
    # No loss on the first instruction and through the source image's <eoi> (target
    # n + hw + 1); every target after it counts.
    n = len(vocab.encode_text(tokenizer, item["instructions"][0]))
    weights = example["loss_weights"]
    assert example["targets"][n + hw + 1] == vocab.eoi_id and not weights[: n + hw + 2].any()
    assert example["targets"][n + hw + 2] == vocab.boi_id  # the result follows the source
    assert weights[n + hw + 2 :].all() and example["targets"][-1] == vocab.eos_id
    assert set(weights[vocab.is_image(example["targets"])][hw:]) == {2.0}
    # The sampling prompt of the first edit is the document up to the first result's <boi>.
    prompt = edits.prompt_ids(item["codes"][0], item["instructions"][0], vocab, tokenizer)
    assert prompt == ids[: len(prompt)].tolist() and prompt[-1] == vocab.boi_id
  with pytest.raises(UserError, match="with_codes"):
    edits.build(items("train", num=1)[0], vocab, tokenizer)


def test_parse_refuses_malformed_documents(text):
  vocab, tokenizer = text
  item = edits.with_codes(items("train", num=1)[0], fake_codes)
  seg = edits.segment(item["codes"], item["instructions"], vocab, tokenizer).tokens.tolist()
  hw = vocab.tokens_per_image
  n = len(vocab.encode_text(tokenizer, item["instructions"][0]))
  instruction, source_end = seg[1 : 1 + n], n + hw + 3  # seg[:source_end]: <bos> text source
  for ids, match in (
    (seg[:source_end] + instruction + seg[source_end:], "followed by its result, not text"),
    (seg[:1] + seg[1 + n :], "no instruction before it"),
    (seg[:-1] + instruction, "ends with an instruction"),
    (seg[:source_end] + [vocab.eos_id], "at least one result"),
    (seg[: n + 4] + [vocab.eoi_id], "not <boi>"),
    (seg[: n + hw + 2] + [vocab.boi_id] + seg[source_end:], "not closed by <eoi>"),
    (seg[:-1] + [vocab.frame_id], "unexpected <frame>"),
  ):
    with pytest.raises(UserError, match=match):
      edits.parse(ids, vocab, tokenizer)
  codes, texts = edits.parse(seg + [vocab.pad_id, 5], vocab, tokenizer)  # reads up to <eos>
  assert texts == item["instructions"] and len(codes) == 2
  with pytest.raises(UserError, match="n >= 1 instructions and n \\+ 1 images"):
    edits.segment(item["codes"], [], vocab, tokenizer)


def test_reasoned_layout_round_trip_and_loss_on_the_reason(text):
  vocab, tokenizer = text
  for item in items("train", num=12, max_edits=2):
    item = edits.with_codes(edits.with_reasons(item), fake_codes)
    assert item["reasons"][0] == (
      f"{edits.scene_caption(item['scenes'][0])} so {edits.scene_caption(item['scenes'][1])}"
    )
    assert edits.reasoned_scene(item["reasons"][-1]) in (item["scenes"][-1], [])
    example = edits.build(item, vocab, tokenizer)
    ids = np.concatenate([example["tokens"], example["targets"][-1:]])
    codes, texts = edits.parse(ids, vocab, tokenizer, reasoned=True)
    runs = [f"{i} {r}" for i, r in zip(item["instructions"][1:], item["reasons"][1:])]
    assert texts == [item["instructions"][0], item["reasons"][0], *runs]
    for got, want in zip(codes, item["codes"]):
      np.testing.assert_array_equal(got, want)
    # The prompt ends with the source; the reason after it is the first target with a loss.
    prompt = edits.prompt_ids(
      item["codes"][0], item["instructions"][0], vocab, tokenizer, reason=True
    )
    assert prompt == ids[: len(prompt)].tolist() and prompt[-1] == vocab.eoi_id
    weights = example["loss_weights"]
    assert not weights[: len(prompt) - 1].any() and weights[len(prompt) - 1 :].all()
    reason_ids = vocab.encode_text(tokenizer, item["reasons"][0])
    assert ids[len(prompt) : len(prompt) + len(reason_ids)].tolist() == reason_ids
    assert ids[len(prompt) + len(reason_ids)] == vocab.boi_id
    # Read as a plain document, text after the source is refused.
    with pytest.raises(UserError, match="followed by its result, not text"):
      edits.parse(ids, vocab, tokenizer)
  # Removing the only object leaves an empty scene, said "nothing".
  lone = [obj("red", "circle", "center")]
  assert edits.reason(lone, []) == "a large red circle in the center so nothing"
  assert edits.reasoned_scene("a large red circle in the center so nothing") == []
  assert edits.reasoned_scene("so a blue blob") is None
  with pytest.raises(UserError, match="one reason per instruction"):
    edits.segment(item["codes"], item["instructions"], vocab, tokenizer, reasons=[])


def test_change_reasons_name_the_changed_object_and_give_the_result_back():
  src = [obj("red", "circle", "top left", "small"), obj("blue", "square", "center")]
  cases = {
    "move the blue square down": "a large blue square in the center so a large blue square at "
    "the bottom",
    "make the red circle green": "a small red circle at the top left so a small green circle at "
    "the top left",
    "remove the red circle": "a small red circle at the top left so nothing",
    "add a small cyan triangle on the right": "nothing so a small cyan triangle on the right",
  }
  for text, want in cases.items():
    after = edits.apply(src, edits.interpret(src, text))
    assert edits.reason(src, after, "change") == want
    assert edits.reasoned_scene(want, src, "change") == after
  for style in ("change", "caption_change", "focus_change"):
    for item in items("train", num=40):
      item = edits.with_reasons(item, style)
      said = edits.reasoned_scene(item["reasons"][0], item["scenes"][0], style)
      assert said == item["scenes"][1]
  # The caption first, then the change; read back only in its own style.
  text = edits.reason(src, [src[1]], "caption_change")
  assert text == f"{shapes.caption(src)} so a small red circle at the top left so nothing"
  assert edits.reasoned_scene(text, src, "caption_change") == [src[1]]
  assert edits.reasoned_scene(text, src, "change") is None
  # The caption, the instruction's name of the object, then the change.
  for text, name in (
    ("remove the red circle", "red circle"),
    ("add a small cyan triangle on the right", "small cyan triangle"),
  ):
    after = edits.apply(src, edits.interpret(src, text))
    focused = edits.reason(src, after, "focus_change")
    assert focused == f"{shapes.caption(src)} so {name} so {edits.reason(src, after, 'change')}"
    assert edits.reasoned_scene(focused, src, "focus_change") == after
    assert edits.reasoned_scene(focused, src, "caption_change") is None
  twins = [dict(src[0], position="center", size="large"), src[0]]
  removed = edits.apply(twins, edits.interpret(twins, "remove the large red circle"))
  assert edits.reason(twins, removed, "focus_change").split(" so ")[1] == "large red circle"
  # A reason naming an object the source lacks, a taken cell or no object says no scene.
  assert edits.reasoned_scene("a small red circle on the left so nothing", src, "change") is None
  assert (
    edits.reasoned_scene("nothing so a small cyan triangle in the center", src, "change") is None
  )
  assert edits.reasoned_scene("a blue blob", src, "change") is None
  with pytest.raises(UserError, match="reason style 'words'"):
    edits.reason(src, src, "words")
