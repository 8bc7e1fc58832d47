"""The demo's smoke preset end to end (slow: a few minutes on 2 cores; `pytest -m slow`)."""

import json
import os

import pytest

from vqlm import cli
from vqlm.eval.text_image import chance_scene_accuracy


@pytest.mark.slow
def test_smoke_demo_produces_every_artefact_and_learns(tmp_path):
  workdir = str(tmp_path / "demo")
  assert (
    cli.main(["vqlm", "demo", "--workdir", workdir, "--preset", "smoke", "--progress=false"]) == 0
  )
  for path in (
    "report.html",
    "eval.json",
    "samples/text_to_image.png",
    "samples/text_to_image_heldout.png",
    "samples/captions.json",
    "tokenizer/eval.json",
    "lm/vocab.json",
    "lm/text.model",
    "codes/manifest.json",
  ):
    assert os.path.exists(os.path.join(workdir, path)), path
  results = json.load(open(os.path.join(workdir, "eval.json")))
  chance = chance_scene_accuracy(2)
  assert results["tokenizer"]["psnr"] > 20
  # Patch-local codes: shapes has only ~300 distinct 4x4 patches, so a healthy tokenizer uses a
  # few hundred of its 4096 codes; a collapsed one uses a handful.
  manifest = json.load(open(os.path.join(workdir, "codes", "manifest.json")))
  assert results["tokenizer"]["codebook_usage"] * manifest["codebook_size"] >= 32
  # Bounds far below what this preset reaches (docs/evaluation.md), so that they catch a demo
  # that stopped learning, not run-to-run noise.
  assert results["text_to_image"]["scene"] > 10 * chance
  assert results["text_to_image"]["position_acc"] > 2 / 9  # Chance: one cell in nine.
  assert results["image_to_text"]["scene"] > 10 * chance
  assert results["image_to_text"]["color_acc"] > 3 / 6  # Chance: one colour in six.
  html = open(os.path.join(workdir, "report.html")).read()
  assert "https://" not in html and "<script" not in html
  # Re-running skips every finished stage.
  assert (
    cli.main(
      [
        "vqlm",
        "demo",
        "--workdir",
        workdir,
        "--preset",
        "smoke",
        "--progress=false",
        "--stages",
        "tokenizer,lm,generate",
      ]
    )
    == 0
  )
