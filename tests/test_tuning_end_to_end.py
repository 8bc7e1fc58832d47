"""Instruction and preference tuning end to end on the tiny runs (slow; CI runs it every time):
SFT from a trained LM, DPO from the SFT run, GRPO from the DPO run, each an LM run that loads
and that the chat evaluators measure."""

import json
import os

import numpy as np
import pytest

from vqlm import cli
from vqlm.eval import evaluators
from vqlm.runs import LMRun
from vqlm.sample import chat as sample_chat


@pytest.mark.slow
def test_sft_then_dpo_then_grpo(tiny, tmp_path):
  sft, dpo, grpo = (str(tmp_path / name) for name in ("sft", "dpo", "grpo"))
  argv = ["vqlm", "train", "--config", "configs/lm.py:size=tiny", "--progress=false"]
  argv += [f"--config.data.codes={tiny['codes']}", f"--config.init_from={tiny['lm']}"]
  argv += ["--config.data.chat.weight=0.5", "--config.data.chat.num_examples=64"]
  argv += ["--config.data.chat.validation_examples=8", "--config.data.chat.max_objects=1"]
  argv += ["--config.train.seq_len=128", "--config.train.steps=4", "--config.train.eval_every=2"]
  argv += ["--workdir", sft]
  assert cli.main(argv) == 0
  for method, source, out in (("dpo", sft, dpo), ("grpo", dpo, grpo)):
    argv = ["vqlm", "train", "--config", f"configs/tune.py:method={method},size=tiny"]
    argv += [f"--config.init_from={source}", "--workdir", out, "--progress=false"]
    assert cli.main(argv) == 0
  with open(os.path.join(dpo, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert any("train/reward_acc" in r for r in rows)
  with open(os.path.join(grpo, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert any("train/kl" in r and np.isfinite(r["train/reward"]) for r in rows)
  runs = [LMRun(path) for path in (sft, dpo, grpo)]
  assert [r.vocab for r in runs[1:]] == [runs[0].vocab] * 2
  # Tuning moved the parameters away from the run it started from.
  first = np.asarray(runs[0].params["embed"]["embedding"])
  assert not np.array_equal(first, np.asarray(runs[2].params["embed"]["embedding"]))
  run = runs[2]
  found = evaluators.build(
    {
      "requests": dict(type="chat_draw", num_prompts=2, images_per_prompt=1, max_objects=1),
      "questions": dict(type="chat_qa", num_items=4, max_objects=1, max_len=4),
    }
  )
  results = evaluators.run_all(run, found)
  assert results["requests"]["num_images"] == 2 and 0.0 <= results["requests"]["scene"] <= 1.0
  assert 0.0 <= results["questions"]["accuracy"] <= 1.0
  images = sample_chat.draw(run.generator(batch_size=2), ["draw a small red circle"], seed=0)
  assert images.shape[0] == 1 and images.dtype == np.uint8
