"""Run directories: the config saved with a run, and the trained state read back from it.

A run directory holds `config.json` (the config that made it), `checkpoints/` (Orbax) and, for an
LM run, `vocab.json` and the SentencePiece model. Everything a later stage needs is found from the
run directory alone.
"""
import json
import os
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes `WORKDIR/config.json` (process 0's view; every process has the same config)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in a run directory; a clear error if the directory is not a run."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a vqlm run directory (no {CONFIG_FILE}); "
                            "train it first with `vqlm train --workdir ...`")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
    return out
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    a, b = list(a), list(b)
  return [] if a == b else [prefix.rstrip(".")]


def check_same_model(workdir: str, config: ml_collections.ConfigDict,
                     sections: tuple[str, ...] = ("model",)) -> None:
  """Refuses to resume a run whose saved config differs from `config` in the given sections."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  saved = config_to_dict(load_config(workdir))
  new = config_to_dict(config)
  for section in sections:
    diffs = _differences(saved.get(section), new.get(section), f"{section}.")
    if diffs:
      raise ValueError(f"the config does not match the run in {workdir}: {diffs[0]} differs "
                       f"({len(diffs)} field(s)); use a new --workdir or the config that made it")
