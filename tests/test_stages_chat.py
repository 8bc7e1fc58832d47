"""Instruction tuning in the LM stage (`config.data.chat`): settings, the vocabulary and text
model, chat examples from a tiny image tokenizer, and an SFT run end to end."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import sentencepiece

from vqlm import cli
from vqlm.data import chat, chat_source, shapes
from vqlm.errors import UserError
from vqlm.eval import chat_eval
from vqlm.runs import LMRun, TokenizerRun
from vqlm.stages import chat_data, lm
from vqlm.stages.lm_config import get_config
from vqlm.text import TextTokenizer
from vqlm.vocab import CHAT_SPECIALS, Vocab


def _config(tiny=None, **chat_fields):
  config = get_config("size=tiny")
  if tiny is not None:
    config.data.codes = tiny["codes"]
  config.data.chat.update(chat_fields)
  return config


@pytest.mark.parametrize(
  "fields, match",
  [
    (dict(weight=1.0), r"weight=1.0 must be in \[0, 1\)"),
    (dict(weight=-0.1), r"weight=-0.1 must be in \[0, 1\)"),
    (dict(weight=0.5, kinds="draw,sing"), r"unknown kinds \['sing'\]"),
    (dict(weight=0.5, kinds=""), "unknown kinds"),
    (dict(weight=0.5, num_examples=0), r"num_examples=0 must be an integer >= 1"),
    (dict(weight=0.5, min_objects=3, max_objects=2), "1 <= min_objects <= max_objects <= 9"),
    (dict(weight=0.0, max_objects=10), "max_objects <= 9"),  # checked when off too
    (dict(weight=0.5, drop_request=1.0), r"drop_request=1.0 must be in \[0, 1\)"),
    (dict(weight=0.5, focus=True), r"focus=True needs reasoned replies"),
    (dict(weight=0.5, reason=True, focus=True, focus_style="cell"), r"focus_style='cell'; use"),
  ],
)
def test_bad_settings_are_one_line_errors(fields, match):
  with pytest.raises(UserError, match=match) as info:
    chat_data.settings(_config(**fields))
  assert "\n" not in str(info.value) and "--config.data.chat." in str(info.value)


def test_settings():
  assert chat_data.settings(_config()) is None  # weight 0: off
  config = _config()
  with config.unlocked():
    del config.data["chat"]  # a config saved before data.chat existed
  assert chat_data.settings(config) is None
  s = chat_data.settings(_config(weight=0.25, kinds=" question, draw ", max_objects=2))
  assert (s.weight, s.kinds, s.min_objects, s.max_objects) == (0.25, ("question", "draw"), 1, 2)
  assert s.conversation(3, "validation") == chat.conversation(
    3, split="validation", kinds=("question", "draw"), max_objects=2
  )
  s = chat_data.settings(_config(weight=0.25, drop_request=0.2, reason=True))
  assert s.conversation(5, "train") == chat.conversation(
    5, drop_request=0.2, reason=True, max_objects=3
  )
  s = chat_data.settings(_config(weight=0.25, reason=True, focus=True, kinds="question"))
  assert s.conversation(2, "train") == chat.conversation(
    2, reason=True, focus=True, kinds=("question",), max_objects=3
  )
  assert s.conversation(2, "train")["focus"]
  s = chat_data.settings(
    _config(weight=0.25, reason=True, focus=True, focus_style="object", kinds="question")
  )
  assert s.focus == "object" and s.conversation(2, "train") == chat.conversation(
    2, reason=True, focus="object", kinds=("question",), max_objects=3
  )
  # How a tuned run is sampled follows init_from back to the instruction-tuned run's settings.
  sft = _config(weight=0.25, drop_request=0.2)
  assert chat_eval.run_chat_uncond(sft) and not chat_eval.run_chat_uncond(_config(weight=0.25))
  assert not chat_eval.run_chat_uncond(_config(drop_request=0.2))  # chat off


def _pieces(path: str) -> list[tuple[str, float]]:
  sp = sentencepiece.SentencePieceProcessor(model_file=path)
  return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def test_weight_zero_changes_nothing_and_chat_adds_specials(tiny, tmp_path):
  off = _config(tiny)
  lm._resolve_paths(off)
  absent = _config(tiny)
  lm._resolve_paths(absent)
  with absent.unlocked():
    del absent.data["chat"]
  on = _config(tiny, weight=0.5, num_examples=200)
  lm._resolve_paths(on)
  runs = {}
  for name, config in (("off", off), ("absent", absent), ("on", on)):
    workdir = str(tmp_path / name)
    os.makedirs(workdir)
    runs[name] = (lm.prepare_vocab(config, workdir, log_fn=lambda _: None), workdir)
  (v_off, d_off), (v_absent, d_absent), (v_on, d_on) = runs["off"], runs["absent"], runs["on"]
  assert v_off == v_absent and "user" not in v_off.specials
  with (
    open(os.path.join(d_off, "vocab.json")) as a,
    open(os.path.join(d_absent, "vocab.json")) as b,
  ):
    assert a.read() == b.read()
  pieces = [_pieces(os.path.join(d, "text.model")) for d in (d_off, d_absent, d_on)]
  assert pieces[0] == pieces[1] != pieces[2]  # the same text model (the file names its path)
  # With chat: the specials in reserved slots and a text model that writes every instruction.
  # (its text model learnt the instructions too: more pieces than the captions alone give).
  assert v_on == dataclasses.replace(v_off, text_size=v_on.text_size).with_specials(CHAT_SPECIALS)
  assert v_on.text_size > v_off.text_size and v_on.user_id == v_on.special_offset + 6
  tokenizer = TextTokenizer.load(os.path.join(d_on, "text.model"))
  texts = chat.texts(chat.conversations(200, max_objects=3))
  assert texts and chat_source.unwritable_texts(texts, tokenizer) == []
  assert lm.prepare_vocab(on, d_on) == v_on  # kept
  # A run made without chat cannot gain the specials afterwards.
  with pytest.raises(UserError, match="has no <user>/<assistant> specials") as info:
    lm.prepare_vocab(on, d_off)
  assert "\n" not in str(info.value) and "--config.init_from" in str(info.value)


def test_chat_examples_from_the_tiny_tokenizer(tiny, tmp_path):
  vocab = chat_data.with_chat_specials(Vocab.load(os.path.join(tiny["lm"], "vocab.json")))
  text_model = os.path.join(tiny["lm"], "text.model")
  s = chat_data.settings(
    _config(weight=0.5, num_examples=24, validation_examples=6, max_objects=2, seed=3)
  )
  data = chat_data.prepare(
    s, vocab=vocab, text_model=text_model, tokenizer_dir=tiny["tok"], seq_len=128, progress=False
  )
  assert (len(data.train), len(data.validation)) == (24, 6)
  info = data.info
  assert info["heldout_pairs_used"] == [] and info["splits"]["train"]["dropped_too_long"] == 0
  assert sum(info["splits"]["train"]["by_kind"].values()) == 24
  items = s.items("train")
  assert {tuple(p) for p in info["pairs_used"]} == chat.pairs_used(items)
  assert not chat.pairs_used(items) & set(shapes.HELDOUT_PAIRS)
  val_scenes = {shapes.canonical(it["scene"]) for it in s.items("validation")}
  assert val_scenes != {shapes.canonical(it["scene"]) for it in items[:6]}
  run, tokenizer = TokenizerRun(tiny["tok"]), TextTokenizer.load(text_model)

  def encode(scene):
    return run.encode(shapes.render(scene, run.image_size)[None])[0]

  for k, item in enumerate(items):
    ex = data.train[k]
    n = int(ex["segment_ids"].sum())
    turns = chat.with_codes(item["turns"], encode)
    ids = np.concatenate([ex["tokens"][:n], ex["targets"][n - 1 : n]])
    assert chat.equal_turns(chat.parse(ids, vocab, tokenizer), turns)
    _, assistant = chat.segment(turns, vocab, tokenizer)
    np.testing.assert_array_equal(ex["loss_weights"][:n] > 0, assistant[1:])
    assert ex["loss_weights"][n:].sum() == 0
  # Too long: one line naming the seq_len that fits 99% of the examples (and that works).
  kwargs = dict(vocab=vocab, text_model=text_model, tokenizer_dir=tiny["tok"], progress=False)
  with pytest.raises(UserError, match=r"--config.train.seq_len=\d+ \(fits 99%\)") as info:
    chat_data.prepare(s, seq_len=70, **kwargs)
  assert "\n" not in str(info.value)
  need = int(re.search(r"seq_len=(\d+) \(fits", str(info.value))[1])
  fits = chat_data.prepare(s, seq_len=need, **kwargs).info["splits"]
  assert fits["train"]["dropped_too_long"] == 0 and fits["train"]["max_length"] == need


@pytest.mark.slow
def test_sft_run_end_to_end(tiny, tmp_path):
  workdir = tmp_path / "sft"
  argv = ["vqlm", "train", "--config", "configs/lm.py:size=tiny", "--progress=false"]
  argv += [f"--config.data.codes={tiny['codes']}", "--workdir", str(workdir)]
  argv += [f"--config.init_from={tiny['lm']}", "--config.data.chat.weight=0.5"]
  argv += ["--config.data.chat.num_examples=64", "--config.data.chat.validation_examples=8"]
  argv += ["--config.train.seq_len=128", "--config.train.steps=4", "--config.train.eval_every=2"]
  assert cli.main(argv) == 0
  with open(workdir / "chat_data.json") as f:
    info = json.load(f)
  assert info["heldout_pairs_used"] == [] and info["splits"]["train"]["examples"] == 64
  assert info["mixture"]["weights_used"] == {"usual": 0.5, "chat": 0.5}
  vocab = Vocab.load(str(workdir / "vocab.json"))
  assert "user" in vocab.specials and "assistant" in vocab.specials
  run = LMRun(str(workdir))
  assert run.step == 4 and run.vocab == vocab
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  valid = [r for r in rows if any(k.startswith("valid/chat_") for k in r)]
  assert len(valid) == 2
  for key in ("valid/loss", "valid/chat_loss", "valid/chat_text_loss", "valid/chat_image_loss"):
    assert np.isfinite(valid[-1][key]), key
