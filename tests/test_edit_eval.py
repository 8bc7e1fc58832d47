"""The "edit" evaluator: prompts, exact judging of the drawn result, metrics and artefacts."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from test_sampler import random_variables

from vqlm.data import edits, shapes
from vqlm.errors import UserError
from vqlm.eval import edit_eval, evaluators
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.sample import api
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import Vocab

SIZE, GRID, K = 32, (2, 2), 16  # images the scene parser reads; codes of 16x16 patches


class PatchTokenizer:
  """A 32x32 image tokenizer: each code paints a 16x16 patch in one of 16 colours (the shapes
  palette first); encode takes each patch's nearest colour. Also test_video_eval's."""

  image_size, grid, codebook_size = SIZE, GRID, K
  config = SimpleNamespace(data=SimpleNamespace(name="shapes", image_size=SIZE))

  def __init__(self):
    extra = np.random.default_rng(0).integers(0, 256, size=(K - 7, 3))
    colours = [shapes.BACKGROUND, *shapes.COLORS.values(), *extra]
    self.palette = np.asarray(colours, np.uint8)

  def codebook(self):
    return self.palette.astype(np.float32) / 127.5 - 1.0

  def decode(self, codes):
    return self.palette[np.asarray(codes)].repeat(16, axis=1).repeat(16, axis=2)

  def encode(self, images):
    means = np.asarray(images, np.float32).reshape(-1, 2, 16, 2, 16, 3).mean((2, 4))
    d = ((means[..., None, :] - self.palette.astype(np.float32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.int32)


class TinyRun:
  """A random tiny LM with `PatchTokenizer` (what `LMRun` offers the Generator and evaluators).
  Also test_video_eval's."""

  config = {"stage": "lm"}

  def __init__(self, text_model):
    self.text_tokenizer = TextTokenizer.load(text_model)
    self.vocab = Vocab(
      text_size=self.text_tokenizer.vocab_size, image_size=K, grid=GRID, num_reserved=2, pad_to=16
    )
    self.model = Transformer(
      TransformerConfig(
        vocab_size=self.vocab.padded_size,
        dim=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        mlp_dim=64,
        image_offset=self.vocab.image_offset,
        image_size=K,
        grid=GRID,
      )
    )
    self.params = random_variables(self.model)["params"]
    self.image_tokenizer = PatchTokenizer()

  def tokenizer_run(self):
    return self.image_tokenizer

  def generator(self, batch_size):
    return api.generator_for(self, batch_size=batch_size, progress=False)


def tiny_run(tmp_path_factory):
  """A TinyRun whose text tokenizer knows the edit corpus (seen and held-out)."""
  corpus = edits.texts(edit_eval.eval_items(300)) + edits.texts(
    edit_eval.eval_items(100, split="test_heldout")
  )
  path = train_sentencepiece(
    corpus, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=64
  )
  return TinyRun(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_run(tmp_path_factory)


class FakeGenerator:
  """A Generator whose drawn images are given; it records the prompt rows."""

  def __init__(self, run, images):
    self.vocab, self.text_tokenizer = run.vocab, run.text_tokenizer
    self.image_tokenizer = run.image_tokenizer
    self.images, self.rows, self.kwargs = images, [], {}

  def encode_images(self, images):
    return self.image_tokenizer.encode(images)

  def draw_ids(self, rows, **kwargs):
    self.rows, self.kwargs = rows, kwargs
    assert len(rows) == len(self.images)
    return self.images


def renders(items, which):
  return np.stack([shapes.render(item["scenes"][which], SIZE) for item in items])


def test_judge_counts_the_true_result_right_and_others_wrong(run):
  items = edit_eval.eval_items(24, seed=3, max_objects=3)
  assert all(len(item["edits"]) == 1 for item in items)
  for item in items:
    assert edit_eval.is_right(shapes.render(item["scenes"][1], SIZE), item["scenes"][1])
    assert not edit_eval.is_right(shapes.render(item["scenes"][0], SIZE), item["scenes"][1])
  gen = FakeGenerator(run, renders(items, 1))
  metrics, images, parsed, reasons = edit_eval.edit_accuracy(gen, items, seed=7)
  assert metrics["accuracy"] == 1.0 and metrics["unchanged"] == 0.0 and metrics["num_items"] == 24
  assert set(metrics["by_kind"]) == set(edits.KINDS) and set(metrics["by_kind"].values()) == {1.0}
  assert sum(metrics["counts"].values()) == 24 and gen.kwargs["seed"] == 7
  assert [shapes.canonical(p) for p in parsed] == [shapes.canonical(i["scenes"][1]) for i in items]
  # The prompt: <bos> <boi> source codes <eoi> instruction <boi>.
  src = run.image_tokenizer.encode(renders(items[:1], 0))[0]
  want = edits.prompt_ids(src, items[0]["instructions"][0], run.vocab, run.text_tokenizer)
  assert gen.rows[0] == want and want[-1] == run.vocab.boi_id
  # The source returned unchanged is wrong; half right is 0.5, per kind too.
  metrics, _, _, _ = edit_eval.edit_accuracy(FakeGenerator(run, renders(items, 0)), items)
  assert metrics["accuracy"] == 0.0 and metrics["unchanged"] == 1.0
  half = np.stack([renders(items, k % 2)[k] for k in range(24)])
  metrics, _, _, _ = edit_eval.edit_accuracy(FakeGenerator(run, half), items)
  assert metrics["accuracy"] == 0.5
  moves = [k for k, item in enumerate(items) if item["kind"] == "move"]
  assert metrics["by_kind"]["move"] == pytest.approx(np.mean([k % 2 for k in moves]))
  held = edit_eval.eval_items(6, split="test_heldout")
  metrics, _, _, _ = edit_eval.edit_accuracy(FakeGenerator(run, renders(held, 1)), held)
  assert metrics["heldout_fraction"] == 1.0 and metrics["accuracy"] == 1.0
  stories = (edits.edit_item(i, max_edits=3) for i in range(20))
  story = next(item for item in stories if len(item["edits"]) > 1)
  with pytest.raises(UserError, match="scores single edits"):
    edit_eval.edit_accuracy(FakeGenerator(run, renders([story], 1)), [story])


def test_evaluator_on_a_tiny_lm_writes_artefacts(run, tmp_path):
  built = evaluators.build(
    {"edit": {"type": "edit", "num_items": 5, "batch_size": 4, "split": "test_heldout"}}
  )
  evaluator = built["edit"]
  assert isinstance(evaluator, edit_eval.EditEval) and evaluator.stage == "lm"
  metrics = evaluator.run(run, str(tmp_path))
  assert metrics["num_items"] == 5 and metrics["split"] == "test_heldout"
  assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["unchanged"] <= 1.0
  assert all(0.0 <= v <= 1.0 for v in metrics["by_kind"].values())
  with open(tmp_path / "edit_test_heldout.json") as f:
    rows = json.load(f)
  items = evaluator.items()
  assert [r["instruction"] for r in rows] == [i["instructions"][0] for i in items]
  assert np.mean([r["right"] for r in rows]) == metrics["accuracy"]
  assert os.path.exists(tmp_path / "edit_test_heldout.png")
  # The right answer drawn by a fake generator scores 1 through the same evaluator.
  fake = SimpleNamespace(
    generator=lambda batch_size: FakeGenerator(run, renders(items, 1)),
    tokenizer_run=run.tokenizer_run,
    config={},
  )
  assert evaluator.run(fake)["accuracy"] == 1.0


def test_evaluator_settings_errors():
  for spec, match in (
    ({"split": "train"}, "split='train'"),
    ({"kinds": "move,spin"}, "kinds='move,spin'"),
    ({"num_items": 0}, "num_items=0"),
    ({"cfg_scale": 2.0}, "edit_eval.py"),
  ):
    with pytest.raises(UserError, match=match):
      evaluators.build({"x": {"type": "edit", **spec}})
  built = evaluators.build({"x": {"type": "edit", "kinds": "add, remove"}})
  assert built["x"].settings["kinds"] == ("add", "remove")


def test_reasoned_edits_write_the_reason_then_draw_from_it(run, monkeypatch):
  items = edit_eval.eval_items(8, seed=1)
  truth = [edits.reason(item["scenes"][0], item["scenes"][1]) for item in items]
  said = truth[:4] + [edits.reason(item["scenes"][0], item["scenes"][0]) for item in items[4:]]
  asked = []

  def text_before_image(generator, rows, *, batch_size):
    asked.extend(rows)
    return said

  monkeypatch.setattr(edit_eval.sample_edit.sample_chat, "text_before_image", text_before_image)
  # Drawn: the true result for the first 6 items, the source for the last 2.
  images = np.stack([renders(items, 1 if k < 6 else 0)[k] for k in range(8)])
  gen = FakeGenerator(run, images)
  metrics, _, _, reasons = edit_eval.edit_accuracy(gen, items, reason=True)
  assert reasons == said and metrics["accuracy"] == 6 / 8
  assert metrics["reason_right"] == 0.5  # the last 4 reasons say the source again
  assert metrics["drawn_as_said"] == 6 / 8  # items 0-3 and 6-7 drew what their reason said
  v, tok = run.vocab, run.text_tokenizer
  src = run.image_tokenizer.encode(renders(items[:1], 0))[0]
  prompt = edits.prompt_ids(src, items[0]["instructions"][0], v, tok, reason=True)
  assert asked[0] == prompt and prompt[-1] == v.eoi_id
  assert gen.rows[0] == prompt + v.encode_text(tok, said[0]) + [v.boi_id]
  # The evaluator reads the choice from the run's config.
  config = SimpleNamespace(get=lambda key: {"edit": {"reason": True}} if key == "data" else None)
  assert edit_eval.run_reasons_edits(config) == "scene" and not edit_eval.run_reasons_edits({})
  change = {"edit": {"reason": True, "reason_style": "change"}}
  config = SimpleNamespace(get=lambda key: change if key == "data" else None)
  assert edit_eval.run_reasons_edits(config) == "change"
  # Change reasons: the scene said is the source with the named object changed.
  said[:] = [edits.reason(it["scenes"][0], it["scenes"][1], "change") for it in items]
  said[6] = said[7] = "nothing so nothing"  # says the source again
  metrics, _, _, _ = edit_eval.edit_accuracy(gen, items, reason="change")
  assert metrics["reason_right"] == 6 / 8 and metrics["drawn_as_said"] == 1.0
  with pytest.raises(UserError, match="edit reason='words'"):
    edit_eval.edit_accuracy(gen, items, reason="words")
