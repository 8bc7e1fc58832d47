"""What the tuning demo measures on each model, with the evaluators of `vqlm.eval`.

Every model gets the main demo's own measures (its test prompts, its held-out captions, its
captioning, with the main demo's sampling settings), so a fall is visible. Chat models (with
`<user>`/`<assistant>` turns) also draw from free-form requests (`chat_draw`: 1-3 objects in any
order and wording, on test scenes and on scenes with held-out colour-shape pairs) and answer
questions about test images (`chat_qa`). The main demo's LM has no turns: it is given the same
requests as plain captions (`<bos> request <boi>`), its "before" figure.
"""

import json
import os

from vqlm.demo.recipe import Preset as MainPreset
from vqlm.demo.recipe import generation_evals
from vqlm.demo.tuning_recipe import Preset
from vqlm.eval import evaluators as evaluators_lib
from vqlm.vocab import CHAT_SPECIALS

# The chat evaluators draw their requests with this seed offset (`vqlm.eval.chat_eval`); the
# native measure of a model without turns uses the same requests.
REQUEST_SEED = 0


def has_turns(vocab) -> bool:
  return all(name in vocab.specials for name in CHAT_SPECIALS)


def evaluator_specs(p: Preset, main: MainPreset, *, chat_turns: bool) -> dict:
  """`{section: evaluator spec}` for one model: the main demo's own measures, then (chat models)
  requests (guidance `p.chat_cfg_scale`) and questions with the main demo's sampling settings."""
  ours = generation_evals(main)
  specs = {
    "test_prompts": ours["text_to_image"],
    "heldout_captions": ours["text_to_image_heldout"],
    "reversed_prompts": ours["text_to_image_reversed"],
    "captions": ours["image_to_text"],
  }
  if chat_turns:
    sampling = {k: ours["text_to_image"][k] for k in ("temperature", "top_k")}
    sampling["cfg_scale"] = p.chat_cfg_scale
    for name, split in (("requests", "test"), ("heldout_requests", "test_heldout")):
      specs[name] = dict(
        type="chat_draw",
        split=split,
        num_prompts=p.measure_prompts,
        images_per_prompt=p.images_per_prompt,
        max_objects=p.max_objects,
        seed=REQUEST_SEED,
        **sampling,
      )
    specs["questions"] = dict(
      type="chat_qa",
      split="test",
      num_items=p.qa_items,
      max_objects=p.max_objects,
      choose_answer=p.qa_choose_answer,
    )
  return specs


def native_requests(
  run, p: Preset, main: MainPreset, *, split: str, artefacts: str = "", name: str = ""
) -> dict:
  """The chat_draw requests given to a model without turns as plain captions; with `artefacts`,
  the first 12 requests' images (`NAME.png`) and texts (`NAME.json`), as chat_draw saves them."""
  from vqlm import imaging
  from vqlm.eval import chat_eval, text_image
  from vqlm.sample.processors import SamplingConfig, Settings

  items = chat_eval.request_items(
    p.measure_prompts, split=split, seed=REQUEST_SEED, max_objects=p.max_objects
  )
  examples = [{"text": item["turns"][0]["parts"][0], "scene": item["scene"]} for item in items]
  metrics, images = text_image.text_to_image(
    run.generator(batch_size=32),
    examples,
    num_per_prompt=p.images_per_prompt,
    cfg_scale=p.chat_cfg_scale,
    sampling=SamplingConfig(
      text=Settings(temperature=0.0),
      image=Settings(temperature=main.image_temperature, top_k=main.image_top_k),
    ),
    seed=0,
  )
  metrics["prompt_format"] = "plain caption"
  if artefacts:
    shown = min(12, len(examples))
    grid = imaging.make_grid(
      images[: shown * p.images_per_prompt], columns=p.images_per_prompt, scale=3
    )
    imaging.save_png(grid, os.path.join(artefacts, f"{name}.png"))
    with open(os.path.join(artefacts, f"{name}.json"), "w", encoding="utf-8") as f:
      json.dump([e["text"] for e in examples[:shown]], f, indent=1)
  return metrics


def measure_model(
  run_dir: str, *, p: Preset, main: MainPreset, artefacts: str, progress: bool, log_fn=print
) -> dict:
  """Runs the measures on the LM run in `run_dir`; returns `{section: metrics}`."""
  from vqlm.runs import LMRun

  run = LMRun(run_dir)
  run.progress = progress
  chat_turns = has_turns(run.vocab)
  os.makedirs(artefacts, exist_ok=True)
  evaluators = evaluators_lib.build(evaluator_specs(p, main, chat_turns=chat_turns), log_fn=log_fn)
  results = evaluators_lib.run_all(run, evaluators, artefacts=artefacts, log_fn=log_fn)
  if not chat_turns:
    for name, split in (("requests", "test"), ("heldout_requests", "test_heldout")):
      results[name] = native_requests(run, p, main, split=split, artefacts=artefacts, name=name)
  results["chat_turns"] = chat_turns
  return results
