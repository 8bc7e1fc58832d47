"""The ladder demo: the parser's valid-scene verdict, `vqlm demo ladder --help`, and (slow) the
smoke preset end to end."""

import json
import os

import numpy as np
import pytest

from vqlm import cli
from vqlm.data import shapes
from vqlm.demo import ladder_measures


def _scene(*objects):
  return [dict(zip(("shape", "color", "size", "position"), o)) for o in objects]


def test_object_pixels_are_the_rendered_objects_and_edits_are_judged_by_the_parser():
  red = shapes.render(_scene(("circle", "red", "large", "center")), 32)
  magenta = shapes.render(_scene(("circle", "magenta", "large", "center")), 32)
  pixels = ladder_measures.object_pixels(np.stack([red, np.zeros_like(red)]))
  np.testing.assert_array_equal(pixels[0], red.max(-1) > 0)
  assert not pixels[1].any()
  scenes = [_scene(("circle", "red", "large", "center"))] * 3
  edited = np.stack([magenta, red, np.zeros_like(red)])
  success, colour, kept = ladder_measures._judge_edits(edited, scenes, "magenta")
  assert success == [True, False, False] and colour == [True, False, False]
  assert kept == [True, True, False]


@pytest.mark.parametrize(
  "scene",
  [
    _scene(("circle", "red", "small", "top left")),
    _scene(("triangle", "blue", "large", "center"), ("square", "yellow", "small", "bottom right")),
  ],
)
def test_rendered_scenes_are_valid(scene):
  image = shapes.render(scene, 32)
  assert ladder_measures.rerender_agreement(image) == 1.0
  assert ladder_measures.valid_scene(image)
  # Mild noise does not change the palette labels or the parsed scene.
  noisy = np.clip(image + np.random.default_rng(0).normal(0, 8, image.shape), 0, 255)
  assert ladder_measures.valid_scene(noisy.astype(np.uint8))


def test_noise_blank_and_crowded_images_are_not_valid():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
  blank = np.zeros((32, 32, 3), np.uint8)
  three = shapes.render(
    _scene(
      ("circle", "red", "small", "top left"),
      ("square", "green", "large", "center"),
      ("triangle", "cyan", "small", "bottom"),
    ),
    32,
  )
  assert not ladder_measures.valid_scene(noise)
  assert not ladder_measures.valid_scene(blank)  # No object.
  assert not ladder_measures.valid_scene(three)  # Three objects: more than the data set has.
  assert ladder_measures.valid_scene(three, max_objects=3)
  # A valid scene with a smear of stray colour over a quarter of it: the re-render disagrees.
  smeared = shapes.render(_scene(("circle", "red", "large", "center")), 32)
  smeared[:16, :16] = (128, 128, 128)
  assert ladder_measures.rerender_agreement(smeared) < 0.95
  assert not ladder_measures.valid_scene(smeared)
  assert ladder_measures.valid_rate(np.stack([blank, three, noise])) == 0.0
  assert ladder_measures.valid_rate(np.zeros((0, 32, 32, 3), np.uint8)) == 0.0


def test_ladder_help_and_demo_help(capsys):
  assert cli.main(["vqlm", "demo", "ladder", "--help"]) == 0
  out = capsys.readouterr().out
  assert "usage: vqlm demo ladder" in out and "--main" in out and "--preset" in out
  assert cli.main(["vqlm", "demo", "--help"]) == 0
  assert "--stages" in capsys.readouterr().out


def test_unknown_preset_and_missing_main_are_one_line_errors(tmp_path, capsys):
  argv = ["vqlm", "demo", "ladder", "--workdir", str(tmp_path / "l"), "--preset", "huge"]
  assert cli.main(argv) == 2
  assert "unknown ladder preset 'huge'" in capsys.readouterr().err
  argv = ["vqlm", "demo", "ladder", "--workdir", str(tmp_path / "l"), "--main", str(tmp_path)]
  assert cli.main(argv) == 2
  assert "has no trained tokenizer/" in capsys.readouterr().err


def _rates(entry):
  return [v for k, v in entry.items() if k in ("valid_scene", "success", "color", "all")]


@pytest.mark.slow
def test_ladder_smoke_end_to_end(tmp_path):
  workdir = str(tmp_path / "ladder")
  argv = ["vqlm", "demo", "ladder", "--workdir", workdir, "--preset", "smoke", "--progress=false"]
  assert cli.main(argv) == 0
  result = json.load(open(os.path.join(workdir, "ladder.json")))
  rungs = ("autoencoder", "vae", "vq", "fsq", "vqgan")
  for section in ("reconstruction", "random_points", "interpolation", "neighbours"):
    for rung in rungs:
      entry = result[section][rung]
      for rate in _rates(entry) + [entry.get("scene_agreement", 0.0)]:
        assert 0.0 <= rate <= 1.0, (section, rung, entry)
  assert 0.0 <= result["random_points"]["lm"]["valid_scene"] <= 1.0
  for rung in rungs:
    recon = result["reconstruction"][rung]
    assert recon["psnr"] > 0 and recon["compression"] > 0 and len(recon["latent_shape"]) == 3
    assert ("bits" in recon) == (rung in ("vq", "fsq", "vqgan"))
  attributes = result["attributes"]
  assert attributes["best"] in (*rungs, None)  # None: no edit succeeded in any latent.
  assert all(0.0 <= e["success"] <= 1.0 for e in attributes["per_rung"].values())
  frames = result["voronoi"]["frames"]
  assert len(frames) >= 2 and sum("usage" in f for f in frames) >= 2
  assert all(0.0 <= f["usage"] <= 1.0 for f in frames if "usage" in f)
  assert os.path.exists(os.path.join(workdir, "ladder", result["voronoi"]["gif"]))
  page = open(os.path.join(workdir, "ladder.html"), encoding="utf-8").read()
  assert "data:image/gif;base64," in page and 'src="http' not in page
  # Re-running resumes: every rung is skipped, only the measurements run again.
  assert cli.main(argv + ["--stages", "rungs,lm"]) == 0
