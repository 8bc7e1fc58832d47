"""The built-in end-to-end demo: every stage of vqlm on the procedural `shapes` data, on a laptop.

Stages (each shows progress, is skipped when its output exists, and can be run alone):
  data       build the shapes data set (TFDS, ArrayRecord; no download)
  tokenizer  train the image tokenizer (patch encoder, FSQ with 6 channels of 4 levels: 32x32 ->
             8x8 codes of 4096, each a function of its own 4x4 patch) and evaluate it
  encode     encode the data set once into code shards
  lm         train the SentencePiece model on the captions, then the LM on a t2i + i2t mix with
             caption dropout
  generate   draw images for held-out prompts (with CFG), caption test images, and evaluate
  report     write WORKDIR/report.html

Layout: WORKDIR/{tokenizer, codes, lm, samples}/, WORKDIR/eval.json, WORKDIR/report.html.
"""
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

STAGES = ("data", "tokenizer", "encode", "lm", "generate", "report")


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
  # The image tokenizer: encoder "conv" | "patch"; FSQ levels, or () for the VQ bottleneck. With
  # FSQ levels the LM's image-code embeddings are sums of per-channel level embeddings. The more
  # FSQ channels the patch encoder's codes have, the better the LM draws unseen colour-shape
  # pairs: held-out text-to-image 7% with 3 channels of 8 levels, 32-45% with 5 of 4, 63% with 6
  # of 4 (docs/evaluation.md).
  tokenizer_encoder: str = "patch"
  fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
  # Sampling defaults (measured: see docs/evaluation.md).
  image_temperature: float = 0.3
  image_top_k: int = 0
  cfg_scale: float = 2.0


PRESETS = {
    # ~5 minutes: every stage runs and every artefact appears; numbers well above chance.
    "smoke": Preset(train_examples=4000, tokenizer_steps=500, tokenizer_batch=64, lm_size="small",
                    lm_steps=300, lm_batch=32, lm_lr=3e-3, eval_prompts=16, images_per_prompt=2,
                    caption_images=32),
    # The default (<= 25 minutes on 2 CPU cores).
    "default": Preset(train_examples=20000, tokenizer_steps=2400, tokenizer_batch=64,
                      lm_size="small", lm_steps=1600, lm_batch=32, lm_lr=2e-3, eval_prompts=100,
                      images_per_prompt=4, caption_images=200),
    # Longer. Not measured with the patch-FSQ tokenizer; with 5 FSQ channels the held-out row
    # peaked mid-training and fell as the LM learned the seen pairs (docs/evaluation.md).
    "long": Preset(train_examples=20000, tokenizer_steps=6000, tokenizer_batch=64,
                   lm_size="small", lm_steps=10000, lm_batch=32, lm_lr=2e-3, eval_prompts=200,
                   images_per_prompt=4, caption_images=500),
}


def _split_sizes(p: Preset) -> dict[str, int]:
  held = max(64, p.eval_prompts)
  return {"train": p.train_examples, "validation": 256, "test": max(held, p.caption_images),
          "test_heldout": held}


def tokenizer_config(p: Preset, data_dir: str) -> ml_collections.ConfigDict:
  from vqlm.stages.tokenizer_config import get_config
  bottleneck = "fsq" if p.fsq_levels else "vq"
  c = get_config(f"size=small,data=shapes,encoder={p.tokenizer_encoder},bottleneck={bottleneck}")
  if p.fsq_levels:
    c.model.bottleneck.levels = tuple(p.fsq_levels)
  c.data.data_dir = data_dir
  c.data.source_kwargs.sizes = _split_sizes(p)
  c.train.steps = p.tokenizer_steps
  c.train.batch_size = p.tokenizer_batch
  c.train.sample_every = max(50, p.tokenizer_steps // 6)
  c.train.checkpoint_every = max(100, p.tokenizer_steps // 4)
  c.optim.warmup_steps = min(c.optim.warmup_steps, p.tokenizer_steps // 10)
  c.eval.num_examples = 1000
  return c


def lm_config(p: Preset, codes: str) -> ml_collections.ConfigDict:
  from vqlm.stages.lm_config import get_config
  c = get_config(f"size={p.lm_size}")
  c.data.codes = codes
  c.train.steps = p.lm_steps
  c.train.batch_size = p.lm_batch
  c.train.eval_every = max(100, p.lm_steps // 5)
  c.train.checkpoint_every = max(100, p.lm_steps // 4)
  c.optim.learning_rate = p.lm_lr
  c.optim.warmup_steps = max(1, min(200, p.lm_steps // 10))
  # Learned grid-cell embeddings on image tokens: at the same step the validation image loss is
  # 6-9% lower (docs/evaluation.md), and the model binds "top left" to the right codes sooner.
  c.model.image_pos_embed = True
  # Loss on the conditioned part only (t2i: the image; i2t: the caption), and 5% of captions
  # dropped for guidance: text-to-image 53% -> 94%, image-to-text 94% -> 97.5% at the same
  # steps (docs/evaluation.md).
  c.data.mask_prompt = True
  c.data.caption_dropout = 0.05
  if p.fsq_levels:
    c.model.image_embed_init = "levels"
  return c


def _latest_step(run_dir: str) -> int | None:
  from vqlm.runtime.checkpoint import Checkpointer
  path = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(path):
    return None
  ckpt = Checkpointer(path)
  step = ckpt.latest_step
  ckpt.close()
  return step


def _read_eval(workdir: str) -> dict:
  path = os.path.join(workdir, "eval.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_eval(workdir: str, section: str, value: Any) -> None:
  data = _read_eval(workdir)
  data[section] = value
  path = os.path.join(workdir, "eval.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True, default=float)
  os.replace(path + ".tmp", path)


class Demo:
  """Runs the demo's stages in `workdir` with a preset."""

  def __init__(self, workdir: str, *, preset: str = "default", progress: bool = True,
               log_fn=print, data_dir: str = ""):
    if preset not in PRESETS:
      raise ValueError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}")
    self.workdir = workdir
    self.preset_name = preset
    self.p = PRESETS[preset]
    self.progress = progress
    self.log = log_fn
    self.data_dir = data_dir or os.path.join(workdir, "data")
    self.tokenizer_dir = os.path.join(workdir, "tokenizer")
    self.codes_dir = os.path.join(workdir, "codes")
    self.lm_dir = os.path.join(workdir, "lm")
    self.samples_dir = os.path.join(workdir, "samples")
    self.timings: dict[str, float] = {}

  def run(self, stages: tuple[str, ...] = STAGES) -> dict:
    for stage in stages:
      if stage not in STAGES:
        raise ValueError(f"unknown demo stage '{stage}'; valid: {', '.join(STAGES)}")
    start_all = time.time()
    for stage in stages:
      start = time.time()
      self.log(f"== {stage}")
      getattr(self, f"stage_{stage}")()
      self.timings[stage] = time.time() - start
    total = time.time() - start_all
    self.log("demo timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items())
             + f", total {total:.0f}s")
    _write_eval(self.workdir, "timings", {**self.timings, "total": total,
                                          "preset": self.preset_name})
    return _read_eval(self.workdir)

  # ---- stages -------------------------------------------------------------------------------

  def _source(self, split: str):
    from vqlm.data.sources import get_source
    return get_source("shapes", split=split, data_dir=self.data_dir, image_size=32,
                      min_objects=1, max_objects=2, sizes=_split_sizes(self.p))

  def stage_data(self) -> None:
    sizes = {split: len(self._source(split)) for split in _split_sizes(self.p)}
    self.log(f"shapes data set in {self.data_dir}: {sizes}")

  def stage_tokenizer(self) -> None:
    from vqlm.stages import tokenizer as tokenizer_stage
    config = tokenizer_config(self.p, self.data_dir)
    done = _latest_step(self.tokenizer_dir) == config.train.steps
    if done and "tokenizer" in _read_eval(self.tokenizer_dir):
      self.log(f"tokenizer already trained ({self.tokenizer_dir}); skipping")
    else:
      os.makedirs(self.tokenizer_dir, exist_ok=True)
      tokenizer_stage.train(config, self.tokenizer_dir, progress=self.progress, log_fn=self.log)
    result = dict(_read_eval(self.tokenizer_dir)["tokenizer"])
    if "heldout_scene_agreement" not in result:
      # The ceiling of held-out text-to-image: can the tokenizer even draw unseen colour-shape
      # pairs? (It was trained on the train split, which has none.)
      heldout = tokenizer_stage.evaluate(tokenizer_stage.load_tokenizer(self.tokenizer_dir),
                                         split="test_heldout", num_examples=1000)
      result["heldout_scene_agreement"] = heldout["scene_agreement"]
      tokenizer_stage.write_eval(self.tokenizer_dir, "tokenizer", result)
      self.log(f"tokenizer scene agreement on held-out pairs: {heldout['scene_agreement']:.3f}")
    _write_eval(self.workdir, "tokenizer", result)

  def stage_encode(self) -> None:
    from vqlm.data.code_shards import encode_split
    from vqlm.stages.tokenizer import load_tokenizer
    run = load_tokenizer(self.tokenizer_dir)
    rates = {}
    for split in ("train", "validation", "test", "test_heldout"):
      entry = encode_split(run, self._source(split), self.codes_dir, split=split,
                           progress=self.progress, log_fn=self.log)
      rates[split] = entry.get("images_per_sec")
    self.log(f"encoded into {self.codes_dir}; images/s: {rates}")

  def stage_lm(self) -> None:
    from vqlm.stages import lm as lm_stage
    config = lm_config(self.p, self.codes_dir)
    if _latest_step(self.lm_dir) == config.train.steps:
      self.log(f"LM already trained ({self.lm_dir}); skipping")
      return
    os.makedirs(self.lm_dir, exist_ok=True)
    lm_stage.train(config, self.lm_dir, progress=self.progress, log_fn=self.log)

  def sampling(self):
    from vqlm.sample.processors import SamplingConfig, Settings
    return SamplingConfig(text=Settings(temperature=0.0),
                          image=Settings(temperature=self.p.image_temperature,
                                         top_k=self.p.image_top_k))

  def stage_generate(self) -> None:
    from vqlm import imaging
    from vqlm.eval import text_image
    from vqlm.sample.api import Generator
    from vqlm.stages.lm import LMRun
    existing = _read_eval(self.workdir)
    if all(k in existing for k in ("text_to_image", "text_to_image_heldout", "image_to_text")):
      self.log("generation already evaluated; skipping")
      return
    generator = Generator(LMRun(self.lm_dir), batch_size=32, progress=self.progress)
    os.makedirs(self.samples_dir, exist_ok=True)
    for split, section in (("test", "text_to_image"), ("test_heldout", "text_to_image_heldout")):
      source = self._source(split)
      examples = [source[i] for i in range(min(self.p.eval_prompts, len(source)))]
      metrics, images = text_image.text_to_image(
          generator, examples, num_per_prompt=self.p.images_per_prompt,
          cfg_scale=self.p.cfg_scale, sampling=self.sampling(), seed=0)
      metrics["settings"] = {"image_temperature": self.p.image_temperature,
                             "image_top_k": self.p.image_top_k, "cfg_scale": self.p.cfg_scale}
      _write_eval(self.workdir, section, metrics)
      shown = min(12, len(examples))
      imaging.save_png(imaging.make_grid(images[:shown * self.p.images_per_prompt],
                                         columns=self.p.images_per_prompt, scale=3),
                       os.path.join(self.samples_dir, f"{section}.png"))
      with open(os.path.join(self.samples_dir, f"{section}.json"), "w", encoding="utf-8") as f:
        json.dump([e["text"] for e in examples[:shown]], f, indent=1)
      self.log(f"{section}: scene accuracy {metrics['scene']:.3f} over {metrics['num_images']} "
               "images")
    source = self._source("test")
    examples = [source[i] for i in range(min(self.p.caption_images, len(source)))]
    metrics, captions = text_image.image_to_text(generator, examples)
    _write_eval(self.workdir, "image_to_text", metrics)
    with open(os.path.join(self.samples_dir, "captions.json"), "w", encoding="utf-8") as f:
      json.dump([{"truth": e["text"], "caption": c} for e, c in zip(examples, captions)], f,
                indent=1)
    np.save(os.path.join(self.samples_dir, "caption_images.npy"),
            np.stack([e["image"] for e in examples[:12]]))
    self.log(f"image_to_text: scene accuracy {metrics['scene']:.3f} over {len(captions)} images")
    self._scene_fd(generator)

  def _scene_fd(self, generator) -> None:
    """Fréchet distance between generated and real test images over scene-parser features."""
    try:
      from vqlm.eval.fid import scene_fd
    except ImportError:
      return
    source = self._source("test")
    examples = [source[i] for i in range(min(200, len(source)))]
    fake = generator.generate_images([e["text"] for e in examples], num_per_prompt=1,
                                     cfg_scale=self.p.cfg_scale, sampling=self.sampling(), seed=1)
    real = np.stack([e["image"] for e in examples])
    _write_eval(self.workdir, "scene_fd", {"generated_vs_test": float(scene_fd(fake, real)),
                                           "num_images": len(examples)})

  def stage_report(self) -> None:
    from vqlm.report import save_prompt_figure, write_report
    save_prompt_figure(self.samples_dir, os.path.join(self.samples_dir, "prompts.png"))
    path = write_report(self.workdir)
    self.log(f"wrote {path}")


def main_stages(spec: str) -> tuple[str, ...]:
  if not spec or spec == "all":
    return STAGES
  return tuple(s.strip() for s in spec.split(",") if s.strip())


def device_summary() -> str:
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"
