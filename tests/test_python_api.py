"""docs/python-api.md runs: every ```python block, in order, in one namespace, on the tiny runs."""

import os
import re
import shutil

import numpy as np
import pytest

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "python-api.md")
# The placeholder run directories of the page -> where the test puts copies of the tiny runs.
PLACEHOLDERS = {"runs/demo/tokenizer": "tok", "runs/demo/lm": "lm"}


def python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.ci
def test_every_python_block_of_the_page_runs(tiny, tmp_path, monkeypatch, capsys):
  with open(DOC, encoding="utf-8") as f:
    blocks = python_blocks(f.read())
  assert len(blocks) >= 8
  # Copies, since the page writes eval.json and samples into the LM run.
  dirs = {key: str(tmp_path / "runs" / name) for key, name in PLACEHOLDERS.items()}
  shutil.copytree(tiny["tok"], dirs["runs/demo/tokenizer"])
  shutil.copytree(tiny["lm"], dirs["runs/demo/lm"])
  monkeypatch.chdir(tmp_path)  # Files the page writes by relative path land here.
  namespace: dict = {}
  for i, block in enumerate(blocks):
    code = block
    for placeholder, path in dirs.items():
      code = code.replace(placeholder, path)
    assert "runs/demo" not in code, f"block {i} has a path the test does not know"
    exec(compile(code, f"{DOC}:block{i}", "exec"), namespace)  # noqa: S102
  capsys.readouterr()

  ns = namespace
  assert type(ns["run"]).__name__ == "LMRun" and type(ns["tok"]).__name__ == "TokenizerRun"
  assert ns["images"].shape == (4, 32, 32, 3) and ns["images"].dtype == np.uint8
  assert os.path.exists(tmp_path / "circles.png")
  assert len(ns["captions"]) == 4 and all(isinstance(c, str) for c in ns["captions"])
  assert ns["codes"].shape == (4, 8, 8) and ns["codes"].dtype == np.int32
  assert ns["decoded"].shape == ns["recon"].shape == (4, 32, 32, 3)
  assert ns["latents"].shape[:3] == (4, 8, 8) and ns["latents"].dtype == np.float32
  assert all(isinstance(s, (str, np.ndarray)) for s in ns["cont"].segments)
  assert ns["new_frames"].shape == (2, 32, 32, 3)
  assert ns["images2"].shape == (4, 32, 32, 3) and ns["codes2"].shape == (4, 8, 8)
  assert ns["gen"] is ns["run"].generator(batch_size=32)
  assert set(ns["results"]) == {"text_to_image", "image_to_text"}
  assert 0.0 <= ns["results"]["text_to_image"]["scene"] <= 1.0
  assert ns["tok_results"]["tokenizer"]["psnr"] > 0
  lm_dir = dirs["runs/demo/lm"]
  for written in ("eval.json", "samples/text_to_image.png", "samples/captions.json"):
    assert os.path.exists(os.path.join(lm_dir, written)), written
  assert os.path.samefile(ns["moved"].tokenizer_dir(), dirs["runs/demo/tokenizer"])
  assert ns["tok_again"].step == ns["tok"].step
