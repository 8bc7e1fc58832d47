"""The image tokenizer for real runs: VQ-GAN `base` on ImageNet at 256x256 (16x16 codes of 16384).

`vqlm train --config configs/tokenizer_imagenet.py --workdir /mnt/vqlm/runs/tok_in256
  --config.data.data_dir=/mnt/vqlm/tfds`

Arguments (`key=value,...`):
  size        base (57.6M params, LlamaGen-style) | large (104M)
  batch       global batch in images (default 128; a multiple of the data axis)
  perceptual  path of the perceptual loss's feature weights (`vqlm.nn.perceptual`); given, the
              loss adds perceptual_weight=1.0 (LlamaGen's), else pixel + GAN losses only
  class_names ImageNet class names file (captions for `vqlm encode`; see vqlm.data.sources)

Choices (see docs/scaling.md):
  mesh    pure data parallelism (data=-1): 57.6M params are 0.67 GiB of state per device
          (params + Adam, float32), so sharding them (fsdp) buys nothing; the batch is what
          costs memory.
  batch   128 images per step. The temporaries per image at 256x256 with the GAN on, as
          `vqlm compile` (CPU) reports them (docs/benchmarks.md), allow about 8 images per
          16 GiB device, 20 per 32 GiB, 50 per 80 GiB. So 128 images need 16 16-GiB chips
          (v5e-16) or 8 32-GiB ones (a v4-16 slice has 8 devices), or 4 GPUs; with more
          devices, raise the batch and the learning rate together.
  dtype   bfloat16 compute in the encoder and decoder, float32 parameters; the bottleneck's
          distances and argmin and all losses stay float32.
  remat   none and scan none: the conv autoencoder has no layer stack to scan and no remat
          switch; if a device runs out of memory, lower the per-device batch instead.
"""

import ml_collections

from vqlm.runtime.config import parse_arg
from vqlm.stages import tokenizer_config as tokenizer_family


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, size="base", batch=128, perceptual="", class_names="")
  if arg.size not in ("base", "large"):
    raise ValueError(f"unknown size '{arg.size}'; valid: base, large")
  c = tokenizer_family.get_config(f"size={arg.size},data=imagenet2012,gan=True")
  c.data.num_threads = 16  # JPEG decoding + resizing is the input pipeline's cost.
  if arg.class_names:
    c.data.source_kwargs = {"class_names": arg.class_names}
  for part in ("encoder", "decoder"):
    c.model[part].dtype = "bfloat16"
    c.model[part].param_dtype = "float32"
  if arg.perceptual:
    c.loss.perceptual_weight = 1.0
    c.loss.perceptual_weights_path = arg.perceptual
  c.train.batch_size = arg.batch
  c.train.update(log_every=100, sample_every=5000, checkpoint_every=5000, checkpoint_minutes=30.0)
  c.evals.tokenizer.update(num_examples=10_000, batch_size=250, split="validation")
  c.mesh.shape.update(data=-1, fsdp=1, tensor=1)
  return c
