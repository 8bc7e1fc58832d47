"""The tune stage's data: prompts, sampled replies and their rewards, DPO pairs, GRPO rollouts.

Prompts are `vqlm.data.chat.conversation` items of the "train" split (no held-out colour-shape
pair ever appears). A reply is scored against the item (`score_reply`): a drawn image by
`vqlm.eval.scene_reward` on its parsed scene, a description by the same reward on the scene its
caption parses to, an answer to a question by exactness.

DPO pairs (`collect_pairs`, once per run, cached in `RUN/pairs.npz`): `samples_per_prompt` replies
per prompt from the tuned-from model; chosen = the best reply if perfect (reward 1), else the
gold reply (the scene's image encoded by the image tokenizer, or the item's reply text);
rejected = the worst reply if imperfect, else a perturbed scene's image (a wrong answer for
questions), so every prompt gives one pair.

GRPO rollouts (`RolloutIterator`): `prompts_per_step` prompts x `group_size` replies sampled with
the policy's current parameters (`Policy.set_params`, which swaps the sampler's parameters without
recompiling), scored, and laid out as chat examples whose loss weights mark the sampled tokens.
"""

from collections.abc import Callable, Mapping, Sequence
import json
import os
import time
import types
from typing import Any

import flax.linen as nn
import numpy as np

from vqlm.data import chat, sequences, shapes
from vqlm.errors import UserError
from vqlm.eval import scene_parser
from vqlm.eval.scene_reward import PARTS, reward_parts
from vqlm.sample import chat as chat_sampling
from vqlm.sample.api import Generator
from vqlm.sample.processors import SamplingConfig, Settings
from vqlm.train.grpo import PART_PREFIX
from vqlm.train.preference import group_advantages, pair_batch
from vqlm.vocab import Vocab

KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")
PAIRS_FILE = "pairs.npz"

# ---- prompts and scoring ------------------------------------------------------------------------


def make_prompts(
  num: int,
  *,
  seed: int,
  kinds: Sequence[str],
  min_objects: int,
  max_objects: int,
  split: str,
  reason: bool = False,
  focus: bool | str = False,
) -> list[dict[str, Any]]:
  """`chat.conversation` items 0..num-1 of `(seed, split)`; refuses any with a held-out pair
  outside "test_heldout" (the train and validation splits never draw one). `reason`, `focus`:
  question replies (the gold ones of DPO pairs, their wrong answers) laid out as the tuned
  model was instruction-tuned to write them (`chat.conversation`)."""
  items = list(
    chat.conversations(
      num,
      seed=seed,
      split=split,
      kinds=tuple(kinds),
      min_objects=min_objects,
      max_objects=max_objects,
      reason=reason,
      focus=focus if reason else False,
    )
  )
  held = chat.pairs_used(items) & set(shapes.HELDOUT_PAIRS)
  if held and split != "test_heldout":
    raise AssertionError(f"held-out pairs {sorted(held)} in {split} prompts")
  return items


def encode_scenes(image_tokenizer: Any, scenes: Sequence[Any], *, chunk: int = 32) -> np.ndarray:
  """Codes `[N, h, w]` of the scenes rendered at the tokenizer's image size (encoded in chunks of
  one fixed size, so the encoder compiles once)."""
  size = int(image_tokenizer.image_size)
  images = np.stack([shapes.render(s, size) for s in scenes])
  n = len(images)
  padded = np.concatenate([images, np.repeat(images[:1], -n % chunk, axis=0)])
  codes = [np.asarray(image_tokenizer.encode(padded[i : i + chunk])) for i in range(0, n, chunk)]
  return np.concatenate(codes)[:n].astype(np.int32)


def prompt_turns(items: Sequence[Mapping[str, Any]], image_tokenizer: Any) -> list[list[dict]]:
  """Each item's user turn (`[turn]`) with its `SceneImage`s replaced by codes."""
  scenes = [
    p.objects() for it in items for p in it["turns"][0]["parts"] if isinstance(p, chat.SceneImage)
  ]
  codes = iter(encode_scenes(image_tokenizer, scenes) if scenes else ())
  return [chat.with_codes(it["turns"][:1], lambda _: next(codes)) for it in items]


def _question_parts(exact: float) -> dict[str, float]:
  parts = {k: exact for k in PARTS}
  parts.update(missing=0.0, extra=0.0)
  return parts


def score_reply(item: Mapping[str, Any], reply: Any) -> dict[str, float]:
  """The reward parts (`scene_reward.PARTS`) of one reply: a drawn image (uint8 `[H, W, 3]`) of a
  "draw" item, a text of a "describe" item (its parsed caption's scene reward; an unparsable text
  scores as an empty scene) or of a "question" item (every part is its exactness)."""
  kind = item["kind"]
  if kind == "draw":
    return reward_parts(scene_parser.parse_image(np.asarray(reply)), item["scene"])
  if kind == "describe":
    return reward_parts(shapes.parse_caption(str(reply)) or [], item["scene"])
  return _question_parts(float(chat.final_answer(str(reply)) == item["answer"]))


# ---- sampling with the parameters being tuned ---------------------------------------------------


# Most text ids of a sampled answer: the answers of 1-2 object scenes need at most 29 (a
# description), 3 objects about 40; a reply sampled at a high temperature may ramble, and a longer
# one would not fit the tuning examples (a cut reply counts as a wrong one).
REPLY_MAX_LEN = 32
# The ids a focused reply adds (`chat.conversation(focus=True)` or focus="object": at most 11
# on 1-2 objects with the demo's text model, a whole focused reply at most 33).
FOCUS_IDS = 8


def reply_max_len(*, focus: bool | str = False) -> int:
  """Most text ids of a sampled answer of a model tuned with (or without) focused replies."""
  return REPLY_MAX_LEN + (FOCUS_IDS if focus else 0)


class Policy:
  """A `Generator` over the parameters being tuned.

  `set_params` swaps the sampler's parameters; they are arguments of its compiled loops, so new
  values of the same shapes and shardings (every train state's) never recompile.

  Args:
    model, params, vocab, text_tokenizer: the LM (params unboxed, placed on `mesh`).
    image_tokenizer: the image tokenizer run (`encode`, `decode`, `codebook`, `image_size`).
    mesh, rules: where the parameters live.
    config: the LM run's config (for its guidance style, `run_cfg_uncond`).
    sampling: image/text settings; cfg_scale: guidance on image codes (1: none).
    batch_size: sampler rows per call.
    restate: draw replies restate the request first; chat_uncond: guidance against an empty
      request (`vqlm.sample.chat.draw`).
    reply_len: most text ids of a sampled answer (`reply_max_len`).
  """

  def __init__(
    self,
    *,
    model: Any,
    params: Any,
    vocab: Vocab,
    text_tokenizer: Any,
    image_tokenizer: Any,
    mesh: Any,
    rules: Any,
    config: Any,
    sampling: SamplingConfig,
    cfg_scale: float,
    batch_size: int,
    restate: bool = False,
    chat_uncond: bool = False,
    reply_len: int = REPLY_MAX_LEN,
  ):
    chat_sampling.require_chat_vocab(vocab)
    self.reply_len = int(reply_len)
    run = types.SimpleNamespace(
      model=model,
      params=params,
      vocab=vocab,
      text_tokenizer=text_tokenizer,
      tokenizer_run=lambda: image_tokenizer,
      mesh=mesh,
      rules=rules,
      config=config,
    )
    self.generator = Generator(
      run, batch_size=batch_size, progress=False, image_tokenizer=image_tokenizer
    )
    self.image_tokenizer = image_tokenizer
    self.sampling = sampling
    self.cfg_scale = float(cfg_scale)
    self.restate = bool(restate)
    self.chat_uncond = bool(chat_uncond)

  def set_params(self, params: Any) -> None:
    sampler = self.generator.sampler
    sampler.variables = {**sampler.variables, "params": nn.meta.unbox(params)}

  def sample(
    self, items: Sequence[Mapping[str, Any]], prompts: Sequence[list[dict]], k: int, *, seed: int
  ) -> list[Any]:
    """`k` replies per item, item-major: `(codes [h, w], image [H, W, 3], caption)` for "draw"
    items (the caption: the model's greedy restatement of the request when `restate`, else ""),
    text for the others; sampled with `sampling`, row i of the drawings with seed `(seed, i)`, of
    the texts with `(seed + 1, i)`."""
    out: list[Any] = [None] * (len(items) * k)
    draw = [i for i, it in enumerate(items) if it["kind"] == "draw"]
    talk = [i for i, it in enumerate(items) if it["kind"] != "draw"]
    if draw:
      requests = [prompts[i] for i in draw]
      captions = chat_sampling.restate(self.generator, requests) if self.restate else None
      images, codes = chat_sampling.draw(
        self.generator,
        requests,
        num_per_prompt=k,
        cfg_scale=self.cfg_scale,
        sampling=self.sampling,
        seed=seed,
        return_codes=True,
        captions=captions,
        chat_uncond=self.chat_uncond,
      )
      for n, i in enumerate(draw):
        caption = captions[n] if captions is not None else ""
        for j in range(k):
          out[i * k + j] = (codes[n * k + j], images[n * k + j], caption)
    if talk:
      texts = chat_sampling.reply(
        self.generator,
        [prompts[i] for i in talk for _ in range(k)],
        greedy=False,
        sampling=self.sampling,
        seed=seed + 1,
        max_len=self.reply_len,
      )
      for n, i in enumerate(talk):
        for j in range(k):
          out[i * k + j] = texts[n * k + j]
    return out


def sampling_config(*, temperature: float, top_k: int) -> SamplingConfig:
  """The same settings for text and image ids (temperature 0: greedy)."""
  settings = Settings(temperature=float(temperature), top_k=int(top_k))
  return SamplingConfig(text=settings, image=settings).check()


def _score_all(items, replies, k) -> list[dict[str, float]]:
  return [
    score_reply(items[i // k], r[1] if isinstance(r, tuple) else r) for i, r in enumerate(replies)
  ]


def evaluate(policy: Policy, items: Sequence[Mapping[str, Any]], prompts, *, seed: int) -> dict:
  """Mean reward parts of one sampled reply per item (`eval/reward`, `eval/exact`, ...)."""
  parts = _score_all(items, policy.sample(items, prompts, 1, seed=seed), 1)
  return {k: float(np.mean([p[k] for p in parts])) for k in PARTS}


# ---- chat examples ------------------------------------------------------------------------------


def _reply_part(reply: Any) -> list[Any]:
  if isinstance(reply, tuple):  # (codes, image, caption): the caption (if any), then the codes.
    caption = reply[2] if len(reply) > 2 else ""
    return ([caption] if caption else []) + [np.asarray(reply[0], np.int32)]
  if isinstance(reply, str):
    return [reply] if reply.strip() else []
  return [reply]


def example(
  prompt: list[dict],
  reply: Any,
  vocab: Vocab,
  tokenizer: Any,
  seq_len: int,
  *,
  sampled_only: bool = False,
) -> dict[str, np.ndarray]:
  """The padded chat example `[seq_len]` of a prompt turn and an assistant reply (codes `[h, w]`,
  a `(codes, image)` sample, or text; an empty text is an empty turn). `sampled_only`: loss weight
  only on the tokens the sampler chose (an image's codes; a text's ids and `<eos>`), not the
  forced `<boi>` / `<eoi>` / `<eos>` of an image."""
  parts = _reply_part(reply)
  turns = list(prompt) + [{"role": "assistant", "parts": parts}]
  ex = chat.build(turns, vocab, tokenizer)
  if sampled_only and parts and np.ndim(parts[0]) == 2:
    ex["loss_weights"] = np.where(vocab.is_image(ex["targets"]), ex["loss_weights"], 0.0)
  n = len(ex["tokens"])
  if n > seq_len:
    raise UserError(
      f"a tuning example has {n} tokens, more than train.seq_len={seq_len}; set "
      f"--config.train.seq_len={n} or lower --config.prompts.max_objects"
    )
  return sequences.pad(ex, seq_len, pad_id=vocab.pad_id)


def check_lengths(
  prompts,
  vocab: Vocab,
  tokenizer: Any,
  seq_len: int,
  kinds: Sequence[str] | None = None,
  *,
  reply_len: int = REPLY_MAX_LEN,
) -> None:
  """Refuses up front prompts whose longest reply would not fit: an image (`<boi>` codes `<eoi>`
  `<eos>`) for a draw prompt, `reply_len` text ids for the others (`kinds`: each prompt's
  item kind; None: all draw)."""
  image = np.zeros(vocab.grid, np.int32)
  for i, p in enumerate(prompts):
    if kinds is None or kinds[i] == "draw":
      example(p, image, vocab, tokenizer, seq_len)
      continue
    turns = list(p) + [{"role": "assistant", "parts": []}]
    need = len(chat.build(turns, vocab, tokenizer)["tokens"]) + reply_len
    if need > seq_len:
      raise UserError(
        f"a tuning example may have {need} tokens (an answer of up to {reply_len} ids), "
        f"more than train.seq_len={seq_len}; set --config.train.seq_len={need} or lower "
        "--config.prompts.max_objects"
      )


# ---- DPO pairs ----------------------------------------------------------------------------------


def collect_pairs(
  policy: Policy,
  items: Sequence[Mapping[str, Any]],
  prompts: Sequence[list[dict]],
  *,
  samples_per_prompt: int,
  vocab: Vocab,
  tokenizer: Any,
  seq_len: int,
  seed: int,
  log_fn: Callable[[str], None] = print,
) -> dict[str, np.ndarray]:
  """One DPO pair per prompt (module docstring) as arrays: `chosen_<key>` / `rejected_<key>`
  `[N, seq_len]` for the example keys, `chosen_reward`, `rejected_reward`, `mean_reward` `[N]`,
  `chosen_from` (0 sample, 1 gold), `rejected_from` (0 sample, 1 perturbed or wrong answer), and
  `seconds` (sampling, scoring) `[2]`."""
  k = samples_per_prompt
  start = time.perf_counter()
  replies = policy.sample(items, prompts, k, seed=seed)
  sampled = time.perf_counter()
  parts = _score_all(items, replies, k)
  scored = time.perf_counter()
  rewards = np.asarray([p["reward"] for p in parts], np.float32).reshape(len(items), k)
  wrong_scenes = [
    i for i in range(len(items)) if items[i]["kind"] == "draw" and rewards[i].min() >= 1.0
  ]
  gold_scenes = [
    i for i in range(len(items)) if items[i]["kind"] == "draw" and rewards[i].max() < 1.0
  ]
  perturbed = {}
  for i in wrong_scenes:
    rng = np.random.default_rng([seed, i, 11])
    perturbed[i] = shapes.sort_scene(chat.perturb_scene(items[i]["scene"], rng, split="train"))
  scenes = [items[i]["scene"] for i in gold_scenes] + [perturbed[i] for i in wrong_scenes]
  codes = encode_scenes(policy.image_tokenizer, scenes) if scenes else []
  gold = dict(zip(gold_scenes, codes[: len(gold_scenes)]))
  wrong = dict(zip(wrong_scenes, codes[len(gold_scenes) :]))
  chosen, rejected = [], []
  out: dict[str, list] = {"chosen_reward": [], "rejected_reward": []}
  out.update(chosen_from=[], rejected_from=[], mean_reward=[])
  for i, item in enumerate(items):
    row = rewards[i]
    best, worst = int(np.argmax(row)), int(np.argmin(row))
    # A restating model's gold and perturbed replies carry the scene's true caption.
    caption = shapes.caption(item["scene"]) if policy.restate else ""
    if row[best] >= 1.0:
      c, c_from, c_reward = replies[i * k + best], 0, 1.0
    else:
      # A question's gold reply is the item's: reasoned (and focused) as the model was tuned.
      c = (gold[i], None, caption) if item["kind"] == "draw" else item["turns"][1]["parts"][0]
      c_from, c_reward = 1, 1.0
    if row[worst] < 1.0:
      r, r_from, r_reward = replies[i * k + worst], 0, float(row[worst])
    elif item["kind"] == "draw":
      r, r_from = (wrong[i], None, caption), 1
      r_reward = reward_parts(perturbed[i], item["scene"])["reward"]
    else:
      r, r_from = chat.preference_pair(item, seed=seed, index=i)["rejected"][0]["parts"][0], 1
      r_reward = score_reply(item, r)["reward"]
    chosen.append(example(prompts[i], c, vocab, tokenizer, seq_len))
    rejected.append(example(prompts[i], r, vocab, tokenizer, seq_len))
    for key, value in (
      ("chosen_reward", c_reward),
      ("rejected_reward", r_reward),
      ("chosen_from", c_from),
      ("rejected_from", r_from),
      ("mean_reward", float(row.mean())),
    ):
      out[key].append(value)
  arrays = {f"chosen_{key}": np.stack([e[key] for e in chosen]) for key in KEYS}
  arrays.update({f"rejected_{key}": np.stack([e[key] for e in rejected]) for key in KEYS})
  arrays.update({key: np.asarray(v, np.float32) for key, v in out.items()})
  arrays["seconds"] = np.asarray([sampled - start, scored - sampled], np.float32)
  log_fn(
    f"collected {len(items)} DPO pairs from {len(items) * k} samples in "
    f"{sampled - start:.1f}s sampling + {scored - sampled:.1f}s scoring: mean reward "
    f"{rewards.mean():.3f}, perfect samples {np.mean(rewards >= 1):.1%}, gold chosen "
    f"{np.mean(out['chosen_from']):.1%}, perturbed rejected {np.mean(out['rejected_from']):.1%}"
  )
  return arrays


def load_or_collect_pairs(
  workdir: str, settings: Mapping[str, Any], collect: Callable[[], Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
  """The pairs of `RUN/pairs.npz` when it was collected with the same `settings` (a JSON-able
  dict), else `collect()`'s, written there first (a resumed run never samples again)."""
  path = os.path.join(workdir, PAIRS_FILE)
  key = json.dumps(dict(settings), sort_keys=True)
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["settings"]) != key:
        raise UserError(
          f"{path} holds pairs collected with other settings ({saved['settings']}); use a new "
          "--workdir or delete that file"
        )
      return {k: saved[k] for k in saved.files if k != "settings"}
  arrays = dict(collect())
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, settings=np.asarray(key), **arrays)
  os.replace(tmp, path)
  return arrays


class PairSource:
  """Random access over collected pairs: element i is `{"chosen_<key>", "rejected_<key>"}`."""

  def __init__(self, pairs: Mapping[str, np.ndarray]):
    self.arrays = {
      f"{side}_{k}": np.asarray(pairs[f"{side}_{k}"])
      for side in ("chosen", "rejected")
      for k in KEYS
    }

  def __len__(self) -> int:
    return len(self.arrays["chosen_tokens"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}


class PairIterator:
  """Batches of pairs `{"chosen_<key>": [B, S], ...}` -> `pair_batch` layout `[2B, S]` (chosen
  rows first); the wrapped iterator's checkpointable state passes through."""

  def __init__(self, inner: Any):
    self.inner = inner

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.inner)
    rows = lambda side: [  # noqa: E731
      {k: batch[f"{side}_{k}"][i] for k in KEYS} for i in range(len(batch[f"{side}_tokens"]))
    ]
    return pair_batch(rows("chosen"), rows("rejected"))

  def get_state(self) -> dict:
    return self.inner.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.inner.set_state(state)


# ---- GRPO rollouts ------------------------------------------------------------------------------


class RolloutIterator:
  """GRPO batches sampled online: rollout c takes `prompts_per_step` prompts (a new seeded
  permutation of the prompt set per pass), `group_size` replies each with the policy's current
  parameters, rewards and per-group advantages.

  Batch (`B = prompts_per_step * group_size` rows, group-major): the padded chat examples
  (weights on sampled tokens only), `advantages`, `rewards` and `reward_<part>` `[B]`. The state
  is the rollout counter; `times` holds the last rollout's seconds (sample, score, build).

  Args:
    policy: samples with the parameters the loop last gave it (`Policy.set_params`).
    items, prompts: the prompt set (`make_prompts`) and their user turns (`prompt_turns`).
    vocab, tokenizer, seq_len: the example layout.
    seed: varies the prompt order and the samples.
    start: the first rollout's counter (a resumed run's step; see `__next__`).
  """

  def __init__(
    self,
    *,
    policy: Policy,
    items: Sequence[Mapping[str, Any]],
    prompts: Sequence[list[dict]],
    prompts_per_step: int,
    group_size: int,
    vocab: Vocab,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    start: int = 0,
  ):
    if prompts_per_step > len(items):
      raise UserError(
        f"grpo.prompts_per_step={prompts_per_step} exceeds prompts.num_prompts={len(items)}; "
        "raise --config.prompts.num_prompts"
      )
    self.policy, self.items, self.prompts = policy, list(items), list(prompts)
    self.per_step, self.group = int(prompts_per_step), int(group_size)
    self.vocab, self.tokenizer, self.seq_len, self.seed = vocab, tokenizer, int(seq_len), int(seed)
    self.rollout = int(start)
    self.times: dict[str, float] = {}
    self._last: tuple[int, dict] | None = None

  def __iter__(self):
    return self

  def indices(self, rollout: int) -> list[int]:
    """The prompt indices of a rollout."""
    n = len(self.items)
    out = []
    for j in range(rollout * self.per_step, (rollout + 1) * self.per_step):
      order = np.random.default_rng([self.seed, j // n]).permutation(n)
      out.append(int(order[j % n]))
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    # The loop draws one batch before restoring a checkpoint's iterator state: a resumed run
    # starts at its step and the repeat of that rollout is served from here, not sampled twice.
    if self._last is not None and self._last[0] == self.rollout:
      batch = self._last[1]
    else:
      batch = self._sample(self.rollout)
      self._last = (self.rollout, batch)
    self.rollout += 1
    return batch

  def _sample(self, rollout: int) -> dict[str, np.ndarray]:
    g = self.group
    idx = self.indices(rollout)
    items = [self.items[i] for i in idx]
    prompts = [self.prompts[i] for i in idx]
    t0 = time.perf_counter()
    replies = self.policy.sample(items, prompts, g, seed=self.seed * 1_000_003 + rollout)
    t1 = time.perf_counter()
    parts = _score_all(items, replies, g)
    t2 = time.perf_counter()
    rows = [
      example(prompts[i // g], r, self.vocab, self.tokenizer, self.seq_len, sampled_only=True)
      for i, r in enumerate(replies)
    ]
    batch = sequences.stack(rows)
    rewards = np.asarray([p["reward"] for p in parts], np.float32)
    batch["rewards"] = rewards
    batch["advantages"] = np.asarray(group_advantages(rewards.reshape(-1, g))).reshape(-1)
    for key in PARTS[1:]:
      batch[PART_PREFIX + key] = np.asarray([p[key] for p in parts], np.float32)
    self.times = {"sample_seconds": t1 - t0, "score_seconds": t2 - t1}
    self.times["build_seconds"] = time.perf_counter() - t2
    return batch

  def get_state(self) -> dict:
    return {"rollout": self.rollout}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.rollout = int(state["rollout"])
