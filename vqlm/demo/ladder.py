"""The ladder demo: the same images through an autoencoder, a VAE, a VQ-VAE, FSQ, a VQ-GAN and a
VQ + LM, side by side, each judged by the scene parser.

    vqlm demo ladder --workdir runs/ladder [--preset smoke|default] [--main runs/demo]

Stages (each skipped when its output exists):
  data     build the shapes data set (the main demo's split sizes for the same preset)
  rungs    train each rung's tokenizer (`vqlm.demo.ladder_recipe`: same encoder and decoder, only
           the bottleneck and loss differ) and the 2-D VQ of the Voronoi picture
  lm       with --main: nothing (the main demo's tokenizer and LM are the VQ + LM rung); without:
           encode the FSQ rung's codes and train the small LM on them (the main demo's recipe)
  measure  reconstructions, random points, interpolations, neighbours, attribute edits and the
           Voronoi frames -> WORKDIR/ladder.json and WORKDIR/ladder/*.png, voronoi.gif
  report   WORKDIR/ladder.html (self-contained)

Layout: WORKDIR/{data, autoencoder, vae, vq, fsq, vqgan, vq2d, codes, lm, ladder}/,
WORKDIR/ladder.json, WORKDIR/ladder.html.
"""

import os
import time

import numpy as np

from vqlm import imaging
from vqlm.demo import common
from vqlm.demo import ladder_measures as measures
from vqlm.demo.ladder_recipe import LABELS, PRESETS, RUNGS, VORONOI_RUNG, lm_preset, rung_config
from vqlm.errors import UserError
from vqlm.runs import read_eval

STAGES = ("data", "rungs", "lm", "measure", "report")
LADDER_JSON = "ladder.json"
ARTEFACTS = "ladder"
SECTIONS = (
  "reconstruction",
  "random_points",
  "interpolation",
  "neighbours",
  "attributes",
  "voronoi",
)


class Ladder:
  """Runs the ladder's stages in `workdir` with a preset; `main` is a main demo's directory whose
  tokenizer and LM are the VQ + LM rung (empty: train an LM on the FSQ rung's codes)."""

  def __init__(
    self,
    workdir: str,
    *,
    preset: str = "default",
    main: str = "",
    progress: bool = True,
    log_fn=print,
    data_dir: str = "",
  ):
    from vqlm.demo.main import Demo

    self.workdir = workdir
    self.preset_name = preset
    self.p = common.find_preset(PRESETS, preset, "ladder")
    self.progress = progress
    self.log = log_fn
    self.main = os.path.abspath(main) if main else ""
    # The main demo's data root is shared when there is one: each split-size setting of the shapes
    # data set has its own directory under it, so nothing is rebuilt or overwritten.
    main_data = os.path.join(self.main, "data") if self.main else ""
    self.data_dir = data_dir or (main_data if os.path.isdir(main_data) else "")
    self.data_dir = self.data_dir or os.path.join(workdir, "data")
    if self.main:
      for part in ("tokenizer", "lm"):
        if common.latest_step(os.path.join(self.main, part)) is None:
          raise UserError(
            f"--main {main} has no trained {part}/ (run `vqlm demo --workdir {main}` first)"
          )
    self.artefacts = os.path.join(workdir, ARTEFACTS)
    # The main demo's stages, pointed at this ladder's FSQ rung, codes and LM.
    self.demo = Demo(workdir, preset=self.p.main, progress=progress, log_fn=log_fn)
    self.demo.p = lm_preset(self.p)
    self.demo.data_dir = self.data_dir
    self.demo.tokenizer_dir = self.rung_dir("fsq")
    self.demo.codes_dir = os.path.join(workdir, "codes")
    self.demo.lm_dir = os.path.join(workdir, "lm")
    self.timings: dict[str, float] = {}

  def rung_dir(self, rung: str) -> str:
    return os.path.join(self.workdir, rung)

  @property
  def lm_dir(self) -> str:
    return os.path.join(self.main, "lm") if self.main else self.demo.lm_dir

  def run(self, stages: tuple[str, ...] = STAGES) -> dict:
    common.check_stages(stages, STAGES, "ladder")
    start_all = time.time()
    for stage in stages:
      start = time.time()
      self.log(f"== ladder {stage}")
      getattr(self, f"stage_{stage}")()
      self.timings[stage] = time.time() - start
    self.timings["total"] = time.time() - start_all
    self.log("ladder timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))
    results = self.results()
    if results:
      results["timings"] = {**results.get("timings", {}), **self.timings}
      self._write_results(results)
    return results

  def results(self) -> dict:
    return common.read_results(os.path.join(self.workdir, LADDER_JSON))

  def _write_results(self, results: dict) -> str:
    return common.write_results(os.path.join(self.workdir, LADDER_JSON), results)

  # ---- training stages -----------------------------------------------------------------------

  def stage_data(self) -> None:
    self.demo.stage_data()

  def stage_rungs(self) -> None:
    from vqlm.stages import tokenizer as tokenizer_stage

    for rung in (*RUNGS, VORONOI_RUNG):
      config = rung_config(self.p, rung, self.data_dir)
      run_dir = self.rung_dir(rung)
      if common.latest_step(run_dir) == config.train.steps and "tokenizer" in read_eval(run_dir):
        self.log(f"{rung} already trained ({run_dir}); skipping")
        continue
      self.log(f"-- training the {LABELS[rung]} rung ({config.train.steps} steps)")
      start = time.time()
      os.makedirs(run_dir, exist_ok=True)
      tokenizer_stage.train(config, run_dir, progress=self.progress, log_fn=self.log)
      self.timings[f"rung_{rung}"] = time.time() - start

  def stage_lm(self) -> None:
    if self.main:
      self.log(f"VQ + LM rung: the main demo's tokenizer and LM in {self.main}")
      return
    from vqlm.demo.recipe import lm_config

    steps = lm_config(self.demo.p, self.demo.codes_dir).train.steps
    if common.latest_step(self.demo.lm_dir) == steps:
      self.log(f"LM already trained ({self.demo.lm_dir}); skipping")
      return
    self.demo.stage_encode()
    self.demo.stage_lm()

  # ---- measurements --------------------------------------------------------------------------

  def _items(self, split: str, num: int) -> list[dict]:
    source = self.demo._source(split)  # noqa: SLF001 (the main demo's data set, same sizes)
    return [source[i] for i in range(min(num, len(source)))]

  def _save(self, name: str, images: np.ndarray, *, columns: int) -> str:
    grid = imaging.make_grid(np.asarray(images), columns=columns, scale=2)
    imaging.save_png(grid, os.path.join(self.artefacts, name))
    return name

  def stage_measure(self) -> None:
    from vqlm.eval.latent_space import LatentSpace
    from vqlm.runs import TokenizerRun

    p = self.p
    os.makedirs(self.artefacts, exist_ok=True)
    test = self._items("test", 10**9)
    pool = self._items("train", p.pool)
    single = [e for e in test if len(e["scene"]) == 1][: p.queries]
    if not single:
      raise UserError("the test split has no single-object scenes to query; use a larger preset")
    show = np.stack([e["image"] for e in test[: p.show]])
    pairs = [(test[2 * i]["image"], test[2 * i + 1]["image"]) for i in range(p.pairs)]
    pool_images = np.stack([e["image"] for e in pool])
    colour_a, colour_b = p.attribute
    one = [e for e in pool if len(e["scene"]) == 1]
    with_b = [e["image"] for e in one if e["scene"][0]["color"] == colour_b]
    # Colour A's single-object training images: half for the vector, half to choose its strength.
    all_a = [e for e in one if e["scene"][0]["color"] == colour_a]
    with_a = [e["image"] for e in all_a[: len(all_a) // 2]]
    validation_a = all_a[len(all_a) // 2 :]
    edit = [e for e in single if e["scene"][0]["color"] == colour_a]
    if not edit:
      edit = [e for e in test if len(e["scene"]) == 1 and e["scene"][0]["color"] == colour_a]
    results: dict = {
      "preset": self.preset_name,
      "main": self.main or None,
      "lm_dir": self.lm_dir,
      "labels": dict(LABELS),
      "rungs": list(RUNGS),
      "reconstruction": {"images": {"original": self._save("original.png", show, columns=p.show)}},
      "random_points": {},
      "interpolation": {},
      "neighbours": {},
      "attributes": {"from": colour_a, "to": colour_b, "per_rung": {}},
    }
    results["neighbours"]["queries_image"] = self._save(
      "neighbour_queries.png", np.stack([e["image"] for e in single[: p.show]]), columns=p.show
    )
    if edit:
      results["attributes"]["queries_image"] = self._save(
        "attribute_queries.png", np.stack([e["image"] for e in edit[: p.show]]), columns=p.show
      )
    for rung in RUNGS:
      self.log(f"-- measuring the {LABELS[rung]} latent space")
      run = TokenizerRun(self.rung_dir(rung))
      space = LatentSpace(run)
      evaluation = read_eval(self.rung_dir(rung)).get("tokenizer", {})
      recon = measures.reconstructions(run, show)
      results["reconstruction"][rung] = {
        **{k: evaluation.get(k) for k in ("psnr", "ssim", "scene_agreement", "num_examples")},
        **{k: v for k, v in recon.items() if k != "images"},
        "bottleneck": run.bottleneck,
        "step": int(run.step),
        "image": self._save(f"recon_{rung}.png", recon["images"], columns=p.show),
      }
      samples = measures.random_points(space, p.samples, reference=pool_images[:256])
      results["random_points"][rung] = {
        "valid_scene": measures.valid_rate(samples),
        "num": int(len(samples)),
        "how": _how(run.bottleneck),
        "image": self._save(f"random_{rung}.png", samples, columns=8),
      }
      strips, rate = measures.interpolations(space, pairs, frames=p.frames)
      results["interpolation"][rung] = {
        "valid_scene": rate,
        "pairs": len(pairs),
        "frames": p.frames,
        "image": self._save(
          f"interp_{rung}.png", strips.reshape(-1, *strips.shape[2:]), columns=p.frames
        ),
      }
      found = measures.neighbours(
        space,
        np.stack([e["image"] for e in single]),
        [e["scene"] for e in single],
        pool_images,
        [e["scene"] for e in pool],
      )
      top = found.pop("top1")[: p.show]
      found["image"] = self._save(f"neighbours_{rung}.png", pool_images[top], columns=p.show)
      results["neighbours"][rung] = found
      if edit and with_a and with_b and validation_a:
        edited, rates = measures.attribute_edits(
          space,
          with_images=np.stack(with_b),
          without_images=np.stack(with_a),
          validation=np.stack([e["image"] for e in validation_a]),
          validation_scenes=[e["scene"] for e in validation_a],
          queries=np.stack([e["image"] for e in edit]),
          query_scenes=[e["scene"] for e in edit],
          target=colour_b,
        )
        rates["image"] = self._save(f"attribute_{rung}.png", edited[: p.show], columns=p.show)
        results["attributes"]["per_rung"][rung] = rates
    per_rung = results["attributes"]["per_rung"]
    best = max(per_rung, key=lambda r: per_rung[r]["success"]) if per_rung else None
    # No rung is best when no edit succeeded anywhere.
    results["attributes"]["best"] = best if best and per_rung[best]["success"] > 0 else None
    results["random_points"].update(self._lm_samples(test))
    results["voronoi"] = self._voronoi(np.stack([e["image"] for e in test[:64]]))
    self._write_results(results)
    self.log(f"wrote {os.path.join(self.workdir, LADDER_JSON)}")

  def _lm_samples(self, test: list[dict]) -> dict[str, dict]:
    """The VQ + LM rung's random points: codes the LM samples for test captions ("lm"), and,
    through the same decoder, codes drawn uniformly ("lm_uniform")."""
    from vqlm.demo.recipe import PRESETS as MAIN_PRESETS
    from vqlm.eval.latent_space import LatentSpace
    from vqlm.runs import LMRun

    q = MAIN_PRESETS[self.p.main]
    # With --main, its tokenizer by its place in the main demo's layout (even if moved).
    run = LMRun(self.lm_dir, tokenizer=os.path.join(self.main, "tokenizer") if self.main else None)
    run.progress = self.progress
    prompts = [e["text"] for e in test[: self.p.samples]]
    images = run.generate(
      prompts, cfg_scale=q.cfg_scale, temperature=q.image_temperature, top_k=q.image_top_k, seed=0
    )
    uniform = LatentSpace(run.tokenizer_run()).sample(self.p.samples, seed=0)
    return {
      "lm": {
        "valid_scene": measures.valid_rate(images),
        "num": int(len(images)),
        "how": "codes sampled by the LM for test captions",
        "lm": self.lm_dir,
        "image": self._save("random_lm.png", images, columns=8),
      },
      "lm_uniform": {
        "valid_scene": measures.valid_rate(uniform),
        "num": int(len(uniform)),
        "how": "codes drawn uniformly, decoded by the LM's own tokenizer",
        "image": self._save("random_lm_uniform.png", uniform, columns=8),
      },
    }

  def _voronoi(self, images: np.ndarray) -> dict:
    from vqlm.eval import voronoi

    snaps = voronoi.snapshots_from_run(self.rung_dir(VORONOI_RUNG), images)
    frames = voronoi.frames(snaps, size_px=360)
    gif = voronoi.save_gif(frames, os.path.join(self.artefacts, "voronoi.gif"))
    out = []
    for snap, frame in zip(snaps, frames):
      entry = {"step": snap.step, "image": f"voronoi_{snap.step:07d}.png"}
      imaging.save_png(frame, os.path.join(self.artefacts, entry["image"]))
      if snap.latents is not None:
        stats = voronoi.assignment_stats(
          voronoi.assign(snap.latents, snap.codebook), snap.codebook.shape[0]
        )
        entry.update(usage=stats["usage"], perplexity=stats["perplexity"], used=stats["used"])
      out.append(entry)
    return {"codes": int(self.p.voronoi_codes), "frames": out, "gif": os.path.basename(gif)}

  def stage_report(self) -> None:
    from vqlm.report.ladder import write_ladder_report

    path = write_ladder_report(self.workdir, timings=self.timings or None)
    self.log(f"wrote {path}")


def _how(bottleneck: str) -> str:
  return {
    "identity": "Gaussian latents with the training latents' per-channel mean and std",
    "gaussian": "the prior N(0, I)",
    "vq": "uniformly random codes",
    "fsq": "uniformly random codes",
  }[bottleneck]


def ladder_stages(spec: str) -> tuple[str, ...]:
  return common.parse_stages(spec, STAGES)
