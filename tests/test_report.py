"""Tests for vqlm.report: the self-contained HTML report of a demo workdir."""

import base64
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest

from vqlm import imaging, report
from vqlm.data import shapes

SECTION_IDS = ("summary", "losses", "codebook", "reconstructions", "text-to-image", "image-to-text")


def _scene_metrics(scene: float) -> dict:
  base = {
    "count": 0.95,
    "position": 0.81,
    "color": 0.77,
    "shape": 0.88,
    "size": 0.9,
    "scene": scene,
    "position_acc": 0.86,
    "color_acc": 0.83,
    "shape_acc": 0.91,
    "size_acc": 0.93,
  }
  return {
    **base,
    "num_images": 8,
    "by_objects": {
      "1_objects": {"num": 4, **base, "scene": 0.875},
      "2_objects": {"num": 4, **base, "scene": 0.125},
    },
  }


def _write_jsonl(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _captions(n: int) -> list[str]:
  rng = np.random.default_rng(0)
  return [shapes.caption(shapes.sample_scene(rng, min_objects=2, max_objects=2)) for _ in range(n)]


def _fake_workdir(root: str) -> str:
  """A demo workdir with every artefact but the held-out text-to-image, scene FD and timings."""
  rng = np.random.default_rng(0)
  ev = {
    "tokenizer": {
      "psnr": 27.346,
      "ssim": 0.912,
      "codebook_usage": 0.8125,
      "codebook_perplexity": 11.5,
      "dead_codes": 3,
      "scene_agreement": 0.964,
      "heldout_scene_agreement": 0.853,
      "split": "test",
      "num_examples": 64,
      "step": 40,
    },
    "text_to_image": {
      **_scene_metrics(0.6875),
      "num_prompts": 4,
      "settings": {"image_temperature": 0.3, "cfg_scale": 1.0},
    },
    "image_to_text": {**_scene_metrics(0.4375), "parseable": 0.9375},
  }
  with open(os.path.join(root, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(ev, f)
  tok = os.path.join(root, "tokenizer")
  _write_jsonl(
    os.path.join(tok, "metrics.jsonl"),
    [
      {
        "step": s,
        "train/loss": 1.0 / s,
        "train/recon_loss": 0.5 / s,
        "train/psnr": 10.0 + s / 4,
        "train/usage": min(1.0, s / 40),
        "train/perplexity": 2.0 + s / 5,
        "train/dead_codes": 16 - s // 4,
      }
      for s in (10, 20, 30, 40)
    ]
    + [{"step": 40, "valid/psnr_grid": 19.5}],
  )
  _write_jsonl(
    os.path.join(root, "lm", "metrics.jsonl"),
    [
      {
        "step": s,
        "train/loss": 3.0 / s,
        "train/text_loss": 2.0 / s,
        "train/image_loss": 4.0 / s,
        "train/text_acc": 0.5,
        "train/image_acc": 0.3,
        "train/num_tokens_per_sec": 1000.0 + s,
      }
      for s in (1, 2, 3, 4)
    ]
    + [
      {
        "step": 4,
        "valid/loss": 0.9,
        "valid/text_loss": 0.6,
        "valid/image_loss": 1.1,
        "valid/text_perplexity": 1.82,
        "valid/image_perplexity": 3.0,
      }
    ],
  )
  images = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
  for step in (20, 40):
    imaging.save_png(
      imaging.make_grid(images, columns=4, scale=2),
      os.path.join(tok, "samples", f"recon_{step:07d}.png"),
    )
    np.save(
      os.path.join(tok, "samples", f"codebook_{step:07d}.npy"),
      rng.normal(size=(16, 4)).astype(np.float32),
    )
  samples = os.path.join(root, "samples")
  imaging.save_png(
    imaging.make_grid(images, columns=2, scale=3), os.path.join(samples, "text_to_image.png")
  )
  prompts = _captions(4)
  prompts[0] += " <b>&"  # Must come out escaped.
  with open(os.path.join(samples, "text_to_image.json"), "w", encoding="utf-8") as f:
    json.dump(prompts, f)
  truths = _captions(5)
  a, b = truths[0].split(" and ")
  captions = [
    {"truth": truths[0], "caption": f"{b} and {a}"},  # Same scene, other order.
    {"truth": truths[1], "caption": truths[2]},
    {"truth": truths[3], "caption": truths[3]},
    {"truth": truths[4], "caption": "garbage"},
  ]
  with open(os.path.join(samples, "captions.json"), "w", encoding="utf-8") as f:
    json.dump(captions, f)
  np.save(
    os.path.join(samples, "caption_images.npy"),
    rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
  )
  return root


def _img_srcs(text: str) -> list[str]:
  return re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)


def _check_self_contained(text: str) -> None:
  for bad in ("http://", "https://", 'src="/', "<script", "<link", "url(", "@import"):
    assert bad not in text, bad
  assert text.count("<img") == len(_img_srcs(text))
  for src in _img_srcs(text):
    assert src.startswith("data:image/png;base64,")
    Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()


def test_full_report(tmp_path):
  root = _fake_workdir(str(tmp_path))
  path = report.write_report(root)
  assert path == os.path.join(root, "report.html")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.startswith("<!DOCTYPE html>")
  for sid in SECTION_IDS:
    assert f'<h2 id="{sid}">' in text
  _check_self_contained(text)
  # Numbers from eval.json.
  for expected in (
    "27.35 dB",
    "0.912",
    "81.2%",
    "96.4%",
    "85.3%",
    "68.8%",
    "43.8%",
    "87.5%",
    "12.5%",
    "93.8%",
    "1 object",
    "2 objects",
    "image temperature 0.3",
  ):
    assert expected in text, expected
  # Held-out text-to-image (its metrics and its samples), scene FD and timings were not run;
  # everything else was.
  assert text.count("not run") == 4
  assert "Text to image (held-out colour-shape pairs): not run" in text
  assert "Scene FD: not run" in text and "Timings: not run" in text
  assert "Held-out prompts (colour-shape pairs never seen in training): not run" in text
  # Images: 2 loss figures + usage + projection, 2 recon grids, 4 prompt rows, 3 captioned images.
  assert len(_img_srcs(text)) == 4 + 2 + 4 + 3
  assert "Step 40 (latest)" in text and "Step 20 (first)" in text
  assert "16 code vectors of dimension 4 at 2 points" in text
  assert "did not move" not in text
  # Prompts escaped, captions marked: 2 of 4 describe the true scene.
  assert "&lt;b&gt;&amp;" in text and "<b>&" not in text
  assert "2 of 4 generated captions" in text
  assert text.count('class="ok"') == 2 and text.count('class="bad"') == 1  # 3 rows shown.
  assert "text perplexity 1.82 (step 4)" in text


def test_fixed_codebook_is_said_to_be_fixed(tmp_path):
  root = _fake_workdir(str(tmp_path))
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 4)] * 2), -1).reshape(16, 2)
  for step in (20, 40):
    np.save(
      os.path.join(root, "tokenizer", "samples", f"codebook_{step:07d}.npy"),
      grid.astype(np.float32),
    )
  with open(report.write_report(root), encoding="utf-8") as f:
    text = f.read()
  assert "16 code vectors of dimension 2 at 2 points" in text
  assert "The code words did not move during training" in text


def test_prompt_rows_cropped_from_grid(tmp_path):
  root = _fake_workdir(str(tmp_path))
  html_text = report.text_to_image_section(os.path.join(root, "samples"))
  srcs = _img_srcs(html_text)
  assert len(srcs) == 4
  strip = np.asarray(Image.open(io.BytesIO(base64.b64decode(srcs[1].split(",", 1)[1]))))
  # 2 images of 8*3 pixels per row, padded by 2 on every side.
  assert strip.shape == (24 + 4, 2 * (24 + 2) + 2, 3)


def test_empty_workdir_says_not_run(tmp_path):
  text = open(report.write_report(str(tmp_path)), encoding="utf-8").read()
  for sid in SECTION_IDS:
    assert f'<h2 id="{sid}">' in text
  _check_self_contained(text)
  assert not _img_srcs(text)
  for what in (
    "Tokenizer evaluation",
    "Text to image (test prompts)",
    "Image to text (test images)",
    "Scene FD",
    "Timings",
    "LM training metrics",
    "Tokenizer training metrics",
    "Codebook snapshots",
    "Reconstruction grids",
    "Captions",
  ):
    assert f"{what}: not run" in text, what


def test_missing_workdir_raises(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    report.write_report(str(tmp_path / "nope"))


def test_split_grid_rows_round_trip():
  images = np.arange(6 * 5 * 5 * 3, dtype=np.uint8).reshape(6, 5, 5, 3)
  grid = imaging.make_grid(images, columns=2, scale=2)
  strips = report.split_grid_rows(grid, 3)
  assert len(strips) == 3
  for r, strip in enumerate(strips):
    np.testing.assert_array_equal(strip[2:12, 2:12], images[2 * r].repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(strip[2:12, 14:24], images[2 * r + 1].repeat(2, 0).repeat(2, 1))
  assert report.split_grid_rows(grid, 4) is None


def test_pca_basis_and_nearest_code_image():
  rng = np.random.default_rng(0)
  direction = np.array([3.0, 4.0, 0.0]) / 5.0
  codes = rng.normal(size=(50, 1)) * 10 * direction + rng.normal(size=(50, 3)) * 0.01 + 7.0
  mean, comps = report.pca_basis(codes)
  np.testing.assert_allclose(mean, codes.mean(0))
  assert abs(abs(comps[0] @ direction) - 1.0) < 1e-3
  assert comps.shape == (2, 3) and abs(comps[0] @ comps[1]) < 1e-9
  _, one_d = report.pca_basis(np.arange(4.0)[:, None])
  np.testing.assert_allclose(one_d, [[1.0], [0.0]], atol=1e-12)
  labels = report.nearest_code_image(np.array([[-1.0, 0.0], [1.0, 0.0]]), (-2, 2, -2, 2), 8)
  assert labels.shape == (8, 8)
  assert (labels[:, :4] == 0).all() and (labels[:, 4:] == 1).all()
  with pytest.raises(ValueError, match="codebook vectors"):
    report.pca_basis(np.zeros(3))


def test_captions_match_ignores_object_order():
  from vqlm.eval.captions import captions_match

  a, b = _captions(2)[0].split(" and ")
  assert captions_match(f"{a} and {b}", f"{b} and {a}")
  assert not captions_match(f"{a} and {b}", a)
  assert captions_match("Not A Caption", "not a  caption")
