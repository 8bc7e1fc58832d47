"""The video demo's recipe: presets and the config of its one LM run.

The run starts from the main demo's LM (`config.init_from`, same model shapes, same vocabulary and
text model) and trains on a weighted mix (`config.data.mixture`: share of training rows) of the
main demo's caption/image pairs both ways (t2i, i2t), clips of the `moving_shapes` data set
encoded by the main demo's image tokenizer (video) and image-edit documents built up front
(edit, `config.data.edit`). Every sequence is packed to `train.seq_len`, which must hold one whole
clip (`VIDEO_FRAMES` frames and a caption of up to `video_max_text_len` ids).
"""

import dataclasses

import ml_collections

from vqlm.demo.recipe import Preset as MainPreset
from vqlm.demo.recipe import lm_config as main_lm_config

VIDEO_FRAMES = 6  # Frames per clip (moving_shapes draws 4 to 8).
MODES = ("t2i", "i2t", "document", "video", "edit")


@dataclasses.dataclass(frozen=True)
class Preset:
  """How much of everything the video demo does."""

  main: str  # The main demo preset whose LM this starts from (its sampling settings too).
  train_clips: int  # moving_shapes clips encoded for training.
  steps: int
  batch_size: int
  # Row length. A row holds one clip of VIDEO_FRAMES frames (`needed_seq_len(vocab,
  # max_text_len=24, mode="video", frames=6)` = 2 + 24 + 6 x (64 + 2) + 5 - 1 = 426 tokens with the
  # main demo's 8x8 codes), or as many caption/image pairs (2 + 20 + 66 = 88 tokens: 5) or
  # single-edit documents (at most 146: 3) as fit; 440 fits 3 edits where 432 fit 2.
  seq_len: int
  lr: float
  # Shares of training rows per mode (`config.data.mixture`); documents are off by default.
  t2i: float
  i2t: float
  video: float
  edit: float
  document: float = 0.0
  # Caption ids kept: the main demo's images (`Preset.lm_max_text_len` of the main recipe: 20;
  # their captions are at most 17) and the clips (at most 24: they also tell the motion).
  video_max_text_len: int = 24
  # Edit documents built up front (`config.data.edit`).
  edit_examples: int = 20000
  edit_validation: int = 256
  edit_kinds: str = "move,recolor,add,remove"
  edit_max_edits: int = 1
  edit_max_objects: int = 2
  # Each edit said in words before its result, in a style of `vqlm.data.edits.REASON_STYLES`
  # ("scene": "<caption of the source> so <caption of the result>"; "change": the changed object
  # before and after; "caption_change": the source's caption, then the change; "focus_change":
  # the object's name between the two); "" is off. The measures let the LM write it, then draw.
  # "caption_change" made the most edits right of the styles tried (docs/experiments.md).
  edit_reason: str = "caption_change"
  # The measures choose the object a "caption_change" reason acts on among the objects of the
  # model's own caption, by the model's likelihood (`vqlm.sample.edit`); False: the greedy
  # reason alone (docs/evaluation.md compares the two).
  edit_choose_object: bool = True
  # Clips encoded for validation (per-mode validation loss) and test.
  validation_clips: int = 256
  test_clips: int = 256
  # Measures: clips per video measure, edit items per split, and the LMs' sampling settings.
  measure_clips: int = 100
  measure_edits: int = 100
  caption_measure: bool = True  # Video continuation with the clip's caption as well.
  # Greedy: a clip's next frames and an edit's result are each one exact image (greedy made
  # more edits right than temperature 0.3; docs/experiments.md).
  video_temperature: float = 0.0
  edit_temperature: float = 0.0
  # Guidance of text-to-video (against the clip without its caption, the same frames drawn so
  # far). The main demo's 2 lowered whole clips against none (docs/evaluation.md).
  t2v_cfg_scale: float = 1.0
  top_k: int = 0
  measure_batch: int = 32
  warmup_steps: int = 50


PRESETS = {
  # Minutes: every stage runs and every artefact appears, from a main smoke demo.
  "smoke": Preset(
    main="smoke",
    train_clips=400,
    steps=40,
    batch_size=8,
    seq_len=440,
    lr=1e-3,
    t2i=0.2,
    i2t=0.2,
    video=0.4,
    edit=0.2,
    edit_examples=500,
    edit_validation=32,
    validation_clips=32,
    test_clips=32,
    measure_clips=8,
    measure_edits=8,
    warmup_steps=4,
  ),
  # The default (<= 25 minutes beyond the main demo on 2 CPU cores).
  "default": Preset(
    main="default",
    train_clips=5000,
    # 1800 steps with reasoned edits: about 23 minutes beyond the main demo on an AMD EPYC
    # 2-core machine (docs/evaluation.md).
    steps=1800,
    batch_size=16,
    seq_len=440,
    lr=2e-3,
    # A t2i or i2t row packs four pairs, and the main LM already draws and captions them: a
    # small share keeps both (measured in docs/evaluation.md) and leaves the rows to video/edit.
    t2i=0.15,
    i2t=0.15,
    video=0.4,
    edit=0.3,
  ),
}


def mixture(p: Preset) -> dict[str, float]:
  """The preset's shares of training rows, `{mode: weight}` (`config.data.mixture` is these as
  "mode=weight,..." without the zeros)."""
  return {mode: float(getattr(p, mode)) for mode in MODES}


def clip_counts(p: Preset) -> dict[str, int]:
  """moving_shapes clips encoded per split."""
  return {"train": p.train_clips, "validation": p.validation_clips, "test": p.test_clips}


def lm_config(
  p: Preset, main: MainPreset, *, codes: str, video_codes: str, init_from: str
) -> ml_collections.ConfigDict:
  """The main demo's LM config, continued from its run (`init_from`) on the preset's mix of
  caption/image pairs (`codes`), clips (`video_codes`) and edit documents."""
  c = main_lm_config(main, codes, caption_rows=False)
  c.init_from = init_from
  c.train.steps = p.steps
  c.train.seq_len = p.seq_len
  c.data.max_text_len = main.lm_max_text_len
  c.data.video_max_text_len = p.video_max_text_len
  c.train.batch_size = p.batch_size
  c.train.eval_every = max(10, p.steps // 4)
  c.train.checkpoint_every = max(10, p.steps // 2)
  c.optim.learning_rate = p.lr
  c.optim.warmup_steps = max(1, min(p.warmup_steps, p.steps // 10))
  c.data.mixture = ",".join(f"{mode}={w:g}" for mode, w in mixture(p).items() if w > 0)
  c.data.video_codes = video_codes
  c.data.frames = VIDEO_FRAMES
  c.data.edit.update(
    num_examples=p.edit_examples,
    validation_examples=p.edit_validation,
    max_edits=p.edit_max_edits,
    kinds=p.edit_kinds,
    min_objects=1,
    max_objects=p.edit_max_objects,
    seed=0,
    reason=bool(p.edit_reason),
    reason_style=p.edit_reason or "scene",
  )
  return c


def video_evals(p: Preset, main: MainPreset) -> dict:
  """`{section: evaluator spec}` of the video and edit measures (the mixed LM only); sampling as
  the preset says."""
  sampling = dict(top_k=p.top_k, batch_size=p.measure_batch)
  frame_sampling = dict(temperature=p.video_temperature, **sampling)
  continuation = dict(
    type="video_continuation",
    split="test",
    num_clips=p.measure_clips,
    given_frames=3,
    num_frames=VIDEO_FRAMES,
    **frame_sampling,
  )
  specs = {"video_continuation": dict(continuation, with_caption=False)}
  if p.caption_measure:
    specs["video_continuation_captioned"] = dict(continuation, with_caption=True)
  specs["text_to_video"] = dict(
    type="text_to_video",
    split="test",
    num_clips=p.measure_clips,
    num_frames=VIDEO_FRAMES,
    cfg_scale=p.t2v_cfg_scale,
    **frame_sampling,
  )
  for name, split in (("edit_test", "test"), ("edit_heldout", "test_heldout")):
    specs[name] = dict(
      type="edit",
      split=split,
      num_items=p.measure_edits,
      kinds=p.edit_kinds,
      seed=0,
      max_objects=p.edit_max_objects,
      temperature=p.edit_temperature,
      choose_object=p.edit_choose_object,
      **sampling,
    )
  return specs
