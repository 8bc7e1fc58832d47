"""`python -m vqlm.bench tokenizer --config configs/tokenizer.py:size=small [--batch 64]`.

Throughput of the image tokenizer in images/s: the training step (the loop's jitted, guarded step
on the config's mesh, state donated, GAN terms included when the config has them), `encode`
(images -> codes) and `decode` (codes -> images), each on random images with randomly initialised
weights. Compile time is excluded from the rates and printed separately (the first call). Uses
every device the process sees (the batch is split over data x fsdp).

Imports no data library (grain, TFDS), so it runs from a plain checkout on a machine that has
only jax, flax, optax, orbax and ml-collections; importing the module (for `time_calls`, as
`vqlm.bench.device` does) needs none of ml-collections either.
"""

from collections.abc import Callable, Mapping
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqlm.errors import UserError


def _define(f) -> None:
  f.DEFINE_integer("batch", 0, "images per call (default: config.train.batch_size)")
  f.DEFINE_integer("steps", 10, "timed calls per repeat (after the first, compiling call)")
  f.DEFINE_integer("repeats", 3, "timed repeats; the best is reported")


def build_trainer(config) -> Any:
  """The loop's Trainer for a tokenizer config (no data library is imported)."""
  from vqlm.stages.tokenizer import build_trainer as build

  return build(config, progress=False)


def time_calls(
  call: Callable[[Any], Any], carry: Any, *, steps: int, repeats: int
) -> tuple[float, float, Any]:
  """(compile seconds, best seconds per call, carry): `carry = call(carry)` repeatedly.

  The first call (tracing + compiling + one run) is timed on its own; a second, untimed call
  absorbs a recompilation if the carry's sharding changed; then `repeats` runs of `steps` calls
  each, blocking on the result at the end of each run.
  """
  start = time.perf_counter()
  carry = jax.block_until_ready(call(carry))
  compile_s = time.perf_counter() - start
  carry = jax.block_until_ready(call(carry))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      carry = call(carry)
    carry = jax.block_until_ready(carry)
    best = min(best, (time.perf_counter() - start) / steps)
  return compile_s, best, carry


def time_torch_tokenizer(
  kw: Mapping[str, Any], image_size: int, batch: int, steps: int, repeats: int, device: str
) -> float | str:
  """Images/s of the generator step of a diffusers `VQModel` shaped like `ImageTokenizer(**kw)`
  (L1 + commitment loss, AdamW, clipping), or a skip message."""
  try:
    import torch
  except ImportError:
    return "skipped: torch not installed"
  from vqlm.bench.lm import best_step_seconds
  from vqlm.testing.torch_refs import prepare_torch_imports

  prepare_torch_imports()  # the interop extra's torchvision (vqlm.testing.torch_refs)
  try:
    from diffusers import VQModel
  except ImportError:
    return "skipped: diffusers not installed"
  from vqlm.nn.autoencoder import num_groups

  enc, vq = kw["encoder"], kw["bottleneck"]
  mults = tuple(enc["channel_multipliers"])
  torch.manual_seed(0)
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  model = VQModel(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * len(mults),
    up_block_types=("UpDecoderBlock2D",) * len(mults),
    block_out_channels=tuple(enc["channels"] * m for m in mults),
    layers_per_block=enc["num_res_blocks"],
    latent_channels=enc["latent_dim"],
    sample_size=image_size,
    num_vq_embeddings=vq["codebook_size"],
    vq_embed_dim=vq["code_dim"],
    norm_num_groups=num_groups(enc["channels"]),
    mid_block_add_attention=enc["attention_at_lowest"],
  ).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
  images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def one():
    recon, commit = model(images, return_dict=False)
    loss = (recon - images).abs().mean() + commit
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return batch / best_step_seconds(one, steps=steps, repeats=repeats, sync=sync)


def main(argv: list[str]) -> int:
  from vqlm.commands import flags as flag_lib
  from vqlm.runtime.config import as_kwargs

  fv = flag_lib.parse(argv, _define, config=True)
  config = flag_lib.require_config(fv)
  if config.get("stage") != "tokenizer":
    raise UserError(
      "vqlm.bench tokenizer needs an image-tokenizer config, e.g. "
      "--config configs/tokenizer.py:size=small"
    )
  config = config.copy_and_resolve_references()
  if fv.batch:
    config.train.batch_size = fv.batch
  from vqlm.nn import image_tokenizer as it
  from vqlm.runtime import mesh as mesh_lib
  from vqlm.train.tokenizer_task import TokenizerTask

  trainer = build_trainer(config)
  mesh = trainer.mesh
  b, size = config.train.batch_size, config.data.image_size
  if b % mesh_lib.batch_divisor(mesh):
    raise UserError(
      f"--batch {b} is not divisible by data x fsdp = "
      f"{mesh_lib.batch_divisor(mesh)}; pass a multiple of it"
    )
  rng = np.random.default_rng(0)
  local = rng.uniform(-1, 1, (b // jax.process_count(), size, size, 3)).astype(np.float32)
  batch = mesh_lib.global_batch({"image": local}, mesh)
  state = trainer.init_state(jax.random.key(0), batch)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  model = it.ImageTokenizer(**as_kwargs(config.model))
  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform})")
  grid = model.grid_shape(size, size)
  codes_desc = f"{model.codebook_size} codes" if model.is_discrete else "continuous latents"
  print(
    f"tokenizer: {size}x{size} -> {grid[0]}x{grid[1]} ({codes_desc}), {num_params:,} params, "
    f"batch {b}, gan={config.loss.gan_weight > 0}"
  )

  key = jax.random.key(1)

  def train(carry):
    s, _ = carry
    s, metrics = trainer.step(s, batch, key)
    return s, metrics["loss"]

  compile_s, per_step, (state, _) = time_calls(
    train, (state, jnp.zeros(())), steps=fv.steps, repeats=fv.repeats
  )
  print(f"train step: {b / per_step:,.1f} images/s (compile {compile_s:.1f}s, excluded)")

  variables = TokenizerTask.variables(state.params, state.extra)
  if model.is_discrete:
    encode = lambda v, x: it.encode(model, v, x)
    decode = lambda v, c: it.decode(model, v, c)
    names = ("encode", "decode")
  else:
    encode = lambda v, x: model.apply(v, x, method=model.encode_latent)
    decode = lambda v, z: model.apply(v, z, method=model.decode_latent)
    names = ("encode (latent)", "decode (latent)")

  def chained(fn):
    """jit(v, x, c) -> (fn(v, x + c), next c): c is a zero that depends on the previous call, so
    timed calls run one after another whatever the runtime's dispatch order. The full output is
    returned (and dropped by the caller) so that XLA computes all of it."""

    def call(v, x, c):
      out = fn(v, x + c)
      return out, (out.reshape(-1)[0] * 0).astype(c.dtype)

    return jax.jit(call)

  images = batch["image"]
  with trainer.context():
    codes = jax.jit(encode)(variables, images)
    for name, fn, x in ((names[0], encode, images), (names[1], decode, codes)):
      call = chained(fn)
      compile_s, per_call, _ = time_calls(
        lambda c, call=call, x=x: call(variables, x, c)[1],
        jnp.zeros((), x.dtype),
        steps=fv.steps,
        repeats=fv.repeats,
      )
      print(f"{name}: {b / per_call:,.1f} images/s (compile {compile_s:.1f}s, excluded)")
  return 0
