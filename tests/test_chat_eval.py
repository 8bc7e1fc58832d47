import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
from test_sample_chat import make_run

from vqlm.data import chat, shapes
from vqlm.errors import UserError
from vqlm.eval import chat_eval, evaluators
from vqlm.sample import chat as sample_chat

SIZE = 32  # the fake image tokenizer's image size: renders the scene parser reads exactly


class FakeGenerator:
  """A chat Generator whose images and replies are given: `draw_ids` returns `images`,
  `write_ids` returns `texts`; it records the prompt rows and the images it encodes."""

  def __init__(self, run, *, images=None, texts=None):
    self.vocab, self.text_tokenizer = run.vocab, run.text_tokenizer
    self.image_tokenizer = SimpleNamespace(image_size=SIZE)
    self.images, self.texts = images, texts
    self.rows, self.kwargs, self.encoded = [], {}, []

  def _check_reads_images(self, what):
    pass

  def encode_images(self, images):
    self.encoded += list(images)
    # codes [N, 2, 2] that name the image: its number in encode order
    start = len(self.encoded) - len(images)
    return np.stack([np.full((2, 2), (start + i) % 16, np.int32) for i in range(len(images))])

  def draw_ids(self, rows, **kwargs):
    self.rows, self.kwargs = rows, kwargs
    assert len(rows) == len(self.images)
    return self.images

  def write_ids(self, rows, **kwargs):
    self.rows, self.kwargs = rows, kwargs
    assert len(rows) == len(self.texts)
    return list(self.texts)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return make_run(tmp_path_factory)


def draw_items(split, num=6, seed=0):
  return [
    chat.conversation(i, seed=seed, split=split, kinds=("draw",), max_objects=3) for i in range(num)
  ]


def renders(scenes, per_prompt):
  return np.stack([shapes.render(s, SIZE) for s in scenes for _ in range(per_prompt)])


def test_draw_accuracy_scores_true_and_wrong_images(run):
  items = draw_items("test")
  truth = renders([item["scene"] for item in items], 2)
  gen = FakeGenerator(run, images=truth)
  metrics, images = chat_eval.draw_accuracy(gen, items, num_per_prompt=2, cfg_scale=2.0, seed=5)
  assert images is truth and metrics["num_prompts"] == 6 and metrics["num_images"] == 12
  assert metrics["scene"] == metrics["color_acc"] == metrics["position_acc"] == 1.0
  counts = {f"{n}_objects": 2 * sum(len(i["scene"]) == n for i in items) for n in (1, 2, 3)}
  assert {k: v["num"] for k, v in metrics["by_objects"].items()} == {
    k: v for k, v in counts.items() if v
  }
  # Prompt-major rows: each request's chat prompt + <boi>, twice; settings passed on.
  row = sample_chat.chat_prompt_ids(gen, items[1]["turns"][:1]) + [gen.vocab.boi_id]
  assert gen.rows[2] == gen.rows[3] == row and gen.rows[1] != row
  assert gen.kwargs["cfg_scale"] == 2.0 and gen.kwargs["seed"] == 5
  assert metrics["heldout_pairs_used"] == [] and metrics["heldout_fraction"] == 0.0
  assert set(metrics["pairs_used"]) == {f"{c} {s}" for c, s in chat.pairs_used(items)}

  rng = np.random.default_rng(0)
  wrong = renders([chat.perturb_scene(item["scene"], rng) for item in items], 1)
  metrics, _ = chat_eval.draw_accuracy(FakeGenerator(run, images=wrong), items, num_per_prompt=1)
  assert metrics["scene"] == 0.0 and metrics["num_images"] == 6
  held = draw_items("test_heldout", num=4)
  metrics, _ = chat_eval.draw_accuracy(
    FakeGenerator(run, images=renders([i["scene"] for i in held], 1)), held, num_per_prompt=1
  )
  assert metrics["heldout_fraction"] == 1.0 and metrics["scene"] == 1.0
  assert set(metrics["heldout_pairs_used"]) <= {f"{c} {s}" for c, s in shapes.HELDOUT_PAIRS}
  assert metrics["heldout_pairs_used"]
  with pytest.raises(UserError, match="'question' item"):
    chat_eval.draw_accuracy(gen, [chat.conversation(0, kinds=("question",))], num_per_prompt=1)


def qa_items(num=30):
  return [
    chat.conversation(i, seed=1, split="test", kinds=("question", "describe"), max_objects=3)
    for i in range(num)
  ]


def test_answer_accuracy_exact_answers_per_kind(run):
  items = qa_items()
  kinds = {item["question_kind"] or item["kind"] for item in items}
  assert kinds >= {"describe", "count", "color"}  # the fixed items cover several groups
  right = [item["answer"] for item in items]
  # A description listing the objects in another order is still right.
  d = next(
    i for i, item in enumerate(items) if item["kind"] == "describe" and len(item["scene"]) > 1
  )
  right[d] = shapes.join_phrases([shapes.object_phrase(o) for o in items[d]["scene"][::-1]])
  assert right[d] != items[d]["answer"]
  gen = FakeGenerator(run, texts=[f" {r} " for r in right])
  metrics, replies = chat_eval.answer_accuracy(gen, items, batch_size=4)
  assert replies == [f" {r} " for r in right] and gen.kwargs["batch_size"] == 4
  assert metrics["accuracy"] == 1.0 and metrics["num_items"] == 30
  assert all(metrics[k] == 1.0 for k in kinds) and metrics["describe_parseable"] == 1.0
  assert sum(metrics["counts"].values()) == 30
  # The prompts hold the codes of each item's rendered scene: distinct scenes encoded once.
  scenes = {shapes.canonical(item["scene"]) for item in items}
  assert len(gen.encoded) == len(scenes)
  image = shapes.render(items[0]["scene"], SIZE)
  first = next(k for k, img in enumerate(gen.encoded) if np.array_equal(img, image))
  code = int(gen.vocab.image_token(np.int32(first % 16)))
  assert code in gen.rows[0] and gen.rows[0][-1] == gen.vocab.special("assistant")

  wrong = [
    chat.preference_pair(item, index=i)["rejected"][0]["parts"][0] for i, item in enumerate(items)
  ]
  metrics, _ = chat_eval.answer_accuracy(FakeGenerator(run, texts=wrong), items)
  assert metrics["accuracy"] == 0.0 and metrics["describe_parseable"] == 1.0
  half = [r if i % 2 else w for i, (r, w) in enumerate(zip(right, wrong))]
  metrics, _ = chat_eval.answer_accuracy(FakeGenerator(run, texts=half), items)
  assert metrics["accuracy"] == 0.5
  color = [i for i, item in enumerate(items) if item["question_kind"] == "color"]
  assert metrics["color"] == pytest.approx(np.mean([i % 2 for i in color]))
  metrics, _ = chat_eval.answer_accuracy(FakeGenerator(run, texts=["blah"] * 30), items)
  assert metrics["accuracy"] == 0.0 and metrics["describe_parseable"] == 0.0


def fake_run(run, generator, *, data="shapes"):
  tokenizer = SimpleNamespace(config=SimpleNamespace(data=SimpleNamespace(name=data)))
  return SimpleNamespace(
    vocab=run.vocab,
    generator=lambda batch_size: generator,
    tokenizer_run=lambda: tokenizer,
    config={"stage": "lm"},
  )


def test_chat_evaluators_build_run_and_refuse(run, tmp_path):
  built = evaluators.build(
    {
      "held": {"type": "chat_draw", "split": "test_heldout", "num_prompts": 5, "seed": 2},
      "qa": {"type": "chat_qa", "num_items": 3, "kinds": "question"},
    }
  )
  assert isinstance(built["held"], chat_eval.ChatDraw) and built["held"].settings["name"] == "held"
  assert built["held"].settings["images_per_prompt"] == 2 and built["qa"].stage == "lm"
  items = [
    chat.conversation(i, seed=1002, split="test_heldout", kinds=("draw",), max_objects=3)
    for i in range(5)
  ]
  gen = FakeGenerator(run, images=renders([i["scene"] for i in items], 2))
  metrics = built["held"].run(fake_run(run, gen), str(tmp_path))
  assert metrics["scene"] == 1.0 and metrics["heldout_fraction"] == 1.0
  assert metrics["split"] == "test_heldout" and metrics["num_images"] == 10
  with open(tmp_path / "held.json") as f:
    assert json.load(f) == [i["turns"][0]["parts"][0] for i in items]
  assert os.path.exists(tmp_path / "held.png")

  qa = [
    chat.conversation(i, seed=1000, split="test", kinds=("question",), max_objects=3)
    for i in range(3)
  ]
  gen = FakeGenerator(run, texts=[qa[0]["answer"], "no", qa[2]["answer"]])
  metrics = built["qa"].run(fake_run(run, gen), str(tmp_path))
  assert metrics["accuracy"] == pytest.approx(2 / 3)
  with open(tmp_path / "qa.json") as f:
    assert [r["right"] for r in json.load(f)] == [True, False, True]

  v = run.vocab  # the same vocab without <user>/<assistant>
  plain = SimpleNamespace(
    vocab=dataclasses.replace(v, specials=v.specials[:-2], num_reserved=v.num_reserved + 2)
  )
  for evaluator in built.values():
    with pytest.raises(UserError) as err:
      evaluator.run(plain)
    assert str(err.value) == sample_chat.NO_CHAT
  with pytest.raises(UserError, match="split"):
    evaluators.build({"x": {"type": "chat_draw", "split": "train"}})
  with pytest.raises(UserError, match="kinds"):
    evaluators.build({"x": {"type": "chat_qa", "kinds": "draw"}})
  with pytest.raises(UserError, match="chat_draw, chat_qa"):
    evaluators.build({"x": {"type": "chat"}})
  with pytest.raises(UserError, match="chat_eval.py"):
    evaluators.build({"x": {"type": "chat_qa", "num_prompts": 3}})
