"""`config.data.mixture` parsing, the old `data.mode` configs, and packed rows."""

import ml_collections
import numpy as np
import pytest

from vqlm.data import sequences
from vqlm.errors import UserError
from vqlm.stages import lm_config, lm_data
from vqlm.vocab import Vocab


def test_mixture_string_and_mapping_give_every_mode():
  weights = lm_data.parse_mixture("t2i=0.4, i2t=0.4,video=0.2")
  assert weights == {"t2i": 0.4, "i2t": 0.4, "document": 0.0, "video": 0.2, "edit": 0.0}
  assert lm_data.parse_mixture({"edit": 1}) == {**dict.fromkeys(lm_data.MODES, 0.0), "edit": 1.0}


@pytest.mark.parametrize(
  "value, message",
  [
    ("t2i=0.5,film=0.5", "unknown mode 'film'"),
    ("t2i", "is not mode=weight"),
    ("t2i=lots", "not a number"),
    ("t2i=-0.1", "must be >= 0"),
    ("t2i=0,i2t=0", "every mode weight 0"),
  ],
)
def test_bad_mixtures_name_the_fix(value, message):
  with pytest.raises(UserError, match=message) as e:
    lm_data.parse_mixture(value)
  assert "--config.data.mixture" in str(e.value) or "must be >= 0" in str(e.value)


def test_default_config_and_configs_saved_before_the_mixture():
  assert lm_data.active_modes(lm_config.get_config("size=tiny")) == ["t2i", "i2t"]
  old = ml_collections.ConfigDict({"data": {"mode": "mix", "t2i_ratio": 0.75}})
  assert lm_data.mixture_weights(old)["t2i"] == 0.75
  assert lm_data.mixture_weights(old)["i2t"] == 0.25
  video = ml_collections.ConfigDict({"data": {"mode": "video"}})
  assert lm_data.active_modes(video) == ["video"]


def test_packed_rows_hold_each_example_as_its_own_segment():
  vocab = Vocab(text_size=20, image_size=16, grid=(2, 2))
  builder = sequences.SequenceBuilder(vocab=vocab, mode="t2i", seq_len=40, pack=True, seed=3)
  need = sequences.needed_seq_len(vocab, max_text_len=5)
  group = lm_data.per_row(need, 40)
  assert group == 40 // need
  records = [{"text_ids": [1 + i, 2], "codes": np.full((2, 2), i)} for i in range(group)]
  rows = lm_data.PackedRows(builder.map_with_index, group=group, seq_len=40, pad_id=vocab.pad_id)
  row = rows(7, records)
  assert row["tokens"].shape == (40,)
  for k, record in enumerate(records, start=1):
    inside = row["segment_ids"] == k
    expected = builder(record, 7 * group + k - 1)["tokens"]
    assert row["tokens"][inside].tolist() == expected.tolist()
    assert row["positions"][inside].tolist() == list(range(len(expected)))
  assert (row["loss_weights"][row["segment_ids"] == 0] == 0).all()
  # Deterministic in the row index: the same row again, another row differs only by its index.
  assert all((rows(7, records)[k] == row[k]).all() for k in row)


def test_unpadded_cuts_a_padded_row_to_its_segment():
  row = {"tokens": np.array([5, 6, 7, 0]), "segment_ids": np.array([1, 1, 1, 0])}
  assert lm_data.unpadded(row)["tokens"].tolist() == [5, 6, 7]


def test_shuffle_objects_reorders_t2i_prompts_only(tmp_path):
  from vqlm.data import shapes
  from vqlm.text import TextTokenizer, train_sentencepiece

  examples = list(shapes.make_examples(split="train", num_examples=300, min_objects=2, seed=0))
  model = train_sentencepiece(
    [e["text"] for e in examples], model_prefix=str(tmp_path / "text"), vocab_size=96
  )
  tok = TextTokenizer.load(model)
  vocab = Vocab(text_size=tok.vocab_size, image_size=16, grid=(2, 2))
  record = {"text": examples[0]["text"], "codes": np.zeros((2, 2), np.int32)}
  canonical = tok.encode(record["text"])

  def prompt_ids(mode, shuffle, index):
    builder = sequences.SequenceBuilder(vocab=vocab, mode=mode, seq_len=96, pack=True)
    transform = lm_data.ExampleTransform(
      text_model=model, builder=builder, max_text_len=64, shuffle_objects=shuffle
    )
    tokens = transform(index, record)["tokens"].tolist()
    text = [t for t in tokens if t < vocab.text_size and t != vocab.bos_id]
    return text

  shuffled = [tok.decode(prompt_ids("t2i", True, i)) for i in range(20)]
  assert {shapes.parse_caption(t) == examples[0]["scene"] for t in shuffled} == {True}
  assert len(set(shuffled)) == 2  # Both orders of the two objects, over 20 indices.
  assert shuffled == [tok.decode(prompt_ids("t2i", True, i)) for i in range(20)]  # Deterministic.
  assert prompt_ids("t2i", False, 3) == canonical

  # Reworded prompts (half of them here): the same scene in a request's words, deterministic.
  def reworded(index, limit=64):
    builder = sequences.SequenceBuilder(vocab=vocab, mode="t2i", seq_len=96, pack=True)
    transform = lm_data.ExampleTransform(
      text_model=model, builder=builder, max_text_len=limit, reword_prompts=0.5
    )
    tokens = transform(index, record)["tokens"].tolist()
    return tok.decode([t for t in tokens if t < vocab.text_size and t != vocab.bos_id])

  texts = [reworded(i) for i in range(40)]
  assert {shapes.parse_caption(t) is not None for t in texts} == {True, False}
  for t in texts:
    if shapes.parse_caption(t) is None:  # a rewording: big/little, corners, any order
      assert set(t.split()) & {"big", "little", "large", "small"}
  assert texts == [reworded(i) for i in range(40)]
  # A rewording longer than the caption limit is never cut: the caption stands instead.
  short = len(canonical)
  assert all(
    t == record["text"] or len(tok.encode(t)) <= short
    for t in map(lambda i: reworded(i, short), range(40))
  )
  # Captions the LM writes (i2t) stay canonical.
  config = lm_config.get_config("size=tiny")
  config.data.shuffle_objects = True
  assert [m for m in lm_data.MODES if lm_data.shuffles_objects(config, m)] == ["t2i"]
  config.data.shuffle_objects = False
  assert not lm_data.shuffles_objects(config, "t2i")
  config.data.reword_prompts = 0.5
  assert [lm_data.reword_share(config, m) for m in lm_data.MODES] == [0.5, 0, 0, 0, 0]
  config.data.reword_prompts = 1.5
  with pytest.raises(UserError, match=r"reword_prompts=1.5 must be in \[0, 1\]"):
    lm_data.reword_share(config, "t2i")
