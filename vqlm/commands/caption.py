"""`vqlm caption --workdir LM_RUN --image x.png [--image y.png ...]`.

Encodes each image with the run's image tokenizer (resized to its training size when needed) and
prints `path: caption` per image; greedy decoding unless `--temperature` > 0.
"""

import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def load_run(workdir: str, tokenizer: str | None = None):
  """The LM run in `workdir`, parameters only (a seam for tests)."""
  from vqlm.runs import LMRun

  return LMRun(workdir, tokenizer=tokenizer or None)


def load_images(paths: list[str], size: int | None) -> np.ndarray:
  """uint8 `[N, size, size, 3]` (images resized when `size` is given and they differ)."""
  import os

  from PIL import Image

  images = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"--image {path} does not exist")
    with Image.open(path) as im:
      im = im.convert("RGB")
      if size and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
      images.append(np.asarray(im))
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise UserError(f"images have different sizes {sorted(shapes)}; resize them to one size")
  return np.stack(images)


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      flag_lib.define_lm_run(f),
      f.DEFINE_multi_string("image", [], "an image file; repeat for several"),
      f.DEFINE_float("temperature", 0.0, "text temperature (0 = greedy)"),
      f.DEFINE_integer("max_len", 48, "most caption tokens"),
      f.DEFINE_integer("seed", 0, "random seed when sampling"),
      f.DEFINE_integer("batch_size", 8, "images per sampler call"),
      f.DEFINE_bool("progress", False, "show a progress bar"),
    ),
  )
  if not fv.workdir:
    raise UserError("--workdir is required: the LM run directory")
  if not fv.image:
    raise UserError("no images given: pass --image PATH (repeatable)")
  if fv.max_len <= 0 or fv.batch_size <= 0:
    raise UserError("--max_len and --batch_size must be >= 1")
  from vqlm.sample.api import generator_for
  from vqlm.sample.processors import SamplingConfig, Settings

  gen = generator_for(load_run(fv.workdir, fv.tokenizer))
  gen.progress = fv.progress
  images = load_images(fv.image, getattr(gen.image_tokenizer, "image_size", None))
  greedy = fv.temperature <= 0
  sampling = None if greedy else SamplingConfig(text=Settings(temperature=fv.temperature))
  captions = gen.caption_images(
    images,
    greedy=greedy,
    sampling=sampling,
    seed=fv.seed,
    max_len=fv.max_len,
    batch_size=fv.batch_size,
  )
  for path, caption in zip(fv.image, captions):
    print(f"{path}: {caption}")
  return 0
