"""`python -m vqlm.bench sweep --workdir LM_RUN`: text-to-image accuracy per sampling setting.

For every combination of image temperature, top-k and classifier-free guidance scale, draws the
captions of the first `--prompts` test (and held-out) shapes scenes and scores the images with the
scene parser. Prints a table, best first, and writes LM_RUN/sweep.json. The demo's defaults come
from this sweep.
"""

import itertools
import json
import os

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def _define(f):
  f.DEFINE_string("workdir", None, "LM run directory (trained on shapes)")
  f.DEFINE_list("temperatures", ["0.0", "0.3", "0.6", "1.0"], "image temperatures")
  f.DEFINE_list("top_ks", ["0"], "image top-k values (0 = off)")
  f.DEFINE_list("cfg", ["1.0", "2.0", "3.0"], "guidance scales (1 = off)")
  f.DEFINE_integer("prompts", 64, "prompts per split")
  f.DEFINE_integer("images_per_prompt", 2, "images per prompt")
  f.DEFINE_bool("heldout", True, "also score the held-out-combination prompts")


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(argv, _define)
  if not fv.workdir:
    raise UserError("--workdir is required")
  from vqlm.data.sources import source_from_config
  from vqlm.eval import text_image
  from vqlm.runs import LMRun
  from vqlm.sample.api import Generator
  from vqlm.sample.processors import SamplingConfig, Settings

  run = LMRun(fv.workdir)
  tokenizer = run.tokenizer_run()
  generator = Generator(run, batch_size=32, progress=False, image_tokenizer=tokenizer)
  splits = ["test"] + (["test_heldout"] if fv.heldout else [])
  examples = {}
  for split in splits:
    source = source_from_config(tokenizer.config.data, split)
    examples[split] = [source[i] for i in range(min(fv.prompts, len(source)))]
  rows = []
  for t, k, cfg in itertools.product(
    map(float, fv.temperatures), map(int, fv.top_ks), map(float, fv.cfg)
  ):
    sampling = SamplingConfig(
      text=Settings(temperature=0.0), image=Settings(temperature=t, top_k=k)
    )
    row = {"temperature": t, "top_k": k, "cfg": cfg}
    for split in splits:
      metrics, _ = text_image.text_to_image(
        generator,
        examples[split],
        num_per_prompt=fv.images_per_prompt,
        cfg_scale=cfg,
        sampling=sampling,
        seed=0,
      )
      row[split] = metrics["scene"]
    rows.append(row)
    print(" ".join(f"{key}={value:.3g}" for key, value in row.items()), flush=True)
  rows.sort(key=lambda r: -sum(r[s] for s in splits))
  print("best first:")
  for row in rows:
    print("  " + " ".join(f"{key}={value:.3g}" for key, value in row.items()))
  with open(os.path.join(fv.workdir, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  return 0
