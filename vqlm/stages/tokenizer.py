"""Stage 1 from a config: data, the image-tokenizer task, hooks, the shared loop, the final eval.

Also reads a trained tokenizer back from its run directory (`load_tokenizer`), which `vqlm encode`,
generation and evaluation use.
"""
import json
import os
from collections.abc import Mapping
from typing import Any

from vqlm.runtime.config import as_kwargs
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm import imaging
from vqlm.runtime import mesh as mesh_lib
from vqlm import runs
from vqlm.runtime.checkpoint import Checkpointer
from vqlm.eval import reconstruction
from vqlm.nn.image_tokenizer import ImageTokenizer
from vqlm.train.optim import make_optimizer
from vqlm.train import loop
from vqlm.train.tokenizer_task import TokenizerTask


def source_from_config(data: ml_collections.ConfigDict, split: str):
  """The data set a config's `data` section names, for one split."""
  from vqlm.data.sources import get_source  # Data libraries load only where data is read.
  kwargs = as_kwargs(data.get("source_kwargs", {})) or {}
  return get_source(data.name, split=split, data_dir=data.data_dir or None,
                    image_size=data.image_size, **kwargs)


def build_task(config: ml_collections.ConfigDict) -> TokenizerTask:
  optim = as_kwargs(config.optim)
  optimizer, _ = make_optimizer(total_steps=config.train.steps, **optim)
  disc_optimizer = None
  if config.loss.gan_weight > 0:
    disc_optimizer, _ = make_optimizer(total_steps=config.train.steps, **optim)
  return TokenizerTask(model_kwargs=as_kwargs(config.model), loss=as_kwargs(config.loss),
                       optimizer=optimizer, disc_optimizer=disc_optimizer)


def build_trainer(config: ml_collections.ConfigDict, *, progress: bool = True) -> loop.Trainer:
  mesh = mesh_lib.make_mesh(as_kwargs(config.mesh.shape))
  t = config.train
  options = loop.LoopOptions(
      steps=t.steps, seed=t.seed, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
      checkpoint_minutes=t.checkpoint_minutes, keep_checkpoints=t.keep_checkpoints,
      max_consecutive_skips=t.max_consecutive_skips, progress=progress)
  return loop.Trainer(build_task(config), mesh=mesh, rules=config.mesh.rules, options=options)


def _example_batch(config) -> dict[str, np.ndarray]:
  size = config.data.image_size
  return {"image": np.zeros((config.train.batch_size, size, size, 3), np.float32)}


class TokenizerRun:
  """A trained image tokenizer read from its run directory.

  `encode(images uint8 [B, H, W, 3]) -> codes int32 [B, h, w]` and
  `decode(codes) -> images uint8 [B, H, W, 3]`, both jitted; `codebook() -> float32 [K, D]`.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, state: Any):
    self.workdir = workdir
    self.config = config
    self.model = ImageTokenizer(**as_kwargs(config.model))
    self.variables = {"params": state.params, **_collections(state.extra)}
    self.step = int(jax.device_get(state.step))
    self._encode = jax.jit(lambda v, x: self.model.apply(v, x, method=self.model.encode))
    self._decode = jax.jit(lambda v, c: self.model.apply(v, c, method=self.model.decode))

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  def encode(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    return np.asarray(self._encode(self.variables, jnp.asarray(images)))

  def decode(self, codes: np.ndarray) -> np.ndarray:
    return imaging.to_uint8(np.asarray(self._decode(self.variables, jnp.asarray(codes))))

  def codebook(self) -> np.ndarray:
    return np.asarray(self.model.apply(self.variables, method=self.model.codebook))

  @property
  def grid(self) -> tuple[int, int]:
    size = self.image_size
    codes = jax.eval_shape(
        lambda v, x: self.model.apply(v, x, method=self.model.encode), self.variables,
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return tuple(codes.shape[1:])

  @property
  def codebook_size(self) -> int:
    return int(self.codebook().shape[0])


def _collections(extra: Mapping[str, Any]) -> dict[str, Any]:
  """The non-trainable flax collections kept in `state.extra` (e.g. the VQ's batch_stats)."""
  return {k: v for k, v in (extra or {}).items() if k == "batch_stats"}


def load_tokenizer(workdir: str) -> TokenizerRun:
  """Restores the latest checkpoint of a tokenizer run directory."""
  config = runs.load_config(workdir)
  if config.get("stage") != "tokenizer":
    raise ValueError(f"{workdir} is not an image-tokenizer run (stage={config.get('stage')}); "
                     "point --tokenizer at a run made with configs/tokenizer.py")
  trainer = build_trainer(config, progress=False)
  target = trainer.abstract_target(mesh_lib.global_batch(_example_batch(config), trainer.mesh))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  restored = ckpt.restore(target)
  ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train the tokenizer first")
  return TokenizerRun(workdir, config, restored.state)


def evaluate(run: TokenizerRun, *, split: str = "test", num_examples: int = 1000,
             batch_size: int = 250) -> dict[str, float]:
  """PSNR, SSIM, codebook usage/perplexity and (on shapes) scene-parser agreement."""
  source = source_from_config(run.config.data, split)
  n = min(num_examples, len(source))
  originals, recons, codes, agree = [], [], [], []
  parse = None
  if run.config.data.name == "shapes":
    from vqlm.data import shapes
    from vqlm.eval import scene_parser
    parse = (scene_parser.parse_image, shapes.canonical)
  for start in range(0, n, batch_size):
    items = [source[i] for i in range(start, min(n, start + batch_size))]
    images = np.stack([item["image"] for item in items])
    batch_codes = run.encode(images)
    recon = run.decode(batch_codes)
    originals.append(images)
    recons.append(recon)
    codes.append(batch_codes)
    if parse is not None:
      for item, image in zip(items, recon):
        agree.append(parse[1](parse[0](image)) == parse[1](item["scene"]))
  originals, recons = np.concatenate(originals), np.concatenate(recons)
  stats = reconstruction.codebook_stats(np.concatenate(codes), run.codebook_size)
  result = {
      "split": split,
      "num_examples": int(n),
      "psnr": float(np.mean(np.minimum(reconstruction.psnr(originals, recons), 100.0))),
      "ssim": float(np.mean(reconstruction.ssim(originals, recons))),
      "codebook_usage": stats["usage"],
      "codebook_perplexity": stats["perplexity"],
      "dead_codes": stats["dead_codes"],
      "step": run.step,
  }
  if agree:
    result["scene_agreement"] = float(np.mean(agree))
  return result


def write_eval(workdir: str, section: str, result: Mapping[str, Any]) -> str:
  """Merges `{section: result}` into `WORKDIR/eval.json` (with the config that produced it)."""
  path = os.path.join(workdir, "eval.json")
  data = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  data[section] = dict(result)
  data["config"] = runs.config_to_dict(runs.load_config(workdir))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def train(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
          log_fn=print) -> dict[str, float]:
  """Trains the image tokenizer, saves grids and metrics, and writes the final eval to eval.json."""
  runs.check_same_model(workdir, config, sections=("model", "data"))
  runs.save_config(workdir, config)
  from vqlm.data import pipeline
  trainer = build_trainer(config, progress=progress)
  source = source_from_config(config.data, "train")
  if config.data.get("filters"):
    from vqlm.data.filters import apply_filters, make_filters
    source, counts = apply_filters(source, make_filters(as_kwargs(config.data.filters)),
                                   report_path=os.path.join(workdir, "filters.json"))
    log_fn(f"filters kept {counts['kept']} of {counts['total']} training images: "
           f"{counts['removed']}")
  data_iter = pipeline.make_iterator(
      source, global_batch_size=config.train.batch_size, transform=pipeline.image_transform(),
      seed=config.train.seed, num_threads=config.data.get("num_threads", 2))
  valid = source_from_config(config.data, "validation")
  grid_images = np.stack([valid[i]["image"] for i in range(min(16, len(valid)))])
  grid_input = jnp.asarray(grid_images.astype(np.float32) / 127.5 - 1.0)
  writer_dir = os.path.join(workdir, "samples")
  reconstruct = jax.jit(trainer.task.reconstruct)
  model = ImageTokenizer(**as_kwargs(config.model))
  discrete = model.codebook_size > 0
  codebook = jax.jit(lambda params, extra: model.apply(
      {"params": params, **_collections(extra)}, method=model.codebook))

  def save_grid(state, step):
    """Inputs (top row) vs reconstructions (bottom row), and a snapshot of the codebook."""
    with trainer.context():
      recon = imaging.to_uint8(np.asarray(reconstruct(state.params, state.extra, grid_input)))
      vectors = np.asarray(codebook(state.params, state.extra)) if discrete else None
    if jax.process_index() == 0:
      both = np.concatenate([grid_images, recon])
      imaging.save_png(imaging.make_grid(both, columns=len(grid_images), scale=2),
                       os.path.join(writer_dir, f"recon_{step:07d}.png"))
      if vectors is not None:
        np.save(os.path.join(writer_dir, f"codebook_{step:07d}.npy"), vectors)
    return {"psnr_grid": float(np.mean(reconstruction.psnr(grid_images, recon)))}

  hooks = [loop.Hook(every=config.train.sample_every, fn=save_grid, name="valid")]
  loop.run(trainer, data_iter=data_iter, workdir=workdir, hooks=hooks,
           meta={"stage": "tokenizer"}, log_fn=log_fn)
  run = load_tokenizer(workdir)
  result = evaluate(run, split=config.eval.split, num_examples=config.eval.num_examples,
                    batch_size=config.eval.batch_size)
  if jax.process_index() == 0:
    write_eval(workdir, "tokenizer", result)
  log_fn("tokenizer eval: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in result.items()))
  return result
