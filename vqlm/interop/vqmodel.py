"""diffusers' `VQModel` (taming VQGAN, as aMUSEd / MUSE and the LDM VQ autoencoders ship it) as
a vqlm image-tokenizer run.

`convert(HFCheckpoint)` maps the safetensors weights (read lazily, no torch) onto an
`ImageTokenizer` with the taming layout (`vqlm.nn.taming`) and a plain VQ bottleneck (argmin of
the Euclidean distance to the raw codebook, as diffusers' `VectorQuantizer`); `import_run(src,
out)` writes the run that `TokenizerRun(out)` loads. `encode` gives the codes diffusers'
`quantize` picks after `encode`; `decode(codes)` is diffusers' `decode` of the codebook rows
(`force_not_quantize=True`).

The small tensor helpers here (torch conv / linear / GroupNorm -> Flax, the VQ variables) are
shared by the Janus and Chameleon importers.
"""

import math
import os
from typing import Any

import numpy as np

from vqlm.errors import UserError
from vqlm.interop import run_files
from vqlm.interop.checkpoint_files import HFCheckpoint, Lazy, lazy

FORMAT = "diffusers VQModel"
NORM_EPS = 1e-6  # every GroupNorm of the taming family (diffusers' resnet_eps)

# diffusers' VQModel defaults (its config.json may leave defaults out).
DEFAULTS = {
  "in_channels": 3,
  "out_channels": 3,
  "down_block_types": ["DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D"],
  "block_out_channels": [64],
  "layers_per_block": 1,
  "act_fn": "silu",
  "latent_channels": 3,
  "sample_size": 32,
  "num_vq_embeddings": 256,
  "norm_num_groups": 32,
  "vq_embed_dim": None,
  "norm_type": "group",
  "mid_block_add_attention": True,
}
DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


# ---- torch tensors -> Flax parameters ----------------------------------------------------------


def conv(ckpt: HFCheckpoint, name: str) -> dict[str, Lazy]:
  """nn.Conv params of torch Conv2d `name`: kernel [O, I, kh, kw] -> [kh, kw, I, O]."""
  o, i, kh, kw = ckpt.shape(f"{name}.weight")
  kernel = lazy(ckpt, f"{name}.weight", lambda w: w.transpose(2, 3, 1, 0), shape=(kh, kw, i, o))
  return {"kernel": kernel, "bias": lazy(ckpt, f"{name}.bias")}


def conv1x1_dense(ckpt: HFCheckpoint, name: str) -> dict[str, Lazy]:
  """nn.Dense params of a torch 1x1 Conv2d `name`: [O, I, 1, 1] -> kernel [I, O]."""
  o, i, kh, kw = ckpt.shape(f"{name}.weight")
  if (kh, kw) != (1, 1):
    raise UserError(f"{ckpt.path}: {name}.weight is a {kh}x{kw} conv where a 1x1 conv belongs")
  kernel = lazy(ckpt, f"{name}.weight", lambda w: w[:, :, 0, 0].T, shape=(i, o))
  return {"kernel": kernel, "bias": lazy(ckpt, f"{name}.bias")}


def linear(ckpt: HFCheckpoint, name: str) -> dict[str, Lazy]:
  """nn.Dense params of torch Linear `name`: weight [O, I] -> kernel [I, O]."""
  o, i = ckpt.shape(f"{name}.weight")
  kernel = lazy(ckpt, f"{name}.weight", lambda w: w.T, shape=(i, o))
  return {"kernel": kernel, "bias": lazy(ckpt, f"{name}.bias")}


def norm(ckpt: HFCheckpoint, name: str) -> dict[str, Lazy]:
  """nn.GroupNorm params of torch GroupNorm `name`."""
  return {"scale": lazy(ckpt, f"{name}.weight"), "bias": lazy(ckpt, f"{name}.bias")}


def vq_variables(ckpt: HFCheckpoint, name: str) -> tuple[Lazy, dict[str, np.ndarray]]:
  """The codebook [K, D] of embedding `name` and the VQ bottleneck's batch_stats (no offset,
  no k-means pending, no unused steps)."""
  k, d = ckpt.shape(name)
  stats = {
    "codebook_offset": np.zeros((k, d), np.float32),
    "initialized": np.array(True),
    "steps_unused": np.zeros((k,), np.int32),
  }
  return lazy(ckpt, name), stats


def base_and_multipliers(widths: list[int], what: str) -> tuple[int, tuple[int, ...]]:
  """(channels, channel_multipliers) with channels = widths[0]: every width must be a multiple."""
  base = int(widths[0])
  if any(int(w) % base for w in widths):
    raise UserError(f"{what}={widths}: vqlm needs every width a multiple of the first")
  return base, tuple(int(w) // base for w in widths)


def check_groups(groups: int, widths: list[int], what: str) -> None:
  if any(int(w) % groups for w in widths):
    raise UserError(f"{what}: {groups} GroupNorm groups do not divide the widths {widths}")


# ---- diffusers' layout ---------------------------------------------------------------------------


def _res(ckpt: HFCheckpoint, p: str) -> dict[str, Any]:
  out = {
    "norm1": norm(ckpt, f"{p}.norm1"),
    "conv1": conv(ckpt, f"{p}.conv1"),
    "norm2": norm(ckpt, f"{p}.norm2"),
    "conv2": conv(ckpt, f"{p}.conv2"),
  }
  if f"{p}.conv_shortcut.weight" in ckpt:
    out["skip"] = conv(ckpt, f"{p}.conv_shortcut")
  return out


def _attn(ckpt: HFCheckpoint, p: str) -> dict[str, Any]:
  # diffusers >= 0.14 names (to_q ...); older checkpoints kept the attention block's own names.
  names = ("to_q", "to_k", "to_v", "to_out.0", "group_norm")
  if f"{p}.to_q.weight" not in ckpt and f"{p}.query.weight" in ckpt:
    names = ("query", "key", "value", "proj_attn", "group_norm")
  q, k, v, o, n = names
  return {
    "norm": norm(ckpt, f"{p}.{n}"),
    "query": linear(ckpt, f"{p}.{q}"),
    "key": linear(ckpt, f"{p}.{k}"),
    "value": linear(ckpt, f"{p}.{v}"),
    "proj": linear(ckpt, f"{p}.{o}"),
  }


def _mid(ckpt: HFCheckpoint, p: str, attention: bool) -> dict[str, Any]:
  out = {"res1": _res(ckpt, f"{p}.resnets.0")}
  if attention:
    out.update(attn=_attn(ckpt, f"{p}.attentions.0"), res2=_res(ckpt, f"{p}.resnets.1"))
  return out


def _config(ckpt: HFCheckpoint) -> dict[str, Any]:
  c = {**DEFAULTS, **ckpt.config}
  levels = len(c["block_out_channels"])
  checks = [
    (c["in_channels"] == 3 and c["out_channels"] == 3, "in_channels and out_channels must be 3"),
    (c["act_fn"] == "silu", f"act_fn {c['act_fn']!r} is not supported (only silu)"),
    (c["norm_type"] == "group", f"norm_type {c['norm_type']!r} (MoVQ) is not supported"),
    (len(c["down_block_types"]) == levels, "down_block_types and block_out_channels differ"),
    (len(c["up_block_types"]) == levels, "up_block_types and block_out_channels differ"),
    (all(t in DOWN_BLOCKS for t in c["down_block_types"]), f"down blocks: {list(DOWN_BLOCKS)}"),
    (all(t in UP_BLOCKS for t in c["up_block_types"]), f"up blocks must be {list(UP_BLOCKS)}"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(f"{ckpt.path}: {message}; vqlm imports diffusers' taming VQModel only")
  return c


def convert(ckpt: HFCheckpoint) -> tuple[dict[str, Any], dict[str, Any]]:
  """A diffusers `VQModel` checkpoint -> (ImageTokenizer kwargs, {"params", "batch_stats"} of
  `Lazy` leaves and arrays)."""
  c = _config(ckpt)
  widths = [int(w) for w in c["block_out_channels"]]
  levels = len(widths)
  channels, multipliers = base_and_multipliers(widths, "block_out_channels")
  groups = int(c["norm_num_groups"])
  check_groups(groups, widths, ckpt.path)
  layers = int(c["layers_per_block"])
  latent = int(c["latent_channels"])
  embed_dim = int(c["vq_embed_dim"] or latent)
  mid_attention = bool(c["mid_block_add_attention"])
  enc_attention = tuple(i for i, t in enumerate(c["down_block_types"]) if DOWN_BLOCKS[t])
  # up_blocks[k] works at level levels - 1 - k (the lowest resolution first).
  dec_attention = tuple(
    sorted(levels - 1 - k for k, t in enumerate(c["up_block_types"]) if UP_BLOCKS[t])
  )
  common = dict(
    kind="taming",
    channels=channels,
    channel_multipliers=multipliers,
    mid_attention=mid_attention,
    z_channels=latent,
    norm_groups=groups,
    norm_eps=NORM_EPS,
  )
  model_kwargs = {
    "encoder": dict(
      common, num_res_blocks=layers, attention_levels=enc_attention, latent_dim=embed_dim
    ),
    "decoder": dict(
      common, num_res_blocks=layers + 1, attention_levels=dec_attention, out_channels=3
    ),
    "bottleneck": dict(kind="vq", codebook_size=int(c["num_vq_embeddings"]), beta=0.25),
  }

  enc: dict[str, Any] = {"conv_in": conv(ckpt, "encoder.conv_in")}
  for i in range(levels):
    block = f"encoder.down_blocks.{i}"
    for j in range(layers):
      enc[f"down{i}_res{j}"] = _res(ckpt, f"{block}.resnets.{j}")
      if i in enc_attention:
        enc[f"down{i}_attn{j}"] = _attn(ckpt, f"{block}.attentions.{j}")
    if i < levels - 1:
      enc[f"down{i}_conv"] = conv(ckpt, f"{block}.downsamplers.0.conv")
  enc["mid"] = _mid(ckpt, "encoder.mid_block", mid_attention)
  enc["norm_out"] = norm(ckpt, "encoder.conv_norm_out")
  enc["conv_out"] = conv(ckpt, "encoder.conv_out")
  enc["quant_conv"] = conv1x1_dense(ckpt, "quant_conv")

  dec: dict[str, Any] = {
    "post_quant_conv": conv1x1_dense(ckpt, "post_quant_conv"),
    "conv_in": conv(ckpt, "decoder.conv_in"),
    "mid": _mid(ckpt, "decoder.mid_block", mid_attention),
  }
  for k in range(levels):
    i, block = levels - 1 - k, f"decoder.up_blocks.{k}"
    for j in range(layers + 1):
      dec[f"up{i}_res{j}"] = _res(ckpt, f"{block}.resnets.{j}")
      if i in dec_attention:
        dec[f"up{i}_attn{j}"] = _attn(ckpt, f"{block}.attentions.{j}")
    if i > 0:
      dec[f"up{i}_conv"] = conv(ckpt, f"{block}.upsamplers.0.conv")
  dec["norm_out"] = norm(ckpt, "decoder.conv_norm_out")
  dec["conv_out"] = conv(ckpt, "decoder.conv_out")

  codebook, stats = vq_variables(ckpt, "quantize.embedding.weight")
  variables = {
    "params": {"enc": enc, "quantizer": {"codebook": codebook}, "dec": dec},
    "batch_stats": {"quantizer": stats},
  }
  return model_kwargs, variables


def default_image_size(ckpt: HFCheckpoint) -> int:
  """The image side the checkpoint was trained at (`sample_size`), at least one code wide."""
  c = {**DEFAULTS, **ckpt.config}
  factor = 2 ** (len(c["block_out_channels"]) - 1)
  size = int(c["sample_size"] if not isinstance(c["sample_size"], list) else c["sample_size"][0])
  return max(factor, factor * math.ceil(size / factor))


def import_run(
  src: str, out: str, *, overwrite: bool = False, image_size: int | None = None, **unused: Any
) -> str:
  """Imports the diffusers `VQModel` directory `src` as the tokenizer run `out`; returns `out`.
  `image_size` (default: the config's `sample_size`) is the side of the images the run encodes."""
  del unused
  ckpt = HFCheckpoint(src)
  model_kwargs, variables = convert(ckpt)
  size = int(image_size or default_image_size(ckpt))
  return run_files.write_tokenizer_run(
    out,
    model_kwargs=model_kwargs,
    image_size=size,
    variables=variables,
    source={"format": FORMAT, "path": os.path.abspath(src)},
    overwrite=overwrite,
    release=ckpt.close,
  )
