"""Reasoned edits with the edited object chosen by the model's likelihood (`vqlm.sample.edit`)."""

import numpy as np
import pytest
from test_edit_eval import SIZE, FakeGenerator, renders, tiny_run

from vqlm.data import edits
from vqlm.errors import UserError
from vqlm.eval import edit_eval
from vqlm.sample import choice
from vqlm.sample import edit as sample_edit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(tmp_path_factory)


TWO = "a small yellow circle in the center and a large cyan circle at the bottom left"


def test_candidates_are_the_captions_objects_and_nothing():
  assert sample_edit.candidates(TWO) == [
    "a small yellow circle in the center",
    "a large cyan circle at the bottom left",
    "nothing",
  ]
  assert sample_edit.candidates("a purple cloud somewhere") == ["nothing"]


def _prompts(run, items):
  v, tok = run.vocab, run.text_tokenizer
  codes = run.image_tokenizer.encode(renders(items, 0))
  return [
    edits.prompt_ids(c, it["instructions"][0], v, tok, reason=True) for c, it in zip(codes, items)
  ]


def test_the_likeliest_candidate_is_kept_and_the_model_writes_the_rest(run, monkeypatch):
  items = edit_eval.eval_items(2, seed=3)
  prompts = _prompts(run, items)
  free = [f"{TWO} so a small yellow circle in the center so nothing", "purple so what"]
  calls = []

  def text_before_image(generator, rows, *, batch_size):
    calls.append(rows)
    return free if len(calls) == 1 else ["a large blue circle at the bottom left", "nothing"]

  scored = []

  def scores(sampler, prompts_, continuations, *, batch_size):
    scored.extend(continuations)
    # Row 0's candidates: its two objects and "nothing"; the second object is likeliest.
    return np.asarray([-5.0, -1.0, -9.0, -3.0], np.float32)

  monkeypatch.setattr(sample_edit.sample_chat, "text_before_image", text_before_image)
  monkeypatch.setattr(choice, "continuation_logps", scores)
  gen = run.generator(batch_size=4)
  reasons, got_free = sample_edit.choose_reasons(gen, prompts)
  v, tok = run.vocab, run.text_tokenizer
  assert got_free == free and len(scored) == 4  # 3 candidates for row 0, 1 for the junk row
  assert scored[1] == v.encode_text(tok, f"{TWO} so a large cyan circle at the bottom left so")
  assert reasons[0] == (
    f"{TWO} so a large cyan circle at the bottom left so a large blue circle at the bottom left"
  )
  assert reasons[1] == "purple so nothing so nothing"  # an unparsed caption: only "nothing"
  # The second pass continues each prompt after its chosen start.
  assert calls[1][0] == prompts[0] + v.encode_text(
    tok, f"{TWO} so a large cyan circle at the bottom left so"
  )


def test_edit_images_on_a_tiny_lm_scores_with_the_model(run):
  items = edit_eval.eval_items(3, seed=5)
  gen = run.generator(batch_size=4)
  images, reasons = sample_edit.edit_images(
    gen, [it["instructions"][0] for it in items], renders(items, 0)
  )
  assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert len(reasons) == 3 and all(isinstance(r, str) for r in reasons)
  with pytest.raises(UserError, match="caption_change"):
    sample_edit.edit_images(gen, ["make it blue"], renders(items[:1], 0), style="scene")
  with pytest.raises(UserError, match="2 instructions for 1 images"):
    sample_edit.edit_images(gen, ["a", "b"], renders(items[:1], 0))


def test_the_evaluator_reports_the_greedy_reasons_next_to_the_chosen(run, monkeypatch):
  items = edit_eval.eval_items(4, seed=2)
  truth = [edits.reason(it["scenes"][0], it["scenes"][1], "caption_change") for it in items]
  wrong = [edits.reason(it["scenes"][0], it["scenes"][0], "caption_change") for it in items]

  def choose(generator, rows, *, style, batch_size):
    return truth, wrong[:2] + truth[2:]

  monkeypatch.setattr(sample_edit, "choose_reasons", choose)
  gen = FakeGenerator(run, renders(items, 1))
  metrics, _, _, reasons = edit_eval.edit_accuracy(
    gen, items, reason="caption_change", choose_object=True
  )
  assert reasons == truth and metrics["accuracy"] == 1.0
  assert metrics["reason_right"] == 1.0 and metrics["free_reason_right"] == 0.5
  monkeypatch.setattr(
    sample_edit.sample_chat, "text_before_image", lambda g, rows, *, batch_size: wrong
  )
  metrics, _, _, reasons = edit_eval.edit_accuracy(gen, items, reason="caption_change")
  assert reasons == wrong and metrics["reason_right"] == 0.0
  assert "free_reason_right" not in metrics
