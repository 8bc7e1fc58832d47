"""The tuning demo's recipe: presets and the configs of its SFT and preference-tuning runs.

Every run starts from the previous one (`config.init_from`): the main demo's LM -> SFT on a mix
of its own caption/image data and chat instructions (`config.data.chat`) -> DPO on pairs of the
SFT model's own drawings judged by the scene parser -> GRPO-style online policy gradient with the
parser's score as reward. Prompts of every step come from the `train` split of shapes, which
never holds a held-out colour-shape pair.
"""

import dataclasses

import ml_collections

from vqlm.demo.recipe import Preset as MainPreset
from vqlm.demo.recipe import lm_config as main_lm_config


@dataclasses.dataclass(frozen=True)
class Preset:
  """How much of everything the tuning demo does."""

  main: str  # The main demo preset whose LM this starts from.
  sft_steps: int
  sft_examples: int
  sft_chat_weight: float
  sft_lr: float
  seq_len: int
  dpo_prompts: int
  dpo_steps: int
  dpo_lr: float
  dpo_beta: float
  grpo_steps: int
  grpo_lr: float
  measure_prompts: int  # Requests per split for the chat drawing measures.
  images_per_prompt: int
  qa_items: int
  # Objects per scene of every request and question: the main demo's scenes have 1-2 (3 fit
  # the config too, with train.seq_len 144).
  max_objects: int = 2
  batch_size: int = 32
  # Question replies describe the image before the answer (`config.data.chat.reason`).
  sft_reason: bool = False
  # ... and name what the question asks about before the answer (`config.data.chat.focus`).
  sft_focus: bool = False
  # What a focused reply names (`config.data.chat.focus_style`): "question" (what the question
  # asks, in the captions' words) or "object" (the caption phrase of the object it asks about).
  sft_focus_style: str = "question"
  # The SFT's instruction kinds (`config.data.chat.kinds`); a kind named twice is drawn twice
  # as often.
  sft_chat_kinds: str = "draw,question,describe"
  # The SFT's caption/image rows name their objects in a random order
  # (`config.data.shuffle_objects`; the main demo's captions list them in cell order).
  sft_shuffle_objects: bool = False
  # The share of the SFT's caption/image rows whose prompt is reworded as a request names the
  # scene (`config.data.reword_prompts`).
  sft_reword_prompts: float = 0.0
  # Guidance of chat drawing, in the measures and in the preference steps' samples; 1 is none:
  # the main demo's scale 2 made two-object requests worse than none (40% against 58% and 43% on
  # two SFT models; docs/experiments.md).
  chat_cfg_scale: float = 1.0
  # Draw instructions with no request (`config.data.chat.drop_request`): guidance for chat
  # drawing against an empty request.
  sft_drop_request: float = 0.0
  # The instruction kinds of each preference step's prompts (`config.prompts.kinds` of the tune
  # stage): draw requests (judged by the scene parser), questions (by exactness).
  dpo_kinds: str = "draw"
  grpo_kinds: str = "draw"
  # The questions' measure chooses each reasoned reply's answer among what the reply's caption
  # says, by the model's likelihood (`vqlm.sample.answer`); False: the greedy replies alone (the
  # measure reports both either way when True: `accuracy` and `free_accuracy`).
  qa_choose_answer: bool = True


PRESETS = {
  "smoke": Preset(
    main="smoke",
    sft_steps=60,
    sft_examples=2000,
    sft_chat_weight=0.5,
    sft_lr=1e-3,
    seq_len=128,
    dpo_prompts=32,
    dpo_steps=10,
    dpo_lr=5e-5,
    dpo_beta=0.1,
    grpo_steps=4,
    grpo_lr=5e-5,
    measure_prompts=16,
    images_per_prompt=1,
    qa_items=32,
  ),
  # Measured end to end in docs/evaluation.md ("Instruction and preference tuning"): about 18
  # minutes beyond the main demo on an AMD EPYC 2-core machine.
  "default": Preset(
    main="default",
    # 2400 steps with prompts in any order and half of them reworded (docs/experiments.md).
    sft_steps=2400,
    sft_examples=20000,
    sft_chat_weight=0.5,
    sft_lr=1e-3,
    # Question replies: the caption, the asked-about object's phrase, then the answer (the
    # object and the answer chosen by likelihood in the measures); 136 tokens hold the tune
    # stage's question examples with such replies.
    seq_len=136,
    sft_reason=True,
    sft_focus=True,
    sft_focus_style="object",
    sft_shuffle_objects=True,
    sft_reword_prompts=0.5,
    dpo_prompts=256,
    dpo_steps=100,
    # 1e-5: DPO on pairs whose chosen samples are almost all perfect cost the fewest test
    # prompts of the rates tried (docs/experiments.md).
    dpo_lr=1e-5,
    dpo_beta=0.1,
    # GRPO on drawings and questions (the parser's score, exact answers; docs/experiments.md).
    grpo_steps=80,
    grpo_lr=5e-5,
    grpo_kinds="draw,question",
    measure_prompts=100,
    images_per_prompt=2,
    qa_items=200,
  ),
}


def sft_config(
  p: Preset, main: MainPreset, *, codes: str, init_from: str
) -> ml_collections.ConfigDict:
  """The main demo's LM config, continued from its run on a chat + caption/image mix."""
  c = main_lm_config(main, codes, caption_rows=False)
  c.init_from = init_from
  c.train.steps = p.sft_steps
  c.train.seq_len = p.seq_len
  c.train.batch_size = p.batch_size
  c.train.eval_every = max(50, p.sft_steps // 4)
  c.train.checkpoint_every = max(50, p.sft_steps // 2)
  c.optim.learning_rate = p.sft_lr
  c.optim.warmup_steps = max(1, min(50, p.sft_steps // 10))
  c.data.chat.weight = p.sft_chat_weight
  c.data.chat.num_examples = p.sft_examples
  c.data.chat.max_objects = p.max_objects
  c.data.chat.restate = False
  c.data.chat.reason = p.sft_reason
  c.data.chat.focus = p.sft_focus
  c.data.chat.focus_style = p.sft_focus_style
  c.data.chat.kinds = p.sft_chat_kinds
  c.data.shuffle_objects = p.sft_shuffle_objects
  c.data.reword_prompts = p.sft_reword_prompts
  if p.sft_reword_prompts:
    # Reworded prompts of two objects take up to 32 ids with the main demo's text model.
    c.data.max_text_len = 40
  c.data.chat.drop_request = p.sft_drop_request
  return c


def _tune_config(
  method: str, p: Preset, *, init_from: str, steps: int, lr: float, kinds: str
) -> ml_collections.ConfigDict:
  from vqlm.stages import tune_config

  c = tune_config.get_config(f"method={method}")
  c.init_from = init_from
  c.train.steps = steps
  c.train.checkpoint_every = max(10, steps // 2)
  c.train.eval_every = max(10, steps // 3)
  c.optim.learning_rate = lr
  c.optim.warmup_steps = max(1, min(10, steps // 10))
  c.prompts.max_objects = p.max_objects
  c.prompts.kinds = kinds
  c.sampling.cfg_scale = p.chat_cfg_scale
  if p.main == "smoke":
    c.prompts.num_eval = 8
  return c


def dpo_config(p: Preset, *, init_from: str) -> ml_collections.ConfigDict:
  """DPO from the SFT run: pairs of its own replies per prompt (`p.dpo_kinds`), judged by the
  scene parser (drawings) or by exactness (answers)."""
  c = _tune_config("dpo", p, init_from=init_from, steps=p.dpo_steps, lr=p.dpo_lr, kinds=p.dpo_kinds)
  c.prompts.num_prompts = p.dpo_prompts
  c.dpo.beta = p.dpo_beta
  return c


def grpo_config(p: Preset, *, init_from: str) -> ml_collections.ConfigDict:
  """Online GRPO from the DPO run: groups of replies per prompt (drawings scored by the scene
  parser, answers to questions by exactness, as `p.grpo_kinds` says)."""
  c = _tune_config(
    "grpo", p, init_from=init_from, steps=p.grpo_steps, lr=p.grpo_lr, kinds=p.grpo_kinds
  )
  c.prompts.num_prompts = max(4 * p.grpo_steps, 16)
  return c
