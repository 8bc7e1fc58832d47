"""The tuning demo's page: `WORKDIR/tuning.html` from `WORKDIR/tuning.json` (`vqlm.demo.tuning`),
the runs' `metrics.jsonl` and the sample grids in `WORKDIR/samples/<model>/`, every image inlined.

One table compares the models (the main demo's LM, then after SFT, DPO and GRPO), each step
against the one before; curves show the SFT losses, the DPO pair accuracy and margin, and the
GRPO reward and KL; grids show drawings from free-form requests, held-out ones included.
"""

from collections.abc import Mapping
import json
import os
from typing import Any

import numpy as np

from vqlm import imaging
from vqlm.report.common import (
  change,
  demo_results,
  demo_title,
  esc,
  html_page,
  img,
  is_number,
  missing,
  note,
  pct,
  read_json,
  read_metrics,
  table,
  timings_table,
  write_text,
)
from vqlm.report.figures import curves
from vqlm.report.sections import split_grid_rows

TUNING_FILE = "tuning.html"
MODELS = (("main", "main demo LM"), ("sft", "+ SFT"), ("dpo", "+ DPO"), ("grpo", "+ GRPO"))
SECTIONS = (
  ("table", "Before and after each step"),
  ("curves", "Training curves"),
  ("drawings", "Drawing from requests"),
  ("prompts", "What the tuning saw"),
  ("timings", "Timings"),
)
# (label, section, key): rows of the comparison table (whole-scene rates unless named).
ROWS = (
  ("test prompts (main demo's captions)", "test_prompts", "scene"),
  ("held-out pairs, main demo's captions", "heldout_captions", "scene"),
  ("test prompts, objects named in reverse order", "reversed_prompts", "scene"),
  ("captioning test images", "captions", "scene"),
  ("requests, any order and wording", "requests", "scene"),
  ("held-out pairs, requests", "heldout_requests", "scene"),
  ("questions about test images", "questions", "accuracy"),
  ("questions, greedy replies (answers not chosen)", "questions", "free_accuracy"),
)
# The chat_qa metrics per question kind and of descriptions (`vqlm.eval.chat_eval`).
ANSWER_GROUPS = ("color", "shape", "size", "position", "count", "describe")
# Keys whose row is left out when no model has them (measured only with some settings).
OPTIONAL_KEYS = ("free_accuracy",)


def _value(entry: Mapping[str, Any], section: str, key: str) -> Any:
  value = (entry.get(section) or {}).get(key)
  return value


def _comparison(r: Mapping[str, Any]) -> str:
  models = r.get("models") or {}
  shown = [(m, label) for m, label in MODELS if m in models]
  if not shown:
    return missing("measurements")
  rows = []
  for label, section, key in ROWS:
    if key in OPTIONAL_KEYS and all(_value(models[m], section, key) is None for m, _ in shown):
      continue
    cells = [esc(label)]
    previous = None
    for model, _ in shown:
      value = _value(models[model], section, key)
      cell = pct(value)
      if previous is not None and value is not None:
        cell += change(value, previous)
      if model == "main" and section in ("requests", "heldout_requests"):
        cell += "*"
      if model == "main" and section == "questions":
        cell = "&ndash; (no chat turns)"
      cells.append(cell)
      previous = value if value is not None else previous
    rows.append(cells)
  for count in (1, 2, 3):
    values = []
    for model, _ in shown:
      by = (models[model].get("requests") or {}).get("by_objects") or {}
      values.append((by.get(f"{count}_objects") or {}).get("scene"))
    if any(v is not None for v in values):
      label = f"requests with {count} object{'s' if count > 1 else ''}"
      rows.append([esc(label)] + [pct(v) for v in values])
  for kind in ANSWER_GROUPS:
    values = [(models[m].get("questions") or {}).get(kind) for m, _ in shown]
    if any(is_number(v) for v in values):
      rows.append([esc(f"questions: {kind}")] + [pct(v) for v in values])
  header = ["measure"] + [label for _, label in shown]
  return table(header, rows) + note(
    "Whole-scene rates judged by the scene parser (every object's colour, shape, size and cell, "
    "nothing extra); questions: exact answers. In brackets: the change against the column "
    "before, in points. * The main demo's LM has no chat turns: it is given the requests as "
    "plain captions."
  )


def _curves(workdir: str, r: Mapping[str, Any]) -> str:
  models = r.get("models") or {}
  parts = []
  held = [("eval/reward", "reward"), ("eval/exact", "whole scene")]
  specs = {
    "sft": [
      ("validation loss", [("valid/loss", "captions/images"), ("valid/chat_loss", "chat")]),
      ("training loss", [("train/loss", "train")]),
    ],
    "dpo": [
      ("pair accuracy", [("train/reward_acc", "chosen preferred")]),
      ("margin", [("train/margin", "beta x log-ratio gap")]),
      ("validation requests", held),
    ],
    "grpo": [
      ("reward", [("train/reward", "mean"), ("train/reward_exact", "whole scene")]),
      ("KL to the reference", [("train/kl", "k3")]),
      ("validation requests", held),
    ],
  }
  for model, label in MODELS:
    if model not in specs:
      continue
    run_dir = (models.get(model) or {}).get("run_dir") or os.path.join(workdir, model)
    figure = curves(read_metrics(run_dir), specs[model], f"{label} curves")
    if figure:
      parts.append(f"<h3>{esc(label)}</h3>{figure}")
  return "".join(parts) or missing("training curves")


def _grid_rows(png: str, texts: str, shown: int) -> tuple[Any, list[str]]:
  """The first `shown` rows (requests) of a chat_draw grid and their request texts."""
  if not os.path.exists(png) or not os.path.exists(texts):
    return None, []
  with open(texts, encoding="utf-8") as f:
    requests = [str(t) for t in json.load(f)]
  grid = imaging.load_png(png)
  rows = split_grid_rows(grid, len(requests))
  if rows is None:
    return grid, requests
  return np.concatenate(rows[:shown], axis=0), requests[:shown]


def _drawings(workdir: str, r: Mapping[str, Any], shown: int = 6) -> str:
  """Per request set, every model's images for the same first requests, side by side."""
  models = [(m, label) for m, label in MODELS if m in (r.get("models") or {})]
  parts = []
  for section, what in (("requests", "test requests"), ("heldout_requests", "held-out pairs")):
    cells, requests = [], []
    for model, _ in models:
      base = os.path.join(workdir, "samples", model, section)
      grid, texts = _grid_rows(base + ".png", base + ".json", shown)
      cells.append(img(grid, f"{model} {what}") if grid is not None else missing(what))
      requests = requests or texts
    if not requests:
      continue
    listing = "<ol>" + "".join(f"<li>{esc(t)}</li>" for t in requests) + "</ol>"
    header = [label for _, label in models]
    parts.append(f"<h3>{esc(what)}</h3>{table(header, [cells])}{listing}")
  if not parts:
    return missing("drawings")
  return note(
    "Rows: the requests listed below each table, two images each; the main demo's LM gets "
    "them as plain captions."
  ) + "".join(parts)


def _prompts(workdir: str, r: Mapping[str, Any]) -> str:
  rows = []
  for model, label in MODELS[1:]:
    data = read_json(os.path.join(workdir, model, "chat_data.json"))
    if not isinstance(data, Mapping):
      data = read_json(os.path.join(workdir, model, "prompts.json"))
    if not isinstance(data, Mapping):
      continue
    pairs = data.get("pairs_used") or []
    heldout = data.get("heldout_pairs_used")
    rows.append(
      [
        esc(label),
        esc(data.get("num_examples", data.get("num_prompts", ""))),
        esc(", ".join(data.get("kinds", []) if isinstance(data.get("kinds"), list) else [])),
        esc(len(pairs)),
        esc("none" if heldout == [] else heldout),
      ]
    )
  if not rows:
    return missing("prompt lists")
  return table(
    ["step", "examples / prompts", "kinds", "colour-shape pairs used", "held-out pairs used"], rows
  ) + note("Every tuning prompt comes from the train split of shapes: no held-out pair.")


def build_tuning_report(workdir: str, *, timings: Mapping[str, Any] | None = None) -> str:
  """The tuning page's HTML text."""
  r = demo_results(workdir, "tuning")
  bodies = {
    "table": _comparison(r),
    "curves": _curves(workdir, r),
    "drawings": _drawings(workdir, r),
    "prompts": _prompts(workdir, r),
    "timings": timings_table(r, timings),
  }
  return html_page(demo_title(workdir, "tuning", r), SECTIONS, bodies)


def write_tuning_report(workdir: str, *, timings: Mapping[str, Any] | None = None) -> str:
  """Writes `WORKDIR/tuning.html`; returns its path."""
  text = build_tuning_report(workdir, timings=timings)
  return write_text(os.path.join(workdir, TUNING_FILE), text)
