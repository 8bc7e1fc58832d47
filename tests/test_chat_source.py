"""MixtureSource (proportions, determinism, grain iterator state), ChatExamples and building chat
examples from instructions (weights on assistant tokens only, ids that parse back)."""

import numpy as np
import pytest

from vqlm import text as text_lib
from vqlm.data import chat, chat_source, pipeline, sequences, shapes
from vqlm.errors import UserError
from vqlm.vocab import CHAT_SPECIALS, Vocab


def _mixture(seed=0, block=64, **kwargs):
  parts = {"a": list(range(1000)), "b": [f"b{i}" for i in range(150)]}
  return chat_source.MixtureSource(parts, {"a": 0.75, "b": 0.25}, seed=seed, block=block, **kwargs)


def test_mixture_proportions_hold_in_every_window_and_cover_every_element():
  mix = _mixture()
  assert mix.counts == {"a": 48, "b": 16} and mix.weights_used == {"a": 0.75, "b": 0.25}
  # Whole blocks until the 1000 elements of "a" were read once: ceil(1000 / 48) = 21 blocks.
  assert len(mix) == 21 * 64
  located = [mix.locate(i) for i in range(len(mix))]
  is_b = np.asarray([name == "b" for name, _ in located])
  for start in range(0, len(mix) - 40, 7):  # any window of 40 holds 10 b's, give or take 2
    assert abs(is_b[start : start + 40].sum() - 10) <= 2, start
  for b in range(21):  # exactly 16 per block
    assert is_b[b * 64 : (b + 1) * 64].sum() == 16
  # Every element of each part is read; "b" (150 elements, 336 slots) repeats in order.
  a = [j for name, j in located if name == "a"]
  b = [j for name, j in located if name == "b"]
  assert set(a) == set(range(1000)) and set(b) == set(range(150))
  assert sorted(b) == sorted(list(range(150)) * 2 + list(range(36)))
  assert mix[5] == (located[5][0], mix.parts[located[5][0]][located[5][1]])
  with pytest.raises(IndexError):
    mix.locate(len(mix))


def test_mixture_is_a_function_of_seed_and_index():
  one, two, other = _mixture(seed=3), _mixture(seed=3), _mixture(seed=4)
  order = [one.locate(i) for i in range(len(one))]
  assert order == [two.locate(i) for i in range(len(two))]
  assert order != [other.locate(i) for i in range(len(other))]
  assert [one.locate(i) for i in range(199, 99, -1)] == order[100:200][::-1]  # random access
  assert len(_mixture(length=100)) == 100


def test_mixture_weight_zero_and_bad_settings():
  mix = chat_source.MixtureSource({"a": [1, 2], "b": []}, {"a": 1.0, "b": 0.0}, block=8)
  assert mix.counts == {"a": 8, "b": 0} and len(mix) == 8
  assert {mix[i] for i in range(8)} == {("a", 1), ("a", 2)}
  bad = [
    ({"a": [1]}, {"b": 1.0}, {}, "one weight per part"),
    ({"a": [1]}, {"a": -1.0}, {}, "must be >= 0"),
    ({"a": [1], "b": [2]}, {"a": 1.0, "b": 1e-4}, {"block": 64}, "below 1/64"),
    ({"a": [1], "b": []}, {"a": 0.5, "b": 0.5}, {}, r"\['b'\] have a weight but no elements"),
  ]
  for parts, weights, kwargs, match in bad:
    with pytest.raises(UserError, match=match):
      chat_source.MixtureSource(parts, weights, **kwargs)


def test_mixture_through_the_pipeline_and_its_iterator_state_round_trips():
  parts = {
    "usual": [{"x": np.int32(i)} for i in range(100)],
    "chat": [np.full(3, 1000 + i, np.int32) for i in range(40)],
  }
  source = chat_source.MixtureSource(parts, {"usual": 0.5, "chat": 0.5}, seed=1, block=16)

  def usual(index, example):
    return {"x": np.full(3, example["x"], np.int32), "i": np.int32(index)}

  def chat_part(index, example):
    return {"x": example, "i": np.int32(index)}

  transform = chat_source.MixtureTransform({"usual": usual, "chat": chat_part})

  def batches(state=None, n=5):
    it = pipeline.make_iterator(
      source, global_batch_size=8, transform=transform, seed=2, num_threads=1
    )
    if state is not None:
      it.set_state(state)
    return it, [next(it) for _ in range(n)]

  it, first = batches(n=10)
  state = it.get_state()
  after = [next(it) for _ in range(16)]
  _, resumed = batches(state, n=16)
  for x, y in zip(after, resumed):
    np.testing.assert_array_equal(x["x"], y["x"])
    np.testing.assert_array_equal(x["i"], y["i"])
  # One epoch (13 blocks of 16, 26 batches): exactly half chat, every element of both parts.
  xs = np.concatenate([b["x"][:, 0] for b in first + after])
  assert len(source) == len(xs) == 208 and (xs >= 1000).sum() == 104
  assert set(xs) == set(range(100)) | set(range(1000, 1040))
  with pytest.raises(UserError, match="no transform"):
    chat_source.MixtureTransform({"usual": None})(0, ("chat", 1))


V = Vocab(text_size=20, image_size=16, grid=(2, 2)).with_specials(CHAT_SPECIALS)


def test_chat_examples_pad_like_sequences_and_batch_every_example_once():
  rng = np.random.default_rng(0)
  raw = []
  for n in (5, 9, 3):
    ex = sequences.to_example(sequences.Segment(rng.integers(0, 20, n + 1), 0), V)
    ex["loss_weights"] = rng.random(n).astype(np.float32)
    raw.append(ex)
  examples = chat_source.ChatExamples.from_examples(raw, 10, pad_id=V.pad_id, kinds="abc")
  assert len(examples) == 3 and examples.seq_len == 10 and examples.kinds == ("a", "b", "c")
  for i, ex in enumerate(raw):
    want = sequences.pad(ex, 10, pad_id=V.pad_id)
    got = examples[i]
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      assert got[key].dtype == want[key].dtype
  batches = examples.batches(2)
  assert [b["tokens"].shape for b in batches] == [(2, 10), (2, 10)]
  # The filler row repeats example 0 with weight 0: the weight sums are those of the 3 examples.
  total = sum(b["loss_weights"].sum() for b in batches)
  assert np.isclose(total, sum(ex["loss_weights"].sum() for ex in raw))
  np.testing.assert_array_equal(batches[1]["tokens"][1], examples[0]["tokens"])
  shares = [examples.batches(2, process_index=p, process_count=2) for p in (0, 1)]
  for b, (x, y) in zip(batches, zip(*shares)):
    np.testing.assert_array_equal(np.concatenate([x["tokens"], y["tokens"]]), b["tokens"])
    np.testing.assert_array_equal(
      np.concatenate([x["loss_weights"], y["loss_weights"]]), b["loss_weights"]
    )
  with pytest.raises(UserError, match="exceeds seq_len=4"):
    chat_source.ChatExamples.from_examples(raw, 4, pad_id=V.pad_id)


def test_encode_scenes_renders_in_padded_batches():
  items = [chat.conversation(i, max_objects=3) for i in range(30)]
  scenes = chat_source.distinct_scenes(items + items)
  assert list(scenes) == list(dict.fromkeys(shapes.canonical(it["scene"]) for it in items))
  seen = []

  def encode(images):  # codes: the colour sum of each 16x16 quarter of an image, mod 16
    seen.append(images.shape)
    return images.reshape(len(images), 2, 16, 2, 16, 3).sum(axis=(2, 4, 5)) % 16

  codes = chat_source.encode_scenes(
    list(scenes.values()), encode, image_size=32, batch_size=8, progress=False
  )
  assert codes.shape == (len(scenes), 2, 2) and codes.dtype == np.int32
  assert set(seen) == {(8, 32, 32, 3)}  # the last batch padded
  images = np.stack([shapes.render(s, 32) for s in scenes.values()])
  np.testing.assert_array_equal(codes, encode(images))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  corpus = chat.texts(chat.conversations(300, max_objects=3)) + ["a red circle"]
  prefix = str(tmp_path_factory.mktemp("sp") / "text")
  return text_lib.TextTokenizer.load(
    text_lib.train_sentencepiece(corpus, model_prefix=prefix, vocab_size=160)
  )


def test_built_examples_weigh_assistant_tokens_only_and_parse_back(tokenizer):
  vocab = Vocab(text_size=tokenizer.vocab_size, image_size=16, grid=(2, 2))
  vocab = vocab.with_specials(CHAT_SPECIALS)
  items = [chat.conversation(i, max_objects=3, seed=5) for i in range(40)]
  scenes = chat_source.distinct_scenes(items)
  codes = {key: np.arange(4).reshape(2, 2) * 3 % 16 + k % 5 for k, key in enumerate(scenes)}
  full = chat_source.build_examples(items, vocab, tokenizer, codes=codes, seq_len=200)
  assert full.kept.all() and len(full.examples) == 40 and full.dropped == 0
  seq_len = int(np.sort(full.lengths)[30])  # drops the longest few
  built = chat_source.build_examples(
    items, vocab, tokenizer, codes=codes, seq_len=seq_len, text_weight=0.5, image_weight=2.0
  )
  assert built.dropped == int((full.lengths > seq_len).sum()) > 0
  assert built.length_for(1.0) == full.lengths.max()
  kept = [it for it, k in zip(items, built.kept) if k]
  assert built.examples.kinds == tuple(it["kind"] for it in kept)
  for k, item in enumerate(kept):
    ex = built.examples[k]
    n = int(built.examples.lengths[k])
    turns = chat.with_codes(item["turns"], lambda s: codes[shapes.canonical(s)])
    ids = np.concatenate([ex["tokens"][:n], ex["targets"][n - 1 : n]])
    assert chat.equal_turns(chat.parse(ids, vocab, tokenizer), turns)
    _, mask = chat.segment(turns, vocab, tokenizer)
    want = np.where(vocab.is_image(ex["targets"][:n]), 2.0, 0.5) * mask[1:]
    np.testing.assert_array_equal(ex["loss_weights"][:n], want)
    assert ex["loss_weights"][n:].sum() == 0
    first_reply = int(np.argmax(ex["tokens"] == vocab.assistant_id))
    assert ex["loss_weights"][:first_reply].sum() == 0 and ex["loss_weights"].sum() > 0


def test_unwritable_texts(tokenizer):
  texts = ["draw a red circle", "draw a ßig circle", "draw  two", "draw a red circle"]
  assert chat_source.unwritable_texts(texts, tokenizer) == ["draw a ßig circle", "draw  two"]
