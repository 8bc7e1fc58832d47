"""The tuning demo: the main demo's LM -> instruction tuning (SFT) -> preference tuning (DPO, then
an online GRPO-style policy gradient), each model measured the same way, side by side.

    vqlm demo tuning --workdir runs/tuning [--main runs/demo] [--preset smoke|default]

Stages (each skipped when its output exists):
  sft      `config.init_from` = the main demo's LM; its caption/image data mixed with chat
           instructions about shapes scenes (draw requests in any order and wording, questions,
           descriptions; `config.data.chat`)
  dpo      pairs of the SFT model's own drawings per request, chosen/rejected by the scene parser
  grpo     groups of replies per prompt sampled online (default preset: draw requests and
           questions), the parser's score or the answer's exactness as reward, a KL penalty to
           the DPO model
  measure  every model that exists (main, sft, dpo, grpo) on: the main demo's test prompts and
           held-out captions, captioning, drawing from free-form requests (test and held-out
           colour-shape pairs), questions about test images -> WORKDIR/tuning.json
  report   WORKDIR/tuning.html

The main demo's LM has no chat turns: it is measured on the free-form requests as plain captions
(`<bos> request <boi>`), and it cannot answer questions.
"""

import os
import time

from vqlm.demo import common
from vqlm.demo.tuning_recipe import PRESETS, dpo_config, grpo_config, sft_config
from vqlm.errors import UserError

STAGES = ("sft", "dpo", "grpo", "measure", "report")
MODELS = ("main", "sft", "dpo", "grpo")
TUNING_JSON = "tuning.json"


class Tuning(common.OnMain):
  """Runs the tuning demo's stages in `workdir`; `main` is a main demo's directory (its `lm/`,
  `codes/` and `tokenizer/`). Arguments: `common.OnMain`'s."""

  NAME = "tuning"
  PRESETS = PRESETS
  RESULTS_FILE = TUNING_JSON

  def run_dir(self, model: str) -> str:
    if model == "main":
      return os.path.join(self.main, "lm")
    return os.path.join(self.workdir, model)

  def run(self, stages: tuple[str, ...] = STAGES) -> dict:
    common.check_stages(stages, STAGES, "tuning")
    os.makedirs(self.workdir, exist_ok=True)
    self._write_results({**self.results(), "preset": self.preset_name})
    start_all = time.time()
    for stage in stages:
      start = time.time()
      self.log(f"== tuning {stage}")
      getattr(self, f"stage_{stage}")()
      self.timings[stage] = time.time() - start
    self.timings["total"] = time.time() - start_all
    self.log("tuning timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))
    results = self.results()
    results["timings"] = {**results.get("timings", {}), **self.timings}
    results["preset"] = self.preset_name
    self._write_results(results)
    return results

  # ---- training stages -----------------------------------------------------------------------

  def _train(self, model: str, config, train_fn) -> None:
    run_dir = self.run_dir(model)
    if common.latest_step(run_dir) == config.train.steps:
      self.log(f"{model} already trained ({run_dir}); skipping")
      return
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    train_fn(config, run_dir, progress=self.progress, log_fn=self.log)
    self.timings[f"train_{model}"] = time.time() - start

  def stage_sft(self) -> None:
    from vqlm.stages import lm as lm_stage

    config = sft_config(
      self.p,
      self.main_preset,
      codes=os.path.join(self.main, "codes"),
      init_from=self.run_dir("main"),
    )
    self._train("sft", config, lm_stage.train)

  def _tune(self, model: str, source: str, make_config) -> None:
    from vqlm.stages import tune as tune_stage

    if common.latest_step(self.run_dir(source)) is None:
      raise UserError(
        f"the {model} stage starts from the {source} model, which is not trained yet; run the "
        f"stages in order (--stages {source},{model})"
      )
    self._train(model, make_config(self.p, init_from=self.run_dir(source)), tune_stage.train)

  def stage_dpo(self) -> None:
    self._tune("dpo", "sft", dpo_config)

  def stage_grpo(self) -> None:
    self._tune("grpo", "dpo", grpo_config)

  # ---- measurements --------------------------------------------------------------------------

  def stage_measure(self) -> None:
    from vqlm.demo.tuning_measures import measure_model

    results = self.results()
    measured = results.setdefault("models", {})
    for model in MODELS:
      run_dir = self.run_dir(model)
      if common.latest_step(run_dir) is None:
        continue
      step = common.latest_step(run_dir)
      if measured.get(model, {}).get("step") == step:
        self.log(f"{model} already measured at step {step}; skipping")
        continue
      self.log(f"-- measuring {model} ({run_dir})")
      start = time.time()
      measured[model] = {
        "step": step,
        "run_dir": run_dir,
        **measure_model(
          run_dir,
          p=self.p,
          main=self.main_preset,
          artefacts=os.path.join(self.artefacts, model),
          progress=self.progress,
          log_fn=self.log,
        ),
      }
      self.timings[f"measure_{model}"] = time.time() - start
      self._write_results(results)

  def stage_report(self) -> None:
    from vqlm.report.tuning import write_tuning_report

    path = write_tuning_report(self.workdir, timings=self.timings or None)
    self.log(f"wrote {path}")


def tuning_stages(spec: str) -> tuple[str, ...]:
  return common.parse_stages(spec, STAGES)
