"""Answers chosen among what the reply's caption says, by the model's likelihood
(`vqlm.sample.answer`), and the question measure that reports them beside the greedy replies."""

import numpy as np
import pytest
from test_chat_eval import FakeGenerator, qa_items
from test_sample_chat import make_run

from vqlm.data import chat
from vqlm.eval import chat_eval
from vqlm.sample import answer as sample_answer
from vqlm.sample import api, choice

TWO = "a small yellow circle in the center and a large cyan circle at the bottom left"


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
  return api.Generator(make_run(tmp_path_factory), batch_size=4, progress=False)


def test_candidates_are_the_captions_words_and_numbers_up_to_its_objects():
  assert sample_answer.candidates(TWO) == [
    "yellow",
    "circle",
    "small",
    "in the center",
    "cyan",
    "large",
    "at the bottom left",
    "zero",
    "one",
    "two",
  ]
  assert sample_answer.candidates("a purple cloud somewhere") == []


def test_the_likeliest_answer_is_kept_and_other_replies_stay(gen, monkeypatch):
  conversations = ["what colour is the object at the bottom left", "describe it", "where is it"]
  free = [f"{TWO} so yellow", TWO, "purple so what"]
  monkeypatch.setattr(sample_answer.sample_chat, "write_replies", lambda *a, **k: list(free))
  scored = []

  def scores(sampler, prompts, continuations, *, batch_size):
    scored.append((prompts, continuations))
    out = np.full(len(continuations), -9.0, np.float32)
    out[4] = -1.0  # "cyan": the fifth candidate of TWO
    return out

  monkeypatch.setattr(choice, "continuation_logps", scores)
  replies, got_free = sample_answer.choose_answers(gen, conversations)
  assert got_free == free
  # Only the reasoned reply whose caption parses is scored: its 10 candidates, each ending the
  # turn with <eos>, after that conversation's prompt.
  prompts, continuations = scored[0]
  v, tok = gen.vocab, gen.text_tokenizer
  assert len(continuations) == 10
  assert continuations[4] == v.encode_text(tok, f"{TWO} so cyan") + [v.eos_id]
  first = [{"role": "user", "parts": [conversations[0]]}]
  assert all(p == chat.prompt(first, v, tok).tolist() for p in prompts)
  assert replies == [f"{TWO} so cyan", TWO, "purple so what"]


def test_choose_answers_on_a_tiny_lm_scores_with_the_model(gen, monkeypatch):
  free = [f"{TWO} so yellow", f"{TWO} so zero"]
  monkeypatch.setattr(sample_answer.sample_chat, "write_replies", lambda *a, **k: list(free))
  replies, _ = sample_answer.choose_answers(gen, ["what colour is it", "how many are there"])
  # The tiny LM's likelihoods decide; whatever they say, each reply is the caption, "so" and one
  # of its candidates, and the same prompt with the same candidates chooses the same.
  for reply in replies:
    caption, answer = reply.rsplit(" so ", 1)
    assert caption == TWO and answer in sample_answer.candidates(TWO)
  again, _ = sample_answer.choose_answers(gen, ["what colour is it", "how many are there"])
  assert again == replies


def test_the_measure_reports_the_greedy_replies_beside_the_chosen(gen, monkeypatch):
  items = qa_items(8)
  right = [item["answer"] for item in items]
  wrong = [
    chat.preference_pair(item, index=i)["rejected"][0]["parts"][0] for i, item in enumerate(items)
  ]
  seen = {}

  def choose(generator, conversations, *, batch_size, max_len):
    seen["rows"] = len(conversations)
    return list(right), wrong[:4] + right[4:]

  monkeypatch.setattr(sample_answer, "choose_answers", choose)
  fake = FakeGenerator(gen, texts=wrong)
  metrics, replies = chat_eval.answer_accuracy(fake, items, choose_answer=True)
  assert seen["rows"] == 8 and replies == right
  assert metrics["accuracy"] == 1.0 and metrics["free_accuracy"] == 0.5
  metrics, replies = chat_eval.answer_accuracy(fake, items)
  assert replies == wrong and metrics["accuracy"] == 0.0 and "free_accuracy" not in metrics


def test_focus_candidates_are_the_captions_objects_for_object_focused_replies():
  reply = f"{TWO} so a large cyan circle in the center so cyan"
  assert sample_answer.focus_candidates(reply) == [
    f"{TWO} so a small yellow circle in the center so",
    f"{TWO} so a large cyan circle at the bottom left so",
  ]
  assert sample_answer.focus_candidates(f"{TWO} so cyan") == []  # not focused
  assert sample_answer.focus_candidates(f"{TWO} so circle in cyan yellow so two") == []  # a count
  assert sample_answer.focus_candidates("purple so a red circle in the center so red") == []


def test_an_object_focused_reply_has_its_object_chosen_then_goes_on(gen, monkeypatch):
  free = [f"{TWO} so a large cyan circle in the center so yellow", f"{TWO} so two"]
  monkeypatch.setattr(sample_answer.sample_chat, "write_replies", lambda *a, **k: list(free))
  written = {}

  def write_ids(rows, **kwargs):
    written["rows"] = rows
    return [" cyan"]

  monkeypatch.setattr(gen, "write_ids", write_ids)
  calls = []

  def likeliest(generator, prompts, candidates, *, end_ids=(), batch_size=None):
    calls.append(candidates)
    if len(calls) == 1:  # the objects of row 0; row 1 is not focused
      assert candidates[1] == []
      return [candidates[0][1], None]
    return [None, None]  # the answers: keep what the model wrote

  monkeypatch.setattr(sample_answer, "likeliest", likeliest)
  conversations = ["what colour is the object at the bottom left", "how many circles"]
  replies, got_free = sample_answer.choose_answers(gen, conversations)
  start = f"{TWO} so a large cyan circle at the bottom left so"
  v, tok = gen.vocab, gen.text_tokenizer
  prompt = chat.prompt([{"role": "user", "parts": [conversations[0]]}], v, tok).tolist()
  assert written["rows"] == [prompt + v.encode_text(tok, start)]
  assert replies == [f"{start} cyan", f"{TWO} so two"] and got_free == free
  # The answers are chosen after the chosen object: "caption so object so ANSWER".
  assert calls[1][0][0] == f"{start} yellow" and calls[1][1][0] == f"{TWO} so yellow"
