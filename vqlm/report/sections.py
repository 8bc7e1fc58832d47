"""The report's sections that show training: curves, codebook, reconstructions and sample grids."""

from collections.abc import Mapping, Sequence
import glob
import os
from typing import Any

import numpy as np

from vqlm import imaging
from vqlm.eval.captions import captions_match
from vqlm.report import tables
from vqlm.report.common import (
  GRID_PAD,
  esc,
  files_by_step,
  img,
  missing,
  note,
  pct,
  pick,
  read_json,
  step_of,
  upscale,
)
from vqlm.report.figures import (
  codebook_projection_figure,
  curves,
  last_values_table,
  metric_panels,
  series,
)

# Grids of latents drawn without an input image, decoded, that the `reconstruction` evaluator
# leaves in a continuous tokenizer's `samples/`: (file stem, title, bottleneck, what it shows).
PRIOR_GRIDS = (
  ("prior_samples", "Prior samples", "gaussian", "latents drawn from the prior N(0, I)"),
  (
    "random_latents",
    "Random latents",
    "identity",
    "Gaussian noise with the per-channel mean and std of the test latents",
  ),
)
MAX_OTHER_GRIDS = 12


# ---- curves ----------------------------------------------------------------------------------


def _lm_notes(rows: Sequence[Mapping[str, Any]]) -> str:
  last = {}
  for key in ("valid/text_perplexity", "valid/image_perplexity"):
    steps, values = series(rows, key)
    if steps.size:
      last[key.split("/")[1].replace("_", " ")] = (int(steps[-1]), values[-1])
  _, speed = series(rows, "train/num_tokens_per_sec")
  notes = [f"{name} {v:.2f} (step {s})" for name, (s, v) in last.items()]
  if speed.size:
    notes.append(f"median throughput {np.median(speed):,.0f} tokens/s")
  return note(f"Last validation: {esc('; '.join(notes))}.") if notes else ""


def losses_section(
  tok_rows: Sequence[Mapping[str, Any]], lm_rows: Sequence[Mapping[str, Any]]
) -> str:
  """The demo's curves: LM per-modality train/valid losses and accuracies; tokenizer loss, PSNR."""
  lm = curves(
    lm_rows,
    [
      ("total loss", [("train/loss", "train"), ("valid/loss", "valid")]),
      ("text loss", [("train/text_loss", "train"), ("valid/text_loss", "valid")]),
      ("image loss", [("train/image_loss", "train"), ("valid/image_loss", "valid")]),
      ("next-token accuracy", [("train/text_acc", "text"), ("train/image_acc", "image")]),
    ],
    "language model losses",
  )
  out = ["<h3>Language model</h3>"]
  out.append(lm + _lm_notes(lm_rows) if lm is not None else missing("LM training metrics"))
  out.append("<h3>Image tokenizer</h3>")
  tok = curves(
    tok_rows,
    [
      ("loss", [("train/loss", "total"), ("train/recon_loss", "reconstruction")]),
      ("PSNR (dB)", [("train/psnr", "train batch"), ("valid/psnr_grid", "valid grid")]),
    ],
    "tokenizer losses",
  )
  out.append(tok if tok is not None else missing("Tokenizer training metrics"))
  return "".join(out)


def run_losses_section(
  rows: Sequence[Mapping[str, Any]], stage: str, *, elsewhere: Sequence[str] = ()
) -> str:
  """Every metric a run logged to metrics.jsonl but those plotted `elsewhere` (names without
  prefix): one panel per metric, train and validation together, then the last values."""
  figure = curves(rows, metric_panels(rows, elsewhere), f"{stage} training metrics", columns=4)
  if figure is None:
    return missing("Training metrics")
  out = [figure, "<h3>Last values</h3>", last_values_table(rows)]
  if stage == "lm":
    out.append(_lm_notes(rows))
  else:
    _, speed = series(rows, "train/steps_per_sec")
    if speed.size:
      out.append(note(f"Median speed {np.median(speed):.2f} steps/s."))
  return "".join(out)


# ---- codebook --------------------------------------------------------------------------------


# Metrics the codebook section plots (`codebook_section`).
CODEBOOK_METRICS = ("usage", "perplexity", "dead_codes")


def codebook_section(
  tok_rows: Sequence[Mapping[str, Any]], samples_dir: str, max_panels: int = 4
) -> str:
  out = ["<h3>Usage over training</h3>"]
  usage = curves(
    tok_rows,
    [
      ("codebook usage (fraction used)", [("train/usage", "usage")]),
      ("perplexity", [("train/perplexity", "perplexity")]),
      ("dead codes", [("train/dead_codes", "dead codes")]),
    ],
    "codebook usage",
  )
  out.append(usage if usage is not None else missing("Codebook usage metrics"))
  out.append("<h3>How the code words divide the latent space</h3>")
  paths = pick(files_by_step(os.path.join(samples_dir, "codebook_*.npy")), max_panels)
  snapshots = []
  for path in paths:
    try:
      vectors = np.load(path)
    except (OSError, ValueError):
      continue
    if vectors.ndim == 2 and vectors.shape[0]:
      snapshots.append((step_of(path), vectors))
  if not snapshots:
    out.append(missing("Codebook snapshots"))
    return "".join(out)
  k, d = snapshots[-1][1].shape
  out.append(codebook_projection_figure(snapshots))
  out.append(
    note(
      f"{k} code vectors of dimension {d} at {len(snapshots)} points of training, projected on "
      "the two principal components of the final codebook (the same projection in every panel "
      "and shared axes). The coloured cells are the Voronoi cells of the projected codes: each "
      "point of the plane is coloured by its nearest code word."
    )
  )
  if all(np.array_equal(snapshots[0][1], snap) for _, snap in snapshots[1:]):
    out.append(
      note(
        "The code words did not move during training: the codebook is fixed (FSQ's grid of "
        "levels), and training only chose which of them the encoder uses (usage above)."
      )
    )
  return "".join(out)


# ---- images ----------------------------------------------------------------------------------


def _load_png(path: str) -> np.ndarray | None:
  try:
    return imaging.load_png(path)
  except (OSError, ValueError):
    return None


def reconstructions_section(samples_dir: str) -> str:
  paths = files_by_step(os.path.join(samples_dir, "recon_*.png"))
  if not paths:
    return missing("Reconstruction grids")
  shown = [paths[-1]] if len(paths) == 1 else [paths[-1], paths[0]]
  out = [note("Top row: validation inputs; bottom row: their reconstructions.")]
  for path, what in zip(shown, ("latest", "first")):
    step = step_of(path)
    out.append(f"<h3>Step {step} ({what})</h3>")
    grid = _load_png(path)
    out.append(img(grid, f"reconstructions at step {step}") if grid is not None else "&ndash;")
  return "".join(out)


def prior_section(samples_dir: str, kind: str | None) -> str:
  """The decoded prior draws of a continuous bottleneck (`samples/prior_samples.png` of a VAE,
  `samples/random_latents.png` of an autoencoder); `kind`: the bottleneck, None if unknown."""
  if kind in tables.DISCRETE_BOTTLENECKS:
    return note(
      f"Decoded prior grids are made for continuous bottlenecks; this tokenizer's codes are "
      f"discrete ({esc(kind)}): their prior is the LM."
    )
  out = []
  for stem, title, bottleneck, what in PRIOR_GRIDS:
    path = os.path.join(samples_dir, f"{stem}.png")
    if kind not in (None, bottleneck) and not os.path.exists(path):
      continue  # The other continuous bottleneck's grid.
    grid = _load_png(path) if os.path.exists(path) else None
    out.append(f"<h3>{esc(title)}</h3>")
    if grid is None:
      out.append(missing(title))
      continue
    out.append(note(f"Images decoded from {esc(what)}.") + img(grid, title))
  return "".join(out)


def split_grid_rows(grid: np.ndarray, rows: int, pad: int = GRID_PAD) -> list[np.ndarray] | None:
  """Cuts a `make_grid` image of `rows` rows of square cells into row strips; None if the grid's
  size does not fit `rows` rows of square cells."""
  h, w = grid.shape[:2]
  if rows <= 0 or (h - pad) % rows:
    return None
  cell = (h - pad) // rows - pad
  if cell <= 0 or (w - pad) % (cell + pad):
    return None
  return [grid[r * (cell + pad) : (r + 1) * (cell + pad) + pad] for r in range(rows)]


def prompt_rows(samples_dir: str, name: str, title: str) -> str:
  """`samples/NAME.png` (one row of images per prompt) beside the prompts of `NAME.json`."""
  png = os.path.join(samples_dir, f"{name}.png")
  prompts = read_json(os.path.join(samples_dir, f"{name}.json"))
  out = [f"<h3>{esc(title)}</h3>"]
  grid = _load_png(png) if os.path.exists(png) else None
  if grid is None:
    return out[0] + missing(title)
  prompts = [str(p) for p in prompts] if isinstance(prompts, list) else []
  strips = split_grid_rows(grid, len(prompts)) if prompts else None
  if strips is None:
    out.append(img(grid, title))
    if prompts:
      out.append("<ol>" + "".join(f"<li>{esc(p)}</li>" for p in prompts) + "</ol>")
    return "".join(out)
  out.append('<table><tr><th class="text">prompt</th><th class="text">generated images</th></tr>')
  for prompt, strip in zip(prompts, strips):
    out.append(
      f'<tr><td class="text">{esc(prompt)}</td><td class="text">{img(strip, prompt)}</td></tr>'
    )
  out.append("</table>")
  return "".join(out)


def prompt_grid_names(samples_dir: str) -> list[str]:
  """The text-to-image grids in `samples_dir`: `NAME.png` next to a `NAME.json` list of prompts."""
  names = []
  for path in sorted(glob.glob(os.path.join(samples_dir, "*.json"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if os.path.exists(os.path.join(samples_dir, f"{name}.png")) and isinstance(
      read_json(path), list
    ):
      names.append(name)
  return names


def text_to_image_section(samples_dir: str, extra: bool = False) -> str:
  """The test and held-out prompt grids; with `extra`, every other prompt grid too."""
  out = prompt_rows(samples_dir, "text_to_image", "Test prompts") + prompt_rows(
    samples_dir,
    "text_to_image_heldout",
    "Held-out prompts (colour-shape pairs never seen in training)",
  )
  if extra:
    for name in prompt_grid_names(samples_dir):
      if name not in ("text_to_image", "text_to_image_heldout"):
        out += prompt_rows(samples_dir, name, f"Prompts: {name}")
  return out


def image_to_text_section(samples_dir: str, scale: int = 3) -> str:
  captions = read_json(os.path.join(samples_dir, "captions.json"))
  captions = [c for c in captions if isinstance(c, Mapping)] if isinstance(captions, list) else []
  if not captions:
    return missing("Captions")
  images_path = os.path.join(samples_dir, "caption_images.npy")
  try:
    images = np.load(images_path) if os.path.exists(images_path) else None
  except (OSError, ValueError):
    images = None
  if images is None or images.ndim != 4:
    images = np.zeros((0, 1, 1, 3), np.uint8)
  matches = [captions_match(str(c.get("truth", "")), str(c.get("caption", ""))) for c in captions]
  out = [
    f"<p>{sum(matches)} of {len(matches)} generated captions describe the same scene as the "
    f"true caption ({pct(np.mean(matches))}).</p>"
  ]
  shown = len(images) if len(images) else min(len(captions), 20)
  out.append(
    '<table><tr><th>#</th><th>image</th><th class="text">true caption</th>'
    '<th class="text">generated caption</th><th>match</th></tr>'
  )
  for i in range(min(shown, len(captions))):
    entry, ok = captions[i], matches[i]
    image = img(upscale(images[i], scale), f"test image {i}") if i < len(images) else "&ndash;"
    mark = '<span class="ok">&#10003;</span>' if ok else '<span class="bad">&#10007;</span>'
    out.append(
      f"<tr><td>{i}</td><td>{image}</td>"
      f'<td class="text">{esc(entry.get("truth", ""))}</td>'
      f'<td class="text">{esc(entry.get("caption", ""))}</td><td>{mark}</td></tr>'
    )
  out.append("</table>")
  return "".join(out)


def other_grids_section(samples_dir: str, skip: Sequence[str] = ()) -> str:
  """The PNG grids at the top of `samples_dir` that no other section showed (newest last)."""
  paths = [
    p
    for p in sorted(glob.glob(os.path.join(samples_dir, "*.png")))
    if os.path.splitext(os.path.basename(p))[0] not in skip
  ]
  if not paths:
    return missing("Other sample grids")
  out = []
  if len(paths) > MAX_OTHER_GRIDS:
    out.append(note(f"The last {MAX_OTHER_GRIDS} of {len(paths)} grids by name."))
    paths = paths[-MAX_OTHER_GRIDS:]
  for path in paths:
    grid = _load_png(path)
    name = os.path.basename(path)
    out.append(f"<h3>{esc(name)}</h3>" + (img(grid, name) if grid is not None else "&ndash;"))
  return "".join(out)
