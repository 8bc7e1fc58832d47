"""Image tokenizer (VQ-VAE / VQ-GAN) configs.

`vqlm train --config configs/tokenizer.py:data=shapes,size=small --workdir RUN`

Arguments (`key=value,...`):
  size        tiny (tests, seconds) | small (the CPU demo: 32x32 -> 8x8 codes) |
              base / large (256x256 on accelerators) | dalle (256x256 -> 32x32 grid, 8192 codes)
  data        shapes | digits | photos | mnist | cifar10 | imagenet2012 | coco_captions | folder
  bottleneck  vq | fsq | gaussian | identity
  encoder     conv (ResNet, each code sees a wide context) | patch (each code a function of its own
              patch only: `vqlm.nn.autoencoder.PatchEncoder`) | split (patch, with a patch's form
              and colour in separate FSQ channels: `SplitPatchEncoder`; needs bottleneck=fsq)
  gan         add the PatchGAN discriminator (VQ-GAN); on by default for base/large/dalle
  image_size  override the size's default resolution
"""

import ml_collections

from vqlm.errors import UserError
from vqlm.nn.presets import AUTOENCODER_SIZES
from vqlm.runtime.config import choose, mesh_config, parse_arg

# How each size is trained (its shape is `vqlm.nn.presets.AUTOENCODER_SIZES`).
RECIPES = {
  "tiny": dict(batch_size=8, steps=20, lr=2e-3),
  "small": dict(batch_size=64, steps=4000, lr=2e-3),
  "base": dict(batch_size=128, steps=400_000, lr=1e-4),
  "large": dict(batch_size=256, steps=400_000, lr=1e-4),
  "dalle": dict(batch_size=128, steps=400_000, lr=1e-4),
}
SIZES = tuple(RECIPES)

DATA = (
  "shapes",
  "moving_shapes",
  "digits",
  "photos",
  "mnist",
  "cifar10",
  "imagenet2012",
  "coco_captions",
  "folder",
)


def bottleneck_config(kind: str, s: dict) -> dict:
  common = {"kind": kind, "latent_dim": s["latent_dim"]}
  options = {
    "vq": dict(
      codebook_size=s["codebook_size"],
      code_dim=s["code_dim"],
      beta=0.25,
      # None: the codebook is learned by its loss; a float in (0, 1): EMA updates. (A placeholder,
      # so that `--config.model.bottleneck.ema_decay=0.99` can override it.)
      ema_decay=ml_collections.config_dict.placeholder(float),
      l2_normalize=True,
      kmeans_init=True,
      restart_after=50,
    ),
    "fsq": dict(levels=(8, 5, 5, 5) if s["codebook_size"] >= 1000 else (8, 8, 8)),
    "gaussian": dict(kl_weight=1e-6),
    "identity": dict(),
  }
  return {**common, **choose("bottleneck", kind, options)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(
    arg,
    size="small",
    data="shapes",
    bottleneck="vq",
    encoder="conv",
    gan=False,
    image_size=0,
    runlocal=False,
  )
  s = {**choose("size", arg.size, RECIPES), **AUTOENCODER_SIZES[arg.size]}
  if arg.data not in DATA:
    raise UserError(f"unknown dataset '{arg.data}'; valid: {', '.join(DATA)}")
  image_size = arg.image_size or s["image_size"]
  gan = arg.gan or arg.size in ("base", "large", "dalle")

  c = ml_collections.ConfigDict()
  c.stage = "tokenizer"

  c.data = dict(
    name=arg.data,
    data_dir="",
    image_size=image_size,
    num_threads=2,
    # Quality filters on the training split (vqlm/data/filters.py), e.g.
    # {"min_pixel_std": 2.0, "exact_duplicates": True}; counts go to WORKDIR/filters.json.
    filters={},
    # Translate each training image by up to this many pixels per axis (0: off), so the
    # tokenizer sees objects where a data set never draws them, e.g. the in-between positions
    # of moving objects.
    max_shift=0,
    # ... that share of them (the rest as the data set draws them).
    shift_fraction=1.0,
    # Source-specific options (e.g. shapes: min/max objects and split sizes; folder:
    # validation_fraction). A folder of images is given as data_dir.
    source_kwargs=({"min_objects": 1, "max_objects": 2} if arg.data == "shapes" else {}),
  )

  autoencoder = dict(
    channels=s["channels"],
    channel_multipliers=s["channel_multipliers"],
    num_res_blocks=s["num_res_blocks"],
    attention_at_lowest=s["attention"],
  )
  encoder = choose(
    "encoder",
    arg.encoder,
    {
      "conv": dict(autoencoder),
      # Twice the width of the conv encoder's lowest level, 2 residual MLP blocks per patch.
      "patch": dict(autoencoder, kind="patch", channels=2 * s["channels"], mlp_blocks=2),
      # The patch encoder with form and colour in separate channels; FSQ only (below).
      "split": dict(
        autoencoder, kind="split", channels=2 * s["channels"], mlp_blocks=2, colour_channels=2
      ),
    },
  )
  if arg.encoder == "split":
    if arg.bottleneck != "fsq":
      raise UserError("encoder=split needs bottleneck=fsq (one latent channel per FSQ level)")
    # Six channels of 4 levels: 4 of form, 2 of colour; no projection around the FSQ.
    s = dict(s, latent_dim=6)
  c.model = dict(
    encoder=dict(encoder, latent_dim=s["latent_dim"]),
    decoder=dict(autoencoder),
    bottleneck=bottleneck_config(arg.bottleneck, s),
  )
  if arg.encoder == "split":
    c.model.bottleneck.levels = (4,) * 6

  c.loss = dict(
    recon="l1" if gan else "l2",
    recon_weight=1.0,
    perceptual_weight=0.0,
    perceptual_weights_path="",
    gan_weight=0.1 if gan else 0.0,
    disc_start=20_000 if gan else 0,
    adaptive_weight=True,
  )

  c.optim = dict(
    learning_rate=s["lr"],
    warmup_steps=min(200, s["steps"] // 10),
    end_lr_fraction=0.1,
    weight_decay=0.0,
    b1=0.9,
    b2=0.99,
    eps=1e-8,
    clip_norm=1.0,
  )

  c.train = dict(
    steps=s["steps"],
    batch_size=s["batch_size"],
    seed=0,
    log_every=50,
    sample_every=500,
    checkpoint_every=1000,
    checkpoint_minutes=10.0,
    keep_checkpoints=3,
    # Steps divisible by this are permanent checkpoints, never deleted (0: none).
    keep_every_steps=0,
    # How a checkpoint commits: auto (commit_file on FUSE mounts and gs://, else rename),
    # rename, or commit_file.
    checkpoint_commit="auto",
    max_consecutive_skips=10,
    # > 0: skip an update whose loss exceeds the running mean + spike_sigma * std (an EMA),
    # after spike_warmup applied updates; 0: only non-finite updates are skipped.
    spike_sigma=0.0,
    spike_warmup=100,
  )
  # Run after training (and by `vqlm eval`); each entry is one section of RUN/eval.json
  # (`vqlm.eval.evaluators`: type + settings).
  c.evals = {
    "tokenizer": dict(type="reconstruction", split="test", num_examples=1000, batch_size=250)
  }
  c.mesh = mesh_config()

  if arg.size == "tiny" or arg.runlocal:
    c.train.update(log_every=5, sample_every=10, checkpoint_every=10)
    c.evals.tokenizer.update(num_examples=32, batch_size=16)
    if arg.data == "shapes":
      c.data.source_kwargs.sizes = {"train": 256, "validation": 32, "test": 32, "test_heldout": 32}
  return c
