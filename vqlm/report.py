"""A self-contained HTML report of a demo run: `WORKDIR/report.html`.

Reads what the demo stages leave in WORKDIR (see `vqlm.demo`): `eval.json`, `tokenizer/` and `lm/`
metrics (`metrics.jsonl`), the tokenizer's reconstruction grids and codebook snapshots, and the
generated samples. Every image is inlined as a base64 PNG data URI and the only styling is an
inline <style> block: the file has no external links, scripts or fonts and can be viewed offline.
Anything a stage did not produce is reported as "not run".

Sections (each an <h2> with a stable id): summary, losses, codebook, reconstructions,
text-to-image, image-to-text.
"""

import base64
from collections.abc import Mapping, Sequence
import glob
import html
import io
import json
import math
import os
import re
from typing import Any

# Figures are drawn on the Agg canvas directly (no pyplot: no global figure state to close).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
import numpy as np
from PIL import Image
from scipy.spatial import cKDTree  # scipy comes with scikit-learn and scikit-image.

from vqlm import imaging
from vqlm.errors import UserError
from vqlm.eval.captions import captions_match
from vqlm.train.metrics import read_metrics

SECTIONS = (
  ("summary", "Summary"),
  ("losses", "Losses"),
  ("codebook", "Codebook"),
  ("reconstructions", "Reconstructions"),
  ("text-to-image", "Text to image"),
  ("image-to-text", "Image to text"),
)
NOT_RUN = "not run"
GRID_PAD = 2  # `imaging.make_grid`'s default padding, used by the demo's sample grids.

_STYLE = """
body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;padding-top:.6em}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:middle}
td.text,th.text{text-align:left}
img{image-rendering:pixelated;max-width:100%}
.missing{color:#999;font-style:italic}
.ok{color:#080;font-weight:bold}
.bad{color:#b00;font-weight:bold}
nav a{margin-right:1em}
.note{color:#555;font-size:.9em}
"""

# (key in the scene-parser metrics, label): scene-level rates, then object-level accuracies.
_SCENE_METRICS = (
  ("scene", "whole scene right"),
  ("count", "object count right"),
  ("position", "all positions right"),
  ("color", "all colours right"),
  ("shape", "all shapes right"),
  ("size", "all sizes right"),
  ("position_acc", "objects found at their position"),
  ("color_acc", "colour accuracy (per object)"),
  ("shape_acc", "shape accuracy (per object)"),
  ("size_acc", "size accuracy (per object)"),
)


# ---- small helpers ---------------------------------------------------------------------------


def _esc(value: Any) -> str:
  return html.escape(str(value), quote=True)


def _missing(what: str) -> str:
  return f'<p class="missing">{_esc(what)}: {NOT_RUN}.</p>'


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
  return f"{100.0 * value:.1f}%" if _is_number(value) else "&ndash;"


def _num(value: Any, digits: int = 3) -> str:
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  return f"{value:.{digits}f}" if _is_number(value) else "&ndash;"


def png_data_uri(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> "data:image/png;base64,..."."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: np.ndarray, alt: str) -> str:
  return f'<img src="{png_data_uri(image)}" alt="{_esc(alt)}">'


def _figure_img(fig: Figure, alt: str) -> str:
  """Renders a matplotlib figure (Agg) to an inlined <img>."""
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  fig.clf()
  data = base64.b64encode(buf.getvalue()).decode("ascii")
  return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _step_of(path: str) -> int:
  match = re.search(r"_(\d+)\.\w+$", os.path.basename(path))
  return int(match.group(1)) if match else -1


def _files_by_step(pattern: str) -> list[str]:
  return sorted(glob.glob(pattern), key=_step_of)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
  return np.asarray(image).repeat(factor, axis=0).repeat(factor, axis=1)


# ---- summary ---------------------------------------------------------------------------------


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
  body = "".join(f'<tr><th class="text">{_esc(k)}</th><td>{v}</td></tr>' for k, v in rows)
  return f"<table>{body}</table>"


def _tokenizer_summary(tok: Mapping[str, Any] | None) -> str:
  if not tok:
    return "<h3>Image tokenizer</h3>" + _missing("Tokenizer evaluation")
  rows = [
    ("PSNR", f"{_num(tok.get('psnr'), 2)} dB"),
    ("SSIM", _num(tok.get("ssim"))),
    ("codebook usage", _pct(tok.get("codebook_usage"))),
    ("codebook perplexity", _num(tok.get("codebook_perplexity"), 1)),
    ("dead codes", _num(tok.get("dead_codes"), 0)),
    (
      "scene agreement (recon parses as the original)",
      _pct(tok["scene_agreement"]) if "scene_agreement" in tok else NOT_RUN,
    ),
    (
      "scene agreement on held-out colour-shape pairs",
      _pct(tok["heldout_scene_agreement"]) if "heldout_scene_agreement" in tok else NOT_RUN,
    ),
  ]
  where = ", ".join(f"{k} {_esc(tok[k])}" for k in ("split", "num_examples", "step") if k in tok)
  note = f'<p class="note">Evaluated on {where}.</p>' if where else ""
  return "<h3>Image tokenizer</h3>" + _kv_table(rows) + note


def _group_order(key: str) -> tuple[int, str]:
  match = re.match(r"(\d+)_objects$", key)
  return (int(match.group(1)) if match else 1 << 30, key)


def _group_label(key: str) -> str:
  """A `by_objects` key as a column label: 1_objects -> 1 object, 2_objects -> 2 objects."""
  match = re.match(r"(\d+)_objects$", key)
  if not match:
    return key.replace("_", " ")
  n = int(match.group(1))
  return f"{n} object" + ("" if n == 1 else "s")


def _scene_table(metrics: Mapping[str, Any], *, extra: Sequence[tuple[str, str]] = ()) -> str:
  """Scene-parser metrics: overall and split by object count (`by_objects`)."""
  by = metrics.get("by_objects") or {}
  cols = [("all", metrics)] + [(_group_label(k), by[k]) for k in sorted(by, key=_group_order)]
  head = "".join(f"<th>{_esc(name)}</th>" for name, _ in cols)
  rows = [f'<tr><th class="text">metric</th>{head}</tr>']
  num_row = [_num(m.get("num_images", m.get("num")), 0) for _, m in cols]
  rows.append(
    '<tr><th class="text">images</th>' + "".join(f"<td>{v}</td>" for v in num_row) + "</tr>"
  )
  for key, label in tuple(extra) + _SCENE_METRICS:
    if not any(key in m for _, m in cols):
      continue
    cells = "".join(f"<td>{_pct(m.get(key))}</td>" for _, m in cols)
    rows.append(f'<tr><th class="text">{_esc(label)}</th>{cells}</tr>')
  return "<table>" + "".join(rows) + "</table>"


def _generation_summary(ev: Mapping[str, Any]) -> str:
  out = []
  for section, title in (
    ("text_to_image", "Text to image (test prompts)"),
    ("text_to_image_heldout", "Text to image (held-out colour-shape pairs)"),
    ("image_to_text", "Image to text (test images)"),
  ):
    out.append(f"<h3>{_esc(title)}</h3>")
    metrics = ev.get(section)
    if not metrics:
      out.append(_missing(title))
      continue
    extra = (("parseable", "captions that parse"),) if section == "image_to_text" else ()
    out.append(_scene_table(metrics, extra=extra))
    settings = metrics.get("settings")
    if isinstance(settings, Mapping) and settings:
      text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
      out.append(f'<p class="note">Sampling: {_esc(text)}.</p>')
  return "".join(out)


def _scene_fd_summary(fd: Mapping[str, Any] | None) -> str:
  if not fd:
    return "<h3>Scene Fréchet distance</h3>" + _missing("Scene FD")
  rows = [
    ("generated vs test images", _num(fd.get("generated_vs_test"), 2)),
    ("images", _num(fd.get("num_images"), 0)),
  ]
  return (
    "<h3>Scene Fréchet distance</h3>"
    + _kv_table(rows)
    + '<p class="note">Fréchet distance over scene-parser features (lower is better).</p>'
  )


def _timings_summary(timings: Mapping[str, Any] | None) -> str:
  if not timings:
    return "<h3>Timings</h3>" + _missing("Timings")
  rows = [
    (k, f"{v:.0f} s" if _is_number(v) else _esc(v))
    for k, v in timings.items()
    if k not in ("total", "preset")
  ]
  if "total" in timings:
    rows.append(
      (
        "total",
        f"{timings['total']:.0f} s" if _is_number(timings["total"]) else _esc(timings["total"]),
      )
    )
  if "preset" in timings:
    rows.append(("preset", _esc(timings["preset"])))
  return "<h3>Timings</h3>" + _kv_table(rows)


def summary_section(ev: Mapping[str, Any]) -> str:
  """The evaluation tables from `eval.json`; missing sections read "not run"."""
  return (
    _tokenizer_summary(ev.get("tokenizer"))
    + _generation_summary(ev)
    + _scene_fd_summary(ev.get("scene_fd"))
    + _timings_summary(ev.get("timings"))
  )


# ---- curves ----------------------------------------------------------------------------------


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r["step"], r[key]) for r in rows if "step" in r and _is_number(r.get(key))]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _curves(
  rows: Sequence[Mapping[str, Any]],
  panels: Sequence[tuple[str, Sequence[tuple[str, str]]]],
  alt: str,
) -> str | None:
  """One subplot per panel (title, [(metric key, legend label)]); None when nothing to plot."""
  panels = [
    (title, [(k, lab) for k, lab in lines if _series(rows, k)[0].size]) for title, lines in panels
  ]
  panels = [(title, lines) for title, lines in panels if lines]
  if not panels:
    return None
  fig = Figure(figsize=(3.6 * len(panels), 3.0))
  for i, (title, lines) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for key, label in lines:
      steps, values = _series(rows, key)
      marker = "o" if key.startswith("valid/") or steps.size < 3 else None
      ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _figure_img(fig, alt)


def losses_section(
  tok_rows: Sequence[Mapping[str, Any]], lm_rows: Sequence[Mapping[str, Any]]
) -> str:
  """LM per-modality train/valid losses and accuracies; tokenizer loss and PSNR."""
  out = ["<h3>Language model</h3>"]
  lm = _curves(
    lm_rows,
    [
      ("total loss", [("train/loss", "train"), ("valid/loss", "valid")]),
      ("text loss", [("train/text_loss", "train"), ("valid/text_loss", "valid")]),
      ("image loss", [("train/image_loss", "train"), ("valid/image_loss", "valid")]),
      ("next-token accuracy", [("train/text_acc", "text"), ("train/image_acc", "image")]),
    ],
    "language model losses",
  )
  if lm is None:
    out.append(_missing("LM training metrics"))
  else:
    out.append(lm)
    last = {}
    for key in ("valid/text_perplexity", "valid/image_perplexity"):
      steps, values = _series(lm_rows, key)
      if steps.size:
        last[key.split("/")[1].replace("_", " ")] = (int(steps[-1]), values[-1])
    _, speed = _series(lm_rows, "train/num_tokens_per_sec")
    notes = [f"{name} {v:.2f} (step {s})" for name, (s, v) in last.items()]
    if speed.size:
      notes.append(f"median throughput {np.median(speed):,.0f} tokens/s")
    if notes:
      out.append(f'<p class="note">Last validation: {_esc("; ".join(notes))}.</p>')
  out.append("<h3>Image tokenizer</h3>")
  tok = _curves(
    tok_rows,
    [
      ("loss", [("train/loss", "total"), ("train/recon_loss", "reconstruction")]),
      ("PSNR (dB)", [("train/psnr", "train batch"), ("valid/psnr_grid", "valid grid")]),
    ],
    "tokenizer losses",
  )
  out.append(tok if tok is not None else _missing("Tokenizer training metrics"))
  return "".join(out)


# ---- codebook --------------------------------------------------------------------------------


def pca_basis(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """PCA of codebook vectors [K, D] (numpy SVD) -> (mean [D], components [2, D]).

  With D < 2 (or a rank-1 codebook) the missing components are zero rows.
  """
  x = np.asarray(vectors, np.float64)
  if x.ndim != 2 or x.shape[0] == 0:
    raise UserError(f"expected codebook vectors [K, D], got shape {x.shape}")
  mean = x.mean(axis=0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  comps = np.zeros((2, x.shape[1]))
  comps[: min(2, vt.shape[0])] = vt[:2]
  return mean, comps


def nearest_code_image(
  points: np.ndarray, extent: tuple[float, float, float, float], resolution: int = 200
) -> np.ndarray:
  """Index of the nearest point [K, 2] at every pixel of the plane -> int [res, res] (row 0 at the
  bottom, `extent` = (xmin, xmax, ymin, ymax)): the Voronoi cells of the points, rasterised."""
  xs = np.linspace(extent[0], extent[1], resolution)
  ys = np.linspace(extent[2], extent[3], resolution)
  grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
  _, labels = cKDTree(np.asarray(points, np.float64)).query(grid)
  return np.asarray(labels, np.int64).reshape(resolution, resolution)


def _cells_rgb(labels: np.ndarray) -> np.ndarray:
  """Pastel colour per cell, dark cell boundaries -> float RGB [H, W, 3]."""
  k = int(labels.max()) + 1
  hues = (np.arange(k) * 0.6180339887) % 1.0
  palette = hsv_to_rgb(np.stack([hues, np.full(k, 0.35), np.ones(k)], axis=-1))
  rgb = palette[labels]
  edge = np.zeros(labels.shape, bool)
  edge[1:] |= labels[1:] != labels[:-1]
  edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
  rgb[edge] = 0.35
  return rgb


def codebook_projection_figure(snapshots: Sequence[tuple[int, np.ndarray]]) -> str:
  """One panel per (step, codebook [K, D]): PCA fitted on the last snapshot, applied to all."""
  mean, comps = pca_basis(snapshots[-1][1])
  projected = [(step, (np.asarray(v, np.float64) - mean) @ comps.T) for step, v in snapshots]
  allp = np.concatenate([p for _, p in projected])
  lo, hi = allp.min(axis=0), allp.max(axis=0)
  margin = np.maximum((hi - lo) * 0.08, 1e-3)
  extent = (lo[0] - margin[0], hi[0] + margin[0], lo[1] - margin[1], hi[1] + margin[1])
  fig = Figure(figsize=(3.2 * len(projected), 3.3))
  for i, (step, pts) in enumerate(projected):
    ax = fig.add_subplot(1, len(projected), i + 1)
    ax.imshow(
      _cells_rgb(nearest_code_image(pts, extent)),
      extent=extent,
      origin="lower",
      aspect="auto",
      interpolation="nearest",
    )
    ax.scatter(pts[:, 0], pts[:, 1], s=4 if len(pts) > 256 else 9, c="k", linewidths=0)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(f"step {step}", fontsize=10)
    ax.tick_params(labelsize=7)
    if i == 0:
      ax.set_ylabel("PC 2", fontsize=8)
    ax.set_xlabel("PC 1", fontsize=8)
  fig.tight_layout()
  return _figure_img(fig, "codebook projections")


def _pick(items: Sequence[Any], count: int) -> list[Any]:
  """Up to `count` items evenly spaced, always the first and the last."""
  if len(items) <= count:
    return list(items)
  idx = np.unique(np.round(np.linspace(0, len(items) - 1, count)).astype(int))
  return [items[i] for i in idx]


def codebook_section(
  tok_rows: Sequence[Mapping[str, Any]], samples_dir: str, max_panels: int = 4
) -> str:
  out = ["<h3>Usage over training</h3>"]
  usage = _curves(
    tok_rows,
    [
      ("codebook usage (fraction used)", [("train/usage", "usage")]),
      ("perplexity", [("train/perplexity", "perplexity")]),
      ("dead codes", [("train/dead_codes", "dead codes")]),
    ],
    "codebook usage",
  )
  out.append(usage if usage is not None else _missing("Codebook usage metrics"))
  out.append("<h3>How the code words divide the latent space</h3>")
  paths = _pick(_files_by_step(os.path.join(samples_dir, "codebook_*.npy")), max_panels)
  if not paths:
    out.append(_missing("Codebook snapshots"))
    return "".join(out)
  snapshots = [(_step_of(p), np.load(p)) for p in paths]
  k, d = snapshots[-1][1].shape
  out.append(codebook_projection_figure(snapshots))
  out.append(
    f'<p class="note">{k} code vectors of dimension {d} at {len(snapshots)} points of training, '
    "projected on the two principal components of the final codebook (the same projection in "
    "every panel and shared axes). The coloured cells are the Voronoi cells of the projected "
    "codes: each point of the plane is coloured by its nearest code word.</p>"
  )
  if all(np.array_equal(snapshots[0][1], snap) for _, snap in snapshots[1:]):
    out.append(
      '<p class="note">The code words did not move during training: the codebook is '
      "fixed (FSQ's grid of levels), and training only chose which of them the encoder "
      "uses (usage above).</p>"
    )
  return "".join(out)


# ---- images ----------------------------------------------------------------------------------


def reconstructions_section(samples_dir: str) -> str:
  paths = _files_by_step(os.path.join(samples_dir, "recon_*.png"))
  if not paths:
    return _missing("Reconstruction grids")
  shown = [paths[-1]] if len(paths) == 1 else [paths[-1], paths[0]]
  out = ['<p class="note">Top row: validation inputs; bottom row: their reconstructions.</p>']
  for path, what in zip(shown, ("latest", "first")):
    step = _step_of(path)
    out.append(f"<h3>Step {step} ({what})</h3>")
    out.append(_img(imaging.load_png(path), f"reconstructions at step {step}"))
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


def _prompt_rows(samples_dir: str, name: str, title: str) -> str:
  png = os.path.join(samples_dir, f"{name}.png")
  prompts = _read_json(os.path.join(samples_dir, f"{name}.json"))
  out = [f"<h3>{_esc(title)}</h3>"]
  if not os.path.exists(png):
    return out[0] + _missing(title)
  grid = imaging.load_png(png)
  prompts = [str(p) for p in prompts] if isinstance(prompts, list) else []
  strips = split_grid_rows(grid, len(prompts)) if prompts else None
  if strips is None:
    out.append(_img(grid, title))
    if prompts:
      out.append("<ol>" + "".join(f"<li>{_esc(p)}</li>" for p in prompts) + "</ol>")
    return "".join(out)
  out.append('<table><tr><th class="text">prompt</th><th class="text">generated images</th></tr>')
  for prompt, strip in zip(prompts, strips):
    out.append(
      f'<tr><td class="text">{_esc(prompt)}</td><td class="text">{_img(strip, prompt)}</td></tr>'
    )
  out.append("</table>")
  return "".join(out)


def text_to_image_section(samples_dir: str) -> str:
  return _prompt_rows(samples_dir, "text_to_image", "Test prompts") + _prompt_rows(
    samples_dir,
    "text_to_image_heldout",
    "Held-out prompts (colour-shape pairs never seen in training)",
  )


def image_to_text_section(samples_dir: str, scale: int = 3) -> str:
  captions = _read_json(os.path.join(samples_dir, "captions.json"))
  if not captions:
    return _missing("Captions")
  images_path = os.path.join(samples_dir, "caption_images.npy")
  images = np.load(images_path) if os.path.exists(images_path) else np.zeros((0, 1, 1, 3), np.uint8)
  matches = [captions_match(str(c.get("truth", "")), str(c.get("caption", ""))) for c in captions]
  out = [
    f"<p>{sum(matches)} of {len(matches)} generated captions describe the same scene as the "
    f"true caption ({_pct(np.mean(matches))}).</p>"
  ]
  shown = len(images) if len(images) else min(len(captions), 20)
  out.append(
    '<table><tr><th>#</th><th>image</th><th class="text">true caption</th>'
    '<th class="text">generated caption</th><th>match</th></tr>'
  )
  for i in range(min(shown, len(captions))):
    entry, ok = captions[i], matches[i]
    image = _img(_upscale(images[i], scale), f"test image {i}") if i < len(images) else "&ndash;"
    mark = '<span class="ok">&#10003;</span>' if ok else '<span class="bad">&#10007;</span>'
    out.append(
      f"<tr><td>{i}</td><td>{image}</td>"
      f'<td class="text">{_esc(entry.get("truth", ""))}</td>'
      f'<td class="text">{_esc(entry.get("caption", ""))}</td><td>{mark}</td></tr>'
    )
  out.append("</table>")
  return "".join(out)


# ---- the page --------------------------------------------------------------------------------


def build_report(workdir: str) -> str:
  """The report's HTML text for a demo `workdir`."""
  ev = _read_json(os.path.join(workdir, "eval.json")) or {}
  tok_dir = os.path.join(workdir, "tokenizer")
  tok_rows = read_metrics(tok_dir)
  lm_rows = read_metrics(os.path.join(workdir, "lm"))
  tok_samples = os.path.join(tok_dir, "samples")
  samples = os.path.join(workdir, "samples")
  bodies = {
    "summary": summary_section(ev),
    "losses": losses_section(tok_rows, lm_rows),
    "codebook": codebook_section(tok_rows, tok_samples),
    "reconstructions": reconstructions_section(tok_samples),
    "text-to-image": text_to_image_section(samples),
    "image-to-text": image_to_text_section(samples),
  }
  title = f"vqlm demo report: {os.path.basename(os.path.abspath(workdir))}"
  nav = "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name in SECTIONS)
  parts = [
    "<!DOCTYPE html>",
    '<html lang="en"><head><meta charset="utf-8">',
    f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>",
    f"<h1>{_esc(title)}</h1><nav>{nav}</nav>",
  ]
  for sid, name in SECTIONS:
    parts.append(f'<section><h2 id="{sid}">{_esc(name)}</h2>{bodies[sid]}</section>')
  parts.append("</body></html>")
  return "\n".join(parts)


def write_report(workdir: str) -> str:
  """Writes the self-contained `WORKDIR/report.html` and returns its path."""
  if not os.path.isdir(workdir):
    raise UserError(f"demo workdir '{workdir}' does not exist; run `vqlm demo` first")
  text = build_report(workdir)
  path = os.path.join(workdir, "report.html")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


def save_prompt_figure(
  samples_dir: str, out_path: str, *, name: str = "text_to_image", max_rows: int = 8
) -> str | None:
  """A PNG of prompts (left) beside the images drawn for them (right): the README picture."""
  png = os.path.join(samples_dir, f"{name}.png")
  prompts = _read_json(os.path.join(samples_dir, f"{name}.json"))
  if not os.path.exists(png) or not isinstance(prompts, list) or not prompts:
    return None
  strips = split_grid_rows(imaging.load_png(png), len(prompts))
  if strips is None:
    return None
  rows = min(max_rows, len(strips))
  fig = Figure(figsize=(9, 0.9 * rows), dpi=100)
  for r in range(rows):
    text_ax = fig.add_axes([0.0, 1 - (r + 1) / rows, 0.55, 1 / rows])
    text_ax.axis("off")
    text_ax.text(0.98, 0.5, str(prompts[r]), ha="right", va="center", fontsize=9, wrap=True)
    image_ax = fig.add_axes([0.56, 1 - (r + 1) / rows, 0.44, 1 / rows])
    image_ax.axis("off")
    image_ax.imshow(strips[r], interpolation="nearest")
  FigureCanvasAgg(fig).print_png(out_path)
  return out_path
