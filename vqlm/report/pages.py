"""The report page of a tokenizer run, an LM run or the demo directory, and where it goes."""

from collections.abc import Mapping
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vqlm import imaging
from vqlm.errors import UserError
from vqlm.report import sections, tables
from vqlm.report.common import esc, html_page, note, read_json, read_metrics, write_text

REPORT_FILE = "report.html"
# What the demo leaves in its directory (`vqlm.demo`); any one of them makes it a demo directory.
DEMO_PARTS = ("eval.json", "tokenizer", "lm", "samples")
# (id, heading) of each kind of page, in order; the ids are stable anchors.
SECTIONS = (
  ("summary", "Summary"),
  ("losses", "Losses"),
  ("codebook", "Codebook"),
  ("reconstructions", "Reconstructions"),
  ("text-to-image", "Text to image"),
  ("image-to-text", "Image to text"),
)
PAGE_SECTIONS = {
  "demo": SECTIONS,
  "tokenizer": (
    ("summary", "Summary"),
    ("losses", "Losses"),
    ("codebook", "Codebook"),
    ("reconstructions", "Reconstructions"),
    ("prior-samples", "Decoded prior"),
  ),
  "lm": (
    ("summary", "Summary"),
    ("losses", "Losses"),
    ("text-to-image", "Text to image"),
    ("image-to-text", "Image to text"),
    ("samples", "Other samples"),
  ),
}
TITLES = {
  "demo": "vqlm demo report",
  "tokenizer": "vqlm image tokenizer report",
  "lm": "vqlm LM report",
}


def run_kind(workdir: str, *, strict: bool = False) -> str | None:
  """What `workdir` is: "tokenizer" or "lm" (a run directory: its config.json names the stage),
  "demo" (the demo's layout), or None (with `strict`, a UserError saying what was expected)."""
  if not os.path.isdir(workdir):
    raise UserError(f"'{workdir}' does not exist or is not a directory; pass a run directory")
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    config = read_json(config_path)
    if not isinstance(config, Mapping):
      raise UserError(f"{config_path} is not a JSON object; restore the run's config.json")
    stage = config.get("stage")
    if stage in ("tokenizer", "lm"):
      return stage
    raise UserError(
      f"{config_path} has stage {stage!r}; the report knows image-tokenizer and LM runs "
      "(stage 'tokenizer' or 'lm')"
    )
  if any(os.path.exists(os.path.join(workdir, part)) for part in DEMO_PARTS):
    return "demo"
  if strict:
    raise UserError(
      f"'{workdir}' is not a run directory: it has no config.json (a run of `vqlm train`) and "
      f"none of the demo's {', '.join(DEMO_PARTS)}; train or evaluate a run there first"
    )
  return None


def _demo_bodies(workdir: str, timings: Mapping[str, Any] | None) -> dict[str, str]:
  ev = read_json(os.path.join(workdir, "eval.json"))
  ev = ev if isinstance(ev, Mapping) else {}
  tok_dir = os.path.join(workdir, "tokenizer")
  tok_rows = read_metrics(tok_dir)
  tok_samples = os.path.join(tok_dir, "samples")
  samples = os.path.join(workdir, "samples")
  return {
    "summary": tables.summary_section(ev, timings),
    "losses": sections.losses_section(tok_rows, read_metrics(os.path.join(workdir, "lm"))),
    "codebook": sections.codebook_section(tok_rows, tok_samples),
    "reconstructions": sections.reconstructions_section(tok_samples),
    "text-to-image": sections.text_to_image_section(samples),
    "image-to-text": sections.image_to_text_section(samples),
  }


def _run_bodies(workdir: str, stage: str) -> dict[str, str]:
  config = read_json(os.path.join(workdir, "config.json"))
  config = config if isinstance(config, Mapping) else {}
  ev = read_json(os.path.join(workdir, "eval.json"))
  ev = ev if isinstance(ev, Mapping) else {}
  rows = read_metrics(workdir)
  samples = os.path.join(workdir, "samples")
  summary = tables.run_facts(workdir, config, rows) + "<h3>Evaluation</h3>"
  if not any(k != "config" for k in ev):
    summary += note(f"No eval.json results yet: <code>vqlm eval --workdir {esc(workdir)}</code>.")
  summary += tables.run_eval_tables(ev, stage)
  discrete = tables.is_discrete(config) if stage == "tokenizer" else False
  elsewhere = sections.CODEBOOK_METRICS if discrete is not False else ()
  bodies = {
    "summary": summary,
    "losses": sections.run_losses_section(rows, stage, elsewhere=elsewhere),
  }
  if stage == "tokenizer":
    kind = esc(tables.bottleneck_kind(config))
    bodies["codebook"] = (
      note(f"The bottleneck is continuous ({kind}): it has no codebook.")
      if discrete is False
      else sections.codebook_section(rows, samples)
    )
    bodies["reconstructions"] = sections.reconstructions_section(samples)
    bodies["prior-samples"] = sections.prior_section(samples, tables.bottleneck_kind(config))
  else:
    bodies["text-to-image"] = sections.text_to_image_section(samples, extra=True)
    bodies["image-to-text"] = sections.image_to_text_section(samples)
    bodies["samples"] = sections.other_grids_section(
      samples, skip=sections.prompt_grid_names(samples)
    )
  return bodies


def build_report(
  workdir: str, *, kind: str | None = None, timings: Mapping[str, Any] | None = None
) -> str:
  """The report's HTML text for a tokenizer run, an LM run or the demo's directory (`kind`,
  default: `run_kind(workdir)`, and the demo's page for a directory that is none of them).
  `timings` (demo: seconds per stage, "total", "preset") replaces eval.json's "timings"."""
  kind = kind or run_kind(workdir) or "demo"
  if kind not in PAGE_SECTIONS:
    raise UserError(f"unknown report kind {kind!r}; valid: {', '.join(PAGE_SECTIONS)}")
  bodies = _demo_bodies(workdir, timings) if kind == "demo" else _run_bodies(workdir, kind)
  title = f"{TITLES[kind]}: {os.path.basename(os.path.abspath(workdir))}"
  return html_page(title, PAGE_SECTIONS[kind], bodies)


def write_report(
  workdir: str, *, kind: str | None = None, timings: Mapping[str, Any] | None = None
) -> str:
  """Writes the self-contained `WORKDIR/report.html` (see `build_report`); returns its path."""
  if not os.path.isdir(workdir):
    raise UserError(f"workdir '{workdir}' does not exist; train a run (or `vqlm demo`) first")
  text = build_report(workdir, kind=kind, timings=timings)
  return write_text(os.path.join(workdir, REPORT_FILE), text)


def save_prompt_figure(
  samples_dir: str, out_path: str, *, name: str = "text_to_image", max_rows: int = 8
) -> str | None:
  """A PNG of prompts (left) beside the images drawn for them (right): the README picture."""
  png = os.path.join(samples_dir, f"{name}.png")
  prompts = read_json(os.path.join(samples_dir, f"{name}.json"))
  if not os.path.exists(png) or not isinstance(prompts, list) or not prompts:
    return None
  strips = sections.split_grid_rows(imaging.load_png(png), len(prompts))
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
