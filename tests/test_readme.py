"""The README's commands as a new user runs them (slow: 10-25 minutes on 2 cores; `-m slow`).

The repository's committed HEAD is cloned into a temporary directory, the "Run the demo" command is
read from the clone's README.md and run there verbatim with `--preset smoke`, except that the
current interpreter's environment stands in for the fresh virtual environment the README creates.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from vqlm.eval.text_image import chance_scene_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
TEST_COMMAND = (
  "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest"
)


def bash_blocks(readme: str, heading: str) -> list[str]:
  """The ```bash blocks of the `## heading...` section of `readme`, in order."""
  match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", readme, re.M | re.S)
  assert match, f"README.md has no '## {heading}' section"
  return re.findall(r"^```bash\n(.*?)^```", match.group(1), re.M | re.S)


def command_lines(block: str) -> list[str]:
  """A bash block's commands: comments and blank lines dropped, `\\` continuations joined."""
  text = re.sub(r"\s*\\\n\s*", " ", block)
  lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
  return [line for line in lines if line and not line.startswith("#")]


def test_bash_blocks_and_command_lines():
  readme = (
    "# t\n\n## Run the demo (x)\n\n```bash\n# c\nrun --a \\\n    --b  # note\n```\n\n## Next\n"
  )
  [block] = bash_blocks(readme, "Run the demo")
  assert command_lines(block) == ["run --a --b"]
  assert bash_blocks(readme, "Next") == []


def test_this_checkouts_readme_has_the_commands_the_slow_test_runs():
  """The fast half of the slow test below, on the working tree's README."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert command_lines(bash_blocks(readme, "Run the tests")[0]) == [TEST_COMMAND]
  [line] = [l for l in command_lines(bash_blocks(readme, "Run the demo")[0]) if "vqlm demo" in l]
  assert line.startswith(SETUP) and line[len(SETUP) :].startswith("vqlm demo --workdir "), line


def _demo(clone: str, args: list[str], log: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=clone)
  with open(log, "a") as out:
    return subprocess.run(
      [sys.executable, "-m", "vqlm", *args],
      cwd=clone,
      env=env,
      stdout=out,
      stderr=subprocess.STDOUT,
      timeout=3000,
    )


def _tail(log: str) -> str:
  return open(log).read()[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # Past pytest's 900 s: ~15 minutes on 2 loaded cores.
def test_readme_demo_command_runs_in_a_fresh_clone(tmp_path):
  clone = str(tmp_path / "clone")
  subprocess.run(["git", "clone", "-q", ROOT, clone], check=True, timeout=300)
  readme = open(os.path.join(clone, "README.md")).read()

  # The test command is the one CI runs (.ci/run): one venv, the `test` extra, plain pytest.
  [tests_block] = bash_blocks(readme, "Run the tests")
  assert command_lines(tests_block) == [TEST_COMMAND]

  [demo_block] = bash_blocks(readme, "Run the demo")
  [line] = [line for line in command_lines(demo_block) if "vqlm demo" in line]
  # This interpreter's environment stands in for the fresh venv the README sets up.
  assert line.startswith(SETUP), line
  argv = shlex.split(line[len(SETUP) :])
  assert argv[:2] == ["vqlm", "demo"] and "--workdir" in argv, argv
  workdir = os.path.join(clone, argv[argv.index("--workdir") + 1])
  assert not os.path.exists(os.path.dirname(workdir))  # runs/ is not in a fresh clone.

  # The clone's code runs, not this checkout's.
  where = subprocess.run(
    [sys.executable, "-c", "import vqlm; print(vqlm.__file__)"],
    cwd=clone,
    env=dict(os.environ, PYTHONPATH=clone),
    capture_output=True,
    text=True,
    timeout=120,
  )
  used = os.path.realpath(where.stdout.strip())
  assert used.startswith(os.path.realpath(clone) + os.sep), (where.stdout, where.stderr)

  log = str(tmp_path / "demo.log")
  proc = _demo(clone, argv[1:] + ["--preset", "smoke"], log)
  assert proc.returncode == 0, _tail(log)

  for path in (
    "report.html",
    "eval.json",
    "samples/text_to_image.png",
    "samples/text_to_image_heldout.png",
    "samples/captions.json",
    "tokenizer/eval.json",
    "lm/vocab.json",
    "lm/text.model",
    "codes/manifest.json",
  ):
    assert os.path.exists(os.path.join(workdir, path)), path
  results = json.load(open(os.path.join(workdir, "eval.json")))
  chance = chance_scene_accuracy(2)
  assert results["tokenizer"]["psnr"] > 20
  # Patch-local codes: shapes has only ~300 distinct 4x4 patches, so a healthy tokenizer uses a
  # few hundred of its 4096 codes; a collapsed one uses a handful.
  manifest = json.load(open(os.path.join(workdir, "codes", "manifest.json")))
  assert results["tokenizer"]["codebook_usage"] * manifest["codebook_size"] >= 32
  # Bounds far below what this preset reaches (docs/evaluation.md), so that they catch a demo
  # that stopped learning, not run-to-run noise.
  assert results["text_to_image"]["scene"] > 10 * chance
  assert results["text_to_image"]["position_acc"] > 2 / 9  # Chance: one cell in nine.
  assert results["image_to_text"]["scene"] > 10 * chance
  assert results["image_to_text"]["color_acc"] > 3 / 6  # Chance: one colour in six.
  html = open(os.path.join(workdir, "report.html")).read()
  assert "https://" not in html and "<script" not in html

  # Re-running skips every finished stage.
  stages = ["--preset", "smoke", "--progress=false", "--stages", "tokenizer,lm,generate"]
  proc = _demo(clone, argv[1:] + stages, log)
  assert proc.returncode == 0, _tail(log)
