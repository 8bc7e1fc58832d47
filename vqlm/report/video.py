"""The video demo's page: `WORKDIR/video.html` from `WORKDIR/video.json` (`vqlm.demo.video`), the
mixed LM's `metrics.jsonl` and the evaluators' artefacts in `WORKDIR/samples/<model>/`, every
image inlined.

One table compares the main demo's LM with the mixed LM on every measure, against the issue's
bars; then video accuracy per frame offset, video strips (given | generated | true), edit
examples (source | instruction | generated | true, the parser's verdict), the training curves
with the validation loss of each mode, the recipe and the timings.
"""

from collections.abc import Mapping
import os
from typing import Any

from matplotlib.figure import Figure
import numpy as np

from vqlm import imaging
from vqlm.data import shapes
from vqlm.errors import UserError
from vqlm.report.common import (
  GRID_PAD,
  change,
  demo_results,
  demo_timings,
  demo_title,
  esc,
  figure_img,
  html_page,
  img,
  is_number,
  kv_table,
  missing,
  note,
  pct,
  png_data_uri,
  read_json,
  read_metrics,
  seconds,
  table,
  write_text,
)
from vqlm.report.figures import series
from vqlm.report.sections import split_grid_rows

VIDEO_FILE = "video.html"
MODELS = (("main", "main demo LM"), ("mixed", "mixed LM"))
MODES = ("t2i", "i2t", "document", "video", "edit")
MODE_COLOURS = {
  "t2i": "tab:blue",
  "i2t": "tab:orange",
  "document": "tab:purple",
  "video": "tab:green",
  "edit": "tab:red",
}
STAGES = ("encode", "lm", "measure", "report")
SECTIONS = (
  ("table", "Measures against the bars"),
  ("offsets", "Video continuation per frame"),
  ("videos", "Video strips"),
  ("edits", "Edit examples"),
  ("curves", "Training curves"),
  ("recipe", "Recipe"),
  ("timings", "Timings"),
)
# (label, section, key, bar): rows of the comparison table; bar None: shown without a bar.
ROWS = (
  ("next frame, given 3 frames", "video_continuation", "next_frame", 0.95),
  ("third frame, given 3 frames", "video_continuation", "third_frame", 0.85),
  (
    "next frame, given 3 frames and the caption",
    "video_continuation_captioned",
    "next_frame",
    None,
  ),
  (
    "third frame, given 3 frames and the caption",
    "video_continuation_captioned",
    "third_frame",
    None,
  ),
  ("text-to-video, whole clip", "text_to_video", "clip_accuracy", 0.80),
  ("text-to-video, frames", "text_to_video", "frame_accuracy", None),
  ("generated frames, object right anywhere", "video_continuation", "appearance_accuracy", None),
  ("single edits, seen pairs", "edit_test", "accuracy", 0.90),
  ("single edits, held-out pairs", "edit_heldout", "accuracy", 0.70),
  ("edits that leave the source as it was", "edit_test", "unchanged", None),
  ("text-to-image, test prompts", "text_to_image", "scene", 0.97),
  ("image-to-text, test images", "image_to_text", "scene", 0.97),
)
EDIT_SECTIONS = (("edit_test", "test", "seen pairs"), ("edit_heldout", "test_heldout", "held-out"))
VIDEO_SECTIONS = (
  ("video_continuation", "continued from 3 frames"),
  ("video_continuation_captioned", "continued from 3 frames and the caption"),
  ("text_to_video", "drawn from the caption"),
)


def _metric(entry: Mapping[str, Any], section: str, key: str) -> Any:
  return (entry.get(section) or {}).get(key)


def _verdict(value: Any, bar: float | None) -> str:
  if bar is None or not is_number(value):
    return "&ndash;"
  return '<span class="ok">met</span>' if value >= bar else '<span class="bad">not met</span>'


def _comparison(r: Mapping[str, Any]) -> str:
  models = r.get("models") or {}
  shown = [(m, label) for m, label in MODELS if m in models]
  if not shown:
    return missing("measurements")
  rows = []
  for label, section, key, bar in ROWS:
    values = [_metric(models[m], section, key) for m, _ in shown]
    if all(v is None for v in values):
      continue
    cells = [esc(label)]
    for (model, _), value in zip(shown, values):
      cell = pct(value)
      if model == "mixed" and "main" in models and section in ("text_to_image", "image_to_text"):
        before = _metric(models["main"], section, key)
        if is_number(before) and is_number(value):
          cell += change(value, before)
      cells.append(cell)
    mixed = _metric(models.get("mixed") or {}, section, key)
    cells += ["&ge; " + pct(bar) if bar is not None else "&ndash;", _verdict(mixed, bar)]
    rows.append(cells)
  for section, _, what in EDIT_SECTIONS:
    by_kind = _metric(models.get("mixed") or {}, section, "by_kind") or {}
    for kind, value in by_kind.items():  # edit_eval: {kind: accuracy}
      cells = [esc(f"edits, {what}: {kind}")] + [
        "&ndash;" if m == "main" else pct(value) for m, _ in shown
      ]
      rows.append(cells + ["&ndash;", "&ndash;"])
  header = ["measure"] + [label for _, label in shown] + ["bar", "bar met"]
  return table(header, rows) + note(
    "Video: a generated frame is right when the scene parser reads exactly one object of the "
    "clip's colour, shape and size whose top-left corner is within 1 px of the true frame's; a "
    'clip is right when all its frames are ("object right anywhere": colour, shape and size, '
    "position ignored). Edits: the parser reads the edited image as the "
    "true result's scene. Text-to-image and image-to-text: whole-scene rates with the main "
    "demo's sampling settings (in brackets: the change against the main demo's LM, in points). "
    "The main demo's LM never saw a clip or an edit: those rows are the mixed LM's alone."
  )


def _offsets(r: Mapping[str, Any]) -> str:
  mixed = (r.get("models") or {}).get("mixed") or {}
  lines = []
  for section, label in VIDEO_SECTIONS[:2]:
    by = _metric(mixed, section, "accuracy_by_offset") or {}
    if by:
      lines.append((label, by))
  if not lines:
    return missing("video continuation")
  offsets = sorted({int(k) for _, by in lines for k in by})
  header = ["given"] + [f"frame +{k}" for k in offsets]
  rows = [[esc(label)] + [pct(by.get(str(k))) for k in offsets] for label, by in lines]
  return table(header, rows) + note(
    "Share of test clips whose k-th generated frame (after the 3 given ones) is right."
  )


def _left(html: str) -> str:
  """A `table` with every cell left-aligned (text next to images)."""
  return html.replace("<td>", '<td class="text">').replace("<th>", '<th class="text">')


def _shrunk(image: np.ndarray, alt: str) -> str:
  """An inlined image shown at 2/3 of its size (the strips are drawn at 3x)."""
  width = 2 * image.shape[1] // 3
  return f'<img src="{png_data_uri(image)}" alt="{esc(alt)}" width="{width}">'


def _load(path: str) -> np.ndarray | None:
  return imaging.load_png(path) if os.path.exists(path) else None


def _items(data: Any) -> list[Mapping[str, Any]]:
  """The per-item records of an evaluator's artefact JSON list (none when it is not one)."""
  return [d for d in data if isinstance(d, Mapping)] if isinstance(data, list) else []


def _scene_text(scene: Any) -> str:
  """A parsed scene as its caption ("nothing" when empty)."""
  if isinstance(scene, str):
    return scene
  if not isinstance(scene, list):
    return ""
  if not scene:
    return "nothing"
  try:
    return shapes.caption(scene)
  except (UserError, KeyError, TypeError):
    return str(scene)


def _verdict_cell(item: Mapping[str, Any]) -> str:
  """Right or wrong, and what the parser read (edits: the generated scene)."""
  right = item.get("right")
  word = ""
  if isinstance(right, bool):
    word = '<span class="ok">right</span>' if right else '<span class="bad">wrong</span>'
  read = _scene_text(item.get("parsed"))
  return word + (f"<br>read: {esc(read)}" if read else "")


def _grid_rows(grid: np.ndarray, columns: int) -> list[np.ndarray] | None:
  """`grid` (`imaging.make_grid` of square cells, `columns` per row) cut into its rows; None
  when its size does not fit."""
  cell = (grid.shape[1] - GRID_PAD) // max(1, columns)
  if cell <= GRID_PAD:
    return None
  return split_grid_rows(grid, (grid.shape[0] - GRID_PAD) // cell)


def _strips(
  samples: str, name: str, shown: int, columns: int
) -> tuple[list[np.ndarray], list[Mapping]]:
  """The first `shown` rows of `NAME.png` (one item per row of `columns` cells: the first items of
  `NAME.json`) and their records; `([grid], [])` when the grid cannot be cut into rows."""
  grid = _load(os.path.join(samples, f"{name}.png"))
  items = _items(read_json(os.path.join(samples, f"{name}.json")))
  if grid is None:
    return [], []
  rows = _grid_rows(grid, columns)
  if rows is None or not items:
    return [grid], []
  return rows[:shown], items[: min(shown, len(rows))]


def _frame_marks(verdicts: Any, first: int) -> str:
  """Per generated frame: its number, right or wrong (`judge_frame` verdicts)."""
  if not isinstance(verdicts, list):
    return ""
  marks = []
  for t, v in enumerate(verdicts):
    right = isinstance(v, Mapping) and v.get("right")
    cls, word = ("ok", "right") if right else ("bad", "wrong")
    marks.append(f'{first + t + 1}: <span class="{cls}">{word}</span>')
  return "<br>".join(marks)


def _clip_blocks(grid: np.ndarray, frames: int, rows_per_clip: int) -> list[np.ndarray] | None:
  """A `video_eval.strips` image (rows of `frames` cells) cut into one block of `rows_per_clip`
  rows (given, generated, true) per clip."""
  rows = _grid_rows(grid, frames)
  if rows is None or len(rows) % rows_per_clip:
    return None
  return [
    np.concatenate(rows[i : i + rows_per_clip], axis=0) for i in range(0, len(rows), rows_per_clip)
  ]


def _videos(workdir: str, shown: int = 4) -> str:
  samples = os.path.join(workdir, "samples", "mixed")
  parts = []
  for section, label in VIDEO_SECTIONS:
    grid = _load(os.path.join(samples, f"video_{section}.png"))
    if grid is None:
      continue
    data = read_json(os.path.join(samples, f"video_{section}.json"))
    clips = _items(data.get("clips") if isinstance(data, Mapping) else None)
    parts.append(f"<h3>{esc(label)}</h3>")
    blocks = None
    if clips:
      given = int(clips[0].get("given_frames", 0))
      frames = given + len(clips[0].get("verdicts") or [])
      blocks = _clip_blocks(grid, frames, 3 if given else 2)
    if not blocks:
      parts.append(img(grid, label))
      continue
    rows = [
      [esc(clip.get("text", "")), _shrunk(block, label), _frame_marks(clip.get("verdicts"), given)]
      for clip, block in zip(clips[:shown], blocks[:shown])
    ]
    what = "rows: given, generated, true" if given else "rows: generated, true"
    parts.append(_left(table(["caption", what, "generated frames"], rows)))
  if not parts:
    return missing("video strips")
  return note(
    "Time runs left to right (6 frames). Continuation: the first row holds the 3 given frames, "
    "the second the generated frames 4-6, the third the true clip; text-to-video: every frame "
    "generated from the caption above the true clip. Grey: no frame."
  ) + "".join(parts)


def _edits(workdir: str, shown: int = 8) -> str:
  samples = os.path.join(workdir, "samples", "mixed")
  parts = []
  for _, split, label in EDIT_SECTIONS:
    strips, items = _strips(samples, f"edit_{split}", shown, columns=3)
    if not strips:
      continue
    parts.append(f"<h3>{esc(label)} ({esc(split)})</h3>")
    if not items:
      parts.append(img(strips[0], label))
      continue
    rows = [
      [
        esc(item.get("kind", "")),
        esc(item.get("instruction", "")),
        img(strip, label),
        _verdict_cell(item),
      ]
      for item, strip in zip(items, strips)
    ]
    parts.append(
      _left(table(["kind", "instruction", "source | generated | true", "verdict"], rows))
    )
  if not parts:
    return missing("edit examples")
  return "".join(parts)


def _mode_curves(rows: list[Mapping[str, Any]]) -> str | None:
  """Training and validation loss, then the validation loss (all targets, image codes, text) of
  each mode, one colour per mode in every panel; None when nothing was logged."""
  panels = [
    ("loss", [("train/loss", "train", "black"), ("valid/loss", "validation", "grey")]),
    *[
      (f"validation {what} per mode", [(f"valid/{m}_{key}", m, MODE_COLOURS[m]) for m in MODES])
      for what, key in (("loss", "loss"), ("image loss", "image_loss"), ("text loss", "text_loss"))
    ],
  ]
  panels = [(t, [ln for ln in lines if series(rows, ln[0])[0].size]) for t, lines in panels]
  panels = [(t, lines) for t, lines in panels if lines]
  if not panels:
    return None
  fig = Figure(figsize=(3.6 * 2, 3.0 * (-(-len(panels) // 2))))
  for i, (title, lines) in enumerate(panels):
    ax = fig.add_subplot(-(-len(panels) // 2), 2, i + 1)
    for key, label, colour in lines:
      steps, values = series(rows, key)
      marker = "o" if key.startswith("valid/") or steps.size < 3 else None
      ax.plot(steps, values, label=label, color=colour, marker=marker, markersize=3, linewidth=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.set_yscale("log")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return figure_img(fig, "mixed LM curves")


def _curves(workdir: str, r: Mapping[str, Any]) -> str:
  mixed = (r.get("models") or {}).get("mixed") or {}
  figure = _mode_curves(read_metrics(mixed.get("run_dir") or os.path.join(workdir, "lm")))
  if not figure:
    return missing("training curves")
  return figure + note(
    "The mixed LM (log scale). Per mode: the validation loss of that mode's examples only "
    "(valid/&lt;mode&gt;_loss in lm/metrics.jsonl); image loss on image codes, text loss on "
    "captions and instructions."
  )


def _recipe(r: Mapping[str, Any]) -> str:
  recipe = r.get("recipe") or {}
  if not recipe:
    return missing("recipe")
  mix = ", ".join(f"{m} {recipe[m]:g}" for m in MODES if is_number(recipe.get(m)) and recipe[m])
  rows = [
    ("main demo", esc(r.get("main", ""))),
    ("mixture (share of rows)", esc(mix)),
    ("steps x batch", esc(f"{recipe.get('steps')} x {recipe.get('batch_size')}")),
    ("train.seq_len", esc(recipe.get("seq_len"))),
    ("learning rate", esc(recipe.get("lr"))),
    ("training clips", esc(recipe.get("train_clips"))),
    ("edit documents", esc(recipe.get("edit_examples"))),
    ("edit kinds", esc(recipe.get("edit_kinds"))),
    (
      "clips / edits per measure",
      esc(f"{recipe.get('measure_clips')} / {recipe.get('measure_edits')}"),
    ),
  ]
  return kv_table(rows) + note("vqlm/demo/video_recipe.py (preset " + esc(r.get("preset")) + ").")


def _timings(r: Mapping[str, Any], timings: Mapping[str, Any] | None) -> str:
  """Seconds per stage (the latest run of each), their sum, then per measure."""
  t = demo_timings(r, timings)
  t.pop("total", None)  # of the latest command only, which may have run some stages
  if not t:
    return missing("timings")
  stages = [k for k in STAGES if k in t]
  rows = [[esc(k), seconds(t[k])] for k in stages]
  if stages:
    rows.append(["<b>stages together</b>", f"<b>{seconds(sum(t[k] for k in stages))}</b>"])
  rows += [[esc(k), seconds(v)] for k, v in t.items() if k not in STAGES]
  return table(["stage", "seconds"], rows)


def build_video_report(workdir: str, *, timings: Mapping[str, Any] | None = None) -> str:
  """The video page's HTML text."""
  r = demo_results(workdir, "video")
  bodies = {
    "table": _comparison(r),
    "offsets": _offsets(r),
    "videos": _videos(workdir),
    "edits": _edits(workdir),
    "curves": _curves(workdir, r),
    "recipe": _recipe(r),
    "timings": _timings(r, timings),
  }
  return html_page(demo_title(workdir, "video", r), SECTIONS, bodies)


def write_video_report(workdir: str, *, timings: Mapping[str, Any] | None = None) -> str:
  """Writes `WORKDIR/video.html`; returns its path."""
  text = build_video_report(workdir, timings=timings)
  return write_text(os.path.join(workdir, VIDEO_FILE), text)
