"""`vqlm eval --workdir RUN`: run a run's evaluators and write RUN/eval.json (with its config).

The evaluators are the run's `config.evals` (`vqlm.eval.evaluators`), or, where the run has none,
this stage's standard set: image-tokenizer runs reconstruct test images (PSNR, SSIM, codebook
statistics, a VAE's KL, scene-parser agreement on shapes; continuous bottlenecks also write
RUN/samples/prior_samples.png or random_latents.png); LM runs on shapes draw test and held-out
prompts and caption test images, judged by the scene parser, plus a Fréchet distance over
scene-parser features and, with `--inception_weights`, FID. Flags given on the command line
override the evaluators' settings. Only JSON goes to stdout; messages go to stderr.
"""

import json
import os
import sys

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def _define(f):
  f.DEFINE_string("workdir", None, "run directory to evaluate")
  f.DEFINE_string("split", None, "split to evaluate on (default: the evaluators' own, test)")
  f.DEFINE_integer("num_examples", None, "tokenizer: images to reconstruct")
  f.DEFINE_integer("num_prompts", None, "LM: prompts per split")
  f.DEFINE_integer("images_per_prompt", None, "LM: images per prompt")
  f.DEFINE_integer("caption_images", None, "LM: test images to caption")
  f.DEFINE_float("cfg", None, "LM: classifier-free guidance scale (1 = off)")
  f.DEFINE_float("temperature", None, "LM: image-token temperature (0 = greedy)")
  f.DEFINE_integer("top_k", None, "LM: image-token top-k (0 = off)")
  f.DEFINE_string("inception_weights", "", "Inception-v3 .npz for FID (see vqlm/nn/inception.py)")
  f.DEFINE_string("tokenizer", None, "LM: the image tokenizer run (default: the one recorded)")


def default_evals(run, fv, log) -> dict:
  """The standard evaluators of a run's stage (used when the run's config names none)."""
  if run.config.get("stage") == "tokenizer":
    return {"tokenizer": {"type": "reconstruction"}}
  data = run.tokenizer_run().config.data.name
  if data != "shapes":
    log(
      f"no standard LM evaluators apply to the '{data}' data set (they judge images with the "
      "shapes scene parser); the validation losses are in metrics.jsonl, and config.evals "
      "may name evaluators such as fid"
    )
    return {}
  evals = {
    "text_to_image": {"type": "text_to_image", "split": "test"},
    "text_to_image_heldout": {"type": "text_to_image", "split": "test_heldout"},
    "image_to_text": {"type": "image_to_text", "split": "test"},
    "scene_fd": {"type": "scene_fd", "split": "test"},
  }
  if fv.inception_weights:
    evals["fid"] = {"type": "fid", "split": "test", "inception_weights": fv.inception_weights}
  return evals


# flag -> (evaluator setting, the evaluator types it applies to)
_OVERRIDES = {
  "split": ("split", ("reconstruction", "text_to_image", "image_to_text", "scene_fd", "fid")),
  "num_examples": ("num_examples", ("reconstruction",)),
  "num_prompts": ("num_prompts", ("text_to_image",)),
  "images_per_prompt": ("images_per_prompt", ("text_to_image",)),
  "caption_images": ("num_images", ("image_to_text",)),
  "cfg": ("cfg_scale", ("text_to_image", "scene_fd", "fid")),
  "temperature": ("temperature", ("text_to_image", "scene_fd", "fid")),
  "top_k": ("top_k", ("text_to_image", "scene_fd", "fid")),
}


def with_overrides(evals: dict, fv) -> dict:
  out = {}
  for name, spec in evals.items():
    spec = dict(spec)
    for flag, (setting, types) in _OVERRIDES.items():
      value = fv[flag].value
      if value is None or spec.get("type") not in types:
        continue
      if flag == "split" and spec.get("split") not in (None, "test"):
        continue  # --split moves the test evaluations only, not the held-out ones.
      spec[setting] = value
    out[name] = spec
  return out


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(argv, _define)
  if not fv.workdir:
    raise UserError("--workdir is required: the run directory to evaluate")
  from vqlm import runs
  from vqlm.eval import evaluators as evaluators_lib
  from vqlm.runtime.config import as_kwargs

  config = runs.load_config(fv.workdir)
  kwargs = {"tokenizer": fv.tokenizer} if config.get("stage") == "lm" and fv.tokenizer else {}
  run = runs.load(fv.workdir, **kwargs)
  log = lambda message: print(message, file=sys.stderr)
  evals = as_kwargs(config.get("evals")) or default_evals(run, fv, log)
  evaluators = evaluators_lib.build(with_overrides(evals, fv), log_fn=log)
  # Tokenizer runs write their image grids (prior samples, random latents) next to training's.
  artefacts = os.path.join(fv.workdir, "samples") if config.get("stage") == "tokenizer" else None
  results = evaluators_lib.run_all(
    run, evaluators, workdir=fv.workdir, artefacts=artefacts, log_fn=log
  )
  print(
    json.dumps(
      {k: {m: v for m, v in r.items() if not isinstance(v, dict)} for k, r in results.items()},
      indent=1,
      default=float,
    )
  )
  log(f"wrote {runs.eval_file.eval_path(fv.workdir)}")
  return 0
