"""`vqlm latent MODE --workdir TOKENIZER_RUN [flags]`: look inside a tokenizer's latent space.

Modes (`vqlm.eval.latent_space`, `vqlm.eval.voronoi`); images come from `--split` of the run's data
set (its first `--num_images`) or from `--folder`, and `--query` is an index into them or an image
file:

  neighbors     each query (default: 0,1,2,3) and its `--k` nearest images by the L2 distance of
                grid-averaged latents; one row per query; indices and distances printed
  interpolate   `--frames` images decoded along the straight line between two queries' latents
                (default: 0 and 1); discrete runs interpolate before quantising
  attribute     the mean latent of `--add` minus that of `--subtract` (each a folder,
                caption:TEXT or indices such as 0,3,5-9), times `--strength`, added to each
                query's latent (default: 0); one row per query: query | edited
  sample        `--num` images from random points: autoencoder, Gaussian noise matched to the
                set's latents; VAE, its prior; VQ / FSQ, uniformly random codes
  voronoi       VQ with 2-D code words: the Voronoi cells of every saved codebook snapshot with
                the set's latents, as an animated GIF (`--out` with .gif) and the last frame as PNG

The PNG goes to `--out` (default RUN/latent/MODE.png).
"""

import os

import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

MODES = ("neighbors", "interpolate", "attribute", "sample", "voronoi")
DEFAULT_QUERIES = {"neighbors": ["0", "1", "2", "3"], "interpolate": ["0", "1"], "attribute": ["0"]}


def _define(f) -> None:
  f.DEFINE_string("workdir", None, f"image tokenizer run; first argument: {'|'.join(MODES)}")
  f.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
  f.DEFINE_string("split", "train", "split of the run's data set the images come from")
  f.DEFINE_string("folder", None, "a folder of images to use instead of --split")
  f.DEFINE_integer("num_images", 256, "use the first N images of the split or folder")
  f.DEFINE_multi_string("query", [], "an index into the images or an image file; repeatable")
  f.DEFINE_integer("k", 5, "neighbors: how many nearest images per query")
  f.DEFINE_integer("frames", 8, "interpolate: images along the line, both ends included")
  f.DEFINE_string("add", None, "attribute: the group to move towards (folder, caption:TEXT, 0,3)")
  f.DEFINE_string("subtract", None, "attribute: the group to move away from (same forms)")
  f.DEFINE_float("strength", 1.0, "attribute: multiple of the attribute vector to add")
  f.DEFINE_integer("num", 16, "sample: images to draw")
  f.DEFINE_integer("seed", 0, "sample: random seed (same seed, same images)")
  f.DEFINE_integer("batch_size", 32, "images per model call")
  f.DEFINE_integer("scale", 0, "upscale the PNG by this factor (0: to about 64 pixels an image)")
  f.DEFINE_string("out", None, "output PNG (voronoi: .gif also written) [RUN/latent/MODE.png]")


def load_run(workdir: str, step: int | None = None):
  """The tokenizer run in `workdir` (a seam for tests)."""
  from vqlm.runs import TokenizerRun

  return TokenizerRun(workdir, step=step)


def _queries(values: list[str], images, size: int) -> np.ndarray:
  """uint8 `[Q, size, size, 3]`: each `--query` as an index into `images` or an image file."""
  from vqlm.commands.caption import fit_images, read_images

  out = [np.zeros((0, size, size, 3), np.uint8)]
  for value in values:
    if value.strip().isdigit():
      out.append(images.select(value.strip()))
    else:
      out.append(fit_images(read_images([value], "--query"), size, "--query"))
  return np.concatenate(out)


def main(argv: list[str]) -> int:
  argv = list(argv)
  mode = argv.pop(1) if len(argv) > 1 and not argv[1].startswith("-") else None
  fv = flag_lib.parse(argv, _define)
  if mode is None:
    raise UserError(f"give a mode: vqlm latent {'|'.join(MODES)} --workdir RUN")
  if mode not in MODES:
    raise UserError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
  if not fv.workdir:
    raise UserError("--workdir is required: an image tokenizer run directory")
  if not os.path.isdir(fv.workdir):
    raise UserError(f"--workdir {fv.workdir} does not exist; train a tokenizer run first")
  for name in ("num_images", "batch_size", "k", "frames", "num"):
    if fv[name].value < 1:
      raise UserError(f"--{name} must be >= 1")
  if fv.scale < 0:
    raise UserError("--scale must be >= 0")
  if mode == "attribute" and not (fv.add and fv.subtract):
    raise UserError("attribute needs --add GROUP and --subtract GROUP (folder, caption:TEXT, 0,3)")
  from vqlm import imaging
  from vqlm.eval import latent_space

  run = load_run(fv.workdir, fv.step)
  space = latent_space.LatentSpace(run, batch_size=fv.batch_size)
  out = fv.out or os.path.join(fv.workdir, "latent", f"{mode}.png")
  scale = fv.scale or max(1, 64 // run.image_size)
  if mode == "voronoi":
    return _voronoi(fv, run, out)
  images = latent_space.image_set(run, split=fv.split, folder=fv.folder, num=fv.num_images)
  queries = _queries(fv.query or DEFAULT_QUERIES.get(mode, []), images, run.image_size)
  if mode != "sample" and not len(queries):
    raise UserError(f"{mode} needs --query values")
  if mode == "neighbors":
    found = space.neighbors(queries, images.images, k=fv.k)
    rows = [np.concatenate([q[None], images.images[i]]) for q, i in zip(queries, found.indices)]
    grid = imaging.make_grid(np.concatenate(rows), columns=fv.k + 1, scale=scale)
    for value, idx, dist in zip(fv.query or DEFAULT_QUERIES[mode], *found):
      pairs = ", ".join(f"{i} ({d:.4g})" for i, d in zip(idx, dist))
      print(f"query {value}: {pairs}")
  elif mode == "interpolate":
    if len(queries) != 2:
      raise UserError(f"interpolate takes exactly two --query values, got {len(queries)}")
    strip = space.interpolate(queries[0], queries[1], num=fv.frames)
    grid = imaging.make_grid(strip, columns=fv.frames, scale=scale)
  elif mode == "attribute":
    add = latent_space.group(run, fv.add, images)
    subtract = latent_space.group(run, fv.subtract, images)
    vector = space.attribute_vector(add, subtract)
    edited = space.attribute(queries, vector, strength=fv.strength)
    print(
      f"attribute from {len(add)} images minus {len(subtract)}: |vector| = "
      f"{float(np.linalg.norm(vector)):.4g}"
    )
    pairs = np.stack([queries, edited], axis=1).reshape(-1, *queries.shape[1:])
    grid = imaging.make_grid(pairs, columns=2, scale=scale)
  else:
    samples = space.sample(fv.num, seed=fv.seed, reference=images.images)
    grid = imaging.make_grid(samples, columns=min(8, fv.num), scale=scale)
  print(f"wrote {imaging.save_png(grid, out)}")
  return 0


def _voronoi(fv, run, out: str) -> int:
  from vqlm import imaging
  from vqlm.eval import latent_space, voronoi

  if not run.is_discrete:
    raise UserError(f"voronoi needs a VQ (or FSQ) run; this one's bottleneck is {run.bottleneck!r}")
  images = latent_space.image_set(run, split=fv.split, folder=fv.folder, num=fv.num_images)
  snapshots = voronoi.snapshots_from_run(fv.workdir, images.images)
  gif = os.path.splitext(out)[0] + ".gif"
  frames = voronoi.animate(snapshots, gif)
  print(f"wrote {gif} ({len(frames)} frames)")
  print(f"wrote {imaging.save_png(frames[-1], os.path.splitext(out)[0] + '.png')}")
  return 0
