"""The ladder demo's recipe: its presets and the tokenizer config of each rung.

Every rung has the same encoder and decoder (the library's `size` preset and the encoder the
ladder's preset names); only the bottleneck and the loss differ:

  autoencoder  bottleneck "identity"       continuous latents, no prior
  vae          bottleneck "gaussian"       continuous latents, KL to N(0, I)
  vq           bottleneck "vq"             nearest of K learned code words
  fsq          bottleneck "fsq"            per-channel rounding to fixed levels
  vqgan        bottleneck "vq" + PatchGAN  `loss.gan_weight` > 0, discriminator from mid-run
  vq2d         bottleneck "vq", 2-D codes  `code_dim=2`, no l2-normalisation: the Voronoi picture

The LM rung reuses the main demo's recipe (`vqlm.demo.recipe.lm_config`) on the FSQ rung's codes.
"""

import dataclasses

import ml_collections

from vqlm.demo import recipe as main_recipe
from vqlm.stages import tokenizer_config as tokenizer_defaults

RUNGS = ("autoencoder", "vae", "vq", "fsq", "vqgan")
VORONOI_RUNG = "vq2d"
BOTTLENECKS = {
  "autoencoder": "identity",
  "vae": "gaussian",
  "vq": "vq",
  "fsq": "fsq",
  "vqgan": "vq",
  "vq2d": "vq",
}
LABELS = {
  "autoencoder": "Autoencoder",
  "vae": "VAE",
  "vq": "VQ-VAE",
  "fsq": "FSQ",
  "vqgan": "VQ-GAN",
  "vq2d": "VQ, 2-D codes",
  "lm": "VQ + LM",
  "lm_uniform": "VQ + LM's tokenizer, uniform codes",
}


@dataclasses.dataclass(frozen=True)
class LadderPreset:
  """How much of everything the ladder does."""

  main: str  # The main demo's preset: its split sizes (and, without --main, its LM recipe).
  size: str  # The tokenizer size of every rung (`vqlm.nn.presets.AUTOENCODER_SIZES`).
  encoder: str
  steps: int  # Training steps of each rung.
  batch: int
  voronoi_steps: int
  voronoi_codes: int
  voronoi_frames: int
  lm_steps: int  # Without --main: the LM trained on the FSQ rung's codes.
  lm_batch: int
  eval_images: int  # Test images of the reconstruction evaluator.
  show: int  # Test images shown side by side.
  samples: int  # Random points decoded per rung.
  pairs: int  # Interpolation pairs.
  frames: int  # Frames per interpolation strip (the ends included).
  pool: int  # Training images searched for neighbours (and split by colour for attributes).
  queries: int  # Single-object test queries (neighbours, attribute edits).
  fsq_levels: tuple[int, ...] = (8, 8, 8)
  # The continuous rungs (autoencoder, VAE) downsample 8x: a 4x4x16 latent of a 32x32x3 image,
  # 8% of its numbers. At 8x8x16 the VAE's prior samples were faint specks at any KL weight tried
  # (1e-6 to 1e-1: at most ~10% parsed as scenes); at 4x4 each latent position spans an object
  # cell and they are blurry objects (docs/experiments.md).
  continuous_multipliers: tuple[int, ...] = (1, 1, 2, 2)
  vae_kl_weight: float = 1e-2
  # Code words of the VQ-VAE rung. With 512, uniformly random codes decoded to one-blob scenes
  # the parser accepts ~8% of the time (its decoder turns incoherent grids into near-black); with
  # 128, none in 512 draws, at 0.5 dB less PSNR (docs/experiments.md). 0: the size's default.
  vq_codes: int = 0
  # Colour A -> colour B edits. Neither red nor magenta has a held-out colour-shape pair, so an
  # edit never asks for a pair the tokenizers never saw (blue triangles are held out).
  attribute: tuple[str, str] = ("red", "magenta")


PRESETS = {
  # A few minutes on 2 CPU cores: every rung, section and artefact appears; numbers are rough.
  "smoke": LadderPreset(
    main="smoke",
    size="tiny",
    encoder="conv",
    steps=60,
    batch=32,
    voronoi_steps=60,
    voronoi_codes=16,
    voronoi_frames=4,
    lm_steps=40,
    lm_batch=16,
    eval_images=64,
    show=8,
    samples=16,
    pairs=3,
    frames=6,
    pool=512,
    queries=24,
  ),
  # About the main default demo's time (~20 minutes on 2 CPU cores), reusing --main's LM.
  "default": LadderPreset(
    main="default",
    size="small",
    encoder="conv",
    steps=700,
    batch=64,
    voronoi_steps=400,
    voronoi_codes=32,
    voronoi_frames=8,
    lm_steps=800,
    lm_batch=32,
    eval_images=500,
    show=10,
    samples=64,
    pairs=6,
    frames=9,
    pool=4000,
    queries=100,
    vq_codes=128,
  ),
}


def split_sizes(p: LadderPreset) -> dict[str, int]:
  """The main demo's split sizes for the same preset."""
  return main_recipe.split_sizes(main_recipe.PRESETS[p.main])


def rung_config(p: LadderPreset, rung: str, data_dir: str) -> ml_collections.ConfigDict:
  """The tokenizer config of `rung` (one of `RUNGS` or `VORONOI_RUNG`)."""
  gan = rung == "vqgan"
  c = tokenizer_defaults.get_config(
    f"size={p.size},data=shapes,encoder={p.encoder},bottleneck={BOTTLENECKS[rung]},gan={gan}"
  )
  c.data.data_dir = data_dir
  c.data.source_kwargs.sizes = split_sizes(p)
  steps = p.voronoi_steps if rung == VORONOI_RUNG else p.steps
  c.train.steps = steps
  c.train.batch_size = p.batch
  c.train.log_every = max(10, steps // 20)
  c.train.sample_every = max(10, steps // 6)
  c.train.checkpoint_every = max(10, steps // 4)
  c.optim.warmup_steps = max(1, min(c.optim.warmup_steps, steps // 10))
  c.evals.tokenizer.update(num_examples=p.eval_images, batch_size=min(250, p.eval_images))
  if rung == "fsq":
    c.model.bottleneck.levels = tuple(p.fsq_levels)
  if rung in ("autoencoder", "vae"):
    c.model.encoder.channel_multipliers = tuple(p.continuous_multipliers)
    c.model.decoder.channel_multipliers = tuple(p.continuous_multipliers)
  if rung == "vae":
    c.model.bottleneck.kl_weight = p.vae_kl_weight
  if rung == "vq" and p.vq_codes:
    c.model.bottleneck.codebook_size = p.vq_codes
  if gan:
    c.loss.disc_start = steps // 2  # The discriminator joins half way.
  if rung == VORONOI_RUNG:
    c.model.bottleneck.code_dim = 2
    c.model.bottleneck.l2_normalize = False
    c.model.bottleneck.codebook_size = p.voronoi_codes
    # A codebook snapshot and a kept checkpoint at the same steps: every frame has latents.
    every = max(5, steps // p.voronoi_frames)
    c.train.sample_every = every
    c.train.checkpoint_every = every
    c.train.keep_checkpoints = p.voronoi_frames + 2
  return c


def lm_preset(p: LadderPreset) -> main_recipe.Preset:
  """The main demo's preset with the ladder's LM steps and FSQ levels (for `recipe.lm_config`)."""
  return dataclasses.replace(
    main_recipe.PRESETS[p.main],
    lm_steps=p.lm_steps,
    lm_batch=p.lm_batch,
    fsq_levels=tuple(p.fsq_levels),
    tokenizer_encoder=p.encoder,
  )
