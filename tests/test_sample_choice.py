"""The likeliest candidate text after each prompt (`vqlm.sample.choice`)."""

import numpy as np
import pytest
from test_sample_chat import make_run

from vqlm.sample import api, choice
from vqlm.sample.sampler import continuation_logps


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
  return api.Generator(make_run(tmp_path_factory), batch_size=4, progress=False)


def test_likeliest_scores_each_rows_candidates_after_its_own_prompt(gen, monkeypatch):
  v, tok = gen.vocab, gen.text_tokenizer
  prompts = [[v.bos_id, 5], [v.bos_id], [v.bos_id, 7, 8]]
  seen = {}

  def scores(sampler, rows, continuations, *, batch_size):
    seen.update(rows=rows, continuations=continuations, batch_size=batch_size)
    return np.asarray([-3.0, -1.0, -2.0, -2.0], np.float32)

  monkeypatch.setattr(choice, "continuation_logps", scores)
  got = choice.likeliest(
    gen, prompts, [["red", "blue"], [], ["one", "two"]], end_ids=[v.eos_id], batch_size=2
  )
  assert got == ["blue", None, "one"]  # a row without candidates: None; ties: the first
  assert seen["rows"] == [prompts[0], prompts[0], prompts[2], prompts[2]]
  assert seen["continuations"][1] == v.encode_text(tok, "blue") + [v.eos_id]
  assert seen["batch_size"] == 2


def test_likeliest_agrees_with_the_models_log_probabilities(gen):
  v, tok = gen.vocab, gen.text_tokenizer
  prompt = [v.bos_id, v.special("user")]
  texts = ["a red circle", "a blue square", "three", "at the top left"]
  logps = continuation_logps(gen.sampler, [prompt] * 4, [v.encode_text(tok, t) for t in texts])
  assert choice.likeliest(gen, [prompt], [texts]) == [texts[int(np.argmax(logps))]]
