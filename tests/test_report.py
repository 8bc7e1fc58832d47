"""Tests for vqlm.report: the self-contained HTML report of a demo workdir."""

import base64
import glob
import io
import json
import os
import re
import shutil

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


# ---- `vqlm report` on any run directory -------------------------------------------------------

TOKENIZER_IDS = ("summary", "losses", "codebook", "reconstructions", "prior-samples")
LM_IDS = ("summary", "losses", "text-to-image", "image-to-text", "samples")


def _report_command(workdir: str) -> str:
  from vqlm import cli

  assert cli.main(["vqlm", "report", "--workdir", workdir]) == 0
  with open(os.path.join(workdir, "report.html"), encoding="utf-8") as f:
    return f.read()


def _check_sections(text: str, ids: tuple[str, ...]) -> None:
  assert text.startswith("<!DOCTYPE html>")
  assert re.findall(r'<h2 id="([^"]+)">', text) == list(ids)
  _check_self_contained(text)


def test_report_command_on_a_tokenizer_run(tiny, tmp_path, capsys):
  run = shutil.copytree(tiny["tok"], str(tmp_path / "tok"))
  text = _report_command(run)
  assert "tokenizer report" in capsys.readouterr().out
  assert "vqlm image tokenizer report: tok" in text
  _check_sections(text, TOKENIZER_IDS)
  assert "<h3>Run</h3>" in text and "bottleneck" in text and "steps trained" in text
  # eval.json's reconstruction section, every curve of metrics.jsonl and the last values.
  assert "<h3>Image tokenizer</h3>" in text and " dB" in text
  assert "<h3>Last values</h3>" in text and "recon_loss" in text and "psnr_grid" in text
  # Curves, codebook usage and projection, the first and latest reconstruction grids.
  assert len(_img_srcs(text)) == 5
  assert "code vectors of dimension" in text and "Step 20 (latest)" in text
  assert "codes are discrete (vq): their prior is the LM" in text
  assert not os.path.exists(os.path.join(tiny["tok"], "report.html"))


def test_report_of_a_continuous_tokenizer_shows_its_prior_grids(tiny, tmp_path):
  run = shutil.copytree(tiny["tok"], str(tmp_path / "tok"))
  config_path = os.path.join(run, "config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config["model"]["bottleneck"]["kind"] = "gaussian"
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  for path in glob.glob(os.path.join(run, "samples", "codebook_*.npy")):
    os.remove(path)
  grid = imaging.make_grid(np.zeros((4, 8, 8, 3), np.uint8), columns=2)
  imaging.save_png(grid, os.path.join(run, "samples", "prior_samples.png"))
  ev = {"tokenizer": {"bottleneck": "gaussian", "psnr": 21.5, "ssim": 0.7, "kl": 0.01234}}
  with open(os.path.join(run, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(ev, f)
  text = open(report.write_report(run), encoding="utf-8").read()
  _check_sections(text, TOKENIZER_IDS)
  assert "The bottleneck is continuous (gaussian): it has no codebook." in text
  assert "KL to the prior (per latent element)</th><td>0.0123" in text and "21.50 dB" in text
  assert "codebook usage" not in text
  # A VAE's grid; `random_latents.png` is an autoencoder's.
  assert 'alt="Prior samples"' in text and "Random latents" not in text
  assert len(_img_srcs(text)) == 1 + 2 + 1  # Curves, two reconstruction grids, the prior grid.


def test_report_command_on_an_lm_run(tiny, tmp_path):
  run = shutil.copytree(tiny["lm"], str(tmp_path / "lm"))
  text = _report_command(run)
  assert "vqlm LM report: lm" in text
  _check_sections(text, LM_IDS)
  assert "<h3>Run</h3>" in text and "vocabulary" in text and "image tokenizer run" in text
  # Train and validation losses: one figure and the table of last values.
  assert len(_img_srcs(text)) == 1
  assert re.search(r"<th[^>]*>text_loss</th><td>[\d.]+ \(\d+\)</td><td>[\d.]+ \(\d+\)</td>", text)
  assert "No eval.json results yet" in text
  for what in (
    "Text to image (test prompts)",
    "Image to text (test images)",
    "Scene FD",
    "Test prompts",
    "Captions",
    "Other sample grids",
  ):
    assert f"{what}: not run" in text, what
  # What `vqlm eval` and the evaluators with artefacts add: eval.json tables and sample grids.
  os.makedirs(tmp_path / "fake")
  fake = _fake_workdir(str(tmp_path / "fake"))
  ev = json.load(open(os.path.join(fake, "eval.json"), encoding="utf-8"))
  ev = {k: ev[k] for k in ("text_to_image", "image_to_text")}
  ev["scene_fd"] = {"generated_vs_test": 12.345, "num_images": 8}
  ev["config"] = {"evals": {"t2i_custom": {"type": "text_to_image"}}}
  ev["t2i_custom"] = _scene_metrics(0.25)
  with open(os.path.join(run, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(ev, f)
  shutil.copytree(os.path.join(fake, "samples"), os.path.join(run, "samples"))
  imaging.save_png(np.zeros((10, 10, 3), np.uint8), os.path.join(run, "samples", "extra.png"))
  text = _report_command(run)
  _check_sections(text, LM_IDS)
  for expected in ("68.8%", "43.8%", "25.0%", "12.35", "Text to image (t2i_custom)", "extra.png"):
    assert expected in text, expected
  assert "2 of 4 generated captions" in text
  # Curves, 4 prompt rows, 3 captioned images, the extra grid.
  assert len(_img_srcs(text)) == 1 + 4 + 3 + 1


def test_report_command_on_an_empty_directory_is_a_user_error(tmp_path, capsys):
  from vqlm import cli
  from vqlm.errors import UserError

  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(UserError, match="is not a run directory: it has no config.json"):
    report.run_kind(empty, strict=True)
  assert cli.main(["vqlm", "report", "--workdir", empty]) == 2
  assert "is not a run directory" in capsys.readouterr().err
  assert not os.path.exists(os.path.join(empty, "report.html"))
  assert cli.main(["vqlm", "report", "--workdir", str(tmp_path / "nope")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["vqlm", "report"]) == 2
  assert "--workdir is required" in capsys.readouterr().err


def _timings_table(text: str) -> str:
  return text.split("<h3>Timings</h3>", 1)[1].split("</table>", 1)[0]


def test_demo_report_shows_the_timings(tmp_path):
  from vqlm.demo.main import Demo

  # eval.json's "timings" section, as the demo writes it after its last stage.
  ev = {"timings": {"tokenizer": 61.2, "lm": 300.4, "total": 361.6, "preset": "default"}}
  with open(tmp_path / "eval.json", "w", encoding="utf-8") as f:
    json.dump(ev, f)
  root = str(tmp_path)
  assert report.run_kind(root) == "demo"
  timings = _timings_table(open(report.write_report(root), encoding="utf-8").read())
  for expected in ("tokenizer</th><td>61 s", "lm</th><td>300 s", "total</th><td>362 s", "default"):
    assert expected in timings, expected
  # The demo's report stage shows this run's timings, which eval.json only gets at the end.
  demo = Demo(root, preset="smoke", log_fn=lambda _: None)
  demo.timings = {"data": 2.0, "tokenizer": 40.4}
  demo.stage_report()
  text = open(os.path.join(root, "report.html"), encoding="utf-8").read()
  _check_sections(text, SECTION_IDS)
  timings = _timings_table(text)
  for expected in ("data</th><td>2 s", "tokenizer</th><td>40 s", "total</th><td>42 s", "smoke"):
    assert expected in timings, expected
  assert "lm</th>" not in timings
