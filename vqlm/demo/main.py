"""The built-in end-to-end demo: every stage of vqlm on the procedural `shapes` data, on a laptop.

Stages (each shows progress, is skipped when its output exists, and can be run alone):
  data       build the shapes data set (TFDS, ArrayRecord; no download)
  tokenizer  train the image tokenizer (split patch encoder, FSQ with 6 channels of 4 levels:
             32x32 -> 8x8 codes of 4096, each a function of its own 4x4 patch, 4 channels for
             the patch's form and 2 for its colour) and evaluate it
  encode     encode the data set once into code shards
  lm         train the SentencePiece model on the captions, then the LM on a t2i + i2t mix with
             caption dropout
  generate   draw images for held-out prompts (with CFG), caption test images, and evaluate
  report     write WORKDIR/report.html

Layout: WORKDIR/{tokenizer, codes, lm, samples}/, WORKDIR/eval.json, WORKDIR/report.html.
"""

import os
import time

import jax

from vqlm.demo import common
from vqlm.demo.recipe import PRESETS, generation_evals, lm_config, split_sizes, tokenizer_config
from vqlm.errors import UserError
from vqlm.eval import evaluators as evaluators_lib
from vqlm.runs import LMRun, TokenizerRun, read_eval, write_eval

STAGES = ("data", "tokenizer", "encode", "lm", "generate", "report")


class Demo:
  """Runs the demo's stages in `workdir` with a preset."""

  def __init__(
    self,
    workdir: str,
    *,
    preset: str = "default",
    progress: bool = True,
    log_fn=print,
    data_dir: str = "",
  ):
    if preset not in PRESETS:
      raise UserError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}")
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
    common.check_stages(stages, STAGES, "demo")
    start_all = time.time()
    for stage in stages:
      start = time.time()
      self.log(f"== {stage}")
      getattr(self, f"stage_{stage}")()
      self.timings[stage] = time.time() - start
    total = time.time() - start_all
    self.log(
      "demo timings: "
      + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items())
      + f", total {total:.0f}s"
    )
    write_eval(
      self.workdir, "timings", {**self.timings, "total": total, "preset": self.preset_name}
    )
    return read_eval(self.workdir)

  # ---- stages -------------------------------------------------------------------------------

  def _source(self, split: str):
    from vqlm.data.sources import get_source

    return get_source(
      "shapes",
      split=split,
      data_dir=self.data_dir,
      image_size=32,
      min_objects=1,
      max_objects=2,
      sizes=split_sizes(self.p),
    )

  def stage_data(self) -> None:
    sizes = {split: len(self._source(split)) for split in split_sizes(self.p)}
    self.log(f"shapes data set in {self.data_dir}: {sizes}")

  def stage_tokenizer(self) -> None:
    from vqlm.stages import tokenizer as tokenizer_stage

    config = tokenizer_config(self.p, self.data_dir)
    done = common.latest_step(self.tokenizer_dir) == config.train.steps
    if done and "tokenizer" in read_eval(self.tokenizer_dir):
      self.log(f"tokenizer already trained ({self.tokenizer_dir}); skipping")
    else:
      os.makedirs(self.tokenizer_dir, exist_ok=True)
      tokenizer_stage.train(config, self.tokenizer_dir, progress=self.progress, log_fn=self.log)
    result = dict(read_eval(self.tokenizer_dir)["tokenizer"])
    if "heldout_scene_agreement" not in result:
      # The ceiling of held-out text-to-image: can the tokenizer even draw unseen colour-shape
      # pairs? (It was trained on the train split, which has none.)
      heldout = evaluators_lib.Reconstruction(
        split="test_heldout", num_examples=1000, log_fn=self.log
      ).run(TokenizerRun(self.tokenizer_dir))
      result["heldout_scene_agreement"] = heldout["scene_agreement"]
      write_eval(self.tokenizer_dir, "tokenizer", result)
      self.log(f"tokenizer scene agreement on held-out pairs: {heldout['scene_agreement']:.3f}")
    write_eval(self.workdir, "tokenizer", result)

  def stage_encode(self) -> None:
    from vqlm.data.code_shards import encode_split

    run = TokenizerRun(self.tokenizer_dir)
    rates = {}
    for split in ("train", "validation", "test", "test_heldout"):
      entry = encode_split(
        run,
        self._source(split),
        self.codes_dir,
        split=split,
        progress=self.progress,
        log_fn=self.log,
      )
      rates[split] = entry.get("images_per_sec")
    self.log(f"encoded into {self.codes_dir}; images/s: {rates}")

  def stage_lm(self) -> None:
    from vqlm.stages import lm as lm_stage

    config = lm_config(self.p, self.codes_dir)
    if common.latest_step(self.lm_dir) == config.train.steps:
      self.log(f"LM already trained ({self.lm_dir}); skipping")
      return
    os.makedirs(self.lm_dir, exist_ok=True)
    lm_stage.train(config, self.lm_dir, progress=self.progress, log_fn=self.log)

  def evals(self) -> dict:
    """The generation evaluators of the demo (`vqlm.eval.evaluators`), in the order they run."""
    return generation_evals(self.p)

  def stage_generate(self) -> None:
    existing = read_eval(self.workdir)
    if all(k in existing for k in ("text_to_image", "text_to_image_heldout", "image_to_text")):
      self.log("generation already evaluated; skipping")
      return
    run = LMRun(self.lm_dir)
    run.progress = self.progress
    evaluators = evaluators_lib.build(self.evals(), log_fn=self.log)
    evaluators_lib.run_all(
      run, evaluators, workdir=self.workdir, artefacts=self.samples_dir, log_fn=self.log
    )

  def stage_report(self) -> None:
    from vqlm.report import save_prompt_figure, write_report

    save_prompt_figure(self.samples_dir, os.path.join(self.samples_dir, "prompts.png"))
    # This run's stage timings so far (eval.json gets them, with the report's, after the last
    # stage); a run of the report stage alone shows eval.json's timings of the previous run.
    timings = None
    if self.timings:
      total = sum(self.timings.values())
      timings = {**self.timings, "total": total, "preset": self.preset_name}
    path = write_report(self.workdir, kind="demo", timings=timings)
    self.log(f"wrote {path}")


def main_stages(spec: str) -> tuple[str, ...]:
  return common.parse_stages(spec, STAGES)


def device_summary() -> str:
  return f"{jax.device_count()} x {jax.devices()[0].device_kind}"
