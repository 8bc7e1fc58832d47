"""`vqlm generate --workdir LM_RUN --prompt "a red square" --num 8 --cfg 3.0 --out samples.png`.

Draws `--num` images per caption (`--prompt`, repeatable, and/or `--prompt-file` with one caption
per line) with a trained LM run and its image tokenizer. Writes a grid (one row per caption) to
`--out` and each image next to it as `<out stem>-<index>.png` (prompt-major order).
"""

import os

import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def load_run(workdir: str, tokenizer: str | None = None):
  """The LM run in `workdir`, parameters only (a seam for tests)."""
  from vqlm.runs import LMRun

  return LMRun(workdir, tokenizer=tokenizer or None)


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
  """`--prompt` values, then the non-blank lines of `--prompt-file`."""
  out = [p.strip() for p in prompts if p.strip()]
  if prompt_file:
    if not os.path.isfile(prompt_file):
      raise FileNotFoundError(f"--prompt-file {prompt_file} does not exist")
    with open(prompt_file) as f:
      out += [line.strip() for line in f if line.strip()]
  if not out:
    raise UserError('no captions given: pass --prompt "..." or --prompt-file FILE')
  return out


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("workdir", None, "LM run directory (from `vqlm train`, configs/lm.py)"),
      f.DEFINE_string("tokenizer", None, "image tokenizer run (default: the one the LM recorded)"),
      f.DEFINE_multi_string("prompt", [], "a caption; repeat for several"),
      f.DEFINE_string("prompt-file", None, "a text file with one caption per line"),
      f.DEFINE_integer("num", 8, "images per caption"),
      f.DEFINE_float("cfg", 1.0, "classifier-free guidance scale (1 = no guidance)"),
      f.DEFINE_float("temperature", 1.0, "image-code temperature (0 = greedy)"),
      f.DEFINE_integer("top_k", 0, "keep the k most likely codes (0 = all)"),
      f.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)"),
      f.DEFINE_integer("seed", 0, "random seed (same seed, same images)"),
      f.DEFINE_integer("batch_size", 8, "images per sampler call"),
      f.DEFINE_string("out", "samples.png", "grid PNG; single images go next to it"),
      f.DEFINE_integer("scale", 1, "upscale the saved images by this integer factor"),
      f.DEFINE_bool("progress", True, "show a progress bar"),
      f.DEFINE_enum(
        "dtype",
        "model",
        ["model", "float32", "bfloat16"],
        "sampling weights and compute: the model's own, or cast (bfloat16 halves "
        "weight and cache memory; logits and sampling stay float32)",
      ),
    ),
  )
  if not fv.workdir:
    raise UserError("--workdir is required: the LM run directory")
  if fv.num <= 0 or fv.batch_size <= 0 or fv.scale <= 0:
    raise UserError("--num, --batch_size and --scale must be >= 1")
  prompts = read_prompts(fv.prompt, fv["prompt-file"].value)
  from vqlm import imaging
  from vqlm.sample.api import generator_for
  from vqlm.sample.processors import SamplingConfig, Settings

  settings = Settings(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)
  gen = generator_for(
    load_run(fv.workdir, fv.tokenizer), dtype=None if fv.dtype == "model" else fv.dtype
  )
  gen.progress = fv.progress
  images = gen.generate_images(
    prompts,
    num_per_prompt=fv.num,
    cfg_scale=fv.cfg,
    sampling=SamplingConfig(text=settings, image=settings).check(),
    seed=fv.seed,
    batch_size=fv.batch_size,
  )
  if fv.scale > 1:
    images = images.repeat(fv.scale, axis=1).repeat(fv.scale, axis=2)
  out = os.path.abspath(fv.out)
  imaging.save_png(imaging.make_grid(np.asarray(images), columns=fv.num), out)
  stem = os.path.splitext(out)[0]
  for i, image in enumerate(images):
    imaging.save_png(image, f"{stem}-{i:03d}.png")
  print(
    f"wrote {out} ({len(prompts)} caption(s) x {fv.num}) and {len(images)} images "
    f"{stem}-000.png ... {stem}-{len(images) - 1:03d}.png"
  )
  return 0
