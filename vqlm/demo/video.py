"""The video demo: the main demo's LM trained on a mix of captions and images (both ways), video
clips and image-edit documents, then measured on video continuation and image editing next to
the main demo's own measures.

    vqlm demo video --workdir runs/video [--main runs/demo] [--preset smoke|default]

Stages (each skipped when its output exists):
  encode   clips of `moving_shapes` (6 frames at the main tokenizer's image size) encoded by the
           main demo's image tokenizer -> WORKDIR/video_codes (splits train, validation, test)
  lm       one LM run WORKDIR/lm from the main demo's LM (`config.init_from`) on the preset's
           `config.data.mixture` of the main demo's codes (t2i, i2t), the clips (video) and
           edit documents (edit); validation loss per mode
  measure  both LMs (main, mixed) on the main demo's text-to-image and image-to-text measures;
           the mixed LM also on video continuation from 3 frames, text-to-video and single
           edits (seen and held-out colour-shape pairs) -> WORKDIR/video.json
  report   WORKDIR/video.html
"""

import dataclasses
import os
import time

from vqlm.demo import common
from vqlm.demo.video_recipe import PRESETS, VIDEO_FRAMES, clip_counts, lm_config
from vqlm.errors import UserError

STAGES = ("encode", "lm", "measure", "report")
MODELS = ("main", "mixed")
VIDEO_JSON = "video.json"


class Video(common.OnMain):
  """Runs the video demo's stages in `workdir`; `main` is a main demo's directory (its `lm/`,
  `codes/` and `tokenizer/`). Arguments: `common.OnMain`'s."""

  NAME = "video"
  PRESETS = PRESETS
  RESULTS_FILE = VIDEO_JSON
  MAIN_COMMAND = "vqlm demo --workdir {main} --preset {preset}"

  def __init__(self, workdir: str, **kwargs):
    super().__init__(workdir, **kwargs)
    self.video_codes = os.path.join(workdir, "video_codes")
    self.lm_dir = os.path.join(workdir, "lm")

  def run_dir(self, model: str) -> str:
    return os.path.join(self.main, "lm") if model == "main" else self.lm_dir

  def run(self, stages: tuple[str, ...] = STAGES) -> dict:
    common.check_stages(stages, STAGES, "video")
    os.makedirs(self.workdir, exist_ok=True)
    self._write_results({**self.results(), **self._identity()})
    start_all = time.time()
    for stage in stages:
      start = time.time()
      self.log(f"== video {stage}")
      if getattr(self, f"stage_{stage}")() is not False:  # False: skipped, its time is kept
        self.timings[stage] = time.time() - start
    # No "total" in video.json: a command may run some stages only (the page sums the stages).
    self.log(
      "video timings: "
      + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items())
      + f", this command {time.time() - start_all:.0f}s"
    )
    results = self.results()
    results["timings"] = {**results.get("timings", {}), **self.timings}
    self._write_results(results)
    return results

  def _identity(self) -> dict:
    return {"preset": self.preset_name, "main": self.main, "recipe": dataclasses.asdict(self.p)}

  # ---- encode --------------------------------------------------------------------------------

  def _tokenizer_dir(self) -> str:
    path = os.path.join(self.main, "tokenizer")
    if common.latest_step(path) is None:
      raise UserError(
        f"{self.main} has no trained tokenizer/; run `vqlm demo --workdir {self.main} --preset "
        f"{self.p.main}` first"
      )
    return path

  def encoded(self) -> bool:
    """Whether WORKDIR/video_codes holds every split of the preset, complete, made by the main
    demo's tokenizer."""
    from vqlm.data.code_shards import MANIFEST, read_manifest

    if not os.path.exists(os.path.join(self.video_codes, MANIFEST)):
      return False
    manifest = read_manifest(self.video_codes)
    if manifest.get("tokenizer_run") != os.path.join(self.main, "tokenizer"):
      return False
    for split, n in clip_counts(self.p).items():
      entry = manifest["splits"].get(split) or {}
      if entry.get("num_records") != n:
        return False
      for shard in entry.get("shards", []):
        if not (
          shard["complete"] and os.path.exists(os.path.join(self.video_codes, shard["file"]))
        ):
          return False
    return True

  def stage_encode(self) -> bool:
    if self.encoded():
      self.log(f"clips already encoded ({self.video_codes}); skipping")
      return False
    from vqlm.data.code_shards import encode_split
    from vqlm.data.sources import get_source
    from vqlm.runs import TokenizerRun

    run = TokenizerRun(self._tokenizer_dir())
    for split, n in clip_counts(self.p).items():
      source = get_source(
        "moving_shapes",
        split=split,
        image_size=run.image_size,
        num_clips=n,
        num_frames=VIDEO_FRAMES,
      )
      entry = encode_split(
        run, source, self.video_codes, split=split, progress=self.progress, log_fn=self.log
      )
      rate = entry.get("images_per_sec")
      self.log(
        f"encoded {split}: {n} clips of {VIDEO_FRAMES} frames"
        + (f", {rate:.0f} frames/s" if rate else "")
      )
    return True

  # ---- lm ------------------------------------------------------------------------------------

  def config(self):
    """The LM run's config (`vqlm.demo.video_recipe.lm_config`)."""
    return lm_config(
      self.p,
      self.main_preset,
      codes=os.path.join(self.main, "codes"),
      video_codes=self.video_codes,
      init_from=self.run_dir("main"),
    )

  def check_seq_len(self, config) -> int:
    """The tokens one clip needs with the main LM's vocabulary; a one-line error naming the
    preset's field when `train.seq_len` is shorter."""
    from vqlm.runs.lm_run import VOCAB_FILE
    from vqlm.stages import lm_data
    from vqlm.vocab import Vocab

    need = lm_data.needed(
      config, Vocab.load(os.path.join(self.run_dir("main"), VOCAB_FILE)), "video"
    )
    if need > config.train.seq_len:
      raise UserError(
        f"a clip of {VIDEO_FRAMES} frames needs {need} tokens but the '{self.preset_name}' "
        f"preset's seq_len is {config.train.seq_len}; set seq_len >= {need} in "
        "vqlm/demo/video_recipe.py"
      )
    return need

  def stage_lm(self) -> bool:
    from vqlm.stages import lm as lm_stage

    config = self.config()
    if common.latest_step(self.lm_dir) == config.train.steps:
      self.log(f"mixed LM already trained ({self.lm_dir}); skipping")
      return False
    if not self.encoded():
      raise UserError(
        f"{self.video_codes} lacks the encoded clips; run the encode stage first "
        "(--stages encode,lm)"
      )
    need = self.check_seq_len(config)
    self.log(f"one clip needs {need} tokens; train.seq_len {config.train.seq_len}")
    os.makedirs(self.lm_dir, exist_ok=True)
    lm_stage.train(config, self.lm_dir, progress=self.progress, log_fn=self.log)
    return True

  # ---- measure -------------------------------------------------------------------------------

  def stage_measure(self) -> bool:
    from vqlm.demo.video_measures import measure_model

    measured_any = False
    results = self.results()
    measured = results.setdefault("models", {})
    for model in MODELS:
      run_dir = self.run_dir(model)
      step = common.latest_step(run_dir)
      if step is None:
        self.log(f"{model} LM not trained ({run_dir}); not measured")
        continue
      entry = measured.get(model) or {}
      if entry.get("step") != step:
        entry = {}
      entry.update(step=step, run_dir=run_dir)
      measured[model] = entry

      def save(section: str, metrics: dict, entry=entry) -> None:
        entry[section] = metrics
        self._write_results(results)

      self.log(f"-- measuring {model} ({run_dir})")
      seconds = measure_model(
        run_dir,
        p=self.p,
        main=self.main_preset,
        video=model == "mixed",
        artefacts=os.path.join(self.artefacts, model),
        done=entry,
        save=save,
        progress=self.progress,
        log_fn=self.log,
      )
      if not seconds:
        self.log(f"{model} already measured at step {step}; skipping")
      measured_any = measured_any or bool(seconds)
      entry.setdefault("seconds", {}).update(seconds)
      for section, value in seconds.items():
        self.timings[f"measure_{model}_{section}"] = value
      self._write_results(results)
    return measured_any

  def stage_report(self) -> None:
    from vqlm.report.video import write_video_report

    path = write_video_report(self.workdir, timings=self.timings or None)
    self.log(f"wrote {path}")


def video_stages(spec: str) -> tuple[str, ...]:
  return common.parse_stages(spec, STAGES)
