"""The `vqlm` command: user errors are one line naming the fix; the stages run end to end (tiny)."""

import json
import os
import shutil

import numpy as np
import pytest

from vqlm import cli, runs


def _main(capsys, *args):
  code = cli.main(["vqlm", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _one_error_line(err):
  lines = [l for l in err.strip().splitlines() if l.startswith("vqlm: error:")]
  assert len(lines) == 1, err
  assert "Traceback" not in err
  return lines[0]


def test_unknown_command(capsys):
  code, _, err = _main(capsys, "trian")
  assert code == 2
  assert "unknown command 'trian'; valid: train" in _one_error_line(err)


def test_unknown_host_malloc_mode(capsys, monkeypatch):
  monkeypatch.setenv("VQLM_HOST_MALLOC", "tcmalloc")
  code, _, err = _main(capsys, "info", "--config", "configs/lm.py:size=tiny")
  assert code == 2
  assert "VQLM_HOST_MALLOC='tcmalloc'; use 'auto'" in _one_error_line(err)


def test_unknown_config_argument_lists_valid_ones(capsys, tmp_path):
  code, _, err = _main(
    capsys,
    "train",
    "--config",
    "configs/tokenizer.py:sise=small",
    "--workdir",
    str(tmp_path / "run"),
  )
  assert code == 2
  line = _one_error_line(err)
  assert "unknown config argument 'sise'" in line and "size" in line


def test_unknown_config_field_override(capsys, tmp_path):
  code, _, err = _main(
    capsys,
    "train",
    "--config",
    "configs/tokenizer.py:size=tiny",
    "--config.train.stepz=3",
    "--workdir",
    str(tmp_path / "run"),
  )
  assert code == 2
  assert "stepz" in _one_error_line(err)


def test_unknown_dataset(capsys, tmp_path):
  code, _, err = _main(
    capsys,
    "train",
    "--config",
    "configs/tokenizer.py:data=imagenet",
    "--workdir",
    str(tmp_path / "run"),
  )
  assert code == 2
  assert "unknown dataset 'imagenet'; valid: shapes" in _one_error_line(err)


def test_workdir_parents_are_created_and_an_impossible_one_is_one_line(capsys, tmp_path):
  from vqlm.commands import flags as flag_lib

  made = flag_lib.check_workdir(str(tmp_path / "runs" / "demo"))
  assert os.path.isdir(made) and made == str(tmp_path / "runs" / "demo")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  code, _, err = _main(
    capsys,
    "train",
    "--config",
    "configs/tokenizer.py:size=tiny",
    "--workdir",
    str(blocker / "run"),
  )
  assert code == 2
  assert "cannot create --workdir" in _one_error_line(err)


def test_not_a_run_directory(capsys, tmp_path):
  code, _, err = _main(capsys, "eval", "--workdir", str(tmp_path))
  assert code == 2
  assert "is not a vqlm run directory" in _one_error_line(err)


def test_changed_model_config_is_refused(tmp_path):
  from vqlm.stages.tokenizer_config import get_config

  runs.save_config(str(tmp_path), get_config("size=tiny"))
  other = get_config("size=tiny")
  other.model.encoder.channels = 16
  with pytest.raises(ValueError, match="model.encoder.channels differs"):
    runs.check_same_model(str(tmp_path), other)


# ---- the stages end to end, on tiny configs ---------------------------------------------------


def test_tokenizer_run_writes_eval_grids_and_metrics(tiny):
  ev = json.load(open(os.path.join(tiny["tok"], "eval.json")))
  for key in ("psnr", "ssim", "codebook_usage", "scene_agreement"):
    assert key in ev["tokenizer"]
  assert ev["config"]["stage"] == "tokenizer"
  assert any(f.startswith("recon_") for f in os.listdir(os.path.join(tiny["tok"], "samples")))
  assert os.path.exists(os.path.join(tiny["tok"], "metrics.jsonl"))


def test_encoded_shards_round_trip_to_direct_encode(tiny):
  from vqlm.data.code_shards import CodeShards
  from vqlm.data.sources import source_from_config
  from vqlm.runs import TokenizerRun as load_tokenizer

  run = load_tokenizer(tiny["tok"])
  shards = CodeShards(tiny["codes"], "validation")
  source = source_from_config(run.config.data, "validation")
  images = np.stack([source[i]["image"] for i in range(8)])
  direct = run.encode(images)
  for i in range(8):
    record = shards[i]
    assert record["index"] == i and record["text"] == source[i]["text"]
    np.testing.assert_array_equal(record["codes"], direct[i])


def test_encode_rerun_skips_finished_shards(tiny, capsys):
  assert (
    cli.main(
      [
        "vqlm",
        "encode",
        "--tokenizer",
        tiny["tok"],
        "--out",
        tiny["codes"],
        "--splits",
        "validation",
      ]
    )
    == 0
  )
  assert "already done, skipping" in capsys.readouterr().out


def test_lm_run_has_vocab_text_model_and_losses(tiny):
  for name in ("vocab.json", "text.model", "config.json", "metrics.jsonl"):
    assert os.path.exists(os.path.join(tiny["lm"], name))
  rows = [json.loads(l) for l in open(os.path.join(tiny["lm"], "metrics.jsonl"))]
  assert any("valid/image_perplexity" in r for r in rows)
  assert any("train/image_loss" in r for r in rows)


def test_lm_refuses_a_different_tokenizer(tiny, tmp_path):
  from vqlm.runs import LMRun

  other = str(tmp_path / "lm")
  shutil.copytree(tiny["lm"], other)
  config = runs.load_config(other)
  bigger = str(tmp_path / "tok")
  shutil.copytree(tiny["tok"], bigger)
  tok_config = runs.load_config(bigger)
  tok_config.model.bottleneck.codebook_size = 64
  runs.save_config(bigger, tok_config)
  config.data.tokenizer = bigger
  runs.save_config(other, config)
  with pytest.raises(ValueError, match="does not match the config|does not match this LM"):
    LMRun(other).tokenizer_run()


def test_level_embeddings_take_the_fsq_levels_of_the_tokenizer(tiny, tmp_path, capsys):
  from vqlm.runs import LMRun

  lm = str(tmp_path / "lm")
  args = [
    "vqlm",
    "train",
    "--config",
    "configs/lm.py:size=tiny",
    f"--config.data.codes={tiny['codes']}",
    "--workdir",
    lm,
    "--progress=false",
    "--config.model.image_embed_init=levels",
    "--config.train.steps=4",
  ]
  # The tiny tokenizer is a VQ: there are no levels to take.
  assert cli.main(args) == 2
  assert "needs an FSQ image tokenizer" in _one_error_line(capsys.readouterr().err)
  # The same codes read as an FSQ tokenizer's with levels (4, 8) (32 codes).
  fsq = str(tmp_path / "tok")
  shutil.copytree(tiny["tok"], fsq)
  tok_config = runs.load_config(fsq)
  tok_config.model.bottleneck = {"kind": "fsq", "latent_dim": 8, "levels": (4, 8)}
  runs.save_config(fsq, tok_config)
  assert cli.main(args + [f"--config.data.tokenizer={fsq}"]) == 0
  run = LMRun(lm)
  assert (
    tuple(run.model.config.code_levels) == (4, 8) and run.model.config.image_embed_init == "levels"
  )
  assert run.params["embed"]["level_embedding"].shape == (12, run.model.config.dim)


def test_lm_refuses_a_vocab_that_does_not_match_the_data(tiny, tmp_path):
  from vqlm.stages import lm as lm_stage
  from vqlm.stages.lm_config import get_config
  from vqlm.vocab import Vocab

  workdir = str(tmp_path / "lm")
  os.makedirs(workdir)
  Vocab(text_size=100, image_size=999, grid=(4, 4)).save(os.path.join(workdir, "vocab.json"))
  config = get_config("size=tiny")
  config.data.codes = tiny["codes"]
  with pytest.raises(ValueError, match="was made for a"):
    lm_stage.prepare_vocab(config, workdir)


def test_lm_refuses_a_text_model_that_does_not_match_the_vocab(tiny, tmp_path):
  from vqlm.runs import LMRun
  from vqlm.text import train_sentencepiece

  other = str(tmp_path / "lm")
  shutil.copytree(tiny["lm"], other)
  train_sentencepiece(
    ["a b c d e f g h i j k l m n o p"] * 10,
    model_prefix=os.path.join(other, "text"),
    vocab_size=30,
  )
  with pytest.raises(ValueError, match="restore the run's own text model"):
    LMRun(other)


def test_encode_video_clips_round_trip(tiny, tmp_path):
  from vqlm.data.code_shards import CodeShards, encode_split
  from vqlm.data.moving_shapes import MovingShapesSource
  from vqlm.runs import TokenizerRun as load_tokenizer

  run = load_tokenizer(tiny["tok"])
  clips = MovingShapesSource(split="validation", num_clips=3, num_frames=4)
  encode_split(run, clips, str(tmp_path / "video"), split="validation", progress=False)
  shards = CodeShards(str(tmp_path / "video"), "validation")
  assert len(shards) == 3
  record = shards[1]
  assert record["codes"].shape == (4,) + tuple(run.grid)
  np.testing.assert_array_equal(record["codes"], run.encode(clips[1]["frames"]))
  assert record["text"] == clips[1]["text"]


def test_text_train_command(tmp_path, capsys):
  code = cli.main(
    [
      "vqlm",
      "text",
      "train",
      "--config",
      "configs/tokenizer.py:data=digits",
      "--out",
      str(tmp_path),
      "--vocab_size",
      "40",
    ]
  )
  assert code == 0
  from vqlm.text import TextTokenizer

  tok = TextTokenizer.load(str(tmp_path / "text.model"))
  assert tok.decode(tok.encode("the digit seven")) == "the digit seven"


def test_encode_with_quality_filters_writes_counts(tiny, tmp_path):
  out = str(tmp_path / "codes")
  assert (
    cli.main(
      [
        "vqlm",
        "encode",
        "--tokenizer",
        tiny["tok"],
        "--out",
        out,
        "--splits",
        "validation",
        "--filters",
        '{"min_caption_words": 7, "reconstruction_error": 2.0}',
      ]
    )
    == 0
  )
  counts = json.load(open(os.path.join(out, "filters_validation.json")))
  assert counts["total"] == 32
  # Single-object captions ("a large red circle at the top left") have fewer than 7 words... some
  # have exactly 8 ("... at the top left"); whatever the split, kept + removed add up.
  assert counts["kept"] + sum(counts["removed"].values()) == counts["total"]
  assert counts["removed"].get("reconstruction_error", 0) == 0  # 2.0 is the maximum error.
  from vqlm.data.code_shards import CodeShards

  assert len(CodeShards(out, "validation")) == counts["kept"]


def test_top_level_help_describes_every_command(capsys):
  from vqlm.commands import COMMANDS

  code, out, _ = _main(capsys, "--help")
  assert code == 0
  for name, (_, description) in COMMANDS.items():
    assert f"  {name}" in out and description in out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_prints_its_flags(capsys, flag):
  from vqlm.commands import COMMANDS

  for name in COMMANDS:
    if name == "bench":
      continue  # `vqlm bench --help` lists the benchmarks (its own argument parser).
    code, out, err = _main(capsys, name, flag)
    assert code == 0, (name, err)
    assert out.startswith(f"usage: vqlm {name}"), (name, out)
    assert "flags:" in out and "--" in out.split("flags:")[1], (name, out)


def test_a_config_file_that_cannot_be_read_is_one_line(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # configs/ is not here.
  code, _, err = _main(capsys, "train", "--config", "configs/lm.py:size=tiny", "--workdir", "x")
  assert code == 2
  assert "cannot read the config file configs/lm.py;" in _one_error_line(err)
