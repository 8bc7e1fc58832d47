"""The main demo's recipe: how much of everything it does (presets) and the configs it trains.

The configs start from the library's defaults (`vqlm.stages.tokenizer_config`,
`vqlm.stages.lm_config`, the same ones `configs/*.py` load) and change what the demo needs.
"""

import dataclasses

import ml_collections

from vqlm.stages import lm_config as lm_defaults
from vqlm.stages import tokenizer_config as tokenizer_defaults


@dataclasses.dataclass(frozen=True)
class Preset:
  """How much of everything the demo does."""

  train_examples: int
  tokenizer_steps: int
  tokenizer_batch: int
  lm_size: str
  lm_steps: int
  lm_batch: int
  lm_lr: float
  eval_prompts: int
  images_per_prompt: int
  caption_images: int
  # The image tokenizer: encoder "conv" | "patch" | "split"; FSQ levels, or () for the VQ
  # bottleneck. With FSQ levels the LM's image-code embeddings are sums of per-channel level
  # embeddings. "split" (a patch's form in 4 channels, its colour in 2, `SplitPatchEncoder`) lets
  # the LM draw colour-shape pairs it never saw from digits it saw: 96.5% against 47-78% with the
  # "patch" encoder, whose 6 channels each mix form and colour (docs/experiments.md).
  tokenizer_encoder: str = "split"
  fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
  # Tokenizer training images translated by up to this many pixels (`config.data.max_shift`),
  # that share of them (`config.data.shift_fraction`). Shapes are drawn at fixed places in their
  # cells; a tokenizer that never saw them elsewhere decodes some in-between frames of moving
  # objects wrongly (12 of 100 test clips), which caps the video demo's next-frame accuracy.
  tokenizer_max_shift: int = 0
  tokenizer_shift_fraction: float = 1.0
  # LM rows: the shapes captions are at most 17 text ids, so a caption/image pair fits in 85
  # tokens; rows of 88 (captions up to 20 ids) instead of the library's 96 (up to 29) leave out
  # 8 columns that were padding in every batch (the same examples and losses; 1.1x per step).
  lm_seq_len: int = 88
  lm_max_text_len: int = 20
  # Shares of the LM's training rows (`config.data.mixture`). With the loss on the conditioned
  # part only, a text-to-image row trains on its 65 image tokens and an image-to-text row on its
  # caption (at most 18 tokens) at the same cost per row; captioning is learnt from fewer rows.
  lm_mixture: str = "t2i=0.5,i2t=0.5"
  # Text-to-image rows list a caption's objects in a random order (`config.data.shuffle_objects`),
  # so the LM draws a prompt whatever order it names the objects in.
  lm_shuffle_objects: bool = False
  # Sampling defaults: the best cell of the guidance sweep in docs/evaluation.md.
  image_temperature: float = 0.3
  image_top_k: int = 0
  cfg_scale: float = 2.0


PRESETS = {
  # ~5 minutes: every stage runs and every artefact appears; numbers well above chance.
  "smoke": Preset(
    train_examples=4000,
    tokenizer_steps=500,
    tokenizer_batch=64,
    lm_size="small",
    lm_steps=300,
    lm_batch=32,
    lm_lr=3e-3,
    eval_prompts=16,
    images_per_prompt=2,
    caption_images=32,
  ),
  # The default (<= 25 minutes on 2 CPU cores).
  "default": Preset(
    train_examples=20000,
    # Half of the images shifted by up to 2 px, and 3600 steps: every frame of 100 test clips
    # and every test scene (held-out pairs too) decodes right, and the LM draws held-out pairs
    # 100% (96.5% at 2400 steps unshifted; shifted at 2400 steps the tokenizer lost scenes of
    # small squares: docs/experiments.md).
    tokenizer_steps=3600,
    tokenizer_max_shift=2,
    tokenizer_shift_fraction=0.5,
    tokenizer_batch=64,
    lm_size="small",
    lm_steps=1000,
    lm_batch=32,
    lm_lr=2e-3,
    eval_prompts=100,
    images_per_prompt=4,
    caption_images=200,
    # Two text-to-image rows per caption row: 1000 steps reach what 1600 of an even mix did
    # (docs/experiments.md, "two text-to-image rows per caption row").
    lm_mixture="t2i=0.67,i2t=0.33",
  ),
  # Longer. Not yet evaluated with the patch-FSQ tokenizer; with 5 FSQ channels the held-out
  # row peaked mid-training and fell as the LM learned the seen pairs (docs/experiments.md).
  "long": Preset(
    train_examples=20000,
    tokenizer_steps=6000,
    tokenizer_max_shift=2,
    tokenizer_shift_fraction=0.5,
    tokenizer_batch=64,
    lm_size="small",
    lm_steps=10000,
    lm_batch=32,
    lm_lr=2e-3,
    eval_prompts=200,
    images_per_prompt=4,
    caption_images=500,
  ),
}


def split_sizes(p: Preset) -> dict[str, int]:
  held = max(64, p.eval_prompts)
  return {
    "train": p.train_examples,
    "validation": 256,
    "test": max(held, p.caption_images),
    "test_heldout": held,
  }


def tokenizer_config(p: Preset, data_dir: str) -> ml_collections.ConfigDict:
  bottleneck = "fsq" if p.fsq_levels else "vq"
  c = tokenizer_defaults.get_config(
    f"size=small,data=shapes,encoder={p.tokenizer_encoder},bottleneck={bottleneck}"
  )
  if p.fsq_levels:
    c.model.bottleneck.levels = tuple(p.fsq_levels)
  c.data.data_dir = data_dir
  c.data.source_kwargs.sizes = split_sizes(p)
  c.data.max_shift = p.tokenizer_max_shift
  c.data.shift_fraction = p.tokenizer_shift_fraction
  c.train.steps = p.tokenizer_steps
  c.train.batch_size = p.tokenizer_batch
  c.train.sample_every = max(50, p.tokenizer_steps // 6)
  c.train.checkpoint_every = max(100, p.tokenizer_steps // 4)
  c.optim.warmup_steps = min(c.optim.warmup_steps, p.tokenizer_steps // 10)
  c.evals.tokenizer.num_examples = 1000
  return c


def lm_config(p: Preset, codes: str, *, caption_rows: bool = True) -> ml_collections.ConfigDict:
  """The main demo's LM config. `caption_rows`: the main demo's caption/image rows, sized for the
  shapes captions (`p.lm_seq_len`, `p.lm_max_text_len`) and mixed by `p.lm_mixture`; recipes with
  longer texts and other modes (chat, video) pass False and keep the library's caption limit and
  mixture."""
  c = lm_defaults.get_config(f"size={p.lm_size}")
  c.data.codes = codes
  c.train.steps = p.lm_steps
  c.train.batch_size = p.lm_batch
  if caption_rows:
    c.train.seq_len = p.lm_seq_len
    c.data.max_text_len = p.lm_max_text_len
    c.data.mixture = p.lm_mixture
  c.train.eval_every = max(100, p.lm_steps // 5)
  c.train.checkpoint_every = max(100, p.lm_steps // 4)
  c.optim.learning_rate = p.lm_lr
  c.optim.warmup_steps = max(1, min(200, p.lm_steps // 10))
  # Learned grid-cell embeddings on image tokens: with only relative (RoPE) positions the model
  # must infer a token's cell from its distance to <boi>; with them the validation image loss is
  # lower at the same step and the model binds "top left" to the right codes sooner
  # (docs/experiments.md).
  c.model.image_pos_embed = True
  # Loss on the conditioned part only (t2i: the image; i2t: the caption), and 5% of captions
  # dropped for guidance. Shapes' attributes are drawn at random, so a caption predicted before
  # its image (or an image before its caption) carries a loss no model can remove, and its
  # gradient is mostly noise; masking it spends the steps on the link between text and image,
  # which raised both text-to-image and image-to-text at the same steps (docs/experiments.md).
  c.data.mask_prompt = True
  c.data.caption_dropout = 0.05
  c.data.shuffle_objects = p.lm_shuffle_objects
  if p.fsq_levels:
    c.model.image_embed_init = "levels"
  return c


def generation_evals(p: Preset) -> dict:
  """The demo's generation evaluators (`vqlm.eval.evaluators` specs), in the order they run, with
  the preset's sampling settings."""
  sampling = dict(
    cfg_scale=p.cfg_scale, temperature=p.image_temperature, top_k=p.image_top_k, batch_size=32
  )
  drawing = dict(
    type="text_to_image", num_prompts=p.eval_prompts, images_per_prompt=p.images_per_prompt, seed=0
  )
  return {
    "text_to_image": dict(split="test", **drawing, **sampling),
    "text_to_image_heldout": dict(split="test_heldout", **drawing, **sampling),
    # The test prompts with their objects listed in reverse order.
    "text_to_image_reversed": dict(split="test", object_order="reversed", **drawing, **sampling),
    "image_to_text": dict(
      type="image_to_text", split="test", num_images=p.caption_images, batch_size=32
    ),
    "scene_fd": dict(type="scene_fd", split="test", num_prompts=200, seed=1, **sampling),
  }
