"""The Voronoi cells of a 2-D codebook, the encoder outputs that fall in them, and their history.

A VQ with 2-D code words (`codebook` float32 `[K, 2]`, e.g. `code_dim=2`) splits its code space
into K cells: every point belongs to its nearest code word. This module draws them exactly:

    labels = voronoi_labels(codebook, extent=(x0, x1, y0, y1), resolution=256)  # int32 [256, 256]
    image = draw(codebook, latents, title="step 1000")   # uint8 [H, W, 3]: cells, latents, codes
    animate(snapshots_from_run("runs/tok"), "runs/tok/latent/voronoi.gif")

`voronoi_labels` gives the index of the nearest code word at every pixel centre (float32 squared
distances of the differences; ties go to the lower index, as `np.argmin`); row 0 is the top
(largest y) so the array displays as drawn. `draw` colours the cells, scatters the 2-D
pre-quantisation latents (`LatentSpace.code_space`) and marks the code words, used ones in red and
unused ones hollow, with the usage and perplexity of the latents' assignment in the title.

The tokenizer stage saves `samples/codebook_<step>.npy` every `train.sample_every` steps;
`snapshots_from_run` pairs each with the latents of a few images encoded by the checkpoint of the
same step when one is still kept (older checkpoints are deleted as training goes, so early
snapshots may show the codebook alone).
"""

import dataclasses
import glob
import os
import re

import numpy as np

from vqlm.errors import UserError, check_int
from vqlm.eval.reconstruction import codebook_stats

_F32 = np.float32
_CHUNK_ELEMENTS = 1 << 22  # Points x codes per chunk of the nearest-code search.
MAX_SCATTER = 4000  # Latents drawn per frame (a fixed random subset beyond this).


def _check_codebook(codebook: np.ndarray) -> np.ndarray:
  codebook = np.asarray(codebook, _F32)
  if codebook.ndim != 2 or codebook.shape[1] != 2 or codebook.shape[0] < 1:
    raise UserError(
      f"Voronoi cells need a codebook of 2-D code words [K, 2], got shape {codebook.shape}; "
      "train the VQ with code_dim=2 (--config.model.bottleneck.code_dim=2)"
    )
  return codebook


def assign(points: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """int32 `[N]`: the nearest code word of each point `[N, 2]` (float32, ties to the lower
  index)."""
  codebook = _check_codebook(codebook)
  points = np.asarray(points, _F32).reshape(-1, 2)
  chunk = max(1, _CHUNK_ELEMENTS // codebook.shape[0])
  out = np.empty((points.shape[0],), np.int32)
  for start in range(0, points.shape[0], chunk):
    diff = points[start : start + chunk, None, :] - codebook[None, :, :]
    out[start : start + chunk] = np.argmin(np.sum(np.square(diff), axis=-1, dtype=_F32), axis=1)
  return out


def pixel_centres(extent: tuple[float, float, float, float], resolution: int) -> np.ndarray:
  """float32 `[R, R, 2]`: the (x, y) of each pixel centre over `extent` = (x0, x1, y0, y1); row 0
  is the top (y near y1), column 0 the left (x near x0)."""
  r = check_int("resolution", resolution)
  x0, x1, y0, y1 = (float(v) for v in extent)
  if not (x1 > x0 and y1 > y0):
    raise UserError(f"extent (x0, x1, y0, y1) must have x1 > x0 and y1 > y0, got {extent}")
  odd = 2.0 * np.arange(r, dtype=np.float64) + 1.0
  xs = (x0 + odd * (x1 - x0) / (2 * r)).astype(_F32)
  ys = (y1 - odd * (y1 - y0) / (2 * r)).astype(_F32)
  return np.stack(np.meshgrid(xs, ys), axis=-1)


def voronoi_labels(
  codebook: np.ndarray, *, extent: tuple[float, float, float, float], resolution: int = 256
) -> np.ndarray:
  """int32 `[R, R]`: the Voronoi cell (nearest code word) of each pixel centre of `extent`."""
  centres = pixel_centres(extent, resolution)
  return assign(centres.reshape(-1, 2), codebook).reshape(centres.shape[:2])


def assignment_stats(indices: np.ndarray, codebook_size: int) -> dict[str, float]:
  """`usage` (fraction of the K codes used), `used` (how many), `perplexity` (exp of the entropy
  of the code histogram: K for a uniform assignment over K codes) and `dead_codes`."""
  stats = codebook_stats(np.asarray(indices, np.int64), codebook_size)
  return {**stats, "used": codebook_size - stats["dead_codes"]}


def extent_of(*arrays: np.ndarray | None, margin: float = 0.1) -> tuple[float, float, float, float]:
  """(x0, x1, y0, y1) around every point of `arrays` (each `[..., 2]`; None skipped), widened by
  `margin` of its size on each side."""
  points = [np.asarray(a, np.float64).reshape(-1, 2) for a in arrays if a is not None]
  points = np.concatenate(points) if points else np.zeros((0, 2))
  points = points[np.all(np.isfinite(points), axis=1)]
  if points.shape[0] == 0:
    return (-1.0, 1.0, -1.0, 1.0)
  lo, hi = points.min(0), points.max(0)
  pad = np.maximum((hi - lo) * margin, 1e-3)
  lo, hi = lo - pad, hi + pad
  return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))


def _cell_colours(k: int) -> np.ndarray:
  """float `[K, 3]` pale colours, neighbouring indices far apart in hue."""
  from matplotlib.colors import hsv_to_rgb

  golden = 0.6180339887498949
  hues = (np.arange(k) * golden) % 1.0
  sat = np.where(np.arange(k) % 2 == 0, 0.35, 0.22)
  return hsv_to_rgb(np.stack([hues, sat, np.full(k, 0.97)], axis=-1))


def draw(
  codebook: np.ndarray,
  latents: np.ndarray | None = None,
  *,
  extent: tuple[float, float, float, float] | None = None,
  resolution: int = 256,
  title: str = "",
  size_px: int = 480,
) -> np.ndarray:
  """uint8 `[size_px, size_px, 3]`: the Voronoi cells of `codebook` `[K, 2]` over `extent`
  (default: around the codes and latents), the latents `[..., 2]` as dots and the code words as
  crosses (used: red; unused by the latents: hollow grey). The title adds usage and perplexity."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  codebook = _check_codebook(codebook)
  k = codebook.shape[0]
  extent = extent or extent_of(codebook, latents)
  labels = voronoi_labels(codebook, extent=extent, resolution=resolution)
  dpi = 100
  fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(_cell_colours(k)[labels], extent=extent, origin="upper", interpolation="nearest")
  used = np.zeros((k,), bool)
  if latents is not None:
    points = np.asarray(latents, _F32).reshape(-1, 2)
    indices = assign(points, codebook)
    used[np.unique(indices)] = True
    stats = assignment_stats(indices, k)
    title = (
      f"{title}  " if title else ""
    ) + f"usage {stats['used']}/{k} ({stats['usage']:.0%}), perplexity {stats['perplexity']:.1f}"
    if points.shape[0] > MAX_SCATTER:
      points = points[np.random.default_rng(0).choice(points.shape[0], MAX_SCATTER, False)]
    ax.scatter(points[:, 0], points[:, 1], s=3, c="black", alpha=0.35, linewidths=0)
  else:
    used[:] = True
    title = (f"{title}  " if title else "") + f"{k} codes (no latents)"
  ax.scatter(*codebook[used].T, marker="x", s=36, c="red", linewidths=1.5)
  ax.scatter(*codebook[~used].T, marker="o", s=30, facecolors="none", edgecolors="grey")
  ax.set_xlim(extent[0], extent[1])
  ax.set_ylim(extent[2], extent[3])
  ax.set_title(title, fontsize=9)
  ax.tick_params(labelsize=7)
  fig.tight_layout()
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


@dataclasses.dataclass
class Snapshot:
  """The codebook float32 `[K, 2]` at one training step, and the 2-D pre-quantisation latents
  `[N, 2]` of some images at that step (None when no checkpoint of the step was kept)."""

  step: int
  codebook: np.ndarray
  latents: np.ndarray | None = None


def frames(
  snapshots: list[Snapshot], *, resolution: int = 256, size_px: int = 480
) -> list[np.ndarray]:
  """One uint8 `[size_px, size_px, 3]` frame per snapshot, all over one extent (every snapshot's
  codes and latents) so that the cells move on fixed axes."""
  if not snapshots:
    raise UserError("no snapshots to draw")
  extent = extent_of(*(a for s in snapshots for a in (s.codebook, s.latents)))
  return [
    draw(
      s.codebook,
      s.latents,
      extent=extent,
      resolution=resolution,
      title=f"step {s.step}",
      size_px=size_px,
    )
    for s in snapshots
  ]


def save_gif(images: list[np.ndarray], path: str, *, duration_ms: int = 400) -> str:
  """Writes uint8 `[H, W, 3]` frames as an animated GIF (looping); returns `path`."""
  from PIL import Image

  if not images:
    raise UserError("no frames to write")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pil = [Image.fromarray(np.asarray(f, np.uint8)) for f in images]
  pil[0].save(
    path, save_all=True, append_images=pil[1:], duration=int(duration_ms), loop=0, disposal=1
  )
  return path


def animate(
  snapshots: list[Snapshot],
  path: str,
  *,
  resolution: int = 256,
  size_px: int = 480,
  duration_ms: int = 400,
) -> list[np.ndarray]:
  """`frames(snapshots)` written to the GIF `path`; returns the frames."""
  out = frames(snapshots, resolution=resolution, size_px=size_px)
  save_gif(out, path, duration_ms=duration_ms)
  return out


_CODEBOOK_FILE = re.compile(r"codebook_(\d+)\.npy$")


def saved_codebooks(workdir: str) -> dict[int, str]:
  """{step: path} of the `samples/codebook_<step>.npy` snapshots the tokenizer stage saved."""
  out = {}
  for path in glob.glob(os.path.join(workdir, "samples", "codebook_*.npy")):
    match = _CODEBOOK_FILE.search(os.path.basename(path))
    if match:
      out[int(match.group(1))] = path
  return dict(sorted(out.items()))


def snapshots_from_run(
  workdir: str, images: np.ndarray | None = None, *, split: str = "validation", num: int = 64
) -> list[Snapshot]:
  """The run's codebook history, one `Snapshot` per saved codebook (and per kept checkpoint),
  with the 2-D latents of `images` (uint8 `[N, H, W, 3]`; default: the first `num` images of
  `split`) encoded by the checkpoint of each step that is still kept."""
  from vqlm.eval.latent_space import LatentSpace, image_set
  from vqlm.runs import TokenizerRun
  from vqlm.runtime.checkpoint import Checkpointer

  saved = saved_codebooks(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = []
  if os.path.isdir(ckpt_dir):
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
      steps = ckpt.all_steps()
    finally:
      ckpt.close()
  if not saved and not steps:
    raise UserError(f"{workdir} has no codebook snapshots (samples/codebook_*.npy) or checkpoints")
  out = []
  for step in sorted(set(saved) | set(steps)):
    codebook, latents = None, None
    if step in saved:
      codebook = _check_codebook(np.load(saved[step]))
    if step in steps:
      run = TokenizerRun(workdir, step=step)
      if not run.is_discrete:
        raise UserError(f"{workdir} is a {run.bottleneck!r} run; Voronoi cells need a VQ")
      if images is None:
        images = image_set(run, split=split, num=num).images
      if codebook is None:
        codebook = _check_codebook(run.codebook())
      latents = LatentSpace(run).code_space(images).reshape(-1, codebook.shape[1])
    out.append(Snapshot(int(step), codebook, latents))
  return out
