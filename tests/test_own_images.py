"""A user's own folder of captioned images, end to end through the `vqlm` command
(docs/own-images.md): train a tokenizer on it, encode it, train an LM on the codes, generate
images, caption images.

The folder is what users have: images of mixed sizes, modes and formats, a corrupt file, a JPEG cut
short, a blank line and an empty caption in captions.jsonl, and an image with no caption.
"""

import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw
import pytest

from vqlm import cli
from vqlm.data.code_shards import CodeShards
from vqlm.data.sources import FolderSource
from vqlm.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
COLORS = {
  "red": (230, 40, 40),
  "green": (40, 200, 70),
  "blue": (50, 100, 240),
  "yellow": (240, 220, 40),
}
SIZES = ((32, 32), (48, 36), (20, 28), (64, 64), (40, 24), (17, 33))  # (width, height)
# (PIL mode, file extension): what the folder source must turn into RGB.
MODES = (
  ("RGB", ".png"),
  ("RGB", ".jpg"),
  ("RGBA", ".png"),
  ("L", ".png"),
  ("L", ".jpg"),
  ("P", ".png"),
  ("LA", ".png"),
  ("CMYK", ".jpg"),
)
UNCAPTIONED, EMPTY_CAPTION = "img07.jpg", "img05.png"  # CMYK JPEG, palette PNG


def _draw(i: int) -> tuple[Image.Image, str]:
  color = list(COLORS)[i % len(COLORS)]
  shape = ("circle", "square")[(i // len(COLORS)) % 2]
  width, height = SIZES[i % len(SIZES)]
  image = Image.new("RGB", (width, height), (0, 0, 0))
  box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
  draw = ImageDraw.Draw(image)
  (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
  return image, f"a {color} {shape}"


def write_folder(root: pathlib.Path, n: int = 40) -> list[dict]:
  """`n` images + captions.jsonl, plus the odd cases; returns the caption rows written."""
  root.mkdir(parents=True)
  rows = []
  for i in range(n):
    image, text = _draw(i)
    mode, ext = MODES[i % len(MODES)]
    name = f"img{i:02d}{ext}"
    converted = (
      image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
      if mode == "P"
      else image.convert(mode)
    )
    converted.save(root / name)
    rows.append({"file": name, "text": text})
  (root / "broken.png").write_bytes(b"this is not an image")  # fails PIL's verify(): skipped
  image, _ = _draw(0)
  image.resize((64, 64)).save(root / "cut.jpg", quality=95)
  data = (root / "cut.jpg").read_bytes()
  (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # passes verify(), fails to decode
  rows += [{"file": "broken.png", "text": "a broken file"}, {"file": "cut.jpg", "text": "a cut"}]
  assert rows[5]["file"] == EMPTY_CAPTION and rows[7]["file"] == UNCAPTIONED
  rows[5]["text"] = ""
  rows = [r for r in rows if r["file"] != UNCAPTIONED]
  lines = [json.dumps(r) for r in rows]
  lines.insert(10, "")  # a blank line
  (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
  return rows


def _vqlm(capsys, *args: str) -> tuple[int, str, str]:
  code = cli.main(["vqlm", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _pngs(path: pathlib.Path) -> set[pathlib.Path]:
  return set(path.rglob("*.png")) if path.exists() else set()


@pytest.mark.slow  # Five commands, each compiling its own programs: ~40 s on 2 cores.
def test_own_folder_of_images_end_to_end(tmp_path, capsys):
  images = tmp_path / "my_images"
  rows = write_folder(images)
  tok, codes, lm = tmp_path / "tok", tmp_path / "codes", tmp_path / "lm"

  # 1. Image tokenizer on the folder; its final evaluation falls back to the validation split.
  with pytest.warns(UserWarning) as caught:
    code, out, err = _vqlm(
      capsys,
      "train",
      "--config",
      f"{REPO}/configs/tokenizer.py:size=tiny,data=folder",
      f"--config.data.data_dir={images}",
      '--config.data.source_kwargs={"validation_fraction": 0.25}',
      "--config.train.steps=3",
      "--workdir",
      str(tok),
      "--progress=false",
    )
  assert code == 0, err
  warned = " ".join(str(w.message) for w in caught)
  assert "broken.png" in warned and UNCAPTIONED in warned
  assert "no test split; evaluating on validation" in out + err
  evaluation = json.loads((tok / "eval.json").read_text())["tokenizer"]
  assert evaluation["split"] == "validation" and evaluation["num_examples"] >= 4
  assert np.isfinite(evaluation["psnr"])

  # `vqlm eval` on the tokenizer does the same.
  code, out, err = _vqlm(capsys, "eval", "--workdir", str(tok))
  assert code == 0, err
  assert json.loads(out)["tokenizer"]["split"] == "validation"

  # 2. Encode: only the splits the folder has (train, validation); test is skipped, saying so.
  with pytest.warns(UserWarning, match="cut.jpg"):  # the cut JPEG fails when decoded
    code, out, err = _vqlm(capsys, "encode", "--tokenizer", str(tok), "--out", str(codes))
  assert code == 0, err
  assert "skipped test: the folder data set has no test split" in out
  manifest = json.loads((codes / "manifest.json").read_text())
  assert sorted(manifest["splits"]) == ["train", "validation"]
  for split in manifest["splits"].values():
    for shard in split["shards"]:
      assert shard["complete"] and (codes / shard["file"]).stat().st_size > 0
  counts = {s: manifest["splits"][s]["num_records"] for s in manifest["splits"]}
  assert sum(counts.values()) == len(rows) - 1  # every listed file but broken.png
  assert counts["validation"] >= 4  # at least one LM batch of the tiny size
  texts = [
    shards[i]["text"]
    for shards in (CodeShards(str(codes), split) for split in counts)
    for i in range(len(shards))
  ]
  assert "" in texts  # the empty caption: its image is kept, uncaptioned
  assert "a broken file" not in texts and "a cut" not in texts  # the next image stood in for it

  # An explicitly requested split the folder lacks is a one-line error naming the valid ones.
  code, _, err = _vqlm(
    capsys, "encode", "--tokenizer", str(tok), "--out", str(codes), "--splits", "train,test"
  )
  assert code == 2 and "unknown split 'test'" in err and "valid: train, validation" in err

  # 3. The LM on the codes (train and validation; no test split needed).
  code, out, err = _vqlm(
    capsys,
    "train",
    "--config",
    f"{REPO}/configs/lm.py:size=tiny",
    f"--config.data.codes={codes}",
    "--config.train.steps=3",
    "--workdir",
    str(lm),
    "--progress=false",
  )
  assert code == 0, err
  metrics = [json.loads(line) for line in (lm / "metrics.jsonl").read_text().splitlines()]
  assert any("valid/loss" in m and np.isfinite(m["valid/loss"]) for m in metrics)
  assert (lm / "vocab.json").exists() and (lm / "text.model").exists()

  # 4. Generate: `--out` is a directory of PNGs, or (older) a grid with single images next to it.
  out_path = tmp_path / "generated" / "samples"
  code, out, err = _vqlm(
    capsys,
    "generate",
    "--workdir",
    str(lm),
    "--prompt",
    "a red circle",
    "--prompt",
    "a blue square",
    "--num",
    "2",
    "--out",
    str(out_path),
    "--progress=false",
  )
  assert code == 0, err
  made = _pngs(out_path.parent)
  assert len(made) >= 4, (out, sorted(made))
  for path in made:
    with Image.open(path) as image:
      assert image.size[0] > 0

  # 5. Caption images of different sizes and modes: one line per image.
  pictures = [str(images / "img03.png"), str(images / "img02.png"), str(images / "img06.png")]
  args = [a for p in pictures for a in ("--image", p)]
  code, out, err = _vqlm(capsys, "caption", "--workdir", str(lm), *args)
  assert code == 0, err
  lines = [line for line in out.splitlines() if line.startswith(tuple(pictures))]
  assert [line.split(":")[0] for line in lines] == pictures, out  # a caption may be empty


def _gray_pngs(root: pathlib.Path, names: list[str]) -> None:
  for i, name in enumerate(names):
    Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / name)


def test_a_small_folder_still_has_a_validation_image(tmp_path):
  # Six files: none hashes below the default validation_fraction of 0.05.
  _gray_pngs(tmp_path, [f"{i}.png" for i in range(6)])
  train = FolderSource(tmp_path, split="train", image_size=8)
  val = FolderSource(tmp_path, split="validation", image_size=8)
  assert len(val) == 1 and len(train) == 5 and not set(val._files) & set(train._files)
  # When that file is unreadable, the next readable one validates instead.
  (tmp_path / val._files[0]).write_bytes(b"not an image")
  val2 = FolderSource(tmp_path, split="validation", image_size=8)
  with pytest.warns(UserWarning, match=f"skipped 1 unreadable image .*first: {val._files[0]}"):
    train2 = FolderSource(tmp_path, split="train", image_size=8)
  assert len(val2) == 1 and val2._files != val._files and len(train2) == 4
  assert not set(val2._files) & set(train2._files)
  # A single image trains; there is nothing left to validate on.
  single = tmp_path / "single"
  single.mkdir()
  _gray_pngs(single, ["only.png"])
  assert len(FolderSource(single, split="train", image_size=8)) == 1
  with pytest.raises(UserError, match="no usable images in .* for split 'validation'"):
    FolderSource(single, split="validation", image_size=8)


def test_captions_csv_empty_caption_uncaptioned_image_and_short_row(tmp_path):
  _gray_pngs(tmp_path, ["a.png", "b.png", "c.png"])
  (tmp_path / "captions.csv").write_text('file,text\na.png,\nb.png,"a square, gray"\n')
  with pytest.warns(UserWarning, match=r"captions.csv has no line for 1 image .*\(c.png\)"):
    src = FolderSource(tmp_path, split="all", image_size=8)
  assert [src[i]["text"] for i in range(len(src))] == ["", "a square, gray"]
  (tmp_path / "captions.csv").write_text("file,text\na.png,x\nb.png\n")
  with pytest.raises(UserError, match=r"captions.csv:3: 'file' and 'text' must be strings"):
    FolderSource(tmp_path, split="all", image_size=8)
