"""`vqlm generate --workdir LM_RUN --prompt "a red square" --num 8 --cfg 3.0 --out DIR`.

Draws `--num` images per caption (`--prompt`, repeatable, and/or `--prompt-file` with one caption
per line) with a trained LM run and its image tokenizer, and writes them to the directory `--out`:

  DIR/00000.png ...    one PNG per image, prompt-major (image j of caption p is number p*num + j)
  DIR/prompts.jsonl    one line per image: {"file", "prompt", "prompt_index", "sample_index"}
                       (and "codes" with --npz)
  DIR/00000.npz ...    with --npz: the image's codes (`codes`, int32 [h, w])
  FILE                 with --grid FILE: one row per caption (read back from the written PNGs)

Images are sampled, decoded and written `--batch_size` at a time, so memory stays bounded for any
number of captions (a 30k-caption FID set). Image number i draws with seed `(--seed, i)`, so the
files do not depend on `--batch_size` and equal `Generator.generate_images(captions,
num_per_prompt=num, seed=seed)`.
"""

import json
import os

import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

PROMPTS_FILE = "prompts.jsonl"


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
      flag_lib.define_lm_run(f),
      f.DEFINE_multi_string("prompt", [], "a caption; repeat for several"),
      f.DEFINE_string("prompt-file", None, "a text file with one caption per line"),
      f.DEFINE_integer("num", 8, "images per caption"),
      f.DEFINE_float("cfg", 1.0, "classifier-free guidance scale (1 = no guidance)"),
      f.DEFINE_float("temperature", 1.0, "image-code temperature (0 = greedy)"),
      f.DEFINE_integer("top_k", 0, "keep the k most likely codes (0 = all)"),
      f.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)"),
      f.DEFINE_integer("seed", 0, "random seed: image i draws with (seed, i) at any batch size"),
      f.DEFINE_integer("batch_size", 8, "images per sampler call (and held in memory at once)"),
      f.DEFINE_string("out", "samples", "output directory: 00000.png ... and prompts.jsonl"),
      f.DEFINE_string("grid", None, "also write a grid PNG here (one row per caption)"),
      f.DEFINE_bool("npz", False, "also write each image's codes as DIR/00000.npz ..."),
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
  if os.path.splitext(fv.out)[1].lower() in (".png", ".jpg", ".jpeg"):
    raise UserError(
      f"--out {fv.out} looks like an image file; --out is a directory (one PNG per image), "
      "pass --grid FILE.png for a grid"
    )
  if fv.grid and os.path.isdir(fv.grid):
    raise UserError(f"--grid {fv.grid} is a directory; pass a PNG file name")
  prompts = read_prompts(fv.prompt, fv["prompt-file"].value)
  out_dir = flag_lib.check_workdir(fv.out, "--out")
  from tqdm.auto import tqdm

  from vqlm import imaging
  from vqlm.sample.api import generator_for
  from vqlm.sample.processors import SamplingConfig, Settings

  settings = Settings(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)
  sampling = SamplingConfig(text=settings, image=settings).check()
  gen = generator_for(
    load_run(fv.workdir, fv.tokenizer), dtype=None if fv.dtype == "model" else fv.dtype
  )
  gen.progress = False  # This command's bar counts images across batches.
  total = len(prompts) * fv.num
  width = max(5, len(str(total - 1)))
  names = [f"{i:0{width}d}" for i in range(total)]
  bar = tqdm(total=total, desc="images", unit="img", disable=not fv.progress)
  with open(os.path.join(out_dir, PROMPTS_FILE), "w") as index:
    for start in range(0, total, fv.batch_size):
      stop = min(start + fv.batch_size, total)
      images, codes = gen.generate_images(
        [prompts[i // fv.num] for i in range(start, stop)],
        cfg_scale=fv.cfg,
        sampling=sampling,
        seed=fv.seed,
        batch_size=fv.batch_size,
        first_row=start,
        return_codes=True,
      )
      if fv.scale > 1:
        images = images.repeat(fv.scale, axis=1).repeat(fv.scale, axis=2)
      for i, image, grid_codes in zip(range(start, stop), images, codes):
        p, j = divmod(i, fv.num)
        record = {"file": f"{names[i]}.png", "prompt": prompts[p], "prompt_index": p}
        record["sample_index"] = j
        imaging.save_png(image, os.path.join(out_dir, record["file"]))
        if fv.npz:
          record["codes"] = f"{names[i]}.npz"
          np.savez(os.path.join(out_dir, record["codes"]), codes=grid_codes)
        index.write(json.dumps(record) + "\n")
      index.flush()
      bar.update(stop - start)
  bar.close()
  what = f"{total} images {names[0]}.png ... {names[-1]}.png and {PROMPTS_FILE}"
  if fv.grid:
    tiles = np.stack([imaging.load_png(os.path.join(out_dir, f"{n}.png")) for n in names])
    grid = imaging.save_png(imaging.make_grid(tiles, columns=fv.num), os.path.abspath(fv.grid))
    what += f"; grid {grid}"
  print(f"wrote {out_dir}: {what} ({len(prompts)} caption(s) x {fv.num})")
  return 0
