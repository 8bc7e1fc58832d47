"""The ladder demo's page: `WORKDIR/ladder.html` from `WORKDIR/ladder.json` and the images the
ladder saved in `WORKDIR/ladder/` (`vqlm.demo.ladder`), every image inlined (PNG and the Voronoi
GIF as base64 data URIs) with the main report's style: the file can be viewed offline.
"""

import base64
from collections.abc import Mapping
import os
from typing import Any

from vqlm import imaging
from vqlm.report.common import (
  demo_results,
  demo_title,
  esc,
  html_page,
  img,
  missing,
  note,
  num,
  pct,
  timings_table,
  write_text,
)
from vqlm.report.common import table as _table

LADDER_FILE = "ladder.html"
LADDER_SECTIONS = (
  ("reconstructions", "Reconstructions"),
  ("random-points", "Pick a random point and decode it"),
  ("interpolation", "Interpolation"),
  ("neighbours", "Neighbours"),
  ("attributes", "Attribute vectors"),
  ("voronoi", "Voronoi cells of a 2-D VQ"),
  ("timings", "Timings"),
)


def _image(workdir: str, name: Any, alt: str) -> str:
  path = os.path.join(workdir, "ladder", str(name or ""))
  if not name or not os.path.exists(path):
    return missing(alt)
  return img(imaging.load_png(path), alt)


def _gif(workdir: str, name: Any, alt: str) -> str:
  path = os.path.join(workdir, "ladder", str(name or ""))
  if not name or not os.path.exists(path):
    return missing(alt)
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  return f'<img src="data:image/gif;base64,{data}" alt="{esc(alt)}">'


def _label(result: Mapping[str, Any], rung: str) -> str:
  return esc(result.get("labels", {}).get(rung, rung))


def _shape(entry: Mapping[str, Any]) -> str:
  shape = entry.get("latent_shape") or []
  text = " &times; ".join(str(v) for v in shape)
  if entry.get("code_grid"):
    grid = " &times; ".join(str(v) for v in entry["code_grid"])
    text += f" (codes {grid} of {entry.get('codebook_size')})"
  return text


def _reconstructions(workdir: str, r: Mapping[str, Any]) -> str:
  sec = r.get("reconstruction") or {}
  rows, strips = (
    [],
    [f"<p>Test images</p>{_image(workdir, sec.get('images', {}).get('original'), 'test images')}"],
  )
  for rung in r.get("rungs", []):
    e = sec.get(rung)
    if not e:
      continue
    bits = num(e.get("bits"), 0) if e.get("bits") is not None else "&ndash;"
    rows.append(
      [
        _label(r, rung),
        num(e.get("psnr"), 2),
        num(e.get("ssim")),
        pct(e.get("scene_agreement")),
        _shape(e),
        num(e.get("compression")),
        bits,
      ]
    )
    strips.append(f"<p>{_label(r, rung)}</p>{_image(workdir, e.get('image'), rung)}")
  header = ["rung", "PSNR", "SSIM", "scene agreement", "latent", "numbers / pixel numbers", "bits"]
  return (
    _table(header, rows)
    + note(
      "Scene agreement: reconstructions the parser reads as the original scene. Compression: the "
      "latent's numbers (codes for VQ/FSQ) over the image's 3 &times; H &times; W values."
    )
    + "".join(strips)
  )


def _rate_section(workdir: str, r: Mapping[str, Any], key: str, rungs: list[str], what: str) -> str:
  sec = r.get(key) or {}
  rows, strips = [], []
  for rung in rungs:
    e = sec.get(rung)
    if not e:
      continue
    extra = esc(e.get("how", f"{e.get('pairs')} pairs x {e.get('frames')} frames"))
    rows.append([_label(r, rung), pct(e.get("valid_scene")), extra])
    strips.append(f"<p>{_label(r, rung)}</p>{_image(workdir, e.get('image'), rung)}")
  if not rows:
    return missing(what)
  return _table(["rung", "valid scenes", "how"], rows) + "".join(strips)


def _neighbours(workdir: str, r: Mapping[str, Any]) -> str:
  sec = r.get("neighbours") or {}
  rows, strips = [], [f"<p>Queries</p>{_image(workdir, sec.get('queries_image'), 'queries')}"]
  for rung in r.get("rungs", []):
    e = sec.get(rung)
    if not e:
      continue
    rows.append(
      [_label(r, rung)] + [pct(e.get(k)) for k in ("color", "shape", "size", "cell", "all")]
    )
    strips.append(f"<p>{_label(r, rung)}: top-1</p>{_image(workdir, e.get('image'), rung)}")
  if not rows:
    return missing("neighbours")
  return (
    _table(["rung", "colour", "shape", "size", "cell", "all four"], rows)
    + note(
      "Single-object test queries, nearest training image by the L2 distance of grid-pooled "
      "latents; a hit: the neighbour's scene (data set metadata) has an object with that value."
    )
    + "".join(strips)
  )


def _attributes(workdir: str, r: Mapping[str, Any]) -> str:
  sec = r.get("attributes") or {}
  per = sec.get("per_rung") or {}
  if not per:
    return missing("attribute edits")
  a, b = esc(sec.get("from")), esc(sec.get("to"))
  rows = [
    [
      _label(r, rung),
      pct(e.get("success")),
      pct(e.get("color_changed")),
      pct(e.get("rest_kept")),
      f"{e['strength']:g}" if e.get("strength") is not None else "&ndash;",
    ]
    for rung, e in per.items()
  ]
  best = sec.get("best")
  strips = [f"<p>Queries ({a})</p>{_image(workdir, sec.get('queries_image'), 'queries')}"]
  strips += [f"<p>{_label(r, k)}</p>{_image(workdir, e.get('image'), k)}" for k, e in per.items()]
  return (
    f"<p>At the object's latent positions: latent + strength &times; (mean over {b} objects' "
    f"positions &minus; mean over {a} objects' positions), on single-object {a} test images; "
    "the strength is the one that edited the most validation images (training images) right. "
    f"Best: <b>{_label(r, best) if best else '&ndash;'}</b>.</p>"
    + _table(
      ["rung", "edit succeeded", f"parser sees {b}", "shape, size, cell kept", "strength"], rows
    )
    + "".join(strips)
  )


def _voronoi(workdir: str, r: Mapping[str, Any]) -> str:
  sec = r.get("voronoi") or {}
  frames = sec.get("frames") or []
  if not frames:
    return missing("Voronoi frames")
  rows = [
    [
      str(f.get("step")),
      pct(f.get("usage")),
      num(f.get("perplexity"), 2),
      str(f.get("used", "&ndash;")),
    ]
    for f in frames
  ]
  pictures = "".join(_image(workdir, f.get("image"), f"step {f.get('step')}") for f in frames)
  return (
    f"<p>A VQ with {esc(sec.get('codes'))} two-dimensional code words: cells, test latents (dots) "
    "and code words (used: red crosses) over training.</p>"
    + _gif(workdir, sec.get("gif"), "Voronoi GIF")
    + _table(["step", "usage", "perplexity", "codes used"], rows)
    + pictures
  )


def build_ladder_report(workdir: str, *, timings: Mapping[str, Any] | None = None) -> str:
  """The ladder page's HTML text (see the module docstring)."""
  r = demo_results(workdir, "ladder")
  rungs = list(r.get("rungs", []))
  bodies = {
    "reconstructions": _reconstructions(workdir, r),
    "random-points": _rate_section(
      workdir, r, "random_points", rungs + ["lm_uniform", "lm"], "random points"
    ),
    "interpolation": note("Valid scenes: the intermediate frames (the ends are reconstructions).")
    + _rate_section(workdir, r, "interpolation", rungs, "interpolation"),
    "neighbours": _neighbours(workdir, r),
    "attributes": _attributes(workdir, r),
    "voronoi": _voronoi(workdir, r),
    "timings": timings_table(r, timings),
  }
  title = demo_title(workdir, "ladder", r)
  intro = note(
    "A valid scene: the scene parser reads 1-2 objects and re-rendering them matches the "
    "palette-snapped image on at least 95% of pixels."
  )
  return html_page(title, LADDER_SECTIONS, bodies, intro=intro)


def write_ladder_report(workdir: str, *, timings: Mapping[str, Any] | None = None) -> str:
  """Writes `WORKDIR/ladder.html`; returns its path."""
  text = build_ladder_report(workdir, timings=timings)
  return write_text(os.path.join(workdir, LADDER_FILE), text)
