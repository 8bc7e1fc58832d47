"""Small HTML helpers of the report: escaping, number formats, inlined PNGs, files by step."""

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
from matplotlib.figure import Figure
import numpy as np
from PIL import Image

from vqlm.errors import UserError

NOT_RUN = "not run"
GRID_PAD = 2  # `imaging.make_grid`'s default padding, used by the sample grids.

STYLE = """
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


def esc(value: Any) -> str:
  return html.escape(str(value), quote=True)


def missing(what: str) -> str:
  return f'<p class="missing">{esc(what)}: {NOT_RUN}.</p>'


def note(text: str) -> str:
  """A grey note; `text` is HTML (escape what comes from files)."""
  return f'<p class="note">{text}</p>'


def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pct(value: Any) -> str:
  return f"{100.0 * value:.1f}%" if is_number(value) else "&ndash;"


def num(value: Any, digits: int = 3) -> str:
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  return f"{value:.{digits}f}" if is_number(value) else "&ndash;"


def change(value: float, before: float) -> str:
  """` (+1.5)`: the change from `before` to `value` (fractions) in percentage points, marked "ok"
  above +0.5 and "bad" below -0.5."""
  delta = 100.0 * (value - before)
  cls = "ok" if delta > 0.5 else "bad" if delta < -0.5 else ""
  return f' <span class="{cls}">({delta:+.1f})</span>'


def seconds(value: Any) -> str:
  return f"{value:.0f} s" if is_number(value) else esc(value)


def png_data_uri(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> "data:image/png;base64,..."."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(image: np.ndarray, alt: str) -> str:
  return f'<img src="{png_data_uri(image)}" alt="{esc(alt)}">'


def figure_img(fig: Figure, alt: str) -> str:
  """Renders a matplotlib figure (Agg) to an inlined <img>."""
  FigureCanvasAgg(fig)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  fig.clf()
  data = base64.b64encode(buf.getvalue()).decode("ascii")
  return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def read_json(path: str) -> Any:
  """The JSON in `path`; None when it is missing or unreadable (a report never crashes on it)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def demo_results(workdir: str, demo: str) -> Mapping[str, Any]:
  """`WORKDIR/<demo>.json`, the results of `vqlm demo <demo>`; a one-line UserError without it."""
  r = read_json(os.path.join(workdir, f"{demo}.json"))
  if not isinstance(r, Mapping):
    raise UserError(f"{workdir} has no {demo}.json; run `vqlm demo {demo} --workdir {workdir}`")
  return r


def demo_title(workdir: str, demo: str, r: Mapping[str, Any]) -> str:
  """The page title of a demo's results `r`: the demo, the work directory's name, the preset."""
  return f"vqlm {demo}: {os.path.basename(os.path.abspath(workdir))} ({r.get('preset')})"


def demo_timings(r: Mapping[str, Any], timings: Mapping[str, Any] | None) -> dict[str, Any]:
  """The seconds of the results `r`, updated with those of this command (`timings`)."""
  t = dict(r.get("timings") or {})
  t.update(timings or {})
  return t


def timings_table(r: Mapping[str, Any], timings: Mapping[str, Any] | None) -> str:
  """A table of `demo_timings` (seconds per stage or measure), or a note that there are none."""
  t = demo_timings(r, timings)
  if not t:
    return missing("timings")
  return table(["stage", "seconds"], [[esc(k), seconds(v)] for k, v in t.items()])


def step_of(path: str) -> int:
  match = re.search(r"_(\d+)\.\w+$", os.path.basename(path))
  return int(match.group(1)) if match else -1


def files_by_step(pattern: str) -> list[str]:
  return sorted(glob.glob(pattern), key=step_of)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  return np.asarray(image).repeat(factor, axis=0).repeat(factor, axis=1)


def kv_table(rows: Sequence[tuple[str, str]]) -> str:
  """Rows of (label, HTML value)."""
  body = "".join(f'<tr><th class="text">{esc(k)}</th><td>{v}</td></tr>' for k, v in rows)
  return f"<table>{body}</table>"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """An HTML table: escaped header cells; row cells are HTML, the first left-aligned."""
  head = "".join(f"<th>{esc(h)}</th>" for h in header)
  body = "".join(
    "<tr>" + f'<td class="text">{r[0]}</td>' + "".join(f"<td>{c}</td>" for c in r[1:]) + "</tr>"
    for r in rows
  )
  return f"<table><tr>{head}</tr>{body}</table>"


def html_page(
  title: str, sections: Sequence[tuple[str, str]], bodies: dict, *, intro: str = ""
) -> str:
  """A self-contained page: the title, a navigation bar, `intro` (HTML), then one `<section>` per
  `(id, heading)` of `sections` holding `bodies[id]` (HTML)."""
  nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name in sections)
  parts = [
    "<!DOCTYPE html>",
    '<html lang="en"><head><meta charset="utf-8">',
    f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
    f"<h1>{esc(title)}</h1><nav>{nav}</nav>",
  ]
  if intro:
    parts.append(intro)
  for sid, name in sections:
    parts.append(f'<section><h2 id="{sid}">{esc(name)}</h2>{bodies[sid]}</section>')
  parts.append("</body></html>")
  return "\n".join(parts)


def write_text(path: str, text: str) -> str:
  """Writes `text` to `path` atomically (a temporary file, then a rename); returns `path`."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


def pick(items: Sequence[Any], count: int) -> list[Any]:
  """Up to `count` items evenly spaced, always the first and the last."""
  if len(items) <= count:
    return list(items)
  idx = np.unique(np.round(np.linspace(0, len(items) - 1, count)).astype(int))
  return [items[i] for i in idx]


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `WORKDIR/metrics.jsonl` (empty if none); a line that does not parse (a run
  still writing it) is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows
