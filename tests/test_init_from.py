"""`config.init_from`: an LM run that starts from another run's parameters (not its optimizer or
step), with `optim.freeze`; and every incompatible source refused in one line."""

import numpy as np

from vqlm import cli
from vqlm.runs import LMRun


def _train(tiny, workdir, *overrides):
  argv = ["vqlm", "train", "--config", "configs/lm.py:size=tiny"]
  argv += [f"--config.data.codes={tiny['codes']}", "--workdir", str(workdir), "--progress=false"]
  return cli.main(argv + [f"--config.{o}" for o in overrides])


def _flat(params) -> dict:
  import jax

  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def test_starts_from_the_source_parameters_and_trains_from_step_zero(tiny, tmp_path, capsys):
  workdir = tmp_path / "tuned"
  assert (
    _train(tiny, workdir, f"init_from={tiny['lm']}", "train.steps=3", "optim.freeze=('embed',)")
    == 0
  )
  out = capsys.readouterr().out
  assert "initialised the parameters from step " in out and str(tiny["lm"]) in out
  source, tuned = LMRun(tiny["lm"]), LMRun(str(workdir))
  assert tuned.step == 3
  before, after = _flat(source.params), _flat(tuned.params)
  assert before.keys() == after.keys()
  frozen = [k for k in before if "embed" in k]
  assert frozen
  for key in before:
    same = np.array_equal(before[key], after[key])
    assert same == (key in frozen), key
  # The text model is the source's: the same token ids.
  with open(f"{tiny['lm']}/text.model", "rb") as f:
    assert (workdir / "text.model").read_bytes() == f.read()


def test_incompatible_sources_are_one_line(tiny, tmp_path, capsys):
  def error(*overrides) -> str:
    assert _train(tiny, tmp_path / "run", "train.steps=3", *overrides) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("vqlm: error: ") and "\n" not in message
    return message

  assert "is a tokenizer run; it must be an LM run" in error(f"init_from={tiny['tok']}")
  assert "not a vqlm run directory" in error(f"init_from={tmp_path}")
  message = error(f"init_from={tiny['lm']}", "model.mlp_dim=128")
  assert "does not fit this model (" in message and "config.json" in message


def test_a_vocabulary_with_chat_specials_in_reserved_slots_extends_the_source(tiny):
  import os

  from vqlm.runs.lm_run import VOCAB_FILE
  from vqlm.stages import init_from
  from vqlm.vocab import CHAT_SPECIALS, Vocab

  source = Vocab.load(os.path.join(tiny["lm"], VOCAB_FILE))
  chat = source.with_specials(CHAT_SPECIALS)
  assert chat != source and chat.extends(source) and not source.extends(chat)
  warm = init_from.warm_start(tiny["lm"], chat, os.path.join(tiny["lm"], "text.model"))

  class Fresh:  # Only `params` and `replace` are used.
    params = LMRun(tiny["lm"]).params

    def replace(self, params):
      return params

  restored = warm(Fresh())
  assert _flat(restored).keys() == _flat(Fresh.params).keys()
