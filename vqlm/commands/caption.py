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


def read_images(paths: list[str], flag: str = "--image") -> list[np.ndarray]:
  """uint8 `[H, W, 3]` of each image file; a one-line UserError naming a file that is missing, a
  directory or not a readable image (read before the slow run loads)."""
  from vqlm import imaging

  return [imaging.read_image(path, f"{flag} {path}") for path in paths]


def fit_images(images: list[np.ndarray], size: int | None, flag: str = "--image") -> np.ndarray:
  """uint8 `[N, size, size, 3]`: each image resized (bicubic) when `size` is given and it
  differs; without `size` the images must share one size."""
  from PIL import Image

  out = []
  for image in images:
    if size and image.shape[:2] != (size, size):
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    out.append(image)
  shapes = {im.shape for im in out}
  if len(shapes) > 1:
    raise UserError(f"{flag} images have different sizes {sorted(shapes)}; resize them to one size")
  return np.stack(out)


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

  images = read_images(fv.image)
  gen = generator_for(load_run(fv.workdir, fv.tokenizer))
  gen.progress = fv.progress
  images = fit_images(images, getattr(gen.image_tokenizer, "image_size", None))
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
