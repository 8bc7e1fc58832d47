"""The soak benchmark's pieces that need no training: commands, row reading, comparisons."""

import json

import pytest

from vqlm.bench import soak
from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


@pytest.mark.parametrize("kind", ["tokenizer", "lm"])
def test_stage_commands_load_their_config_with_the_soak_overrides(tmp_path, kind):
  stage = soak._KINDS[kind](str(tmp_path), 50)
  stage.codes = str(tmp_path / "codes")
  cmd = stage.command(str(tmp_path / "run"))
  assert cmd[1:4] == ["-m", "vqlm", "train"]
  fv = flag_lib.parse(
    ["vqlm train", *cmd[4:]],
    lambda f: (f.DEFINE_string("workdir", None, ""), f.DEFINE_bool("progress", True, "")),
    config=True,
  )
  train = fv.config.train
  assert (fv.config.stage, train.steps, train.log_every) == (kind, 50, 1)
  assert train.checkpoint_every == soak.CHECKPOINT_EVERY
  assert train.get("sample_every", train.get("eval_every")) == 50


def test_rows_from_an_offset_skip_a_line_cut_by_a_kill(tmp_path):
  path = tmp_path / "metrics.jsonl"
  first = json.dumps({"step": 1, "train/loss": 1.0}) + "\n"
  path.write_text(first + '{"step": 2, "tr' + "\n" + json.dumps({"step": 2, "valid/x": 0}) + "\n")
  assert soak._losses(str(tmp_path)) == [(1, 1.0)]
  assert soak._rows(str(tmp_path), len(first)) == [{"step": 2, "valid/x": 0}]


def test_same_losses_checks_every_logged_row():
  ref = [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert soak._same_losses([(1, 1.0), (2, 0.5), (2, 0.5), (3, 0.25)], ref)
  assert not soak._same_losses([(1, 1.0), (2, 0.4), (2, 0.5), (3, 0.25)], ref)
  assert not soak._same_losses([(1, 1.0), (3, 0.25)], ref)


def test_more_kills_than_the_steps_allow_is_a_user_error():
  with pytest.raises(UserError, match="--steps"):
    soak.main(["vqlm.bench soak", "--kills=20", "--steps=25"])
