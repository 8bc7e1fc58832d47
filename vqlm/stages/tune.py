"""The tune stage: preference tuning of a chat LM with DPO or an online GRPO-style policy gradient,
judged by the shapes data's exact scene parser (`vqlm.eval.scene_reward`).

`vqlm train --config configs/tune.py:method=dpo --config.init_from=SFT_RUN --workdir OUT`

Everything about the model comes from `init_from` (an LM run with chat turns): its model config,
vocabulary, text model, image tokenizer and sequence length. The tuned run is an ordinary LM run
(`config.json` with `stage: "lm"`, the tuning settings under `tune`; `vocab.json`, `text.model`,
`checkpoints/`): `vqlm.load`, `vqlm generate`, `vqlm eval` and a later `init_from` read it.

- dpo: one pair per prompt is collected before training (`tune_data.collect_pairs`, cached in
  `OUT/pairs.npz` so a resumed run does not sample again), then `DPOTask` trains on batches of
  pairs through the grain pipeline, with the tuned-from parameters as the reference.
- grpo: every step samples `prompts_per_step x group_size` images with the current parameters
  (`tune_data.RolloutIterator`, handed the parameters after each step by a hook), scores them and
  takes one `GRPOTask` step; the reference (KL) is the tuned-from model.

Logged (TensorBoard `OUT/tb`, `OUT/metrics.jsonl`): the task's train metrics (DPO: loss,
reward_acc, margin, chosen/rejected log-probs; GRPO: loss, reward, kl, clip_frac and the reward
parts `reward_<part>`), `rollout/*_seconds` (GRPO), `pairs/*` at step 0 (DPO) and, every
`train.eval_every` steps (and at step 0), `eval/*`: the reward parts of one sampled drawing per
validation request. Runs on one process.
"""

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm import runs
from vqlm.data import chat, pipeline
from vqlm.errors import UserError
from vqlm.eval import chat_eval
from vqlm.eval.scene_reward import PARTS
from vqlm.nn.transformer import Transformer
from vqlm.runs import TokenizerRun
from vqlm.runs.lm_run import TEXT_MODEL, VOCAB_FILE, load_vocab, transformer_config
from vqlm.runs.restore import latest_step, restore_subtree
from vqlm.runtime import workdir_lock
from vqlm.runtime.config import as_kwargs
from vqlm.sample import chat as chat_sampling
from vqlm.stages import init_from, tune_data
from vqlm.stages.lm import run_evals
from vqlm.stages.wiring import make_trainer
from vqlm.train import loop
from vqlm.train.grpo import PART_PREFIX, GRPOTask
from vqlm.train.metrics import MetricWriter
from vqlm.train.optim import make_optimizer
from vqlm.train.preference import DPOTask

METHODS = ("dpo", "grpo")
EVAL_SEED = 7919  # Every eval draws with the same seeds, so its curve compares like with like.


def check_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """One-line UserErrors for bad values; returns the prompt kinds."""
  if config.method not in METHODS:
    raise UserError(f"config.method={config.method!r}; use one of {', '.join(METHODS)}")
  if not config.init_from:
    raise UserError("config.init_from is empty: pass --config.init_from=RUN, a chat LM run")
  p, s, t = config.prompts, config.sampling, config.train
  kinds = tuple(k.strip() for k in str(p.kinds).split(",") if k.strip())
  if not kinds or any(k not in chat.KINDS for k in kinds):
    raise UserError(
      f"config.prompts.kinds={p.kinds!r}; use a comma-separated subset of {', '.join(chat.KINDS)}"
    )
  checks = [
    ("prompts.num_prompts", p.num_prompts, p.num_prompts >= 1, ">= 1"),
    ("prompts.num_eval", p.num_eval, p.num_eval >= 0, ">= 0 (0: no eval)"),
    (
      "prompts.max_objects",
      p.max_objects,
      1 <= p.min_objects <= p.max_objects <= 9,
      "in min_objects..9 (and min_objects >= 1)",
    ),
    ("sampling.temperature", s.temperature, s.temperature >= 0, ">= 0"),
    ("sampling.top_k", s.top_k, s.top_k >= 0, ">= 0 (0: all)"),
    ("sampling.cfg_scale", s.cfg_scale, s.cfg_scale >= 0, ">= 0 (1: no guidance)"),
    ("sampling.batch_size", s.batch_size, s.batch_size >= 1, ">= 1"),
    ("dpo.beta", config.dpo.beta, config.dpo.beta > 0, "> 0"),
    (
      "dpo.samples_per_prompt",
      config.dpo.samples_per_prompt,
      config.dpo.samples_per_prompt >= 1,
      ">= 1",
    ),
    ("grpo.group_size", config.grpo.group_size, config.grpo.group_size >= 2, ">= 2"),
    (
      "grpo.prompts_per_step",
      config.grpo.prompts_per_step,
      config.grpo.prompts_per_step >= 1,
      ">= 1",
    ),
    ("grpo.kl_coef", config.grpo.kl_coef, config.grpo.kl_coef >= 0, ">= 0"),
    ("grpo.clip_eps", config.grpo.clip_eps, 0 < config.grpo.clip_eps < 1, "in (0, 1)"),
    ("train.steps", t.steps, t.steps >= 1, ">= 1"),
    ("train.seq_len", t.seq_len, t.seq_len >= 0, ">= 0 (0: the tuned-from run's)"),
    ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: no eval)"),
  ]
  if config.method == "dpo":
    checks.append(
      (
        "train.batch_size",
        t.batch_size,
        1 <= t.batch_size <= p.num_prompts,
        f"in 1..prompts.num_prompts={p.num_prompts} (pairs per step)",
      )
    )
  for name, value, ok, want in checks:
    if not ok:
      raise UserError(f"config.{name}={value} must be {want}")
  if jax.process_count() > 1:
    raise UserError("the tune stage runs on one process; start it on one host")
  return kinds


def saved_config(
  config: ml_collections.ConfigDict, source_config: ml_collections.ConfigDict, seq_len: int
) -> ml_collections.ConfigDict:
  """The tuned run's config.json: an LM run's (the source's model and data, this run's train,
  optim, mesh and evals) with the tuning settings under `tune`."""
  d = runs.config_to_dict(source_config)
  d["stage"] = "lm"
  d["init_from"] = config.init_from
  d["train"] = {**d.get("train", {}), **config.train.to_dict(), "seq_len": int(seq_len)}
  for key in ("optim", "mesh", "evals"):
    d[key] = config[key].to_dict()
  d["tune"] = {
    "method": config.method,
    "prompts": config.prompts.to_dict(),
    "sampling": config.sampling.to_dict(),
    config.method: config[config.method].to_dict(),
  }
  return ml_collections.ConfigDict(d)


def _check_resume(workdir: str, saved: ml_collections.ConfigDict) -> None:
  runs.check_same_model(workdir, saved, sections=("model",))
  if os.path.exists(os.path.join(workdir, runs.CONFIG_FILE)):
    before = runs.load_config(workdir).get("tune", {}).get("method")
    if before != saved.tune.method:
      raise UserError(
        f"{workdir} holds a {before or 'non-tuned'} run, not {saved.tune.method}; use a new "
        "--workdir"
      )


def example_batch(method: str, rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """Zeros shaped like a batch of the method (DPO: `rows` = 2 x pairs; GRPO: + `[rows]` keys)."""
  zeros = np.zeros((rows, seq_len), np.int32)
  batch = {
    "tokens": zeros,
    "targets": zeros,
    "segment_ids": np.ones((rows, seq_len), np.int32),
    "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
    "loss_weights": np.ones((rows, seq_len), np.float32),
  }
  if method == "grpo":
    batch["advantages"] = np.zeros(rows, np.float32)
    batch["rewards"] = np.zeros(rows, np.float32)
    for key in PARTS[1:]:
      batch[PART_PREFIX + key] = np.zeros(rows, np.float32)
  return batch


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  progress: bool = True,
  log_fn=print,
  extra_hooks=(),
  checkpoint_dir: str | None = None,
  after_save=None,
) -> Any:
  """Tunes `config.init_from` with `config.method` into `workdir` (resumed if it holds a run).
  `checkpoint_dir` must be local (a bucket work directory is refused); `after_save` is
  `loop.run`'s."""
  if checkpoint_dir and "://" in checkpoint_dir:
    raise UserError("the tune stage trains in a local --workdir; copy the result to a bucket after")
  with workdir_lock.hold(workdir):
    return _train(
      config,
      workdir,
      progress=progress,
      log_fn=log_fn,
      extra_hooks=extra_hooks,
      checkpoint_dir=checkpoint_dir or os.path.join(workdir, "checkpoints"),
      after_save=after_save,
    )


def _train(config, workdir, *, progress, log_fn, extra_hooks, checkpoint_dir, after_save):
  kinds = check_config(config)
  source = init_from.check_source(config.init_from)
  config.init_from = source
  source_config = runs.load_config(source)
  vocab, tokenizer = load_vocab(source)
  chat_sampling.require_chat_vocab(vocab)
  seq_len = int(config.train.seq_len or source_config.train.seq_len)
  saved = saved_config(config, source_config, seq_len)
  _check_resume(workdir, saved)
  for name in (VOCAB_FILE, TEXT_MODEL):
    shutil.copyfile(os.path.join(source, name), os.path.join(workdir, name))
  runs.save_config(workdir, saved)

  image_tokenizer = TokenizerRun(source_config.data.tokenizer)
  model = Transformer(transformer_config(source_config, vocab))
  codebook = None
  if model.config.image_embed_init == "codebook":
    codebook = jnp.asarray(image_tokenizer.codebook())
  optimizer, _ = make_optimizer(total_steps=config.train.steps, **as_kwargs(config.optim))
  common = dict(
    model=model,
    optimizer=optimizer,
    image_offset=vocab.image_offset,
    image_size=vocab.image_size,
    codebook=codebook,
  )
  g = config.grpo
  if config.method == "dpo":
    task = DPOTask(beta=config.dpo.beta, **common)
    rows = 2 * config.train.batch_size
  else:
    task = GRPOTask(kl_coef=g.kl_coef, clip_eps=g.clip_eps, **common)
    rows = g.prompts_per_step * g.group_size
  trainer = make_trainer(
    task, config, progress=progress, throughput_key="num_tokens" if config.method == "grpo" else ""
  )
  resume_step = latest_step(checkpoint_dir)
  p = config.prompts
  # Gold and wrong answers to questions take the layout the model was instruction-tuned with.
  instruction = chat_eval.instruction_settings(source_config)
  layout = {
    "reason": bool(instruction.get("reason", False)),
    "focus": chat.reply_focus(instruction),
  }
  items = tune_data.make_prompts(
    p.num_prompts,
    seed=p.seed,
    kinds=kinds,
    min_objects=p.min_objects,
    max_objects=p.max_objects,
    split="train",
    **layout,
  )
  prompts = tune_data.prompt_turns(items, image_tokenizer)
  reply_len = tune_data.reply_max_len(focus=layout["focus"])
  kinds_of = [it["kind"] for it in items]
  tune_data.check_lengths(prompts, vocab, tokenizer, seq_len, kinds_of, reply_len=reply_len)

  policy = None

  def get_policy() -> tune_data.Policy:
    """The sampler over the parameters being tuned, first with the tuned-from (or, resuming,
    the last saved) parameters, placed as the train state's are."""
    nonlocal policy
    if policy is None:
      target = trainer.abstract_target(example_batch(config.method, rows, seq_len))
      where = checkpoint_dir if resume_step is not None else os.path.join(source, "checkpoints")
      _, restored = restore_subtree(where, {"params": target.params})
      s = config.sampling
      policy = tune_data.Policy(
        model=model,
        params=restored["params"],
        vocab=vocab,
        text_tokenizer=tokenizer,
        image_tokenizer=image_tokenizer,
        mesh=trainer.mesh,
        rules=trainer.rules,
        config=source_config,
        sampling=tune_data.sampling_config(temperature=s.temperature, top_k=s.top_k),
        cfg_scale=s.cfg_scale,
        batch_size=s.batch_size,
        # A model instruction-tuned to restate requests first (`data.chat.restate`) is sampled,
        # and its pairs built, in that layout; one that learnt to draw with no request
        # (`data.chat.drop_request`) is guided against an empty request.
        restate=bool(chat_eval.instruction_settings(source_config).get("restate", False)),
        chat_uncond=chat_eval.run_chat_uncond(source_config),
        reply_len=reply_len,
      )
    return policy

  step0: dict[str, float] = {}
  hooks = []
  if config.method == "dpo":
    data_iter, pairs = _dpo_data(
      config, workdir, items, prompts, get_policy, vocab, tokenizer, seq_len, log_fn=log_fn
    )
    if resume_step is None:
      step0.update(
        {
          "pairs/mean_reward": float(np.mean(pairs["mean_reward"])),
          "pairs/gold_chosen": float(np.mean(pairs["chosen_from"])),
          "pairs/perturbed_rejected": float(np.mean(pairs["rejected_from"])),
          "pairs/sample_seconds": float(pairs["seconds"][0]),
          "pairs/score_seconds": float(pairs["seconds"][1]),
        }
      )
  else:
    data_iter = tune_data.RolloutIterator(
      policy=get_policy(),
      items=items,
      prompts=prompts,
      prompts_per_step=g.prompts_per_step,
      group_size=g.group_size,
      vocab=vocab,
      tokenizer=tokenizer,
      seq_len=seq_len,
      seed=config.train.seed,
      start=resume_step or 0,
    )

    def hand_over(state, step):
      del step
      policy.set_params(state.params)
      return dict(data_iter.times)

    hooks.append(loop.Hook(every=1, fn=hand_over, name="rollout"))

  if p.num_eval and config.train.eval_every:
    eval_items = tune_data.make_prompts(
      p.num_eval,
      seed=p.seed,
      kinds=("draw",),
      min_objects=p.min_objects,
      max_objects=p.max_objects,
      split="validation",
    )
    eval_prompts = tune_data.prompt_turns(eval_items, image_tokenizer)

    def evaluate(state, step):
      del step
      get_policy().set_params(state.params)
      return tune_data.evaluate(policy, eval_items, eval_prompts, seed=EVAL_SEED)

    if resume_step is None:
      scores = tune_data.evaluate(get_policy(), eval_items, eval_prompts, seed=EVAL_SEED)
      step0.update({f"eval/{k}": v for k, v in scores.items()})
      log_fn(f"before tuning: eval reward {scores['reward']:.3f}, exact {scores['exact']:.1%}")
    hooks.append(loop.Hook(every=config.train.eval_every, fn=evaluate, name="eval"))
  if step0:
    writer = MetricWriter(workdir)
    writer.write_scalars(0, step0)
    writer.close()

  warm = init_from.warm_start(source, vocab, os.path.join(workdir, TEXT_MODEL), log_fn=log_fn)
  result = loop.run(
    trainer,
    data_iter=data_iter,
    workdir=workdir,
    hooks=hooks + list(extra_hooks),
    meta={"stage": "lm", "tune": config.method},
    log_fn=log_fn,
    checkpoint_dir=checkpoint_dir,
    after_save=after_save,
    warm_start=lambda state: task.reset_reference(warm(state)),
  )
  if config.evals:
    run_evals(saved, workdir, log_fn=log_fn)
  return result


def _take(index: int, element: dict) -> dict:
  del index
  return element


def _dpo_data(config, workdir, items, prompts, get_policy, vocab, tokenizer, seq_len, *, log_fn):
  """The DPO batches over the run's pairs (collected now, or read from `OUT/pairs.npz`), and the
  pairs."""
  s, p = config.sampling, config.prompts
  settings = {
    "init_from": config.init_from,
    "init_from_step": latest_step(os.path.join(config.init_from, "checkpoints")),
    "prompts": {k: p[k] for k in ("num_prompts", "kinds", "min_objects", "max_objects", "seed")},
    "sampling": {k: s[k] for k in ("temperature", "top_k", "cfg_scale")},
    "samples_per_prompt": config.dpo.samples_per_prompt,
    "seq_len": seq_len,
    "seed": config.train.seed,
  }

  def collect():
    return tune_data.collect_pairs(
      get_policy(),
      items,
      prompts,
      samples_per_prompt=config.dpo.samples_per_prompt,
      vocab=vocab,
      tokenizer=tokenizer,
      seq_len=seq_len,
      seed=config.train.seed,
      log_fn=log_fn,
    )

  pairs = tune_data.load_or_collect_pairs(workdir, settings, collect)
  inner = pipeline.make_iterator(
    tune_data.PairSource(pairs),
    global_batch_size=config.train.batch_size,
    transform=_take,
    seed=config.train.seed,
    num_threads=1,
  )
  return tune_data.PairIterator(inner), pairs
