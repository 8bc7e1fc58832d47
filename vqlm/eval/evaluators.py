"""Evaluators: one interface for every measurement of a trained run, chosen by `config.evals`.

`config.evals` maps a section name to `{"type": TYPE, **kwargs}` (big_vision style):

    evals = {"tokenizer": {"type": "reconstruction", "split": "test", "num_examples": 1000},
             "text_to_image": {"type": "text_to_image", "split": "test", "cfg_scale": 2.0}}

`build(evals)` makes the evaluators; each has `run(loaded_run, artefacts=None) -> dict` (scalar
metrics, plus nested groups such as `by_objects`), and `run_all` writes every result as its section
of `RUN/eval.json`. Training stages, `vqlm eval` and the demos run them this way.

Types: `reconstruction` (tokenizer runs: PSNR, SSIM, codebook statistics for discrete
bottlenecks, KL and prior samples for a VAE, random-latent samples for an autoencoder,
scene-parser agreement on shapes), `text_to_image`, `image_to_text`, `scene_fd` and
`fid` (LM runs on shapes: images judged by the scene parser, captions parsed back into scenes),
`chat_draw` and `chat_qa` (instruction-tuned LMs: `vqlm.eval.chat_eval`), `edit` (image editing
by LMs trained on edit documents: `vqlm.eval.edit_eval`), `video_continuation` and `text_to_video`
(video LMs on moving shapes: `vqlm.eval.video_eval`).
"""

from collections.abc import Callable, Mapping, Sequence
import json
import os
from typing import Any

import numpy as np

from vqlm.data.sources import source_from_config
from vqlm.errors import UserError
from vqlm.eval import reconstruction


def _source(data: Any, split: str, log_fn: Callable[[str], None]) -> tuple[Any, str]:
  """The split's source; a data set without a `test` split is evaluated on `validation`."""
  try:
    return source_from_config(data, split), split
  except ValueError as e:
    if split != "test" or "split" not in str(e):
      raise
    log_fn(f"the {data.name} data set has no test split; evaluating on validation")
    return source_from_config(data, "validation"), "validation"


class Evaluator:
  """Base of all evaluators: keyword settings in, `run(loaded_run, artefacts) -> dict` out."""

  stage = ""  # The run stage it applies to ("tokenizer" or "lm").

  def __init__(self, log_fn: Callable[[str], None] = print, **settings: Any):
    self.settings = settings
    self.log = log_fn

  def run(self, run: Any, artefacts: str | None = None) -> dict[str, Any]:
    raise NotImplementedError


class Reconstruction(Evaluator):
  """Image tokenizers: reconstruct `num_examples` images of `split`; PSNR, SSIM, and on shapes the
  fraction of reconstructions the scene parser reads as the original scene. What else depends on
  the bottleneck:

  - discrete (vq, fsq): codebook usage / perplexity / dead codes of the test codes;
  - gaussian (VAE): `kl`, KL(q(z|x) || N(0, I)) averaged over latent elements (the training
    loss's "kl" term); with `artefacts`, `prior_samples.png`: images decoded from z ~ N(0, I);
  - identity (autoencoder): with `artefacts`, `random_latents.png`: images decoded from Gaussian
    noise with the per-channel mean and std of the test latents.
  """

  stage = "tokenizer"
  num_samples = 16  # Images in the prior-sample / random-latent grids.

  def __init__(
    self, *, split: str = "test", num_examples: int = 1000, batch_size: int = 250, log_fn=print
  ):
    super().__init__(log_fn, split=split, num_examples=num_examples, batch_size=batch_size)

  def run(self, run, artefacts=None):
    s = self.settings
    source, split = _source(run.config.data, s["split"], self.log)
    n = min(s["num_examples"], len(source))
    kind = run.bottleneck
    originals, recons, codes, agree = [], [], [], []
    latents = _LatentStats()
    parse = None
    if run.config.data.name == "shapes":
      from vqlm.data import shapes
      from vqlm.eval import scene_parser

      parse = (scene_parser.parse_image, shapes.canonical)
    for start in range(0, n, s["batch_size"]):
      items = [source[i] for i in range(start, min(n, start + s["batch_size"]))]
      images = np.stack([item["image"] for item in items])
      if run.is_discrete:
        batch_codes = run.encode(images)
        recon = run.decode(batch_codes)
        codes.append(batch_codes)
      elif kind == "gaussian":
        mean, logvar = run.posterior(images)  # The mean is what encode_latent gives.
        recon = run.decode_latent(mean)
        latents.add(mean, kl=0.5 * (np.square(mean) + np.exp(logvar) - 1.0 - logvar))
      else:
        z = run.encode_latent(images)
        recon = run.decode_latent(z)
        latents.add(z)
      originals.append(images)
      recons.append(recon)
      if parse is not None:
        for item, image in zip(items, recon):
          agree.append(parse[1](parse[0](image)) == parse[1](item["scene"]))
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    result = {
      "split": split,
      "num_examples": int(n),
      "bottleneck": kind,
      "psnr": float(np.mean(np.minimum(reconstruction.psnr(originals, recons), 100.0))),
      "ssim": float(np.mean(reconstruction.ssim(originals, recons))),
      "step": run.step,
    }
    if codes:
      stats = reconstruction.codebook_stats(np.concatenate(codes), run.codebook_size)
      result.update(
        codebook_usage=stats["usage"],
        codebook_perplexity=stats["perplexity"],
        dead_codes=stats["dead_codes"],
      )
    if kind == "gaussian":
      result["kl"] = latents.mean_kl()
    if agree:
      result["scene_agreement"] = float(np.mean(agree))
    if artefacts and not run.is_discrete:
      self._save_samples(run, latents, artefacts)
    return result

  def _save_samples(self, run, latents: "_LatentStats", artefacts: str) -> None:
    """Decodes latents drawn without an input image: the VAE's prior, or for an autoencoder noise
    matched to the test latents' statistics (an autoencoder has no prior to sample)."""
    import jax

    from vqlm import imaging

    if run.bottleneck == "gaussian":
      z, name = run.sample_prior(self.num_samples, seed=0), "prior_samples.png"
    else:
      z, name = latents.matched_noise(self.num_samples, seed=0), "random_latents.png"
    images = run.decode_latent(z)  # Every process decodes; process 0 writes.
    if jax.process_index() == 0:
      grid = imaging.make_grid(images, columns=8, scale=max(1, 64 // run.image_size))
      self.log(f"wrote {imaging.save_png(grid, os.path.join(artefacts, name))}")


class _LatentStats:
  """Running per-channel sums of continuous latents `[B, h, w, C]` (and of their KL terms)."""

  def __init__(self):
    self.count, self.sum, self.sum_sq, self.kl_sum = 0, 0.0, 0.0, 0.0
    self.shape: tuple[int, ...] = ()

  def add(self, z: np.ndarray, kl: np.ndarray | None = None) -> None:
    z = np.asarray(z, np.float64)
    self.shape = z.shape[1:]
    flat = z.reshape(-1, z.shape[-1])
    self.count += flat.shape[0]
    self.sum = self.sum + flat.sum(0)
    self.sum_sq = self.sum_sq + np.square(flat).sum(0)
    if kl is not None:
      self.kl_sum += float(np.sum(kl, dtype=np.float64))

  def mean_kl(self) -> float:
    """The KL per latent element, averaged over examples, positions and channels."""
    return self.kl_sum / max(self.count * self.shape[-1], 1)

  def matched_noise(self, num: int, *, seed: int) -> np.ndarray:
    """float32 `[num, h, w, C]` Gaussian noise with each channel's mean and std."""
    mean = self.sum / self.count
    std = np.sqrt(np.maximum(self.sum_sq / self.count - np.square(mean), 0.0))
    noise = np.random.default_rng(seed).standard_normal((num, *self.shape))
    return (mean + std * noise).astype(np.float32)


def _shapes_data(run: Any) -> Any:
  """The data config of the LM's image tokenizer; scene judging needs the shapes data set."""
  data = run.tokenizer_run().config.data
  if data.name != "shapes":
    raise UserError(
      f"this evaluation judges images with the shapes scene parser; the run used "
      f"'{data.name}'. Leave it out of config.evals for this data set"
    )
  return data


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
  """A comma-separated string ("question,describe") or a sequence of names -> a tuple of them."""
  return tuple(k.strip() for k in value.split(",")) if isinstance(value, str) else tuple(value)


def _sampling(temperature: float, top_k: int):
  from vqlm.sample.processors import SamplingConfig, Settings

  return SamplingConfig(
    text=Settings(temperature=0.0), image=Settings(temperature=temperature, top_k=top_k)
  )


class _Generation(Evaluator):
  """Shared settings of the LM evaluators that draw images."""

  stage = "lm"

  def __init__(
    self,
    *,
    split: str = "test",
    num_prompts: int = 100,
    images_per_prompt: int = 4,
    cfg_scale: float = 1.0,
    temperature: float = 0.3,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    log_fn=print,
  ):
    super().__init__(
      log_fn,
      split=split,
      num_prompts=num_prompts,
      images_per_prompt=images_per_prompt,
      cfg_scale=cfg_scale,
      temperature=temperature,
      top_k=top_k,
      seed=seed,
      batch_size=batch_size,
    )

  def examples(self, run) -> list[dict]:
    source = source_from_config(_shapes_data(run), self.settings["split"])
    return [source[i] for i in range(min(self.settings["num_prompts"], len(source)))]


class TextToImage(_Generation):
  """Draws `images_per_prompt` images per caption of `split` and judges each with the scene
  parser (whole scene, count, colour, shape, size, position; split by object count).
  `object_order="reversed"` lists each caption's objects in the reverse of the data set's
  canonical order (a prompt as a user may write it)."""

  def __init__(self, *, object_order: str = "canonical", **kwargs):
    if object_order not in ("canonical", "reversed"):
      raise UserError(f"object_order={object_order!r} must be 'canonical' or 'reversed'")
    super().__init__(**kwargs)
    self.settings["object_order"] = object_order

  def examples(self, run) -> list[dict]:
    from vqlm.data import shapes

    examples = super().examples(run)
    if self.settings["object_order"] == "canonical":
      return examples
    return [dict(e, text=shapes.reorder_caption(e["text"], "reversed")) for e in examples]

  def run(self, run, artefacts=None):
    from vqlm import imaging
    from vqlm.eval import text_image

    s = self.settings
    examples = self.examples(run)
    metrics, images = text_image.text_to_image(
      run.generator(batch_size=self.settings["batch_size"]),
      examples,
      num_per_prompt=s["images_per_prompt"],
      cfg_scale=s["cfg_scale"],
      sampling=_sampling(s["temperature"], s["top_k"]),
      seed=s["seed"],
    )
    metrics["settings"] = {
      "image_temperature": s["temperature"],
      "image_top_k": s["top_k"],
      "cfg_scale": s["cfg_scale"],
    }
    if artefacts:
      name = self.settings.get("name", "text_to_image")
      shown = min(12, len(examples))
      os.makedirs(artefacts, exist_ok=True)
      imaging.save_png(
        imaging.make_grid(
          images[: shown * s["images_per_prompt"]], columns=s["images_per_prompt"], scale=3
        ),
        os.path.join(artefacts, f"{name}.png"),
      )
      with open(os.path.join(artefacts, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump([e["text"] for e in examples[:shown]], f, indent=1)
    return metrics


class ImageToText(Evaluator):
  """Captions `num_images` images of `split` (greedy) and parses each caption back into a scene."""

  stage = "lm"

  def __init__(
    self, *, split: str = "test", num_images: int = 200, batch_size: int = 32, log_fn=print
  ):
    super().__init__(log_fn, split=split, num_images=num_images, batch_size=batch_size)

  def run(self, run, artefacts=None):
    from vqlm.eval import text_image

    source = source_from_config(_shapes_data(run), self.settings["split"])
    examples = [source[i] for i in range(min(self.settings["num_images"], len(source)))]
    generator = run.generator(batch_size=self.settings["batch_size"])
    metrics, captions = text_image.image_to_text(generator, examples)
    if artefacts:
      os.makedirs(artefacts, exist_ok=True)
      with open(os.path.join(artefacts, "captions.json"), "w", encoding="utf-8") as f:
        json.dump(
          [{"truth": e["text"], "caption": c} for e, c in zip(examples, captions)], f, indent=1
        )
      np.save(
        os.path.join(artefacts, "caption_images.npy"), np.stack([e["image"] for e in examples[:12]])
      )
    return metrics


class _SetDistance(_Generation):
  """One image per caption of `split`, compared as a set with the real images of those captions."""

  def __init__(
    self, *, num_prompts: int = 200, images_per_prompt: int = 1, seed: int = 1, **kwargs
  ):
    super().__init__(
      num_prompts=num_prompts, images_per_prompt=images_per_prompt, seed=seed, **kwargs
    )

  def images(self, run) -> tuple[np.ndarray, np.ndarray]:
    s = self.settings
    examples = self.examples(run)
    fake = run.generator(batch_size=self.settings["batch_size"]).generate_images(
      [e["text"] for e in examples],
      num_per_prompt=s["images_per_prompt"],
      cfg_scale=s["cfg_scale"],
      sampling=_sampling(s["temperature"], s["top_k"]),
      seed=s["seed"],
    )
    return fake, np.stack([e["image"] for e in examples])


class SceneFD(_SetDistance):
  """Fréchet distance between generated and real images over scene-parser features."""

  def run(self, run, artefacts=None):
    from vqlm.eval.fid import scene_fd

    fake, real = self.images(run)
    return {"generated_vs_test": float(scene_fd(fake, real)), "num_images": len(real)}


class FID(_SetDistance):
  """FID between generated and real images with Inception-v3 weights (`inception_weights`, an
  `.npz`: see `vqlm.nn.inception`)."""

  def __init__(self, *, inception_weights: str = "", **kwargs):
    if not inception_weights:
      raise UserError(
        "the fid evaluator needs inception_weights=PATH.npz (see "
        "vqlm/nn/inception.py for how to make it)"
      )
    super().__init__(**kwargs)
    self.inception_weights = inception_weights

  def run(self, run, artefacts=None):
    from vqlm.eval.fid import inception_fid

    fake, real = self.images(run)
    return {
      "generated_vs_test": float(inception_fid(fake, real, weights_path=self.inception_weights)),
      "num_images": len(real),
    }


TYPES: dict[str, type[Evaluator]] = {
  "reconstruction": Reconstruction,
  "text_to_image": TextToImage,
  "image_to_text": ImageToText,
  "scene_fd": SceneFD,
  "fid": FID,
}


def all_types() -> dict[str, type[Evaluator]]:
  """TYPES and the evaluators of modules that build on this one: `chat_draw` and `chat_qa`
  (`vqlm.eval.chat_eval`), `edit` (`vqlm.eval.edit_eval`), `video_continuation` and
  `text_to_video` (`vqlm.eval.video_eval`)."""
  from vqlm.eval import chat_eval, edit_eval, video_eval

  return {
    **TYPES,
    "chat_draw": chat_eval.ChatDraw,
    "chat_qa": chat_eval.ChatQA,
    "edit": edit_eval.EditEval,
    "video_continuation": video_eval.VideoContinuation,
    "text_to_video": video_eval.TextToVideo,
  }


# Evaluators that name their artefact files after their config.evals section.
_NAMED = ("text_to_image", "chat_draw", "chat_qa", "video_continuation", "text_to_video")


def build(evals: Mapping[str, Mapping[str, Any]], *, log_fn=print) -> dict[str, Evaluator]:
  """`{section: {"type": TYPE, **kwargs}}` -> `{section: Evaluator}`; errors name the valid types
  and the evaluator's own settings."""
  types = all_types()
  out = {}
  for name, spec in evals.items():
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in types:
      raise UserError(f"config.evals.{name}.type is {kind!r}; valid: {', '.join(types)}")
    try:
      out[name] = types[kind](log_fn=log_fn, **spec)
    except TypeError as e:
      where = types[kind].__module__.replace(".", "/") + ".py"
      raise UserError(
        f"config.evals.{name}: {e}; see {where} for the settings of '{kind}'"
      ) from None
    if kind in _NAMED:
      out[name].settings["name"] = name
  return out


def run_all(
  run: Any,
  evaluators: Mapping[str, Evaluator],
  *,
  workdir: str | None = None,
  artefacts: str | None = None,
  log_fn=print,
) -> dict[str, dict[str, Any]]:
  """Runs each evaluator on a loaded run; with `workdir`, writes each result as its section of
  `WORKDIR/eval.json` (next to the run's config) as soon as it is done."""
  from vqlm.runs import config_to_dict, write_eval

  results = {}
  for name, evaluator in evaluators.items():
    if evaluator.stage and evaluator.stage != run.config.get("stage"):
      raise UserError(
        f"evaluator '{name}' applies to {evaluator.stage} runs, not to "
        f"{run.config.get('stage')} runs"
      )
    results[name] = evaluator.run(run, artefacts)
    if workdir is not None:
      write_eval(workdir, name, results[name], config=config_to_dict(run.config))
    log_fn(
      f"{name}: "
      + ", ".join(f"{k}={v:.4g}" for k, v in results[name].items() if isinstance(v, float))
    )
  return results
