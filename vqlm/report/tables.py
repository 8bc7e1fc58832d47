"""The report's tables: `eval.json` sections, demo timings and what a run directory is."""

from collections.abc import Mapping, Sequence
import os
import re
from typing import Any

import numpy as np

from vqlm.report.common import (
  NOT_RUN,
  esc,
  is_number,
  kv_table,
  missing,
  note,
  num,
  pct,
  read_json,
  seconds,
)

# (key in the scene-parser metrics, label): scene-level rates, then object-level accuracies.
SCENE_METRICS = (
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
# The evaluator type of an eval.json section, when its config does not say (`vqlm eval`'s
# default section names).
_TYPE_BY_NAME = (
  ("text_to_image", "text_to_image"),
  ("image_to_text", "image_to_text"),
  ("scene_fd", "scene_fd"),
  ("fid", "fid"),
  ("tokenizer", "reconstruction"),
)
DISCRETE_BOTTLENECKS = ("vq", "fsq")  # `vqlm.nn.bottlenecks.DISCRETE`, without importing flax.


# ---- scene-parser tables ---------------------------------------------------------------------


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


def scene_table(metrics: Mapping[str, Any], *, extra: Sequence[tuple[str, str]] = ()) -> str:
  """Scene-parser metrics: overall and split by object count (`by_objects`)."""
  by = metrics.get("by_objects")
  by = by if isinstance(by, Mapping) else {}
  groups = [k for k in sorted(by, key=_group_order) if isinstance(by[k], Mapping)]
  cols = [("all", metrics)] + [(_group_label(k), by[k]) for k in groups]
  head = "".join(f"<th>{esc(name)}</th>" for name, _ in cols)
  rows = [f'<tr><th class="text">metric</th>{head}</tr>']
  num_row = [num(m.get("num_images", m.get("num")), 0) for _, m in cols]
  rows.append(
    '<tr><th class="text">images</th>' + "".join(f"<td>{v}</td>" for v in num_row) + "</tr>"
  )
  for key, label in tuple(extra) + SCENE_METRICS:
    if not any(key in m for _, m in cols):
      continue
    cells = "".join(f"<td>{pct(m.get(key))}</td>" for _, m in cols)
    rows.append(f'<tr><th class="text">{esc(label)}</th>{cells}</tr>')
  return "<table>" + "".join(rows) + "</table>"


def tokenizer_summary(tok: Mapping[str, Any] | None, title: str = "Image tokenizer") -> str:
  if not tok or not isinstance(tok, Mapping):
    return f"<h3>{esc(title)}</h3>" + missing("Tokenizer evaluation")
  kind = tok.get("bottleneck")
  rows = [("bottleneck", esc(kind))] if kind else []
  rows += [("PSNR", f"{num(tok.get('psnr'), 2)} dB"), ("SSIM", num(tok.get("ssim")))]
  if "kl" in tok:
    rows.append(("KL to the prior (per latent element)", num(tok.get("kl"), 4)))
  if kind is None or kind in DISCRETE_BOTTLENECKS:
    rows += [
      ("codebook usage", pct(tok.get("codebook_usage"))),
      ("codebook perplexity", num(tok.get("codebook_perplexity"), 1)),
      ("dead codes", num(tok.get("dead_codes"), 0)),
    ]
  rows += [
    (
      "scene agreement (recon parses as the original)",
      pct(tok["scene_agreement"]) if "scene_agreement" in tok else NOT_RUN,
    ),
    (
      "scene agreement on held-out colour-shape pairs",
      pct(tok["heldout_scene_agreement"]) if "heldout_scene_agreement" in tok else NOT_RUN,
    ),
  ]
  where = ", ".join(f"{k} {esc(tok[k])}" for k in ("split", "num_examples", "step") if k in tok)
  return (
    f"<h3>{esc(title)}</h3>" + kv_table(rows) + (note(f"Evaluated on {where}.") if where else "")
  )


def generation_table(metrics: Mapping[str, Any] | None, title: str, *, captions: bool) -> str:
  out = f"<h3>{esc(title)}</h3>"
  if not metrics or not isinstance(metrics, Mapping):
    return out + missing(title)
  extra = (("parseable", "captions that parse"),) if captions else ()
  out += scene_table(metrics, extra=extra)
  settings = metrics.get("settings")
  if isinstance(settings, Mapping) and settings:
    text = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
    out += note(f"Sampling: {esc(text)}.")
  return out


REVERSED_TITLE = "Text to image (test prompts, objects named in reverse order)"


def generation_summary(ev: Mapping[str, Any]) -> str:
  return "".join(
    generation_table(ev.get(section), title, captions=section == "image_to_text")
    for section, title in (
      ("text_to_image", "Text to image (test prompts)"),
      ("text_to_image_heldout", "Text to image (held-out colour-shape pairs)"),
      ("text_to_image_reversed", REVERSED_TITLE),
      ("image_to_text", "Image to text (test images)"),
    )
    # Runs from before the reversed-order measure existed have no such section.
    if section in ev or section != "text_to_image_reversed"
  )


def distance_summary(
  fd: Mapping[str, Any] | None, title: str = "Scene Fréchet distance", what: str = "Scene FD"
) -> str:
  if not fd or not isinstance(fd, Mapping):
    return f"<h3>{esc(title)}</h3>" + missing(what)
  rows = [
    ("generated vs test images", num(fd.get("generated_vs_test"), 2)),
    ("images", num(fd.get("num_images"), 0)),
  ]
  features = "scene-parser features" if what == "Scene FD" else "Inception-v3 features"
  return (
    f"<h3>{esc(title)}</h3>"
    + kv_table(rows)
    + note(f"Fréchet distance over {features} (lower is better).")
  )


def timings_summary(timings: Mapping[str, Any] | None) -> str:
  """Seconds per demo stage, then the total (and the preset)."""
  if not isinstance(timings, Mapping) or not timings:
    return "<h3>Timings</h3>" + missing("Timings")
  rows = [(k, seconds(v)) for k, v in timings.items() if k not in ("total", "preset")]
  if "total" in timings:
    rows.append(("total", seconds(timings["total"])))
  if "preset" in timings:
    rows.append(("preset", esc(timings["preset"])))
  return "<h3>Timings</h3>" + kv_table(rows)


def summary_section(ev: Mapping[str, Any], timings: Mapping[str, Any] | None = None) -> str:
  """The demo's evaluation tables from `eval.json` (and `timings`, default: its "timings"
  section); missing sections read "not run"."""
  return (
    tokenizer_summary(ev.get("tokenizer"))
    + generation_summary(ev)
    + distance_summary(ev.get("scene_fd"))
    + timings_summary(timings if timings else ev.get("timings"))
  )


# ---- a run's eval.json -----------------------------------------------------------------------


def section_types(ev: Mapping[str, Any]) -> dict[str, str]:
  """eval.json section -> evaluator type: from the run config stored with the results
  (`config.evals`), else from `vqlm eval`'s default section names."""
  config = ev.get("config")
  evals = config.get("evals") if isinstance(config, Mapping) else None
  evals = evals if isinstance(evals, Mapping) else {}
  out = {}
  for name, result in ev.items():
    if name == "config" or not isinstance(result, Mapping):
      continue
    spec = evals.get(name)
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind is None:
      kind = next((t for prefix, t in _TYPE_BY_NAME if name.startswith(prefix)), "")
    if not kind and "psnr" in result:
      kind = "reconstruction"
    out[name] = kind or "other"
  return out


def _other_table(name: str, result: Mapping[str, Any]) -> str:
  rows = [(k, esc(num(v, 4) if is_number(v) else v)) for k, v in result.items()]
  return f"<h3>{esc(name)}</h3>" + (kv_table(rows) if rows else missing(name))


def _t2i_title(name: str) -> str:
  if name == "text_to_image":
    return "Text to image (test prompts)"
  if name == "text_to_image_heldout":
    return "Text to image (held-out colour-shape pairs)"
  if name == "text_to_image_reversed":
    return REVERSED_TITLE
  return f"Text to image ({name})"


def run_eval_tables(ev: Mapping[str, Any], stage: str) -> str:
  """Every section of a run's eval.json as its table. The standard evaluations of the stage that
  are absent read "not run"."""
  types = section_types(ev)
  out = []
  if stage == "tokenizer":
    recon = [n for n, t in types.items() if t == "reconstruction"]
    if not recon:
      out.append(tokenizer_summary(None))
    for name in recon:
      out.append(
        tokenizer_summary(
          ev[name], "Image tokenizer" + ("" if name == "tokenizer" else f" ({name})")
        )
      )
  else:
    t2i = [n for n, t in types.items() if t == "text_to_image"] or ["text_to_image"]
    for name in t2i:
      out.append(generation_table(ev.get(name), _t2i_title(name), captions=False))
    i2t = [n for n, t in types.items() if t == "image_to_text"] or ["image_to_text"]
    for name in i2t:
      title = "Image to text" + (" (test images)" if name == "image_to_text" else f" ({name})")
      out.append(generation_table(ev.get(name), title, captions=True))
    fd = [n for n, t in types.items() if t == "scene_fd"] or ["scene_fd"]
    for name in fd:
      out.append(distance_summary(ev.get(name)))
    for name in (n for n, t in types.items() if t == "fid"):
      out.append(distance_summary(ev[name], "FID" + ("" if name == "fid" else f" ({name})"), "FID"))
  known = (
    ("reconstruction",)
    if stage == "tokenizer"
    else ("text_to_image", "image_to_text", "scene_fd", "fid")
  )
  for name, kind in types.items():
    if kind not in known:
      out.append(_other_table(name, ev[name]))
  return "".join(out)


# ---- what the run is -------------------------------------------------------------------------


def _codebook_size(bottleneck: Mapping[str, Any]) -> int | None:
  if bottleneck.get("kind") == "fsq" and bottleneck.get("levels"):
    return int(np.prod(bottleneck["levels"]))
  size = bottleneck.get("codebook_size")
  return int(size) if is_number(size) else None


def bottleneck_kind(config: Mapping[str, Any]) -> str | None:
  """A tokenizer config's `model.bottleneck.kind` (None when it does not say)."""
  model = config.get("model")
  bottleneck = model.get("bottleneck") if isinstance(model, Mapping) else None
  return bottleneck.get("kind") if isinstance(bottleneck, Mapping) else None


def is_discrete(config: Mapping[str, Any]) -> bool | None:
  """Whether a tokenizer config's bottleneck gives codes; None when the config does not say."""
  kind = bottleneck_kind(config)
  return None if kind is None else kind in DISCRETE_BOTTLENECKS


def _v(value: Any) -> str:
  return "&ndash;" if value in (None, "") else esc(value)


def run_facts(workdir: str, config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
  """A table of what the run is: stage, size, model, data, steps trained."""
  model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
  data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
  train = config.get("train") if isinstance(config.get("train"), Mapping) else {}
  facts = [("run directory", esc(os.path.abspath(workdir))), ("stage", esc(config.get("stage")))]
  if config.get("size"):
    facts.append(("size", esc(config["size"])))
  if config.get("stage") == "tokenizer":
    bottleneck = model.get("bottleneck") if isinstance(model.get("bottleneck"), Mapping) else {}
    encoder = model.get("encoder") if isinstance(model.get("encoder"), Mapping) else {}
    facts.append(("bottleneck", _v(bottleneck.get("kind"))))
    if _codebook_size(bottleneck):
      facts.append(("codebook size", str(_codebook_size(bottleneck))))
    facts.append(("encoder", esc(encoder.get("kind", "conv"))))
    facts.append(("image size", _v(data.get("image_size"))))
    facts.append(("data set", _v(data.get("name"))))
  else:
    shape = ", ".join(f"{k} {model[k]}" for k in ("dim", "num_layers", "num_heads") if k in model)
    facts.append(("transformer", _v(shape)))
    vocab = read_json(os.path.join(workdir, "vocab.json"))
    if isinstance(vocab, Mapping):
      parts = [
        f"{k.replace('_', ' ')} {vocab[k]}" for k in ("text_size", "image_size") if k in vocab
      ]
      if "grid" in vocab:
        parts.append("grid " + "x".join(str(g) for g in vocab["grid"]))
      facts.append(("vocabulary", esc(", ".join(parts))))
    facts.append(("data mixture", _v(data.get("mixture", data.get("mode")))))
    facts.append(("image tokenizer run", _v(data.get("tokenizer"))))
    facts.append(("code shards", _v(data.get("codes"))))
  steps = [r["step"] for r in rows if is_number(r.get("step"))]
  total = train.get("steps")
  facts.append(
    ("steps trained", f"{max(steps) if steps else 0}" + (f" of {esc(total)}" if total else ""))
  )
  return "<h3>Run</h3>" + kv_table(facts)
