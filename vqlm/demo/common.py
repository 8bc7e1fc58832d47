"""What the demos share: their runs' checkpoints, presets, stages and results files, and
(`OnMain`) the start-up of the demos that continue from a main demo's directory (tuning, video).
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

from vqlm.demo.recipe import PRESETS as MAIN_PRESETS
from vqlm.errors import UserError
from vqlm.runs.restore import latest_step as _latest_checkpoint


def latest_step(run_dir: str) -> int | None:
  """The step of the run's latest checkpoint (`RUN/checkpoints`), None before the first."""
  return _latest_checkpoint(os.path.join(run_dir, "checkpoints"))


def find_preset(presets: Mapping[str, Any], name: str, demo: str) -> Any:
  """`presets[name]`; a one-line UserError naming the valid ones otherwise."""
  if name not in presets:
    raise UserError(f"unknown {demo} preset '{name}'; valid: {', '.join(presets)}")
  return presets[name]


def main_demo(main: str, command: str) -> str:
  """The absolute path of a main demo's directory with a trained `lm/`; `command` (that makes
  one) in the UserError otherwise."""
  path = os.path.abspath(main)
  if latest_step(os.path.join(path, "lm")) is None:
    raise UserError(
      f"--main {main} has no trained lm/; run `{command}` first (or pass --main DIR of a main demo)"
    )
  return path


def parse_stages(spec: str, stages: tuple[str, ...]) -> tuple[str, ...]:
  """`--stages`: "all" (or empty) -> every stage, else the comma-separated names."""
  if not spec or spec == "all":
    return stages
  return tuple(s.strip() for s in spec.split(",") if s.strip())


def check_stages(stages: Sequence[str], valid: tuple[str, ...], demo: str) -> None:
  """A one-line UserError for the first stage not in `valid`."""
  for stage in stages:
    if stage not in valid:
      raise UserError(f"unknown {demo} stage '{stage}'; valid: {', '.join(valid)}")


def read_results(path: str) -> dict:
  """The demo's results file (JSON), {} before it exists."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_results(path: str, results: dict) -> str:
  """Writes the results file atomically (a temporary file, then a rename); returns `path`."""
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


class OnMain:
  """A demo whose runs start from a main demo's directory `main` (its `lm/`, `codes/` and
  `tokenizer/`): its preset (`p`), the main demo's (`main_preset`), `WORKDIR/samples`, the
  results file `WORKDIR/<RESULTS_FILE>` (`results`, `_write_results`) and `timings`.

  Subclasses set `NAME` (in messages), `PRESETS`, `RESULTS_FILE` and `MAIN_COMMAND` (the command
  that makes the main demo: `{main}` and `{preset}`, the main demo's preset, filled in).
  """

  NAME = ""
  PRESETS: Mapping[str, Any] = {}
  RESULTS_FILE = ""
  MAIN_COMMAND = "vqlm demo --workdir {main}"

  def __init__(
    self,
    workdir: str,
    *,
    main: str = "runs/demo",
    preset: str = "default",
    progress: bool = True,
    log_fn=print,
  ):
    self.workdir = workdir
    self.preset_name = preset
    self.p = find_preset(self.PRESETS, preset, self.NAME)
    self.main_preset = MAIN_PRESETS[self.p.main]
    self.main = main_demo(main, self.MAIN_COMMAND.format(main=main, preset=self.p.main))
    self.progress = progress
    self.log = log_fn
    self.artefacts = os.path.join(workdir, "samples")
    self.timings: dict[str, float] = {}

  def results(self) -> dict:
    return read_results(os.path.join(self.workdir, self.RESULTS_FILE))

  def _write_results(self, results: dict) -> None:
    write_results(os.path.join(self.workdir, self.RESULTS_FILE), results)
