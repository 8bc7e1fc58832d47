"""LM example construction: layouts, shifted targets, loss weights, dropout, packing."""

import numpy as np
import pytest

from vqlm.data import sequences as seq
from vqlm.vocab import Vocab

# text [0, 20); pad 20 bos 21 eos 22 boi 23 eoi 24 frame 25; reserved 26 27; image [28, 44).
V = Vocab(text_size=20, image_size=16, grid=(2, 2), num_reserved=2, pad_to=8)
PAD, BOS, EOS, BOI, EOI, FRAME = 20, 21, 22, 23, 24, 25
REC = {"text_ids": [5, 6, 7], "codes": np.array([[0, 1], [2, 3]], np.int32)}
REC2 = {"text_ids": [9], "codes": np.array([[15, 14], [13, 12]], np.int32)}
VIDEO = {"text_ids": [5, 6, 7], "codes": np.arange(8, dtype=np.int32).reshape(2, 2, 2)}

T2I = [BOS, 5, 6, 7, BOI, 28, 29, 30, 31, EOI, EOS]
I2T = [BOS, BOI, 28, 29, 30, 31, EOI, 5, 6, 7, EOS]


def test_ids_assumed_by_this_file():
  assert [V.pad_id, V.bos_id, V.eos_id, V.boi_id, V.eoi_id, V.frame_id] == [20, 21, 22, 23, 24, 25]
  assert V.image_offset == 28


def test_t2i_layout():
  s = seq.t2i(REC, V)
  assert s.tokens.dtype == np.int32 and s.tokens.tolist() == T2I and s.prompt_len == 5
  dropped = seq.t2i(REC, V, drop_caption=True)
  assert dropped.tokens.tolist() == [BOS, BOI, 28, 29, 30, 31, EOI, EOS] and dropped.prompt_len == 2


def test_i2t_layout():
  s = seq.i2t(REC, V)
  assert s.tokens.tolist() == I2T and s.prompt_len == 7


def test_video_layout():
  s = seq.video(VIDEO, V)
  assert s.tokens.tolist() == [
    BOS,
    5,
    6,
    7,
    BOI,
    28,
    29,
    30,
    31,
    EOI,
    FRAME,
    BOI,
    32,
    33,
    34,
    35,
    EOI,
    EOS,
  ]
  assert s.prompt_len == 5
  one = seq.video({"text_ids": [], "codes": VIDEO["codes"][:1]}, V)
  assert one.tokens.tolist() == [BOS, BOI, 28, 29, 30, 31, EOI, EOS]


def test_document_layout():
  text_first = [5, 6, 7, BOI, 28, 29, 30, 31, EOI]
  image_first = [BOI, 43, 42, 41, 40, EOI, 9]
  seen = set()
  for seed in range(8):
    draws = np.random.default_rng(seed).random(2) < 0.5
    first = text_first if draws[0] else [BOI, 28, 29, 30, 31, EOI, 5, 6, 7]
    second = [9, BOI, 43, 42, 41, 40, EOI] if draws[1] else image_first
    s = seq.document([REC, REC2], V, np.random.default_rng(seed))
    assert s.tokens.tolist() == [BOS] + first + second + [EOS] and s.prompt_len == 0
    seen.add(tuple(draws))
  assert len(seen) >= 3  # Both orders occur for each pair.


def test_mixed_picks_by_ratio():
  assert seq.mixed(REC, V, np.random.default_rng(0), t2i_ratio=1.0).tokens.tolist() == T2I
  assert seq.mixed(REC, V, np.random.default_rng(0), t2i_ratio=0.0).tokens.tolist() == I2T
  b = seq.SequenceBuilder(vocab=V, mode="mix", t2i_ratio=0.25, seq_len=16)
  n_t2i = sum(b.segment(REC, i).tokens[1] != BOI for i in range(2000))
  assert abs(n_t2i - 500) < 4 * np.sqrt(2000 * 0.25 * 0.75)


def test_targets_are_shifted_tokens():
  for s in [seq.t2i(REC, V), seq.i2t(REC, V), seq.video(VIDEO, V)]:
    ex = seq.to_example(s, V)
    full = s.tokens.tolist()
    assert ex["tokens"].tolist() == full[:-1] and ex["targets"].tolist() == full[1:]
    assert ex["positions"].tolist() == list(range(len(full) - 1))
    assert (ex["segment_ids"] == 1).all()
    assert {k: v.dtype for k, v in ex.items()} == {
      "tokens": np.int32,
      "targets": np.int32,
      "loss_weights": np.float32,
      "segment_ids": np.int32,
      "positions": np.int32,
    }


def test_loss_weights():
  # t2i targets: 5 6 7 <boi> img img img img <eoi> <eos>
  ex = seq.to_example(seq.t2i(REC, V), V, text_weight=0.5, image_weight=2.0)
  np.testing.assert_array_equal(ex["loss_weights"], [0.5, 0.5, 0.5, 0.5, 2, 2, 2, 2, 0.5, 0.5])
  ex = seq.to_example(seq.t2i(REC, V), V, text_weight=0.5, image_weight=2.0, mask_prompt=True)
  np.testing.assert_array_equal(ex["loss_weights"], [0, 0, 0, 0, 2, 2, 2, 2, 0.5, 0.5])
  ex = seq.to_example(seq.t2i(REC, V, drop_caption=True), V, mask_prompt=True)
  np.testing.assert_array_equal(ex["loss_weights"], [0, 1, 1, 1, 1, 1, 1])
  # i2t targets: <boi> img img img img <eoi> 5 6 7 <eos>
  ex = seq.to_example(seq.i2t(REC, V), V, mask_prompt=True)
  np.testing.assert_array_equal(ex["loss_weights"], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
  ex = seq.to_example(seq.video(VIDEO, V), V, image_weight=3.0, mask_prompt=True)
  assert ex["loss_weights"][:4].tolist() == [0, 0, 0, 0]
  np.testing.assert_array_equal(
    ex["loss_weights"][4:], np.where(V.is_image(ex["targets"][4:]), 3.0, 1.0)
  )
  # A document has no prompt: mask_prompt changes nothing.
  doc = seq.document([REC, REC2], V, np.random.default_rng(0))
  np.testing.assert_array_equal(
    seq.to_example(doc, V, mask_prompt=True)["loss_weights"], np.ones(len(doc.tokens) - 1)
  )


def test_caption_dropout_rate():
  p, n = 0.3, 2000
  b = seq.SequenceBuilder(vocab=V, mode="t2i", caption_dropout=p, seq_len=16)
  dropped = sum(b(REC, i)["tokens"][1] == BOI for i in range(n))
  assert abs(dropped - p * n) < 4 * np.sqrt(n * p * (1 - p))
  never = seq.SequenceBuilder(vocab=V, mode="i2t", caption_dropout=1.0, seq_len=16)
  assert never(REC, 0)["tokens"][:10].tolist() == I2T[:-1]


def test_builder_pads_and_is_deterministic():
  b = seq.SequenceBuilder(vocab=V, mode="mix", caption_dropout=0.5, seq_len=16, seed=3)
  ex = b(REC, 7)
  n = (ex["segment_ids"] > 0).sum()
  assert all(v.shape == (16,) for v in ex.values())
  assert ex["tokens"][n:].tolist() == [PAD] * (16 - n) and (ex["targets"][n:] == PAD).all()
  assert (ex["loss_weights"][n:] == 0).all() and (ex["positions"][n:] == 0).all()
  again = seq.SequenceBuilder(vocab=V, mode="mix", caption_dropout=0.5, seq_len=16, seed=3)
  for i in [0, 7, 123]:
    x, y = b(REC, i), again(REC, i)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  other = seq.SequenceBuilder(vocab=V, mode="mix", caption_dropout=0.5, seq_len=16, seed=4)
  diffs = [not np.array_equal(b(REC, i)["tokens"], other(REC, i)["tokens"]) for i in range(40)]
  assert any(diffs)
  # Calls out of order give the same result as in order.
  forward = [b(REC, i)["tokens"] for i in range(10)]
  backward = [b(REC, i)["tokens"] for i in reversed(range(10))][::-1]
  assert all(np.array_equal(x, y) for x, y in zip(forward, backward))


def test_too_long_raises():
  b = seq.SequenceBuilder(vocab=V, mode="t2i", seq_len=9)
  with pytest.raises(ValueError, match="exceeds seq_len=9; raise seq_len to at least 10"):
    b(REC, 0)
  assert seq.needed_seq_len(V, max_text_len=3) == 10
  assert seq.SequenceBuilder(vocab=V, mode="t2i", seq_len=10)(REC, 0)["segment_ids"].all()
  assert (
    seq.needed_seq_len(V, max_text_len=3, mode="video", frames=2)
    == len(seq.video(VIDEO, V).tokens) - 1
  )
  assert (
    seq.needed_seq_len(V, max_text_len=3, mode="document", pairs=2)
    >= len(seq.document([REC, REC2], V, np.random.default_rng(0)).tokens) - 1
  )


def test_pack_first_fit():
  def example(n, start):
    return seq.to_example(seq.Segment(np.arange(start, start + n + 1, dtype=np.int32), 0), V)

  lengths = [10, 20, 10, 4]
  examples = [example(n, 2 * k) for k, n in enumerate(lengths)]
  rows = seq.pack(examples, 24, pad_id=PAD)
  assert len(rows) == 2
  r0, r1 = rows
  assert r0["segment_ids"].tolist() == [1] * 10 + [2] * 10 + [3] * 4
  assert r0["positions"].tolist() == list(range(10)) + list(range(10)) + list(range(4))
  assert r0["tokens"].tolist() == (
    examples[0]["tokens"].tolist() + examples[2]["tokens"].tolist() + examples[3]["tokens"].tolist()
  )
  assert r0["targets"].tolist() == (
    examples[0]["targets"].tolist()
    + examples[2]["targets"].tolist()
    + examples[3]["targets"].tolist()
  )
  assert r1["segment_ids"].tolist() == [1] * 20 + [0] * 4
  assert r1["positions"].tolist() == list(range(20)) + [0] * 4
  assert r1["tokens"][20:].tolist() == [PAD] * 4 and (r1["loss_weights"][20:] == 0).all()
  with pytest.raises(ValueError, match="exceeds seq_len=8"):
    seq.pack(examples, 8, pad_id=PAD)
  batch = seq.stack(rows)
  assert batch["tokens"].shape == (2, 24) and batch["loss_weights"].dtype == np.float32


def test_build_packed_keeps_weights():
  b = seq.SequenceBuilder(vocab=V, mode="t2i", seq_len=32, mask_prompt=True, pack=True)
  assert len(b(REC, 0)["tokens"]) == 10  # pack=True: unpadded.
  rows = b.build_packed([REC, REC2, REC])
  assert len(rows) == 1 + (10 + 8 + 10 > 32)
  row = rows[0]
  assert row["segment_ids"].tolist()[:28] == [1] * 10 + [2] * 8 + [3] * 10
  # Per segment, weights start with the masked prompt (caption + <boi> targets).
  assert row["loss_weights"][:10].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
  assert row["loss_weights"][10:18].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
  with pytest.raises(ValueError, match="indices"):
    b.build_packed([REC], [0, 1])


def test_document_builder_and_grouped_source():
  source = seq.GroupedSource([REC, REC2, REC, REC2, REC], k=2)
  assert len(source) == 2 and source[1] == [REC, REC2]
  b = seq.SequenceBuilder(vocab=V, mode="document", seq_len=32, seed=1)
  ex = b(source[0], 5)
  expected = seq.document([REC, REC2], V, np.random.default_rng([1, 5])).tokens
  assert ex["tokens"][: len(expected) - 1].tolist() == expected[:-1].tolist()
  with pytest.raises(ValueError, match="GroupedSource"):
    b(REC, 0)


def test_bad_records():
  with pytest.raises(ValueError, match="outside the text ids"):
    seq.t2i({"text_ids": [V.bos_id], "codes": REC["codes"]}, V)
  with pytest.raises(ValueError, match="grid"):
    seq.t2i({"text_ids": [1], "codes": np.zeros((4, 4), np.int32)}, V)
  with pytest.raises(ValueError, match="mode='video'"):
    seq.t2i(VIDEO, V)
  with pytest.raises(ValueError, match="outside"):
    seq.i2t({"text_ids": [1], "codes": np.full((2, 2), 16, np.int32)}, V)
  with pytest.raises(ValueError, match="mode="):
    seq.SequenceBuilder(vocab=V, mode="captions", seq_len=16)


def test_grain_map_with_index():
  import grain  # pylint: disable=g-import-not-at-top

  b = seq.SequenceBuilder(vocab=V, mode="t2i", caption_dropout=0.5, seq_len=16, seed=2)
  ds = grain.MapDataset.source([REC, REC2] * 4).map_with_index(b.map_with_index)
  got = [ds[i] for i in range(8)]
  for i, ex in enumerate(got):
    np.testing.assert_array_equal(ex["tokens"], b([REC, REC2][i % 2], i)["tokens"])
