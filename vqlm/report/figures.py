"""The report's figures: training curves from `metrics.jsonl` and codebook projections."""

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
import numpy as np
from scipy.spatial import cKDTree  # scipy comes with scikit-learn and scikit-image.

from vqlm.errors import UserError
from vqlm.report.common import esc, figure_img, is_number

# Metrics that are bookkeeping rather than curves (throughput is summarised in a note instead).
NOT_PLOTTED = ("skipped", "num_tokens", "steps_per_sec", "num_tokens_per_sec")
PREFIX_ORDER = ("train", "valid")


# ---- curves ----------------------------------------------------------------------------------


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pts = [(r["step"], r[key]) for r in rows if is_number(r.get("step")) and is_number(r.get(key))]
  if not pts:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def curves(
  rows: Sequence[Mapping[str, Any]],
  panels: Sequence[tuple[str, Sequence[tuple[str, str]]]],
  alt: str,
  *,
  columns: int | None = None,
) -> str | None:
  """One subplot per panel (title, [(metric key, legend label)]), in one row or in rows of
  `columns`; None when nothing to plot."""
  panels = [
    (title, [(k, lab) for k, lab in lines if series(rows, k)[0].size]) for title, lines in panels
  ]
  panels = [(title, lines) for title, lines in panels if lines]
  if not panels:
    return None
  cols = min(columns or len(panels), len(panels))
  nrows = -(-len(panels) // cols)
  fig = Figure(figsize=(3.6 * cols, 3.0 * nrows))
  for i, (title, lines) in enumerate(panels):
    ax = fig.add_subplot(nrows, cols, i + 1)
    for key, label in lines:
      steps, values = series(rows, key)
      marker = "o" if key.startswith("valid/") or steps.size < 3 else None
      ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return figure_img(fig, alt)


def _split(key: str) -> tuple[str, str]:
  """ "train/text_loss" -> ("train", "text_loss"); a key without a prefix has prefix ""."""
  prefix, _, name = key.rpartition("/")
  return prefix, name


def _name_order(name: str) -> tuple[int, str]:
  """The total loss first, then the other losses, PSNR, accuracies, perplexities, the rest."""
  for rank, test in enumerate(
    (
      lambda n: n == "loss",
      lambda n: n.endswith("loss"),
      lambda n: "psnr" in n,
      lambda n: n.endswith("acc"),
      lambda n: "perplexity" in n,
    )
  ):
    if test(name):
      return rank, name
  return 5, name


def _prefix_order(prefix: str) -> tuple[int, str]:
  return (PREFIX_ORDER.index(prefix) if prefix in PREFIX_ORDER else len(PREFIX_ORDER), prefix)


def metric_names(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
  """Every plotted metric name of `metrics.jsonl` -> the prefixes it was logged under
  ("train", "valid", ...), in display order."""
  names: dict[str, set[str]] = {}
  for row in rows:
    for key, value in row.items():
      prefix, name = _split(key)
      if key == "step" or name in NOT_PLOTTED or not is_number(value):
        continue
      names.setdefault(name, set()).add(prefix)
  return {name: sorted(names[name], key=_prefix_order) for name in sorted(names, key=_name_order)}


def metric_panels(
  rows: Sequence[Mapping[str, Any]], exclude: Sequence[str] = ()
) -> list[tuple[str, list[tuple[str, str]]]]:
  """One panel per metric name (but those in `exclude`) with a line per prefix: train and
  validation side by side."""
  return [
    (name.replace("_", " "), [(f"{p}/{name}" if p else name, p or name) for p in prefixes])
    for name, prefixes in metric_names(rows).items()
    if name not in exclude
  ]


def last_values_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Metric x prefix: the last value logged and its step."""
  names = metric_names(rows)
  prefixes = sorted({p for ps in names.values() for p in ps}, key=_prefix_order)
  head = "".join(f"<th>{esc(p or 'value')} (step)</th>" for p in prefixes)
  out = [f'<table><tr><th class="text">metric</th>{head}</tr>']
  for name, logged in names.items():
    cells = []
    for p in prefixes:
      steps, values = series(rows, f"{p}/{name}" if p else name)
      cells.append(
        f"<td>{values[-1]:.4g} ({int(steps[-1])})</td>"
        if p in logged and steps.size
        else "<td>&ndash;</td>"
      )
    out.append(f'<tr><th class="text">{esc(name)}</th>{"".join(cells)}</tr>')
  return "".join(out) + "</table>"


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
  return figure_img(fig, "codebook projections")
