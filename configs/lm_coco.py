"""LMs for real runs: `large` / `xl` on pre-encoded captioned images (COCO captions or alike).

`vqlm train --config configs/lm_coco.py:size=xl --config.data.codes=/mnt/vqlm/codes/coco
  --workdir /mnt/vqlm/runs/lm_xl`

The codes come from `vqlm encode` with the 256x256 tokenizer of configs/tokenizer_imagenet.py
(16x16 grids of 16384 codes), so one text-to-image example is <bos> caption <boi> 256 codes <eoi>
<eos>: `train.seq_len` is 384 (captions up to 125 SentencePiece ids), not the 2048 of
configs/lm.py, whose padding would waste 80% of the compute here.

Arguments (`key=value,...`):
  size   large (342M params) | xl (1.37B)
  fsdp   devices one copy of the parameters is sharded over (default: large 1, xl 8); the
         remaining devices form the data axis, so the device count must be a multiple of it
  batch  global batch in sequences (default: large 512, xl 1024)
  remat  none | full | dots | dots_with_no_batch_dims (default: dots_with_no_batch_dims)

Choices (see docs/scaling.md for the arithmetic):
  mesh   large: data parallel (12 bytes/param of float32 params + Adam = 4.1 GB, plus 1.4 GB of
         gradients, fits every current accelerator). xl: 16.4 GB of state + 5.5 GB of gradients
         does not fit a 16 GiB chip, so parameters, gradients and Adam moments are sharded over
         fsdp=8 (2.7 GB per device) and the data axis takes the other devices.
  batch  large 512 x 384 = 197k tokens per step, xl 1024 x 384 = 393k (a multiple of data x fsdp).
  remat  dots_with_no_batch_dims keeps the projections' outputs and recomputes the attention
         scores in the backward pass: the activations of one layer per sequence, not all of them.
  scan   scan_layers=True: one compiled layer body (compile time independent of depth) and the
         per-layer FSDP all-gathers can be pipelined (launch/_gpu_env.sh, launch/tpu_pod.sh).
"""

import ml_collections

from vqlm.runtime.config import choose, parse_arg
from vqlm.stages import lm_config as lm_family

SIZES = {
  "large": dict(fsdp=1, batch=512, steps=100_000, lr=3e-4),
  "xl": dict(fsdp=8, batch=1024, steps=150_000, lr=2e-4),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, size="large", fsdp=0, batch=0, remat="dots_with_no_batch_dims")
  s = choose("size", arg.size, SIZES)
  c = lm_family.get_config(f"size={arg.size},dtype=bfloat16,remat={arg.remat}")
  c.model.scan_layers = True
  c.data.update(
    text_vocab_size=16000,
    max_text_len=125,
    mixture="t2i=0.7,i2t=0.3",
    caption_dropout=0.1,
    num_threads=8,
  )
  c.train.update(
    seq_len=384,
    batch_size=arg.batch or s["batch"],
    steps=s["steps"],
    log_every=100,
    eval_every=2000,
    checkpoint_every=2000,
    checkpoint_minutes=30.0,
  )
  c.optim.update(learning_rate=s["lr"], warmup_steps=2000)
  c.mesh.shape.update(data=-1, fsdp=arg.fsdp or s["fsdp"], tensor=1)
  return c
