"""The tune stage: its config, DPO pair collection and GRPO rollouts on a scripted sampler, and
(slow) end-to-end DPO and GRPO runs from a chat-vocabulary copy of the tiny LM run."""

import json
import os
import shutil

import numpy as np
import pytest

from vqlm import cli
from vqlm.data import chat, pipeline, shapes
from vqlm.errors import UserError
from vqlm.stages import tune, tune_config, tune_data
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.train.preference import group_advantages
from vqlm.vocab import CHAT_SPECIALS, Vocab

SIZE, GRID, K = 32, (2, 2), 16


@pytest.fixture(scope="module")
def tok_vocab(tmp_path_factory):
  texts = chat.texts(chat.conversations(200, max_objects=3, seed=1))
  path = train_sentencepiece(
    texts, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=150
  )
  tokenizer = TextTokenizer.load(path)
  vocab = Vocab(text_size=tokenizer.vocab_size, image_size=K, grid=GRID).with_specials(
    CHAT_SPECIALS
  )
  return tokenizer, vocab


class FakeImageTokenizer:
  """Codes from the parsed scene (the first object's colour, shape, size, cell); records the
  scenes it encodes."""

  image_size = SIZE

  def __init__(self):
    self.scenes = []

  def encode(self, images):
    out = []
    for image in images:
      scene = shapes.sort_scene(tune_data.scene_parser.parse_image(image))
      self.scenes.append(scene)
      o = scene[0]
      out.append(
        [
          [list(shapes.COLORS).index(o["color"]), shapes.SHAPES.index(o["shape"])],
          [shapes.SIZES.index(o["size"]), shapes.POSITIONS.index(o["position"])],
        ]
      )
    return np.asarray(out, np.int32)


class ScriptedPolicy:
  """`Policy.sample` with scripted replies: `replies_for(item)` lists an item's replies, scenes
  (drawn as reply j with codes `[[15, j], [15, j]]`) or texts."""

  def __init__(self, replies_for, *, restate=False):
    self.replies_for = replies_for
    self.image_tokenizer = FakeImageTokenizer()
    self.calls = 0
    self.restate = restate

  def sample(self, items, prompts, k, *, seed):
    self.calls += 1
    out = []
    for item in items:
      for j, reply in enumerate(self.replies_for(item)[:k]):
        if item["kind"] == "draw":
          codes = np.asarray([[15, j], [15, j]], np.int32)
          caption = shapes.caption(reply) if self.restate and reply else ""
          out.append((codes, shapes.render(reply, SIZE), caption))
        else:
          out.append(reply)
    return out


def recolour(scene):
  """The scene with its first object in another colour."""
  color = "cyan" if scene[0]["color"] != "cyan" else "red"
  return [dict(scene[0], color=color)] + [dict(o) for o in scene[1:]]


def collect_two(policy, items, prompts, tok_vocab, *, seq_len):
  """`collect_pairs` of two samples per prompt, seed 0, quiet."""
  tokenizer, vocab = tok_vocab
  return tune_data.collect_pairs(
    policy,
    items,
    prompts,
    samples_per_prompt=2,
    vocab=vocab,
    tokenizer=tokenizer,
    seq_len=seq_len,
    seed=0,
    log_fn=lambda _: None,
  )


def assistant_part(row_tokens, vocab, tokenizer):
  turns = chat.parse(row_tokens, vocab, tokenizer)
  assert [t["role"] for t in turns] == ["user", "assistant"]
  return turns[1]["parts"][0]


def test_dpo_pairs_chosen_rejected_gold_and_perturbed(tok_vocab):
  tokenizer, vocab = tok_vocab
  items = tune_data.make_prompts(
    3, seed=1, kinds=("draw",), min_objects=1, max_objects=2, split="train"
  )
  items.append(tune_data.make_prompts(1, seed=3, kinds=("question",), **_OBJ, split="train")[0])
  s0, s1, s2 = (it["scene"] for it in items[:3])
  script = [
    [s0, recolour(s0)],  # a perfect sample
    [recolour(s1), []],  # none perfect: gold chosen, the empty drawing rejected
    [s2, s2],  # all perfect: a perturbed scene rejected
    ["not an answer", items[3]["answer"]],
  ]
  policy = ScriptedPolicy(lambda item: script[items.index(item)])
  prompts = tune_data.prompt_turns(items, policy.image_tokenizer)
  policy.image_tokenizer.scenes = []
  pairs = collect_two(policy, items, prompts, tok_vocab, seq_len=96)
  np.testing.assert_array_equal(pairs["chosen_from"], [0, 1, 0, 0])
  np.testing.assert_array_equal(pairs["rejected_from"], [0, 0, 1, 0])
  np.testing.assert_array_equal(pairs["chosen_reward"], 1.0)
  np.testing.assert_allclose(pairs["rejected_reward"][:2], [0.75, 0.0])
  assert 0 < pairs["rejected_reward"][2] < 1 and pairs["rejected_reward"][3] == 0
  part = lambda side, i: assistant_part(pairs[f"{side}_tokens"][i], vocab, tokenizer)  # noqa: E731
  np.testing.assert_array_equal(part("chosen", 0), [[15, 0], [15, 0]])
  np.testing.assert_array_equal(part("rejected", 0), [[15, 1], [15, 1]])
  gold = policy.image_tokenizer.encode(shapes.render(s1, SIZE)[None])[0]
  np.testing.assert_array_equal(part("chosen", 1), gold)
  np.testing.assert_array_equal(part("rejected", 1), [[15, 1], [15, 1]])
  np.testing.assert_array_equal(part("chosen", 2), [[15, 0], [15, 0]])
  # Encoded in one fixed-size chunk: item 1's gold scene, item 2's perturbed one, then padding.
  gold_scene, perturbed = policy.image_tokenizer.scenes[:2]
  assert shapes.canonical(gold_scene) == shapes.canonical(s1)
  assert shapes.canonical(perturbed) != shapes.canonical(s2) and len(perturbed) == len(s2)
  np.testing.assert_array_equal(
    part("rejected", 2), policy.image_tokenizer.encode(shapes.render(perturbed, SIZE)[None])[0]
  )
  assert part("chosen", 3) == items[3]["answer"] and part("rejected", 3) == "not an answer"
  # Loss only on the replies; both rows of a pair share the prompt.
  for i in range(4):
    t, w = pairs["chosen_tokens"][i], pairs["chosen_loss_weights"][i]
    start = int(np.argmax(t == vocab.assistant_id))
    assert w[:start].sum() == 0 and w[start:].sum() > 0
    np.testing.assert_array_equal(t[: start + 1], pairs["rejected_tokens"][i, : start + 1])
  assert pairs["chosen_loss_weights"][0].sum() == vocab.tokens_per_image + 3  # <boi> ... <eos>


_OBJ = dict(min_objects=1, max_objects=3)


def test_restating_pairs_caption_the_scene_before_the_image(tok_vocab):
  tokenizer, vocab = tok_vocab
  items = tune_data.make_prompts(
    2, seed=1, kinds=("draw",), min_objects=1, max_objects=1, split="train"
  )
  s0, s1 = (it["scene"] for it in items)
  script = [[s0, recolour(s0)], [recolour(s1), recolour(s1)]]
  policy = ScriptedPolicy(lambda item: script[items.index(item)], restate=True)
  prompts = tune_data.prompt_turns(items, policy.image_tokenizer)
  pairs = collect_two(policy, items, prompts, tok_vocab, seq_len=96)
  reply = lambda side, i: chat.parse(pairs[f"{side}_tokens"][i], vocab, tokenizer)[1]["parts"]  # noqa: E731
  # Sampled replies keep the model's caption; the gold reply (item 1) carries the true one.
  assert reply("chosen", 0)[0] == shapes.caption(s0)
  assert reply("rejected", 0)[0] == shapes.caption(recolour(s0))
  assert reply("chosen", 1)[0] == shapes.caption(s1) and len(reply("chosen", 1)) == 2


def test_prompts_never_hold_a_heldout_pair_and_perturbations_stay_in_train():
  items = tune_data.make_prompts(
    400, seed=1, kinds=chat.KINDS, min_objects=1, max_objects=3, split="train"
  )
  assert not chat.pairs_used(items) & set(shapes.HELDOUT_PAIRS)
  assert {it["kind"] for it in items} == set(chat.KINDS)
  assert items[5] == chat.conversation(5, seed=1, kinds=chat.KINDS, **_OBJ)
  rng = np.random.default_rng(0)
  perturbed = [chat.perturb_scene(it["scene"], rng, split="train") for it in items]
  assert not chat.pairs_used([{"scene": s} for s in perturbed]) & set(shapes.HELDOUT_PAIRS)


def test_pairs_are_cached_and_batched_chosen_first(tmp_path):
  pairs = {
    f"{side}_{k}": np.full((3, 5), v + i, np.float32 if k == "loss_weights" else np.int32)
    for i, side in enumerate(("chosen", "rejected"))
    for v, k in enumerate(tune_data.KEYS)
  }
  pairs["chosen_reward"] = np.ones(3, np.float32)
  settings = {"seed": 1, "kinds": "draw"}
  first = tune_data.load_or_collect_pairs(str(tmp_path), settings, lambda: pairs)

  def never():
    raise AssertionError("sampled again")

  again = tune_data.load_or_collect_pairs(str(tmp_path), dict(settings), never)
  assert set(again) == set(pairs) and all(np.array_equal(again[k], first[k]) for k in pairs)
  with pytest.raises(UserError, match="other settings"):
    tune_data.load_or_collect_pairs(str(tmp_path), {"seed": 2, "kinds": "draw"}, never)
  inner = pipeline.make_iterator(
    tune_data.PairSource(again), global_batch_size=2, transform=tune._take, seed=0, num_threads=1
  )
  it = tune_data.PairIterator(inner)
  batch = next(it)
  assert batch["tokens"].shape == (4, 5)
  np.testing.assert_array_equal(batch["tokens"][:2], 0)  # chosen rows, then rejected
  np.testing.assert_array_equal(batch["tokens"][2:], 1)
  state = it.get_state()
  second = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["tokens"], second["tokens"])


def test_rollouts_advantages_weights_and_resume(tok_vocab):
  tokenizer, vocab = tok_vocab
  items = tune_data.make_prompts(
    3, seed=1, kinds=("draw",), min_objects=1, max_objects=1, split="train"
  )
  policy = ScriptedPolicy(lambda item: [item["scene"], recolour(item["scene"]), []])
  prompts = tune_data.prompt_turns(items, policy.image_tokenizer)
  kw = dict(vocab=vocab, tokenizer=tokenizer, seq_len=64, seed=3)
  it = tune_data.RolloutIterator(
    policy=policy, items=items, prompts=prompts, prompts_per_step=2, group_size=3, **kw
  )
  batch = next(it)
  assert batch["tokens"].shape == (6, 64) and it.get_state() == {"rollout": 1}
  rewards = np.asarray([[1.0, 0.75, 0.0]] * 2)
  np.testing.assert_allclose(batch["rewards"], rewards.reshape(-1))
  np.testing.assert_allclose(batch["advantages"], np.asarray(group_advantages(rewards)).reshape(-1))
  np.testing.assert_allclose(batch["reward_exact"], (rewards == 1).reshape(-1))
  # Weights only on the sampled codes (not <boi>, <eoi>, <eos> nor the prompt).
  np.testing.assert_array_equal(batch["loss_weights"].sum(1), vocab.tokens_per_image)
  assert vocab.is_image(batch["targets"][batch["loss_weights"] > 0]).all()
  # Prompts come in a seeded permutation per pass over the set.
  seen = it.indices(0) + it.indices(1) + it.indices(2)
  assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]
  # The loop draws a batch before restoring the iterator: that rollout is not sampled twice.
  calls = policy.calls
  it.set_state({"rollout": 0})
  np.testing.assert_array_equal(next(it)["tokens"], batch["tokens"])
  assert policy.calls == calls
  next(it)
  assert policy.calls == calls + 1
  with pytest.raises(UserError, match="num_prompts"):
    tune_data.RolloutIterator(
      policy=policy, items=items, prompts=prompts, prompts_per_step=4, group_size=2, **kw
    )


def test_config_presets_and_bad_values_are_one_line():
  for method in ("dpo", "grpo"):
    for size in ("small", "tiny"):
      config = tune_config.get_config(f"method={method},size={size}")
      config.init_from = "somewhere"
      assert tune.check_config(config) == ("draw",)
  config = tune_config.get_config("method=dpo")
  config.init_from = "somewhere"
  config.prompts.kinds = "draw, question"
  assert tune.check_config(config) == ("draw", "question")
  for field, value, match in (
    ("prompts.kinds", "draw,paint", "kinds='draw,paint'"),
    ("dpo.beta", 0.0, "dpo.beta=0.0 must be > 0"),
    ("grpo.group_size", 1, "group_size=1 must be >= 2"),
    ("train.batch_size", 100, "train.batch_size=100 must be in 1..prompts.num_prompts=64"),
    ("prompts.max_objects", 10, "max_objects=10"),
    ("sampling.temperature", -1.0, "temperature=-1.0"),
  ):
    bad = tune_config.get_config("method=dpo")
    bad.init_from = "somewhere"
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(UserError, match=match.replace(".", r"\.").replace("(", r"\(")):
      tune.check_config(bad)
  bad = tune_config.get_config("method=dpo")
  with pytest.raises(UserError, match="init_from is empty"):
    tune.check_config(bad)


def test_cli_errors_are_one_line(tmp_path, capsys, tiny):
  def error(*argv) -> str:
    base = ["vqlm", "train", "--workdir", str(tmp_path / "run"), "--progress=false"]
    assert cli.main(base + list(argv)) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("vqlm: error: ") and "\n" not in message, message
    return message

  assert "unknown method 'ppo'" in error("--config", "configs/tune.py:method=ppo")
  assert "init_from is empty" in error("--config", "configs/tune.py:method=dpo")
  assert "tokenizer run; it must be an LM run" in error(
    "--config", "configs/tune.py", f"--config.init_from={tiny['tok']}"
  )
  message = error("--config", "configs/tune.py", f"--config.init_from={tiny['lm']}")
  assert "no chat turns" in message


def chat_copy(tiny, path) -> str:
  """The tiny LM run with `<user>`/`<assistant>` in its vocabulary (no id moves)."""
  shutil.copytree(tiny["lm"], path)
  vocab = Vocab.load(os.path.join(path, "vocab.json"))
  vocab.with_specials(CHAT_SPECIALS).save(os.path.join(path, "vocab.json"))
  return str(path)


def _tune(method, source, workdir, *overrides):
  argv = ["vqlm", "train", "--config", f"configs/tune.py:method={method},size=tiny"]
  argv += [f"--config.init_from={source}", "--workdir", str(workdir), "--progress=false"]
  return cli.main(argv + [f"--config.{o}" for o in overrides])


@pytest.mark.slow
def test_dpo_end_to_end_checkpoints_resumes_and_loads(tiny, tmp_path, capsys):
  import jax

  from vqlm.runs import LMRun

  source = chat_copy(tiny, tmp_path / "chat")
  out = tmp_path / "dpo"
  assert _tune("dpo", source, out) == 0
  log = capsys.readouterr().out
  assert "collected 4 DPO pairs from 8 samples" in log and "initialised the parameters" in log
  assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert rows[0]["step"] == 0 and "pairs/mean_reward" in rows[0]
  trained = [r for r in rows if "train/reward_acc" in r]
  assert [r["step"] for r in trained] == [1, 2, 3, 4]
  assert trained[0]["train/loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference
  pairs_time = os.path.getmtime(out / "pairs.npz")
  assert _tune("dpo", source, out) == 0  # done: resumes at the end, samples nothing
  log = capsys.readouterr().out
  assert "resuming from step 4" in log and "collected" not in log
  assert os.path.getmtime(out / "pairs.npz") == pairs_time
  assert _tune("dpo", source, out, "train.steps=6") == 0  # continues from the cached pairs
  assert "resuming from step 4" in capsys.readouterr().out
  run, before = LMRun(str(out)), LMRun(source)
  assert run.step == 6 and run.config.tune.method == "dpo" and run.config.stage == "lm"
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), run.params, before.params)
  assert any(jax.tree.leaves(moved))
  assert _tune("grpo", source, out) == 2
  assert "holds a dpo run, not grpo" in capsys.readouterr().err


@pytest.mark.slow
def test_grpo_end_to_end_samples_with_the_current_parameters(tiny, tmp_path, capsys):
  from vqlm.runs import LMRun

  source = chat_copy(tiny, tmp_path / "chat")
  out = tmp_path / "grpo"
  assert _tune("grpo", source, out, "prompts.num_eval=2", "train.eval_every=2") == 0
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  train = [r for r in rows if "train/reward" in r]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert train[0]["train/kl"] == 0.0 and train[-1]["train/kl"] > 0
  assert {"train/reward_color", "train/clip_frac"} <= set(train[0])
  assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2, 3]
  assert [r["step"] for r in rows if "rollout/sample_seconds" in r] == [1, 2, 3]
  assert _tune("grpo", source, out, "train.steps=4") == 0
  assert "resuming from step 3" in capsys.readouterr().out
  assert LMRun(str(out)).step == 4


@pytest.mark.slow
def test_new_parameters_do_not_recompile_the_sampler(tiny, tmp_path):
  import jax

  from vqlm.runs import LMRun

  run = LMRun(chat_copy(tiny, tmp_path / "chat"))
  policy = tune_data.Policy(
    model=run.model,
    params=run.params,
    vocab=run.vocab,
    text_tokenizer=run.text_tokenizer,
    image_tokenizer=run.tokenizer_run(),
    mesh=run.mesh,
    rules=run.rules,
    config=run.config,
    sampling=tune_data.sampling_config(temperature=1.0, top_k=0),
    cfg_scale=2.0,
    batch_size=4,
  )
  items = tune_data.make_prompts(2, seed=1, kinds=("draw",), **_OBJ, split="train")
  prompts = tune_data.prompt_turns(items, policy.image_tokenizer)
  first = policy.sample(items, prompts, 2, seed=0)
  jitted = policy.generator.sampler._jitted
  sizes = {k: f._cache_size() for k, f in jitted.items()}
  policy.set_params(jax.tree.map(lambda x: x * 1.5, run.params))
  second = policy.sample(items, prompts, 2, seed=0)
  assert {k: f._cache_size() for k, f in jitted.items()} == sizes and set(sizes.values()) == {1}
  assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, second))
  policy.set_params(run.params)
  np.testing.assert_array_equal(policy.sample(items, prompts, 2, seed=0)[0][0], first[0][0])


def test_dpo_pairs_of_questions_take_the_tuned_models_reply_layout(tok_vocab):
  tokenizer, vocab = tok_vocab
  items = tune_data.make_prompts(
    2,
    seed=3,
    kinds=("question",),
    min_objects=1,
    max_objects=1,
    split="train",
    reason=True,
    focus=True,
  )
  gold = [it["turns"][1]["parts"][0] for it in items]
  assert all(g.count(" so ") == 2 for g in gold)
  script = [["not an answer", "nor this"], [gold[1], gold[1]]]
  policy = ScriptedPolicy(lambda item: script[items.index(item)])
  prompts = tune_data.prompt_turns(items, policy.image_tokenizer)
  pairs = collect_two(policy, items, prompts, tok_vocab, seq_len=160)
  np.testing.assert_array_equal(pairs["chosen_from"], [1, 0])
  np.testing.assert_array_equal(pairs["rejected_from"], [0, 1])
  part = lambda side, i: assistant_part(pairs[f"{side}_tokens"][i], vocab, tokenizer)  # noqa: E731
  # None right: the gold reply (description, focus, answer) is chosen.
  assert part("chosen", 0) == gold[0] and part("rejected", 0) == "not an answer"
  # All right: the rejected reply is the same description and focus with a wrong answer.
  wrong = part("rejected", 1)
  assert wrong.rsplit(" so ", 1)[0] == gold[1].rsplit(" so ", 1)[0] and wrong != gold[1]


def test_object_focused_gold_replies_and_their_answer_budget(tok_vocab):
  tokenizer, vocab = tok_vocab
  items = tune_data.make_prompts(
    6,
    seed=3,
    kinds=("question",),
    min_objects=1,
    max_objects=2,
    split="train",
    reason=True,
    focus="object",
  )
  budget = tune_data.reply_max_len(focus="object")
  assert budget == tune_data.reply_max_len(focus=True) > tune_data.reply_max_len()
  for it in items:
    gold = it["turns"][1]["parts"][0]
    assert (
      gold.split(" so ")[1] == it["focus"] and len(vocab.encode_text(tokenizer, gold)) <= budget
    )
  # Without reasons there is no focus.
  plain = tune_data.make_prompts(
    1, seed=3, kinds=("question",), min_objects=1, max_objects=1, split="train", focus="object"
  )
  assert plain[0]["focus"] is None


def test_lengths_are_checked_for_the_reply_each_prompt_gets(tok_vocab):
  tokenizer, vocab = tok_vocab
  image_tokenizer = FakeImageTokenizer()
  question = tune_data.make_prompts(1, seed=3, kinds=("question",), **_OBJ, split="train")
  draw = tune_data.make_prompts(1, seed=3, kinds=("draw",), **_OBJ, split="train")
  for items in (question, draw):
    prompts = tune_data.prompt_turns(items, image_tokenizer)
    kinds = [it["kind"] for it in items]
    turns = list(prompts[0]) + [{"role": "assistant", "parts": []}]
    base = len(chat.build(turns, vocab, tokenizer)["tokens"])
    # A question's answer may take REPLY_MAX_LEN ids; a drawing an image and <eoi>.
    reply = tune_data.REPLY_MAX_LEN if kinds[0] != "draw" else vocab.tokens_per_image + 2
    tune_data.check_lengths(prompts, vocab, tokenizer, base + reply, kinds)
    with pytest.raises(UserError, match=r"more than train.seq_len=\d+; set --config.train"):
      tune_data.check_lengths(prompts, vocab, tokenizer, base + reply - 1, kinds)
