"""The video demo: its recipe's configs and measures, `vqlm demo video --help`, its one-line
refusals, the page from a results file, and (slow) the smoke preset end to end from the main
demo's smoke run."""

import json
import os

import numpy as np
import pytest

from vqlm import cli, imaging
from vqlm.data import moving_shapes
from vqlm.demo import video
from vqlm.demo.recipe import PRESETS as MAIN_PRESETS
from vqlm.demo.video_measures import evaluator_specs
from vqlm.demo.video_recipe import PRESETS, VIDEO_FRAMES, lm_config, mixture
from vqlm.errors import UserError
from vqlm.eval import evaluators, video_eval
from vqlm.report.video import build_video_report, write_video_report
from vqlm.stages import edit_data, lm_data
from vqlm.vocab import Vocab


@pytest.mark.parametrize("name", list(PRESETS))
def test_recipe_configs_are_valid(name):
  p = PRESETS[name]
  main = MAIN_PRESETS[p.main]
  c = lm_config(p, main, codes="/m/codes", video_codes="/v/video_codes", init_from="/m/lm")
  assert c.init_from == "/m/lm" and c.data.video_codes == "/v/video_codes"
  weights = lm_data.mixture_weights(c)
  assert weights == mixture(p) and weights["video"] > 0 and weights["edit"] > 0
  assert sum(weights.values()) == pytest.approx(1.0)
  # One clip fits a row: the main demo's LM (8x8 codes, clip captions up to 24 ids) needs 426; a
  # row holds 5 caption/image pairs (captions up to 20 ids) or 3 single-edit documents (<= 146).
  main_vocab = Vocab(text_size=447, image_size=4096, grid=(8, 8))
  assert lm_data.needed(c, main_vocab, "video") == 426 <= c.train.seq_len
  assert lm_data.per_row(lm_data.needed(c, main_vocab, "t2i"), c.train.seq_len) == 5
  assert lm_data.per_row(146, c.train.seq_len) == 3
  assert c.data.frames == VIDEO_FRAMES and c.train.seq_len % 8 == 0
  edits = edit_data.settings(c)
  assert edits is not None and edits.num_examples == p.edit_examples
  assert edits.reason == p.edit_reason == "caption_change"
  c.data.edit.reason = False
  assert edit_data.settings(c).reason == ""
  c.data.edit.reason = True
  c.data.edit.reason_style = "change"
  assert edit_data.settings(c).reason == "change"
  c.data.edit.reason_style = "words"
  with pytest.raises(UserError, match="reason_style='words': use one of scene, change"):
    edit_data.settings(c)
  # The model is the main demo's (init_from needs the same shapes).
  base = MAIN_PRESETS[p.main]
  assert c.size == base.lm_size and c.model.image_pos_embed
  # Every measure builds with its settings; the main LM gets the main demo's two only.
  built = evaluators.build(evaluator_specs(p, main, video=True), log_fn=lambda *_: None)
  assert {"video_continuation", "text_to_video", "edit_test", "edit_heldout"} <= set(built)
  assert set(evaluator_specs(p, main, video=False)) == {"text_to_image", "image_to_text"}


def test_video_help(capsys):
  assert cli.main(["vqlm", "demo", "video", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--main" in out and "--preset" in out and "encode, lm, measure, report" in out
  assert cli.main(["vqlm", "demo", "--help"]) == 0
  assert "vqlm demo video" in capsys.readouterr().out


def test_video_needs_a_trained_main_demo_and_known_names(tmp_path):
  with pytest.raises(UserError, match="has no trained lm/; run `vqlm demo --workdir .* --preset"):
    video.Video(str(tmp_path / "v"), main=str(tmp_path / "nothing"))
  with pytest.raises(UserError, match="unknown video preset 'huge'; valid: smoke, default"):
    video.Video(str(tmp_path / "v"), main=str(tmp_path), preset="huge")
  assert video.video_stages("encode, lm") == ("encode", "lm")
  assert video.video_stages("all") == video.STAGES
  assert cli.main(["vqlm", "demo", "video", "--workdir", str(tmp_path / "v"), "--main", "x"]) == 2


def _artefacts(samples: str) -> None:
  """A continuation strip of 2 clips and an edit grid of 2 items, as the evaluators write them."""
  os.makedirs(samples)
  source = moving_shapes.MovingShapesSource(split="test", num_clips=2, image_size=32)
  clips = [source[0], source[1]]
  generated = np.stack([c["frames"][3:] for c in clips])
  imaging.save_png(
    video_eval.strips(clips, generated, 3), os.path.join(samples, "video_video_continuation.png")
  )
  records = [
    {"text": c["text"], "given_frames": 3, "verdicts": [{"right": True}] * 2 + [{"right": False}]}
    for c in clips
  ]
  with open(os.path.join(samples, "video_video_continuation.json"), "w", encoding="utf-8") as f:
    json.dump({"metrics": {}, "clips": records}, f)
  tiles = np.zeros((6, 32, 32, 3), np.uint8)
  imaging.save_png(imaging.make_grid(tiles, columns=3, scale=3), f"{samples}/edit_test.png")
  scene = [{"shape": "circle", "color": "red", "size": "small", "position": "center"}]
  items = [
    {"kind": "move", "instruction": "move the red circle up", "parsed": scene, "right": False},
    {"kind": "remove", "instruction": "remove the red circle", "parsed": [], "right": True},
  ]
  with open(os.path.join(samples, "edit_test.json"), "w", encoding="utf-8") as f:
    json.dump(items, f)


def test_report_shows_measures_against_the_bars(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(UserError, match="has no video.json; run `vqlm demo video"):
    build_video_report(workdir)
  models = {
    "main": {"text_to_image": {"scene": 0.99}, "image_to_text": {"scene": 1.0}},
    "mixed": {
      "text_to_image": {"scene": 0.96},
      "image_to_text": {"scene": 1.0},
      "video_continuation": {
        "next_frame": 0.97,
        "third_frame": 0.80,
        "accuracy_by_offset": {"1": 0.97, "2": 0.9, "3": 0.80},
      },
      "edit_test": {"accuracy": 0.92, "by_kind": {"move": 0.9, "remove": 1.0}},
    },
  }
  result = {"preset": "smoke", "models": models, "timings": {"lm": 12.0}, "recipe": {"video": 0.4}}
  with open(os.path.join(workdir, "video.json"), "w", encoding="utf-8") as f:
    json.dump(result, f)
  _artefacts(os.path.join(workdir, "samples", "mixed"))
  page = open(write_video_report(workdir), encoding="utf-8").read()
  # next frame 97% >= 95% met; third frame 80% < 85% not met; t2i fell 3 points.
  assert "next frame, given 3 frames</td><td>&ndash;</td><td>97.0%</td><td>&ge; 95.0%</td>" in page
  assert "third frame, given 3 frames</td><td>&ndash;</td><td>80.0%</td>" in page
  assert page.count('class="ok">met') == 3 and page.count('class="bad">not met') == 2
  assert '96.0% <span class="bad">(-3.0)</span>' in page
  assert "edits, seen pairs: remove" in page and "frame +3" in page
  assert "text-to-video, whole clip" not in page  # a measure not run has no row
  # Strips and edit rows cut from the artefacts, with their verdicts.
  assert page.count("rows: given, generated, true") == 1 and "6: <span" in page
  assert "move the red circle up" in page and "read: nothing" in page
  assert 'src="http' not in page and "lm</td><td>12 s" in page


@pytest.mark.slow
def test_video_smoke_end_to_end(tmp_path):
  main = str(tmp_path / "demo")
  assert cli.main(["vqlm", "demo", "--workdir", main, "--preset", "smoke", "--progress=false"]) == 0
  workdir = str(tmp_path / "video")
  argv = ["vqlm", "demo", "video", "--workdir", workdir, "--main", main, "--preset", "smoke"]
  argv.append("--progress=false")
  assert cli.main(argv) == 0
  result = json.load(open(os.path.join(workdir, "video.json"), encoding="utf-8"))
  assert set(result["models"]) == set(video.MODELS)
  assert set(result["models"]["main"]) >= {"text_to_image", "image_to_text"}
  mixed = result["models"]["mixed"]
  for section, key in (
    ("video_continuation", "next_frame"),
    ("video_continuation", "third_frame"),
    ("video_continuation_captioned", "next_frame"),
    ("text_to_video", "clip_accuracy"),
    ("edit_test", "accuracy"),
    ("edit_heldout", "accuracy"),
    ("text_to_image", "scene"),
    ("image_to_text", "scene"),
  ):
    assert 0.0 <= mixed[section][key] <= 1.0, (section, key)
  assert {"encode", "lm", "measure", "report"} <= set(result["timings"])
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "lm", "metrics.jsonl"))]
  logged = {k for row in metrics for k in row}
  assert {"valid/video_loss", "valid/edit_loss", "valid/t2i_loss"} <= logged
  page = open(os.path.join(workdir, "video.html"), encoding="utf-8").read()
  assert "rows: given, generated, true" in page and "source | generated | true" in page
  # Re-running resumes: every stage but the report is skipped.
  assert cli.main(argv + ["--stages", "encode,lm,measure"]) == 0
  again = json.load(open(os.path.join(workdir, "video.json"), encoding="utf-8"))
  assert again["models"] == result["models"]
  assert again["timings"]["lm"] == result["timings"]["lm"]  # a skipped stage keeps its time
