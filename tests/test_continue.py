"""`vqlm continue` on the tiny LM run: interleaved prompts in command-line order, and video."""

import os

import numpy as np
import pytest

from vqlm import cli, imaging
from vqlm.commands import continue_ as continue_cmd
from vqlm.runs import LMRun
from vqlm.sample import api


@pytest.fixture(scope="module")
def lm(tiny):
  return LMRun(tiny["lm"])  # loaded once; the commands below reuse its compiled sampling loops


@pytest.fixture
def run_continue(lm, monkeypatch, tmp_path):
  monkeypatch.setattr(continue_cmd, "load_run", lambda workdir, tokenizer=None: lm)
  monkeypatch.chdir(tmp_path)  # the default --out is relative

  def run(*argv):
    return cli.main(["vqlm", "continue", "--workdir", "unused", *argv])

  return run


def square_png(path, size=32, colour=(255, 0, 0)):
  image = np.full((size, size, 3), 255, np.uint8)
  image[size // 4 : size // 2, size // 4 : size // 2] = colour
  return imaging.save_png(image, str(path))


def test_ordered_parts_follow_the_command_line():
  argv = ["vqlm continue", "--image", "a.png", "--text=x", "--seed", "3", "-text", "y"]
  argv += ["--image=b.png", "--", "--text", "z"]
  assert continue_cmd.ordered_parts(argv) == [
    ("image", "a.png"),
    ("text", "x"),
    ("text", "y"),
    ("image", "b.png"),
  ]


def test_continue_text_and_image_parts(run_continue, tmp_path, monkeypatch, capsys):
  prompts = []
  original = api.Generator.continue_sequence

  def spy(self, batch, **kwargs):
    prompts.extend(batch)
    return original(self, batch, **kwargs)

  monkeypatch.setattr(api.Generator, "continue_sequence", spy)
  big = square_png(tmp_path / "big.png", size=48)  # resized to the tokenizer's 32
  out = tmp_path / "out"
  argv = ["--text", "a small red square", "--image", big, "--text", "a", "--out", str(out)]
  assert run_continue(*argv, "--max_new_tokens", "6") == 0
  [prompt] = prompts
  assert [type(p) for p in prompt] == [str, np.ndarray, str] and prompt[1].shape == (32, 32, 3)
  text = (out / "continuation.txt").read_text()
  assert text.endswith("\n") and "<image" not in text  # 6 tokens cannot hold an image
  # --mode image always draws the asked images: image_000.png and its placeholder.
  out = tmp_path / "image"
  argv = ["--text", "a small red square", "--image", big, "--text", "a large blue circle"]
  assert run_continue(*argv, "--mode", "image", "--max_new_tokens", "66", "--out", str(out)) == 0
  assert sorted(os.listdir(out)) == ["continuation.txt", "image_000.png"]
  assert (out / "continuation.txt").read_text().strip() == "<image 0>"
  assert imaging.load_png(str(out / "image_000.png")).shape == (32, 32, 3)
  capsys.readouterr()
  assert run_continue("--text", "a", "--image", str(tmp_path / "gone.png")) == 2
  err = capsys.readouterr().err
  assert err.startswith("vqlm: error: --image") and "does not exist" in err
  (tmp_path / "bad.png").write_text("not an image")
  assert run_continue("--image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "b")) == 2
  assert "not a readable image" in capsys.readouterr().err


def test_continue_video_writes_the_new_frames(run_continue, tmp_path, capsys):
  frames = [square_png(tmp_path / f"f{i}.png", colour=(0, 0, 255 - 40 * i)) for i in range(2)]
  out = tmp_path / "clip"
  argv = ["--frames", ",".join(frames), "--num_frames", "2", "--caption", "a blue square"]
  assert run_continue(*argv, "--out", str(out)) == 0
  assert sorted(os.listdir(out)) == ["frame_000.png", "frame_001.png"]
  assert all(imaging.load_png(str(out / f)).shape == (32, 32, 3) for f in os.listdir(out))
  capsys.readouterr()
  assert run_continue("--frames", ",".join(frames)) == 2
  assert "--num_frames" in capsys.readouterr().err
  assert run_continue(*argv, "--text", "x") == 2
  assert "--caption" in capsys.readouterr().err
  assert run_continue("--frames", f"{frames[0]},{tmp_path / 'gone.png'}", "--num_frames", "1") == 2
  assert "--frames" in capsys.readouterr().err


def test_continue_without_a_prompt_names_the_flags(run_continue, capsys):
  assert run_continue() == 2
  assert "--text" in capsys.readouterr().err


def test_continue_edit_writes_the_reason_and_the_edited_image(
  run_continue, tmp_path, monkeypatch, capsys
):
  from vqlm.sample import edit as sample_edit

  source = square_png(tmp_path / "scene.png", size=48)
  argv = ["--edit", "--text", "make the square blue", "--image", source]
  assert run_continue(*argv, "--out", str(tmp_path / "no")) == 2  # the tiny LM has no reasons
  assert "reasoned edits" in capsys.readouterr().err
  asked = {}

  def edit_images(gen, instructions, images, **kwargs):  # tested in test_sample_edit.py
    asked.update(kwargs, instructions=instructions, shape=images.shape)
    return images[:, ::-1], ["a large red square so a large red square so a large blue square"]

  monkeypatch.setattr(continue_cmd, "reason_style", lambda run: "caption_change")
  monkeypatch.setattr(sample_edit, "edit_images", edit_images)
  assert run_continue(*argv, "--seed", "3", "--out", str(tmp_path / "e")) == 0
  assert asked["instructions"] == ["make the square blue"] and asked["shape"] == (1, 32, 32, 3)
  assert asked["style"] == "caption_change" and asked["choose_object"] and asked["seed"] == 3
  assert sorted(os.listdir(tmp_path / "e")) == ["continuation.txt", "image_000.png"]
  text = (tmp_path / "e" / "continuation.txt").read_text().strip()
  assert text == "a large red square so a large red square so a large blue square <image 0>"
  assert imaging.load_png(str(tmp_path / "e" / "image_000.png")).shape == (32, 32, 3)
  assert run_continue(*argv, "--nochoose_object", "--out", str(tmp_path / "f")) == 0
  assert not asked["choose_object"]
  capsys.readouterr()
  assert run_continue("--edit", "--image", source, "--text", "make it blue") == 2
  assert "--edit takes one --text" in capsys.readouterr().err
