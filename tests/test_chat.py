"""Chat layout, its parser, chat specials in reserved slots, and the shapes instruction data."""

import re

import numpy as np
import pytest

from vqlm import text as text_lib
from vqlm.data import chat, shapes
from vqlm.data import sequences as seq
from vqlm.errors import UserError
from vqlm.vocab import CHAT_SPECIALS, Vocab

# Small id-level vocab: text [0, 20), specials 20.. (pad bos eos boi eoi frame user assistant),
# image codes from 36.
OLD = Vocab(text_size=20, image_size=16, grid=(2, 2), num_reserved=10)
V = OLD.with_specials(CHAT_SPECIALS)
BOS, EOS, BOI, EOI, USER, ASSIST = 21, 22, 23, 24, 26, 27
IMG = np.array([[0, 1], [2, 3]])
IMG_IDS = [BOI, 36, 37, 38, 39, EOI]


def test_chat_specials_take_reserved_slots():
  assert (V.user_id, V.assistant_id) == (USER, ASSIST)
  assert V.image_offset == OLD.image_offset == 36 and V.size == OLD.size
  assert V.num_reserved == 8 and V.extends(OLD) and not OLD.extends(V)
  assert all(V.special(n) == OLD.special(n) for n in OLD.specials)
  assert V.with_specials(CHAT_SPECIALS) == V  # already there: unchanged
  assert Vocab.from_json(V.to_json()) == V and Vocab.from_json(OLD.to_json()) == OLD
  assert not Vocab(text_size=21, image_size=16, grid=(2, 2)).extends(OLD)
  with pytest.raises(UserError, match="reserved slots"):
    Vocab(text_size=20, image_size=16, grid=(2, 2), num_reserved=1).with_specials(CHAT_SPECIALS)
  with pytest.raises(UserError, match="with_specials"):
    seq.chat([{"role": "user", "parts": [[1]]}], OLD)


def test_chat_layout_and_weights():
  turns = [
    {"role": "user", "parts": [[1, 2], IMG]},
    {"role": "assistant", "parts": [[3]]},
    {"role": "user", "parts": [[4]]},
    {"role": "assistant", "parts": [IMG, [5, 6]]},
  ]
  s, mask = seq.chat(turns, V)
  want = [BOS, USER, 1, 2, *IMG_IDS, ASSIST, 3, USER, 4, ASSIST, *IMG_IDS, 5, 6, EOS]
  assert s.tokens.tolist() == want and s.tokens.dtype == np.int32
  assert s.prompt_len == 11  # through the first <assistant>
  # Assistant parts and the token closing each assistant turn (<user>, <eos>).
  on = [False] * 11 + [True, True, False, False] + [True] * 9
  assert mask.tolist() == on
  ex = seq.chat_example(s, mask, V, text_weight=0.5, image_weight=2.0)
  assert ex["tokens"].tolist() == want[:-1] and ex["targets"].tolist() == want[1:]
  w = np.where(V.is_image(ex["targets"]), 2.0, 0.5) * np.asarray(on[1:])
  np.testing.assert_array_equal(ex["loss_weights"], w)
  assert ex["loss_weights"].dtype == np.float32
  padded = seq.pad(ex, 30, pad_id=V.pad_id)
  assert padded["loss_weights"][len(want) - 1 :].sum() == 0
  # A prompt: no <eos>, ends in <assistant>.
  p, _ = seq.chat(turns[:1] + [{"role": "assistant", "parts": []}], V, eos=False)
  assert p.tokens.tolist() == want[:11]


@pytest.mark.parametrize(
  "turns, match",
  [
    ([], "at least one"),
    ([{"role": "system", "parts": []}], "role"),
    ([{"role": "user", "parts": [[1], [2]]}], "adjacent"),
    ([{"role": "user", "parts": [[]]}], "non-empty"),
    ([{"role": "user", "parts": [[25]]}], "text_ids"),
    ([{"role": "user", "parts": [np.zeros((3, 3), int)]}], "grid"),
    ([{"role": "user"}], "keys"),
  ],
)
def test_chat_bad_turns(turns, match):
  with pytest.raises(UserError, match=match):
    seq.chat(turns, V)


@pytest.fixture(scope="module")
def tok_vocab(tmp_path_factory):
  items = list(chat.conversations(400, max_objects=3, seed=1))
  pairs = [chat.preference_pair(it, index=i) for i, it in enumerate(items[:100])]
  corpus = chat.texts(items) + chat.texts(pairs) + ["hello there, a red circle"]
  prefix = str(tmp_path_factory.mktemp("sp") / "text")
  tok = text_lib.TextTokenizer.load(
    text_lib.train_sentencepiece(corpus, model_prefix=prefix, vocab_size=160)
  )
  vocab = Vocab(text_size=tok.vocab_size, image_size=16, grid=(2, 2)).with_specials(CHAT_SPECIALS)
  return tok, vocab


IMG2 = np.array([[15, 0], [7, 7]], np.int32)
ROUND_TRIPS = {
  "text": [
    {"role": "user", "parts": ["what color is the shape in the middle"]},
    {"role": "assistant", "parts": ["red"]},
  ],
  "image": [{"role": "user", "parts": [IMG]}, {"role": "assistant", "parts": [IMG2]}],
  "mixed": [
    {"role": "user", "parts": [IMG, "how many shapes are there", IMG2]},
    {"role": "assistant", "parts": ["two", IMG, "hello there, a red circle"]},
  ],
  "multi_turn": [
    {"role": "user", "parts": ["draw a big red circle in the middle"]},
    {"role": "assistant", "parts": [IMG]},
    {"role": "user", "parts": ["describe the image", IMG2]},
    {"role": "assistant", "parts": ["a large red circle in the center"]},
    {"role": "assistant", "parts": []},
  ],
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_round_trip(tok_vocab, name):
  tok, vocab = tok_vocab
  turns = ROUND_TRIPS[name]
  s, mask = chat.segment(turns, vocab, tok)
  back = chat.parse(s.tokens, vocab, tok)
  assert chat.equal_turns(back, turns), back
  # Without <bos>, followed by padding, and as an example's tokens + last target.
  padded = np.concatenate([s.tokens[1:], [vocab.pad_id] * 3])
  assert chat.equal_turns(chat.parse(padded, vocab, tok), turns)
  ex = chat.build(turns, vocab, tok)
  assert np.array_equal(np.append(ex["tokens"], ex["targets"][-1]), s.tokens)
  assert ex["loss_weights"].sum() == mask[1:].sum()


def test_round_trip_generated(tok_vocab):
  tok, vocab = tok_vocab
  rng = np.random.default_rng(0)
  for item in chat.conversations(60, max_objects=3, seed=1):
    turns = chat.with_codes(item["turns"], lambda scene: rng.integers(0, 16, (2, 2)))
    back = chat.parse(chat.segment(turns, vocab, tok)[0].tokens, vocab, tok)
    assert chat.equal_turns(back, turns)


def test_prompt_and_parse_errors(tok_vocab):
  tok, vocab = tok_vocab
  user = ROUND_TRIPS["mixed"][:1]
  p = chat.prompt(user, vocab, tok)
  assert p[-1] == vocab.assistant_id and vocab.eos_id not in p.tolist()
  assert chat.equal_turns(chat.parse(p, vocab, tok), user + [{"role": "assistant", "parts": []}])
  U, B, E = vocab.user_id, vocab.boi_id, vocab.eoi_id
  img = vocab.image_token(IMG.reshape(-1)).tolist()
  for ids, match in [
    ([5, U], "start"),
    ([U, B] + img[:3] + [E], "<boi>"),
    ([U, B] + img + [5], "<eoi>"),
    ([U, img[0]], "unexpected"),
    ([U, vocab.frame_id], "unexpected"),
  ]:
    with pytest.raises(UserError, match=match):
      chat.parse(ids, vocab, tok)
  with pytest.raises(UserError, match="with_codes"):
    chat.build([{"role": "user", "parts": [chat.SceneImage.of([])]}], vocab, tok)


def _mentioned(request):
  """Objects named in a draw request, as `shapes` dicts (synonyms mapped back)."""
  size = {w: s for s, words in chat.SIZE_WORDS.items() for w in words}
  where = {w: p for p, words in chat.WHERE_WORDS.items() for w in words}
  pat = r"a ({}) ({}) ({}) ({})".format(
    "|".join(size),
    "|".join(shapes.COLORS),
    "|".join(shapes.SHAPES),
    "|".join(sorted(where, key=len, reverse=True)),
  )
  return [
    dict(size=size[m[1]], color=m[2], shape=m[3], position=where[m[4]])
    for m in re.finditer(pat, request)
  ]


def test_conversations_are_exact_and_deterministic():
  items = list(chat.conversations(300, max_objects=3, seed=3))
  again = list(chat.conversations(300, max_objects=3, seed=3))
  assert all(
    a["kind"] == b["kind"] and chat.equal_turns(a["turns"], b["turns"])
    for a, b in zip(items, again)
  )
  other = list(chat.conversations(30, max_objects=3, seed=4))
  assert any(a["scene"] != b["scene"] for a, b in zip(items, other))
  assert chat.conversation(7, seed=3, max_objects=3)["scene"] == items[7]["scene"]
  assert {it["kind"] for it in items} == set(chat.KINDS)
  assert {len(it["scene"]) for it in items} == {1, 2, 3}
  requests, orders = [], set()
  for it in items:
    (user, reply), scene = it["turns"], it["scene"]
    if it["kind"] == "draw":
      assert reply["parts"] == [chat.SceneImage.of(scene)] and it["answer"] is None
      named = _mentioned(user["parts"][0])
      assert shapes.sort_scene(named) == scene, user["parts"][0]
      requests.append(user["parts"][0])
      orders.add(tuple(o["position"] for o in named) == tuple(o["position"] for o in scene))
      continue
    assert reply["parts"] == [it["answer"]]
    (image,) = [p for p in user["parts"] if isinstance(p, chat.SceneImage)]
    assert image.objects() == scene
    (q,) = [p for p in user["parts"] if isinstance(p, str)]
    if it["kind"] == "describe":
      assert shapes.parse_caption(it["answer"]) == scene
    else:
      assert it["answer"] == _answer(q, scene), q
  joined = " | ".join(requests)
  for word in ["big", "large", "little", "small", "in the middle", "in the center", ", "]:
    assert word in joined
  assert orders == {True, False}  # objects named in and out of canonical order


def _answer(q, scene):
  """An independent reading of a question against the scene."""
  where = {w: p for p, words in chat.WHERE_WORDS.items() for w in words}
  at = [w for w in sorted(where, key=len, reverse=True) if f" {w}" in q]
  if q.startswith("how many"):
    words = q.split()
    if words[2] in ("shapes", "objects"):
      n = len(scene)
    elif words[2] in shapes.COLORS:
      n = sum(o["color"] == words[2] for o in scene)
    else:
      n = sum(o["shape"] + "s" == words[2] for o in scene)
    return chat.NUMBERS[n]
  if q.startswith("where"):
    (obj,) = [o for o in scene if f"the {o['color']} {o['shape']}" in q]
    return shapes.POSITION_PHRASES[obj["position"]]
  (obj,) = [o for o in scene if o["position"] == where[at[0]]]
  key = "color" if "colo" in q else "shape" if "shape is" in q else "size"
  return obj[key]


def test_a_kind_named_twice_is_drawn_twice_as_often():
  kinds = ("draw", "question", "question", "describe")
  counts = {k: 0 for k in chat.KINDS}
  for it in chat.conversations(2000, kinds=kinds, seed=5):
    counts[it["kind"]] += 1
  assert counts["question"] / 2000 == pytest.approx(0.5, abs=0.04)
  assert counts["draw"] / 2000 == pytest.approx(0.25, abs=0.04)


def test_pairs_used_and_heldout():
  train = list(chat.conversations(200, max_objects=3, seed=5))
  held = set(shapes.HELDOUT_PAIRS)
  assert not chat.pairs_used(train) & held
  heldout = list(chat.conversations(50, split="test_heldout", seed=5))
  assert all(chat.pairs_used([it]) & held for it in heldout)
  assert chat.pairs_used(["draw a big red circle and a little blue triangles on the left"]) == {
    ("red", "circle"),
    ("blue", "triangle"),
  }
  draw = next(it for it in train if it["kind"] == "draw")
  assert chat.pairs_used([draw["turns"][0]["parts"][0]]) == {
    (o["color"], o["shape"]) for o in draw["scene"]
  }


def test_preference_pairs():
  for i, it in enumerate(chat.conversations(100, max_objects=3, seed=6)):
    pair = chat.preference_pair(it, index=i)
    assert pair["prompt"] == [it["turns"][0]] and pair["chosen"] == [it["turns"][1]]
    (wrong,) = pair["rejected"][0]["parts"]
    (right,) = it["turns"][1]["parts"]
    assert wrong != right and type(wrong) is type(right)
    assert not chat.pairs_used([pair]) & set(shapes.HELDOUT_PAIRS)
    if it["kind"] == "describe":
      assert shapes.parse_caption(wrong) is not None


def test_restated_draw_replies_caption_the_scene_then_draw_it():
  for i in range(20):
    plain = chat.conversation(i, kinds=("draw",), max_objects=3)
    restated = chat.conversation(i, kinds=("draw",), max_objects=3, restate=True)
    assert restated["scene"] == plain["scene"]
    assert restated["turns"][0] == plain["turns"][0]  # the same request
    caption, image = restated["turns"][1]["parts"]
    assert caption == shapes.caption(plain["scene"]) and image == plain["turns"][1]["parts"][0]
    assert shapes.canonical(shapes.parse_caption(caption)) == shapes.canonical(plain["scene"])
  question = chat.conversation(0, kinds=("question",), restate=True)
  assert question == chat.conversation(0, kinds=("question",))


def test_reasoned_question_replies_describe_the_image_then_answer():
  from vqlm.eval import chat_eval

  seen = set()
  for i in range(40):
    plain = chat.conversation(i, kinds=("question", "describe"), max_objects=3)
    reasoned = chat.conversation(i, kinds=("question", "describe"), max_objects=3, reason=True)
    assert reasoned["turns"][0] == plain["turns"][0] and reasoned["answer"] == plain["answer"]
    (reply,) = reasoned["turns"][1]["parts"]
    if plain["kind"] == "describe":
      assert reasoned == plain  # Descriptions are captions already.
      continue
    seen.add(plain["question_kind"])
    assert reply == f"{shapes.caption(plain['scene'])} so {plain['answer']}"
    assert chat.final_answer(reply) == plain["answer"] == chat.final_answer(f" {plain['answer']} ")
    assert chat_eval.is_right(reasoned, reply) and chat_eval.is_right(plain, plain["answer"])
    # The rejected reply keeps the description and changes the answer.
    (wrong,) = chat.preference_pair(reasoned, index=i)["rejected"][0]["parts"]
    assert wrong.startswith(shapes.caption(plain["scene"]) + " so ") and wrong != reply
    assert not chat_eval.is_right(reasoned, wrong)
    # The answer decides: a right description with a wrong answer is wrong.
    assert not chat_eval.is_right(reasoned, f"{shapes.caption(plain['scene'])} so blah")
  assert seen == {"color", "shape", "size", "position", "count"}


def test_focused_replies_restate_the_question_next_to_what_answers_it():
  from vqlm.eval import chat_eval

  seen = set()
  for i in range(60):
    plain = chat.conversation(i, kinds=("question",), max_objects=3, reason=True)
    focused = chat.conversation(i, kinds=("question",), max_objects=3, reason=True, focus=True)
    assert focused["turns"][0] == plain["turns"][0] and focused["answer"] == plain["answer"]
    assert plain["focus"] is None
    (reply,) = focused["turns"][1]["parts"]
    caption, focus, answer = reply.split(" so ")
    assert caption == shapes.caption(plain["scene"]) and focus == focused["focus"]
    assert answer == plain["answer"] and chat.final_answer(reply) == answer
    assert chat_eval.is_right(focused, reply)
    # The answer follows from the focus and the caption alone.
    objects = shapes.parse_caption(caption)
    phrase = {o["position"]: shapes.POSITION_PHRASES[o["position"]] for o in objects}
    kind = focused["question_kind"]
    seen.add(kind)
    if kind in ("color", "shape", "size"):
      attribute, where = focus.split(" ", 1)
      assert attribute == kind
      (obj,) = [o for o in objects if phrase[o["position"]] == where]
      assert obj[kind] == answer
    elif kind == "position":
      color, shape = focus.split(" ")
      (obj,) = [o for o in objects if (o["color"], o["shape"]) == (color, shape)]
      assert phrase[obj["position"]] == answer
    else:
      counted, listed = focus.split(" in ")
      values = listed.split(" ")
      assert len(values) == len(objects)
      n = len(values) if counted == "shapes" else values.count(counted)
      assert chat.NUMBERS[n] == answer
    # The rejected reply keeps the description and the focus and changes the answer.
    (wrong,) = chat.preference_pair(focused, index=i)["rejected"][0]["parts"]
    assert wrong.rsplit(" so ", 1)[0] == f"{caption} so {focus}" and wrong != reply
    assert not chat_eval.is_right(focused, wrong)
  assert seen == {"color", "shape", "size", "position", "count"}
  with pytest.raises(UserError, match="reason=True"):
    chat.conversation(0, focus=True)


def test_object_focus_names_the_asked_about_object_by_its_caption_phrase():
  seen = set()
  for i in range(60):
    plain = chat.conversation(i, kinds=("question",), max_objects=3, reason=True, focus=True)
    named = chat.conversation(i, kinds=("question",), max_objects=3, reason=True, focus="object")
    # The same question, answer and scene; only the focus differs.
    assert named["turns"][0] == plain["turns"][0] and named["answer"] == plain["answer"]
    (reply,) = named["turns"][1]["parts"]
    caption, focus, answer = reply.split(" so ")
    assert caption == shapes.caption(named["scene"]) and focus == named["focus"]
    assert answer == named["answer"] and chat.final_answer(reply) == answer
    kind = named["question_kind"]
    seen.add(kind)
    if kind == "count":
      assert focus == plain["focus"]  # counts keep the question's focus
      continue
    # The focus is one of the caption's object phrases, and the answer is that object's.
    (obj,) = shapes.parse_caption(focus)
    assert obj in named["scene"] and focus in caption
    want = shapes.POSITION_PHRASES[obj["position"]] if kind == "position" else obj[kind]
    assert answer == want
  assert seen == {"color", "shape", "size", "position", "count"}
  with pytest.raises(UserError, match="focus='cell'"):
    chat.conversation(0, reason=True, focus="cell")
  with pytest.raises(UserError, match="question focus='cell'"):
    chat.question(
      [{"shape": "circle", "color": "red", "size": "large", "position": "center"}],
      np.random.default_rng(0),
      focus="cell",
    )
  assert chat.reply_focus({"focus": True, "focus_style": "object"}) == "object"
  assert chat.reply_focus({"focus": True}) is True and chat.reply_focus({"reason": True}) is False
  assert chat.reply_focus({"focus": False, "focus_style": "object"}) is False


def test_dropped_requests_leave_the_user_turn_empty_and_the_rest_unchanged(tok_vocab):
  tok, vocab = tok_vocab
  dropped = 0
  for i in range(60):
    plain = chat.conversation(i, max_objects=2)
    item = chat.conversation(i, max_objects=2, drop_request=0.3)
    assert item["scene"] == plain["scene"] and item["turns"][1] == plain["turns"][1]
    if item["turns"][0]["parts"] != plain["turns"][0]["parts"]:
      assert item["kind"] == "draw" and item["turns"][0]["parts"] == []
      dropped += 1
      turns = chat.with_codes(item["turns"], lambda s: IMG)
      ids = chat.segment(turns, vocab, tok)[0].tokens.tolist()
      assert ids[:4] == [
        vocab.bos_id,
        vocab.special("user"),
        vocab.special("assistant"),
        vocab.boi_id,
      ]
  draws = sum(chat.conversation(i, max_objects=2)["kind"] == "draw" for i in range(60))
  assert 0 < dropped < draws


def test_reworded_captions_name_the_same_scene_in_request_words():
  rng = np.random.default_rng(0)
  scene = [
    {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
    {"shape": "square", "color": "blue", "size": "small", "position": "center"},
  ]
  texts = {chat.reworded_caption(shapes.caption(scene), rng) for _ in range(200)}
  assert len(texts) > 20
  for text in texts:
    a, b = text.split(" and ")
    assert {a.split()[2], b.split()[2]} == {"red", "blue"}
    red = a if "red" in a else b
    assert red.split()[1] in ("large", "big") and red.split()[3] == "circle"
    assert red.split(" circle ")[1] in chat.WHERE_WORDS["top left"]
  with pytest.raises(UserError, match="not a shapes caption; data.reword_prompts"):
    chat.reworded_caption("a dog on a sofa", rng)
