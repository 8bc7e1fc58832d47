"""The LM stage trains in "document" and "video" mode from a config (tiny, a few steps each)."""

import json
import os

import numpy as np
import pytest

from vqlm import cli, imaging, runs
from vqlm.data import shapes
from vqlm.data.code_shards import CodeShards, encode_split, read_manifest
from vqlm.data.moving_shapes import MovingShapesSource
from vqlm.data.sequences import needed_seq_len
from vqlm.runs import TokenizerRun
from vqlm.stages import lm_config, lm_data
from vqlm.vocab import Vocab

FRAMES = 4  # moving_shapes' shortest clips
MAX_TEXT_LEN = lm_config.get_config("size=tiny").data.max_text_len


# Clip captions ("a large red circle moves right from ...") are longer than 5 ids.
VIDEO_CAPTION_LIMIT = ("--config.data.video_max_text_len=5",)


def _seq_len(codes: str, **kwargs) -> int:
  """The sequence length the tiny LM needs for the code shards in `codes`."""
  m = read_manifest(codes)
  vocab = Vocab(text_size=1, image_size=m["codebook_size"], grid=tuple(m["grid"]))
  return needed_seq_len(vocab, max_text_len=MAX_TEXT_LEN, **kwargs)


def _train(workdir, codes: str, *overrides: str) -> int:
  return cli.main(
    [
      "vqlm",
      "train",
      "--config",
      "configs/lm.py:size=tiny",
      f"--config.data.codes={codes}",
      "--config.train.steps=3",
      "--config.train.batch_size=2",
      "--config.eval.num_batches=1",
      # Fewer ops to compile (compilation is most of a tiny run): one layer, unchunked attention.
      "--config.model.num_layers=1",
      "--config.model.query_chunks=1",
      *overrides,
      "--workdir",
      str(workdir),
      "--progress=false",
    ]
  )


def _metrics(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  assert os.path.exists(path), "metrics.jsonl was not written"
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _valid_loss(workdir) -> float:
  losses = [r["valid/loss"] for r in _metrics(workdir) if "valid/loss" in r]
  assert losses, "no validation loss in metrics.jsonl"
  assert np.isfinite(losses[-1])
  return losses[-1]


def _example(workdir, index: int = 0) -> tuple[dict, Vocab]:
  """Training row `index` of a run's data through the stage's own source and transform."""
  config = runs.load_config(str(workdir))
  vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
  source, transform = lm_data.make_source(
    config,
    "train",
    vocab=vocab,
    text_model=os.path.join(workdir, "text.model"),
    seed=config.train.seed,
  )
  return transform(index, source[index]), vocab


def _assert_one_error_line(capsys, message: str) -> None:
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("vqlm: error:")]
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def _image_runs(tokens: np.ndarray, vocab: Vocab) -> list[tuple[int, int]]:
  """(start, stop) of each `<boi> ... <eoi>` run, each holding one whole image of codes."""
  starts = np.flatnonzero(tokens == vocab.boi_id)
  stops = np.flatnonzero(tokens == vocab.eoi_id)
  assert len(starts) == len(stops)
  for a, b in zip(starts, stops):
    assert b - a - 1 == vocab.tokens_per_image
    assert vocab.is_image(tokens[a + 1 : b]).all()
  return list(zip(starts.tolist(), stops.tolist()))


@pytest.fixture(scope="module")
def video_codes(tiny, tmp_path_factory):
  """Code shards of moving_shapes clips `[FRAMES, h, w]`, encoded by the session's tokenizer."""
  out = str(tmp_path_factory.mktemp("video") / "codes")
  run = TokenizerRun(tiny["tok"])
  for split, n in (("train", 24), ("validation", 8)):
    source = MovingShapesSource(
      split=split, image_size=run.image_size, num_clips=n, num_frames=FRAMES
    )
    encode_split(run, source, out, split=split, progress=False, log_fn=lambda *a: None)
  return out


def test_document_mode_trains(tiny, tmp_path):
  k = lm_config.get_config("size=tiny").data.pairs_per_document
  workdir = tmp_path / "lm"
  seq_len = _seq_len(tiny["codes"], mode="document", pairs=k)
  code = _train(
    workdir, tiny["codes"], "--config.data.mixture=document=1", f"--config.train.seq_len={seq_len}"
  )
  assert code == 0
  _valid_loss(workdir)
  # One element is k consecutive records: k images, all k captions, in one segment.
  example, vocab = _example(workdir, index=1)
  assert len(_image_runs(example["tokens"], vocab)) == k
  assert set(example["segment_ids"].tolist()) <= {0, 1}
  records = CodeShards(tiny["codes"], "train")
  source = lm_data.records(runs.load_config(str(workdir)), "document", "train")
  assert len(source) == len(records) // k
  assert [r["index"] for r in source[1]] == [records[i]["index"] for i in range(k, 2 * k)]


def test_video_codes_are_clips(video_codes):
  shards = CodeShards(video_codes, "train")
  grid = tuple(read_manifest(video_codes)["grid"])
  assert len(shards) == 24
  assert shards[0]["codes"].shape == (FRAMES, *grid)
  assert "moves" in shards[0]["text"]


def test_video_mode_trains(video_codes, tmp_path):
  workdir = tmp_path / "lm"
  seq_len = _seq_len(video_codes, mode="video", frames=FRAMES)
  code = _train(
    workdir,
    video_codes,
    "--config.data.mixture=video=1",
    f"--config.data.frames={FRAMES}",
    f"--config.train.seq_len={seq_len}",
  )
  assert code == 0
  _valid_loss(workdir)
  example, vocab = _example(workdir)
  tokens = example["tokens"][example["segment_ids"] > 0]
  image_runs = _image_runs(tokens, vocab)
  assert len(image_runs) == FRAMES
  # Exactly one <frame> between consecutive frames, none elsewhere.
  for (_, stop), (start, _) in zip(image_runs, image_runs[1:]):
    assert tokens[stop + 1 : start].tolist() == [vocab.frame_id]
  assert int((tokens == vocab.frame_id).sum()) == FRAMES - 1
  assert tokens[0] == vocab.bos_id


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      ("--config.data.mixture=t2i=1",),
      f"--config.data.mixture=video=1 --config.data.frames={FRAMES}",
    ),
    (("--config.data.mixture=video=1", "--config.data.frames=6"), f"--config.data.frames={FRAMES}"),
    (
      (
        "--config.data.mixture=video=1",
        f"--config.data.frames={FRAMES}",
        "--config.train.seq_len=96",
      ),
      "--config.train.seq_len=",
    ),
    (
      ("--config.data.mixture=video=1", f"--config.data.frames={FRAMES}", *VIDEO_CAPTION_LIMIT),
      "exceed data.video_max_text_len=5; set --config.data.video_max_text_len=",
    ),
  ],
)
def test_video_config_mistakes_are_one_line(video_codes, tmp_path, capsys, overrides, message):
  assert _train(tmp_path / "lm", video_codes, *overrides) == 2
  _assert_one_error_line(capsys, message)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (("--config.data.pairs_per_document=0",), "pairs_per_document=0 must be >= 1"),
    (("--config.data.pairs_per_document=3",), "--config.train.seq_len="),
    (("--config.data.mixture=video=1", "--config.data.frames=4"), "encode a video source"),
    (("--config.data.mixture=document=1,movie=1",), "unknown mode 'movie'"),
    (("--config.data.mixture=document=-1",), "document=-1 must be >= 0"),
  ],
)
def test_document_config_mistakes_are_one_line(tiny, tmp_path, capsys, overrides, message):
  args = ("--config.data.mixture=document=1", *overrides)
  assert _train(tmp_path / "lm", tiny["codes"], *args) == 2
  _assert_one_error_line(capsys, message)


def test_a_mixture_of_every_mode_trains_packs_rows_validates_per_mode_and_continues(
  tiny, video_codes, tmp_path
):
  workdir = tmp_path / "lm"
  seq_len = _seq_len(video_codes, mode="video", frames=FRAMES)
  modes = ("t2i", "i2t", "document", "video", "edit")
  code = _train(
    workdir,
    tiny["codes"],
    f"--config.data.video_codes={video_codes}",
    "--config.data.mixture=t2i=0.2,i2t=0.2,document=0.2,video=0.2,edit=0.2",
    "--config.data.edit.num_examples=40",
    "--config.data.edit.validation_examples=8",
    f"--config.data.frames={FRAMES}",
    f"--config.train.seq_len={seq_len}",
    "--config.eval.num_batches=5",
  )
  assert code == 0
  last = [r for r in _metrics(workdir) if "valid/loss" in r][-1]
  for mode in modes:
    assert np.isfinite(last[f"valid/{mode}_loss"]), mode
  assert os.path.exists(workdir / "edit_data.json")
  # The rows of the modes read from code shards (edit rows are built up front by the stage).
  config = runs.load_config(str(workdir))
  config.data.mixture = "t2i=0.2,i2t=0.2,document=0.2,video=0.2"
  vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
  source, transform = lm_data.make_source(
    config, "train", vocab=vocab, text_model=os.path.join(workdir, "text.model"), seed=0
  )
  per_t2i = lm_data.per_row(_seq_len(tiny["codes"], mode="t2i"), seq_len)
  assert per_t2i >= 2
  seen = set()
  for i in range(12):
    name, row = source[i][0], transform(i, source[i])
    seen.add(name)
    segments = set(row["segment_ids"].tolist()) - {0}
    image_runs = _image_runs(row["tokens"][row["segment_ids"] > 0], vocab)
    if name in ("t2i", "i2t"):  # several examples per row, each its own segment
      assert len(segments) == per_t2i and len(image_runs) == per_t2i, name
    if name == "video":  # a clip fills its row alone
      assert len(segments) == 1 and len(image_runs) == FRAMES
  assert seen == set(modes) - {"edit"}
  # The trained run continues an edit document: an instruction and a source image -> one image.
  src = tmp_path / "src.png"
  imaging.save_png(
    shapes.render([dict(shape="circle", color="red", size="large", position="center")], 32),
    str(src),
  )
  out = tmp_path / "edited"
  args = ["--text", "move the red circle to the right", "--image", str(src), "--mode", "image"]
  assert _continue(workdir, *args, "--num_images", "1", "--out", str(out)) == 0
  assert imaging.load_png(str(out / "image_000.png")).shape == (32, 32, 3)


def _continue(workdir, *args: str) -> int:
  return cli.main(["vqlm", "continue", "--workdir", str(workdir), *args])
