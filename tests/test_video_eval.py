import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import test_edit_eval
from test_edit_eval import GRID, SIZE, K

from vqlm.data import shapes
from vqlm.errors import UserError
from vqlm.eval import evaluators, scene_parser, video_eval
from vqlm.sample import api
from vqlm.text import train_sentencepiece


def clips(num=4, num_frames=6, split="test", seed=0):
  return video_eval.load_clips(
    split=split, num_clips=num, num_frames=num_frames, image_size=SIZE, seed=seed
  )


def drawn(objects):
  """A frame with each `(shape, color, size, top, left)` drawn on the background."""
  frame = np.empty((SIZE, SIZE, 3), np.uint8)
  frame[...] = shapes.BACKGROUND
  for shape, color, size, top, left in objects:
    shapes.draw(frame, shape, color, shapes.layout(SIZE).sides[size], top, left)
  return frame


def shifted(clip, t, dy, dx, **changes):
  obj = dict(clip["scenes"][t][0], **changes)
  top, left = clip["boxes"][t]
  return drawn([(obj["shape"], obj["color"], obj["size"], top + dy, left + dx)])


def test_object_boxes_read_the_drawn_corner():
  for clip in clips(6):
    for frame, scene, box in zip(clip["frames"], clip["scenes"], clip["boxes"]):
      [obj] = scene_parser.object_boxes(frame)
      assert (obj["top"], obj["left"]) == tuple(box)
      assert {k: obj[k] for k in ("shape", "color", "size", "position")} == scene[0]
      assert scene_parser.parse_image(frame) == scene


def test_judge_frame_position_attributes_and_count():
  clip = clips(1)[0]
  truth = video_eval.frame_truth(clip)
  assert len(truth) == 6 and [[t["top"], t["left"]] for t in truth] == clip["boxes"].tolist()
  for t in range(6):
    assert video_eval.judge_frame(clip["frames"][t], truth[t])["right"]
  t = 2
  for dy, dx, right in [(0, 1, True), (-1, 1, True), (1, 0, True), (0, 2, False), (2, 0, False)]:
    verdict = video_eval.judge_frame(shifted(clip, t, dy, dx), truth[t])
    assert verdict["right"] is right and verdict["appearance"], (dy, dx)
  other = next(c for c in shapes.COLORS if c != truth[t]["color"])
  verdict = video_eval.judge_frame(shifted(clip, t, 0, 0, color=other), truth[t])
  assert not verdict["right"] and not verdict["appearance"]
  size = "small" if truth[t]["size"] == "large" else "large"
  assert not video_eval.judge_frame(shifted(clip, t, 0, 0, size=size), truth[t])["right"]
  # The true object plus another one in a cell the object never visits: two objects, wrong.
  cells = {s[0]["position"] for s in clip["scenes"]}
  far = next(p for p in shapes.POSITIONS if p not in cells)
  y, x = shapes.layout(SIZE).object_origin(far, "small")
  two = clip["frames"][t].copy()
  shapes.draw(two, "square", other, shapes.layout(SIZE).sides["small"], y, x)
  verdict = video_eval.judge_frame(two, truth[t])
  assert len(verdict["objects"]) == 2 and not verdict["right"]
  assert not video_eval.judge_frame(np.zeros_like(two), truth[t])["right"]


class FakeGenerator:
  """`continue_videos` returns the true frames of the clips it is asked about, passed through
  `change(frames [n, H, W, 3], clip, first) -> frames`; it records its arguments."""

  def __init__(self, clips, change=None):
    self.by_text = {clip["text"]: clip for clip in clips}
    self.clips = clips
    self.change = change or (lambda frames, clip, first: frames)
    self.calls = []

  def continue_videos(self, frames, *, num_new_frames, captions=None, **kwargs):
    self.calls.append(
      dict(frames=frames, num_new_frames=num_new_frames, captions=captions, **kwargs)
    )
    out = []
    for i, given in enumerate(frames):
      clip = self.clips[i]
      np.testing.assert_array_equal(given, clip["frames"][: len(given)])
      first = len(given)
      out.append(self.change(clip["frames"][first : first + num_new_frames], clip, first))
    return np.stack(out)


def test_continuation_accuracy_per_offset():
  cs = clips(5)
  metrics, generated, verdicts = video_eval.continuation_accuracy(
    FakeGenerator(cs), cs, given_frames=3, seed=4
  )
  assert metrics["accuracy_by_offset"] == {"1": 1.0, "2": 1.0, "3": 1.0}
  assert metrics["next_frame"] == metrics["third_frame"] == metrics["clip_accuracy"] == 1.0
  assert metrics["num_clips"] == 5 and generated.shape == (5, 3, SIZE, SIZE, 3)
  assert len(verdicts) == 5 and all(len(v) == 3 and all(x["right"] for x in v) for v in verdicts)

  def shift_all(frames, clip, first):
    return np.stack([shifted(clip, first + d, 2, 0) for d in range(len(frames))])

  gen = FakeGenerator(cs, shift_all)
  metrics, _, _ = video_eval.continuation_accuracy(gen, cs, given_frames=3, with_caption=True)
  assert metrics["accuracy_by_offset"] == {"1": 0.0, "2": 0.0, "3": 0.0}
  assert metrics["clip_accuracy"] == 0.0 and metrics["appearance_accuracy"] == 1.0
  [call] = gen.calls
  assert call["captions"] == [c["text"] for c in cs] and call["num_new_frames"] == 3

  def second_wrong_for_odd_clips(frames, clip, first):
    frames = frames.copy()
    if [c is clip for c in cs].index(True) % 2:
      frames[1] = shifted(clip, first + 1, 0, -2)
    return frames

  gen = FakeGenerator(cs, second_wrong_for_odd_clips)
  metrics, _, _ = video_eval.continuation_accuracy(gen, cs, given_frames=2)
  assert metrics["accuracy_by_offset"] == {"1": 1.0, "2": 0.6, "3": 1.0, "4": 1.0}
  assert metrics["clip_accuracy"] == 0.6 and gen.calls[0]["captions"] is None
  metrics, _, _ = video_eval.continuation_accuracy(FakeGenerator(cs), cs, given_frames=4)
  assert "third_frame" not in metrics and metrics["accuracy_by_offset"] == {"1": 1.0, "2": 1.0}
  with pytest.raises(UserError, match="given_frames"):
    video_eval.continuation_accuracy(FakeGenerator(cs), cs, given_frames=6)


def test_text_to_video_accuracy_whole_clips():
  cs = clips(4)

  def last_wrong_for_first_clip(frames, clip, first):
    frames = frames.copy()
    if clip is cs[0]:
      frames[-1] = shifted(
        clip, 5, 0, 2, color="blue" if clip["scenes"][0][0]["color"] != "blue" else "red"
      )
    return frames

  gen = FakeGenerator(cs, last_wrong_for_first_clip)
  metrics, generated, _ = video_eval.text_to_video_accuracy(gen, cs, cfg_scale=2.0, seed=1)
  assert generated.shape == (4, 6, SIZE, SIZE, 3)
  assert metrics["clip_accuracy"] == 0.75 and metrics["frame_accuracy"] == pytest.approx(23 / 24)
  assert metrics["accuracy_by_frame"]["6"] == 0.75 and metrics["accuracy_by_frame"]["1"] == 1.0
  [call] = gen.calls
  assert all(len(f) == 0 for f in call["frames"]) and call["num_new_frames"] == 6
  assert call["captions"] == [c["text"] for c in cs] and call["cfg_scale"] == 2.0


def fake_run(generator, *, data="shapes"):
  tokenizer = SimpleNamespace(
    config=SimpleNamespace(data=SimpleNamespace(name=data, image_size=SIZE))
  )
  return SimpleNamespace(
    generator=lambda batch_size: generator, tokenizer_run=lambda: tokenizer, config={"stage": "lm"}
  )


def test_evaluators_build_run_and_write_artefacts(tmp_path):
  built = evaluators.build(
    {
      "next": {"type": "video_continuation", "num_clips": 3, "with_caption": True},
      "t2v": {"type": "text_to_video", "num_clips": 2, "num_frames": 4, "cfg_scale": 3.0},
    }
  )
  assert isinstance(built["next"], video_eval.VideoContinuation) and built["next"].stage == "lm"
  assert built["next"].settings["name"] == "next" and built["next"].settings["given_frames"] == 3
  cs = clips(3)
  gen = FakeGenerator(cs)
  metrics = built["next"].run(fake_run(gen), str(tmp_path))
  assert metrics["next_frame"] == metrics["third_frame"] == 1.0 and metrics["split"] == "test"
  assert gen.calls[0]["captions"] == [c["text"] for c in cs]
  with open(tmp_path / "video_next.json") as f:
    saved = json.load(f)
  assert saved["metrics"]["num_clips"] == 3 and len(saved["clips"]) == 3
  assert saved["clips"][0]["text"] == cs[0]["text"] and len(saved["clips"][0]["verdicts"]) == 3
  assert saved["clips"][0]["truth"][0]["top"] == int(cs[0]["boxes"][3][0])
  from vqlm import imaging

  grid = imaging.load_png(str(tmp_path / "video_next.png"))
  assert grid.shape == (3 * 3 * (3 * SIZE + 2) + 2, 6 * (3 * SIZE + 2) + 2, 3)  # 3 rows per clip

  t2v_clips = clips(2, num_frames=4)
  metrics = built["t2v"].run(fake_run(FakeGenerator(t2v_clips)), str(tmp_path))
  assert metrics["clip_accuracy"] == 1.0 and metrics["settings"]["cfg_scale"] == 3.0
  grid = imaging.load_png(str(tmp_path / "video_t2v.png"))
  assert grid.shape == (2 * 2 * (3 * SIZE + 2) + 2, 4 * (3 * SIZE + 2) + 2, 3)  # no given row

  with pytest.raises(UserError, match="'imagenet'"):
    built["next"].run(fake_run(gen, data="imagenet"))
  with pytest.raises(UserError, match="given_frames"):
    evaluators.build({"x": {"type": "video_continuation", "given_frames": 6}})
  with pytest.raises(UserError, match="num_frames"):
    evaluators.build({"x": {"type": "text_to_video", "num_frames": 9}})
  with pytest.raises(UserError, match="split"):
    evaluators.build({"x": {"type": "text_to_video", "split": "dev"}})
  with pytest.raises(UserError, match="video_eval.py"):
    evaluators.build({"x": {"type": "text_to_video", "given_frames": 2}})


# ---- a tiny random LM: continue_videos through the real sampler ---------------------------------


class TinyRun(test_edit_eval.TinyRun):
  """test_edit_eval's tiny LM with a text model of clip captions and one Generator per batch
  size."""

  def __init__(self, tmp_path_factory):
    texts = [c["text"] for c in clips(40, split="train")]
    path = train_sentencepiece(
      texts, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=60
    )
    super().__init__(path)
    self._generators = {}

  def generator(self, *, batch_size=8):  # one per batch size, as `LMRun.generator`
    if batch_size not in self._generators:
      self._generators[batch_size] = api.Generator(self, batch_size=batch_size, progress=False)
    return self._generators[batch_size]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return TinyRun(tmp_path_factory)


def test_continue_videos_prompts_and_frames(tiny, monkeypatch):
  """The prompts, guidance and sampler settings `continue_videos` passes on, and how it cuts the
  sampled ids into frames (the sampler replaced by one that writes known codes)."""
  gen = api.Generator(tiny, batch_size=2, progress=False)
  v, hw = gen.vocab, gen.vocab.tokens_per_image
  calls = []

  def codes_of(row, frame):
    return [(3 * row + frame + k) % K for k in range(hw)]

  def fake_run_batches(prompts, **kwargs):
    calls.append(dict(prompts=prompts, **kwargs))
    rows = []
    for r, prompt in enumerate(prompts):
      ids = []
      for f in range(kwargs["num_images"]):
        if f or prompt[-1] != v.boi_id:
          ids += [v.frame_id, v.boi_id]
        ids += [v.image_offset + c for c in codes_of(r, f)] + [v.eoi_id]
      rows.append(ids + [v.eos_id])
    assert max(map(len, rows)) == kwargs["max_new_tokens"]  # the grammar's exact length
    width = kwargs["max_new_tokens"]
    tokens = np.array([r + [v.pad_id] * (width - len(r)) for r in rows], np.int32)
    return tokens, np.array([len(r) for r in rows])

  monkeypatch.setattr(gen, "_run_batches", fake_run_batches)
  cs = clips(3)
  captions = [c["text"] for c in cs]
  for given, cfg in [(2, None), (0, 2.0)]:
    calls.clear()
    out = gen.continue_videos(
      [c["frames"][:given] for c in cs], num_new_frames=3, captions=captions, cfg_scale=cfg, seed=7
    )
    assert out.shape == (3, 3, SIZE, SIZE, 3) and out.dtype == np.uint8
    for r in range(3):
      for f in range(3):
        grid = np.array(codes_of(r, f), np.int32).reshape(GRID)
        np.testing.assert_array_equal(out[r, f], gen.image_tokenizer.decode(grid[None])[0])
    [call] = calls
    assert call["mode"] == "video" and call["num_images"] == 3 and call["seed"] == 7
    for r, prompt in enumerate(call["prompts"]):
      expected = [v.bos_id, *gen.text_ids(captions[r])]
      codes = gen.encode_images(cs[r]["frames"][:given])
      for t, c in enumerate(codes):
        expected += ([v.frame_id] if t else []) + gen.image_ids(c)
      assert prompt == expected + ([] if given else [v.boi_id])
    if cfg:
      assert call["cfg_scale"] == 2.0 and call["uncond_prompts"] == [[v.bos_id, v.boi_id]] * 3
    else:
      assert call["cfg_scale"] is None and call["uncond_prompts"] is None
  with pytest.raises(UserError, match="captions"):
    gen.continue_videos([cs[0]["frames"][:1]] * 2, num_new_frames=1, captions=captions)
  with pytest.raises(UserError, match=r"\[T, H, W, 3\]"):
    gen.continue_videos([cs[0]["frames"][0]], num_new_frames=1)
  with pytest.raises(UserError, match="num_new_frames"):
    gen.continue_videos([cs[0]["frames"][:1]], num_new_frames=0)


@pytest.mark.slow
def test_continue_videos_and_evaluators_on_a_tiny_lm(tiny, tmp_path):
  """The real sampler (about 15 s of compiling on a CPU)."""
  gen = tiny.generator(batch_size=4)
  cs = clips(3)
  given = [c["frames"][:2] for c in cs]
  captions = [c["text"] for c in cs]
  out = gen.continue_videos(given, num_new_frames=2, captions=captions, seed=3)
  assert out.shape == (3, 2, SIZE, SIZE, 3) and out.dtype == np.uint8
  # Row i draws with seed (3, i): the batch's clip 0 is the single-clip call's.
  one = gen.continue_video(given[0], num_new_frames=2, caption=captions[0], seed=3)
  np.testing.assert_array_equal(one, out[0])
  codes = gen.encode_images(out.reshape(-1, SIZE, SIZE, 3))  # every frame decodes from codes
  np.testing.assert_array_equal(gen.image_tokenizer.decode(codes), out.reshape(-1, SIZE, SIZE, 3))
  t2v = gen.continue_videos(
    [c["frames"][:0] for c in cs], num_new_frames=2, captions=captions, cfg_scale=2.0
  )
  assert t2v.shape == (3, 2, SIZE, SIZE, 3)

  evaluator = video_eval.VideoContinuation(num_clips=3, given_frames=2, num_frames=4, batch_size=4)
  metrics = evaluator.run(tiny, str(tmp_path))
  assert set(metrics["accuracy_by_offset"]) == {"1", "2"} and metrics["num_clips"] == 3
  assert 0.0 <= metrics["next_frame"] <= 1.0
  assert os.path.exists(tmp_path / "video_video_continuation.png")
