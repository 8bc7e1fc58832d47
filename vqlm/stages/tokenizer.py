"""Stage 1 from a config: data, the image-tokenizer task, hooks, the shared loop, then the
config's evaluators (`config.evals`) on the trained run. A trained run is read back for use by
`vqlm.runs.TokenizerRun`.
"""

from collections.abc import Mapping
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm import imaging, runs
from vqlm.data.sources import source_from_config
from vqlm.eval import evaluators as evaluators_lib
from vqlm.eval import reconstruction
from vqlm.nn.image_tokenizer import ImageTokenizer
from vqlm.runs import TokenizerRun
from vqlm.runtime import workdir_lock
from vqlm.runtime.config import as_kwargs
from vqlm.stages.wiring import make_trainer
from vqlm.train import loop
from vqlm.train.optim import make_optimizer
from vqlm.train.tokenizer_task import TokenizerTask


def build_task(config: ml_collections.ConfigDict) -> TokenizerTask:
  optim = as_kwargs(config.optim)
  optimizer, _ = make_optimizer(total_steps=config.train.steps, **optim)
  disc_optimizer = None
  if config.loss.gan_weight > 0:
    disc_optimizer, _ = make_optimizer(total_steps=config.train.steps, **optim)
  return TokenizerTask(
    model_kwargs=as_kwargs(config.model),
    loss=as_kwargs(config.loss),
    optimizer=optimizer,
    disc_optimizer=disc_optimizer,
  )


def build_trainer(config: ml_collections.ConfigDict, *, progress: bool = True) -> loop.Trainer:
  return make_trainer(build_task(config), config, progress=progress)


def _example_batch(config) -> dict[str, np.ndarray]:
  size = config.data.image_size
  return {"image": np.zeros((config.train.batch_size, size, size, 3), np.float32)}


def _collections(extra: Mapping[str, Any]) -> dict[str, Any]:
  """The non-trainable flax collections kept in `state.extra` (e.g. the VQ's batch_stats)."""
  return {k: v for k, v in (extra or {}).items() if k == "batch_stats"}


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  progress: bool = True,
  log_fn=print,
  checkpoint_dir: str | None = None,
  after_save=None,
) -> dict[str, float]:
  """Trains the image tokenizer, saves grids and metrics, and writes the final eval to eval.json.

  `checkpoint_dir` and `after_save` are `loop.run`'s. Refused (UserError) while another run
  trains in `workdir`."""
  loop_kwargs = dict(checkpoint_dir=checkpoint_dir, after_save=after_save)
  with workdir_lock.hold(workdir):
    return _train(config, workdir, progress=progress, log_fn=log_fn, loop_kwargs=loop_kwargs)


def _train(config, workdir, *, progress, log_fn, loop_kwargs) -> dict[str, float]:
  runs.check_same_model(workdir, config, sections=("model", "data"))
  runs.save_config(workdir, config)
  from vqlm.data import pipeline
  from vqlm.data.memory_cache import cache_images

  trainer = build_trainer(config, progress=progress)
  source = source_from_config(config.data, "train")
  if config.data.get("filters"):
    from vqlm.data.filters import apply_filters, make_filters

    source, counts = apply_filters(
      source,
      make_filters(as_kwargs(config.data.filters)),
      report_path=os.path.join(workdir, "filters.json"),
    )
    log_fn(
      f"filters kept {counts['kept']} of {counts['total']} training images: {counts['removed']}"
    )
  source = cache_images(source, log_fn=log_fn) or source
  data_iter = pipeline.make_iterator(
    source,
    global_batch_size=config.train.batch_size,
    transform=pipeline.image_transform(
      max_shift=int(config.data.get("max_shift", 0)),
      shift_fraction=float(config.data.get("shift_fraction", 1.0)),
      seed=config.train.seed,
    ),
    seed=config.train.seed,
    num_threads=config.data.get("num_threads", 2),
  )
  valid = source_from_config(config.data, "validation")
  grid_images = np.stack([valid[i]["image"] for i in range(min(16, len(valid)))])
  grid_input = jnp.asarray(grid_images.astype(np.float32) / 127.5 - 1.0)
  writer_dir = os.path.join(workdir, "samples")
  reconstruct = jax.jit(trainer.task.reconstruct)
  model = ImageTokenizer(**as_kwargs(config.model))
  discrete = model.codebook_size > 0
  codebook = jax.jit(
    lambda params, extra: model.apply(
      {"params": params, **_collections(extra)}, method=model.codebook
    )
  )

  def save_grid(state, step):
    """Inputs (top row) vs reconstructions (bottom row), and a snapshot of the codebook."""
    with trainer.context():
      recon = imaging.to_uint8(np.asarray(reconstruct(state.params, state.extra, grid_input)))
      vectors = np.asarray(codebook(state.params, state.extra)) if discrete else None
    if jax.process_index() == 0:
      both = np.concatenate([grid_images, recon])
      imaging.save_png(
        imaging.make_grid(both, columns=len(grid_images), scale=2),
        os.path.join(writer_dir, f"recon_{step:07d}.png"),
      )
      if vectors is not None:
        np.save(os.path.join(writer_dir, f"codebook_{step:07d}.npy"), vectors)
    return {"psnr_grid": float(np.mean(reconstruction.psnr(grid_images, recon)))}

  hooks = [loop.Hook(every=config.train.sample_every, fn=save_grid, name="valid")]
  loop.run(
    trainer,
    data_iter=data_iter,
    workdir=workdir,
    hooks=hooks,
    meta={"stage": "tokenizer"},
    log_fn=log_fn,
    **loop_kwargs,
  )
  return run_evals(config, workdir, log_fn=log_fn)


def run_evals(config: ml_collections.ConfigDict, workdir: str, *, log_fn=print) -> dict:
  """Runs `config.evals` on the trained run (parameters only) and writes RUN/eval.json, and
  image grids (e.g. a VAE's prior samples) to RUN/samples."""
  run = TokenizerRun(workdir)
  evaluators = evaluators_lib.build(as_kwargs(config.evals), log_fn=log_fn)
  return evaluators_lib.run_all(
    run,
    evaluators,
    workdir=workdir if jax.process_index() == 0 else None,
    artefacts=os.path.join(workdir, "samples"),
    log_fn=log_fn,
  )
