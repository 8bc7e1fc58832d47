"""Run directories: the config saved with a run, and the trained state read back from it.

A run directory holds `config.json` (the config that made it), `checkpoints/` (Orbax) and, for an
LM run, `vocab.json` and the SentencePiece model. Everything a later stage needs is found from the
run directory alone.
"""

import json
import os
from typing import Any

import ml_collections

from vqlm.errors import UserError

CONFIG_FILE = "config.json"
# Paths a run records that point at other runs or data. Each is also stored relative to the run
# directory (under "relative_paths"), so a tree of runs moved or copied as a whole still loads.
PATH_KEYS = ("data.tokenizer", "data.codes", "data.data_dir", "data.text_model", "init_from")
RELATIVE_PATHS = "relative_paths"


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def save_config(
  workdir: str, config: ml_collections.ConfigDict, *, final_dir: str | None = None
) -> str:
  """Writes `WORKDIR/config.json` (process 0's view; every process has the same config).
  `final_dir`: where the run will live when it is written elsewhere first (the relative paths
  are computed from there)."""
  path = os.path.join(workdir, CONFIG_FILE)
  data = config_to_dict(config)
  relative = {}
  for key in PATH_KEYS:
    value = _get(data, key)
    if isinstance(value, str) and os.path.isabs(value):
      relative[key] = os.path.relpath(value, os.path.abspath(final_dir or workdir))
  if relative:
    data[RELATIVE_PATHS] = relative
  # Every process of a multi-process run writes the same file: a temporary name of its own keeps
  # one process's rename from taking the file another is still writing.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in a run directory; a clear error if the directory is not a run."""
  if "://" in str(workdir):
    raise UserError(
      f"{workdir}: a run in a bucket is trained there (`vqlm train --workdir URL`) but read "
      f"from a local copy (e.g. `gcloud storage cp -r {workdir} .`) or a mounted bucket"
    )
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{workdir} is not a vqlm run directory (no {CONFIG_FILE}); "
      "train it first with `vqlm train --workdir ...`"
    )
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  for key, rel in data.pop(RELATIVE_PATHS, {}).items():
    recorded = _get(data, key)
    moved = os.path.normpath(os.path.join(os.path.abspath(workdir), rel))
    if isinstance(recorded, str) and not os.path.exists(recorded) and os.path.exists(moved):
      _set(data, key, moved)
  return ml_collections.ConfigDict(data)


def _get(data: dict, dotted: str) -> Any:
  for part in dotted.split("."):
    if not isinstance(data, dict) or part not in data:
      return None
    data = data[part]
  return data


def _set(data: dict, dotted: str, value: Any) -> None:
  *parents, last = dotted.split(".")
  for part in parents:
    data = data[part]
  data[last] = value


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
    return out
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    a, b = list(a), list(b)
  return [] if a == b else [prefix.rstrip(".")]


def check_same_model(
  workdir: str, config: ml_collections.ConfigDict, sections: tuple[str, ...] = ("model",)
) -> None:
  """Refuses to resume a run whose saved config differs from `config` in the given sections."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  saved = config_to_dict(load_config(workdir))
  new = config_to_dict(config)
  for section in sections:
    diffs = _differences(saved.get(section), new.get(section), f"{section}.")
    if diffs:
      raise UserError(
        f"the config does not match the run in {workdir}: {diffs[0]} differs "
        f"({len(diffs)} field(s)); use a new --workdir or the config that made it"
      )
