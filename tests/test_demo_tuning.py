"""The tuning demo: `vqlm demo tuning --help`, its one-line refusals, the page from a results
file, and (slow) the smoke preset end to end from the main demo's smoke run."""

import json
import os

import pytest

from vqlm import cli
from vqlm.demo import tuning
from vqlm.errors import UserError
from vqlm.report.tuning import build_tuning_report, write_tuning_report


def test_tuning_help(capsys):
  assert cli.main(["vqlm", "demo", "tuning", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--main" in out and "--preset" in out and "--stages" in out


def test_tuning_needs_a_trained_main_demo_and_known_names(tmp_path):
  with pytest.raises(UserError, match="has no trained lm/; run `vqlm demo --workdir"):
    tuning.Tuning(str(tmp_path / "t"), main=str(tmp_path / "nothing"))
  with pytest.raises(UserError, match="unknown tuning preset 'huge'; valid: smoke, default"):
    tuning.Tuning(str(tmp_path / "t"), main=str(tmp_path), preset="huge")
  assert tuning.tuning_stages("sft, measure") == ("sft", "measure")
  assert tuning.tuning_stages("all") == tuning.STAGES
  assert cli.main(["vqlm", "demo", "tuning", "--workdir", str(tmp_path / "t"), "--main", "x"]) == 2


def _entry(requests, heldout, questions, test=0.99):
  return {
    "test_prompts": {"scene": test},
    "heldout_captions": {"scene": 0.7},
    "captions": {"scene": 1.0},
    "requests": {"scene": requests, "by_objects": {"2_objects": {"scene": requests}}},
    "heldout_requests": {"scene": heldout},
    "questions": {"accuracy": questions, "color": questions},
  }


def test_report_compares_each_step_with_the_one_before(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(UserError, match="has no tuning.json; run `vqlm demo tuning"):
    build_tuning_report(workdir)
  models = {
    "main": _entry(0.40, 0.30, None),
    "sft": _entry(0.95, 0.80, 0.97),
    "dpo": _entry(0.97, 0.78, 0.97),
  }
  models["dpo"]["questions"]["free_accuracy"] = 0.9  # answers chosen by likelihood
  with open(os.path.join(workdir, "tuning.json"), "w", encoding="utf-8") as f:
    json.dump({"preset": "smoke", "models": models, "timings": {"sft": 12.0}}, f)
  os.makedirs(os.path.join(workdir, "sft"))
  with open(os.path.join(workdir, "sft", "chat_data.json"), "w", encoding="utf-8") as f:
    json.dump(
      {
        "num_examples": 5,
        "kinds": ["draw"],
        "pairs_used": [["red", "circle"]],
        "heldout_pairs_used": [],
      },
      f,
    )
  page = open(write_tuning_report(workdir), encoding="utf-8").read()
  assert "+ SFT" in page and "+ DPO" in page and "+ GRPO" not in page
  # requests: 40.0% -> 95.0% (+55.0) -> 97.0% (+2.0); held-out falls by 2 points after DPO.
  assert '95.0% <span class="ok">(+55.0)</span>' in page
  assert '78.0% <span class="bad">(-2.0)</span>' in page
  assert "no chat turns" in page and "questions: color" in page
  assert "questions: shape" not in page  # kinds not measured are left out
  free = "greedy replies (answers not chosen)</td><td>&ndash; (no chat turns)</td><td>&ndash;</td>"
  assert free + "<td>90.0%" in page
  assert "held-out pairs used" in page and ">none<" in page


@pytest.mark.slow
def test_tuning_smoke_end_to_end(tmp_path):
  main = str(tmp_path / "demo")
  assert cli.main(["vqlm", "demo", "--workdir", main, "--preset", "smoke", "--progress=false"]) == 0
  workdir = str(tmp_path / "tuning")
  argv = [
    "vqlm",
    "demo",
    "tuning",
    "--workdir",
    workdir,
    "--main",
    main,
    "--preset",
    "smoke",
    "--progress=false",
  ]
  assert cli.main(argv) == 0
  result = json.load(open(os.path.join(workdir, "tuning.json"), encoding="utf-8"))
  assert set(result["models"]) == set(tuning.MODELS)
  assert result["models"]["main"]["chat_turns"] is False
  for model in ("sft", "dpo", "grpo"):
    entry = result["models"][model]
    assert entry["chat_turns"] is True
    for section in ("test_prompts", "captions", "requests", "heldout_requests"):
      assert 0.0 <= entry[section]["scene"] <= 1.0
    assert 0.0 <= entry["questions"]["accuracy"] <= 1.0
  page = open(os.path.join(workdir, "tuning.html"), encoding="utf-8").read()
  assert "+ GRPO" in page and 'src="http' not in page
  # Re-running resumes: every training stage is skipped.
  assert cli.main(argv + ["--stages", "sft,dpo,grpo"]) == 0


def test_every_model_is_measured_on_prompts_in_reverse_order():
  from vqlm.demo import tuning_measures
  from vqlm.demo.recipe import PRESETS as MAIN
  from vqlm.demo.tuning_recipe import PRESETS
  from vqlm.eval import evaluators

  p = PRESETS["default"]
  for turns in (False, True):
    specs = tuning_measures.evaluator_specs(p, MAIN[p.main], chat_turns=turns)
    assert specs["reversed_prompts"]["object_order"] == "reversed"
    assert specs["reversed_prompts"]["split"] == "test"
    built = evaluators.build({"reversed_prompts": specs["reversed_prompts"]}, log_fn=print)
    assert built["reversed_prompts"].settings["object_order"] == "reversed"
  with pytest.raises(UserError, match="object_order='sorted' must be 'canonical' or 'reversed'"):
    evaluators.build({"x": {"type": "text_to_image", "object_order": "sorted"}}, log_fn=print)


def test_the_preset_sets_each_steps_prompts_and_the_sft_reply_layout():
  import dataclasses

  from vqlm.demo.recipe import PRESETS as MAIN
  from vqlm.demo.tuning_recipe import PRESETS, dpo_config, grpo_config, sft_config

  p = dataclasses.replace(
    PRESETS["default"], dpo_kinds="draw", grpo_kinds="draw,question", sft_focus=True
  )
  assert dpo_config(p, init_from="SFT").prompts.kinds == "draw"
  grpo = grpo_config(p, init_from="DPO")
  assert grpo.prompts.kinds == "draw,question" and grpo.init_from == "DPO"
  sft = sft_config(p, MAIN[p.main], codes="CODES", init_from="MAIN")
  assert sft.data.chat.reason is True and sft.data.chat.focus is True
