"""`RUN/eval.json`: the one reader and writer of evaluation results.

Each evaluation is a section (`{"tokenizer": {...}, "text_to_image": {...}}`); writing a section
replaces it and keeps the others. With `config`, the run's config is stored next to the results,
so a result file says what produced it. Writes are atomic (temporary file, then rename).
"""

from collections.abc import Mapping
import json
import os
from typing import Any

EVAL_FILE = "eval.json"


def eval_path(workdir: str) -> str:
  return os.path.join(workdir, EVAL_FILE)


def read_eval(workdir: str) -> dict[str, Any]:
  """The sections written so far ({} when there is no eval.json)."""
  path = eval_path(workdir)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_eval(
  workdir: str, section: str, result: Any, *, config: Mapping[str, Any] | None = None
) -> str:
  """Merges `{section: result}` (and `config`, when given) into `WORKDIR/eval.json`."""
  data = read_eval(workdir)
  data[section] = dict(result) if isinstance(result, Mapping) else result
  if config is not None:
    data["config"] = dict(config)
  path = eval_path(workdir)
  tmp = f"{path}.tmp{os.getpid()}"  # One temporary file per process (see saved_config).
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)
  return path
