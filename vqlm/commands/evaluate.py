"""`vqlm eval --workdir RUN`: evaluate a run and write RUN/eval.json (with the run's config).

Image-tokenizer runs: PSNR, SSIM, codebook usage/perplexity, scene-parser agreement (shapes).
LM runs on shapes: text-to-image accuracy (test and held-out prompts) and image-to-text accuracy,
judged by the scene parser; a Fréchet distance over scene-parser features; and, with
`--inception_weights`, FID between generated and real test images.
"""
import json
import os

from vqlm.commands import flags as flag_lib


def _define(f):
  f.DEFINE_string("workdir", None, "run directory to evaluate")
  f.DEFINE_string("split", "test", "split to evaluate on")
  f.DEFINE_integer("num_examples", 1000, "tokenizer: images to reconstruct")
  f.DEFINE_integer("num_prompts", 100, "LM: prompts per split")
  f.DEFINE_integer("images_per_prompt", 4, "LM: images per prompt")
  f.DEFINE_integer("caption_images", 200, "LM: test images to caption")
  f.DEFINE_float("cfg", 1.0, "LM: classifier-free guidance scale (1 = off)")
  f.DEFINE_float("temperature", 0.3, "LM: image-token temperature (0 = greedy)")
  f.DEFINE_integer("top_k", 0, "LM: image-token top-k (0 = off)")
  f.DEFINE_string("inception_weights", "", "Inception-v3 .npz for FID (see vqlm/nn/inception.py)")


def _write(workdir: str, section: str, result: dict) -> str:
  from vqlm import runs
  path = os.path.join(workdir, "eval.json")
  data = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  data[section] = result
  data["config"] = runs.config_to_dict(runs.load_config(workdir))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True, default=float)
  os.replace(path + ".tmp", path)
  return path


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(argv, _define)
  if not fv.workdir:
    raise ValueError("--workdir is required")
  from vqlm import runs
  config = runs.load_config(fv.workdir)
  if config.stage == "tokenizer":
    from vqlm.stages import tokenizer as tokenizer_stage
    result = tokenizer_stage.evaluate(tokenizer_stage.load_tokenizer(fv.workdir), split=fv.split,
                                      num_examples=fv.num_examples)
    path = _write(fv.workdir, "tokenizer", result)
    print(json.dumps(result, indent=1, default=float))
  else:
    results = evaluate_lm(fv)
    for section, result in results.items():
      path = _write(fv.workdir, section, result)
    print(json.dumps({k: {m: v for m, v in r.items() if not isinstance(v, dict)}
                      for k, r in results.items()}, indent=1, default=float))
  print(f"wrote {path}")
  return 0


def evaluate_lm(fv) -> dict:
  import numpy as np
  from vqlm.eval import text_image
  from vqlm.sample.api import Generator
  from vqlm.sample.processors import SamplingConfig, Settings
  from vqlm.stages.lm import LMRun
  from vqlm.stages.tokenizer import source_from_config
  run = LMRun(fv.workdir)
  tokenizer = run.tokenizer_run()
  data = tokenizer.config.data
  if data.name != "shapes":
    raise ValueError(f"LM evaluation by scene parsing needs the shapes data set; this run used "
                     f"'{data.name}'")
  generator = Generator(run, batch_size=32, image_tokenizer=tokenizer)
  sampling = SamplingConfig(text=Settings(temperature=0.0),
                            image=Settings(temperature=fv.temperature, top_k=fv.top_k))
  results = {}
  settings = {"cfg_scale": fv.cfg, "image_temperature": fv.temperature, "image_top_k": fv.top_k}
  generated = None
  for split, section in ((fv.split, "text_to_image"), ("test_heldout", "text_to_image_heldout")):
    source = source_from_config(data, split)
    examples = [source[i] for i in range(min(fv.num_prompts, len(source)))]
    metrics, images = text_image.text_to_image(generator, examples,
                                               num_per_prompt=fv.images_per_prompt,
                                               cfg_scale=fv.cfg, sampling=sampling)
    results[section] = {**metrics, "settings": settings}
    if generated is None:
      generated = (images, np.stack([e["image"] for e in examples]))
  source = source_from_config(data, fv.split)
  examples = [source[i] for i in range(min(fv.caption_images, len(source)))]
  results["image_to_text"], _ = text_image.image_to_text(generator, examples)
  from vqlm.eval import fid
  fake, real = generated
  results["scene_fd"] = {"generated_vs_test": float(fid.scene_fd(fake, real))}
  if fv.inception_weights:
    results["fid"] = {"generated_vs_test": float(fid.inception_fid(
        fake, real, weights_path=fv.inception_weights))}
  return results
