"""Preference-tuning configs (the `tune` stage): DPO on sampled pairs, or online GRPO.

`vqlm train --config configs/tune.py:method=dpo --config.init_from=SFT_RUN --workdir OUT`

Arguments (`key=value,...`):
  method    dpo | grpo
  size      small (the CPU demo's LM) | tiny (tests: a few steps, few prompts)

The tuned-from run (`init_from`, required) is an LM run with chat turns (`<user>`/`<assistant>`
in its vocab.json, e.g. made with `config.data.chat`); its model config, vocabulary, text model,
image tokenizer and `train.seq_len` are taken from it. Fields:

  prompts   draw requests (and questions / descriptions, `kinds="draw,question,describe"`) of
            `vqlm.data.chat.conversation(i, seed=seed, split="train")` for i < num_prompts, with
            min_objects..max_objects objects; `num_eval` validation requests are drawn every
            `train.eval_every` steps to log `eval/reward` (0: none).
  sampling  temperature, top_k (0: all) and the guidance scale of the sampled images; batch_size:
            sampler rows per call.
  dpo       beta; samples_per_prompt drawn once per prompt (cached in OUT/pairs.npz);
            `train.batch_size` pairs per step.
  grpo      group_size samples of prompts_per_step prompts per step (the batch), kl_coef (KL to
            the tuned-from model), clip_eps (PPO ratio clip).
  optim     AdamW with warm-up and cosine decay (as configs/lm.py; freeze keeps groups fixed).
  train     steps and intervals as configs/lm.py; seq_len 0: the tuned-from run's.
  evals     evaluators run once after training (as configs/lm.py's `evals`).
"""

import ml_collections

from vqlm.runtime.config import choose, mesh_config, parse_arg

METHODS = ("dpo", "grpo")
# Per method: the learning rate and steps of a run on the demo's LM, and of a test-sized one.
PRESETS = {
  ("dpo", "small"): dict(lr=5e-5, warmup=5, steps=60, batch_size=8, num_prompts=64, num_eval=32),
  ("grpo", "small"): dict(lr=5e-5, warmup=2, steps=100, batch_size=0, num_prompts=256, num_eval=32),
  ("dpo", "tiny"): dict(lr=1e-4, warmup=1, steps=4, batch_size=2, num_prompts=4, num_eval=0),
  ("grpo", "tiny"): dict(lr=1e-4, warmup=1, steps=3, batch_size=0, num_prompts=4, num_eval=0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, method="dpo", size="small")
  choose("method", arg.method, dict.fromkeys(METHODS))
  choose("size", arg.size, dict.fromkeys(("small", "tiny")))
  p = PRESETS[(arg.method, arg.size)]
  tiny = arg.size == "tiny"

  c = ml_collections.ConfigDict()
  c.stage = "tune"
  c.method = arg.method
  c.size = arg.size
  c.init_from = ""  # Required: the chat LM run to tune (also the DPO/GRPO reference model).
  # Always split "train" (never a held-out colour-shape pair); seed 1: not the SFT items' seed.
  c.prompts = dict(
    num_prompts=p["num_prompts"],
    kinds="draw",  # Comma-separated subset of draw, question, describe.
    min_objects=1,
    max_objects=1 if tiny else 3,  # tiny: within the test LM's 96 tokens.
    seed=1,
    num_eval=p["num_eval"],
  )
  c.sampling = dict(temperature=1.0, top_k=0, cfg_scale=2.0, batch_size=8 if tiny else 32)
  c.dpo = dict(beta=0.1, samples_per_prompt=2 if tiny else 4)
  c.grpo = dict(
    group_size=2 if tiny else 8, prompts_per_step=2 if tiny else 4, kl_coef=0.04, clip_eps=0.2
  )
  c.optim = dict(
    learning_rate=p["lr"],
    warmup_steps=p["warmup"],
    end_lr_fraction=0.1,
    weight_decay=0.0,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    clip_norm=1.0,
    grad_accum_steps=1,
    freeze=(),
  )
  c.train = dict(
    steps=p["steps"],
    batch_size=p["batch_size"],  # DPO pairs per step (GRPO: prompts_per_step x group_size).
    seq_len=0,  # 0: the tuned-from run's.
    seed=0,
    log_every=1 if tiny else 5,
    eval_every=20,
    checkpoint_every=2 if tiny else 20,
    checkpoint_minutes=10.0,
    keep_checkpoints=3,
    keep_every_steps=0,
    checkpoint_commit="auto",
    max_consecutive_skips=10,
    spike_sigma=0.0,
    spike_warmup=100,
  )
  c.evals = {}
  c.mesh = mesh_config()
  c.lock()
  return c
