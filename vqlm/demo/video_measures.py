"""What the video demo measures on each LM, with the evaluators of `vqlm.eval`.

Both LMs (the main demo's and the mixed one) get the main demo's own text-to-image (its test
prompts) and image-to-text measures with its sampling settings, so a fall after the mixed training
is visible. The mixed LM also continues test clips from their first 3 frames (with and without the
clip's caption), draws whole clips from captions, and edits test images (seen and held-out
colour-shape pairs): `vqlm.eval.video_eval`, `vqlm.eval.edit_eval`.
"""

from collections.abc import Callable
import os
import time
from typing import Any

from vqlm.demo.recipe import Preset as MainPreset
from vqlm.demo.recipe import generation_evals
from vqlm.demo.video_recipe import Preset, video_evals
from vqlm.eval import evaluators as evaluators_lib

# The main demo's measures that both LMs get, under the main demo's section names.
MAIN_SECTIONS = ("text_to_image", "image_to_text")
VIDEO_TYPES = ("video_continuation", "text_to_video")


def evaluator_specs(p: Preset, main: MainPreset, *, video: bool) -> dict:
  """`{section: evaluator spec}` for one LM, in the order they run: the main demo's measures,
  then (`video`: the mixed LM) the video and edit measures."""
  ours = generation_evals(main)
  specs = {name: ours[name] for name in MAIN_SECTIONS}
  if video:
    specs.update(video_evals(p, main))
  return specs


def measure_model(
  run_dir: str,
  *,
  p: Preset,
  main: MainPreset,
  video: bool,
  artefacts: str,
  done: dict[str, Any],
  save: Callable[[str, dict], None],
  progress: bool,
  log_fn=print,
) -> dict[str, float]:
  """Runs the measures of `evaluator_specs` on the LM run in `run_dir` that `done` (sections
  already measured at this step) lacks; `save(section, metrics)` is called after each one, so an
  interrupted stage resumes. Returns the seconds each measured section took."""
  from vqlm.runs import LMRun

  specs = {k: v for k, v in evaluator_specs(p, main, video=video).items() if k not in done}
  if not specs:
    return {}
  run = LMRun(run_dir)
  run.progress = progress
  os.makedirs(artefacts, exist_ok=True)
  seconds = {}
  for name, evaluator in evaluators_lib.build(specs, log_fn=log_fn).items():
    if specs[name]["type"] in VIDEO_TYPES:  # artefacts video_<section>.json / .png
      evaluator.settings["name"] = name
    start = time.time()
    result = evaluators_lib.run_all(run, {name: evaluator}, artefacts=artefacts, log_fn=log_fn)
    seconds[name] = time.time() - start
    save(name, result[name])
  return seconds
