"""Janus's VQ image tokenizer (transformers' `JanusVQVAE`, a LlamaGen VQ) as vqlm parameters.

`convert(HFCheckpoint)` reads either a `JanusVQVAE` directory or a whole
`JanusForConditionalGeneration` one (weights under `model.vqmodel.`, config under `vq_config`)
and returns ImageTokenizer kwargs with the taming layout (`vqlm.nn.taming`) and its variables.
The VQ matches transformers exactly: the code is the argmin of the Euclidean distance between the
raw `quant_conv` output and the raw codebook, and decoding looks up l2-normalised codebook rows
(`get_codebook_entry` normalises, the quantizer's search does not); in vqlm that is
`VectorQuantizer(lookup_normalize=True)`. The full Janus import (with the LM) is assembled
elsewhere from this `convert`.

The taming-named layout helpers here (`down.{i}.block.{j}`, `mid.block_1`, `up.{k}...`) serve
Chameleon's VQ too.
"""

from typing import Any

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import HFCheckpoint
from vqlm.interop.vqmodel import (
  NORM_EPS,
  check_groups,
  conv,
  conv1x1_dense,
  norm,
  vq_variables,
)

FORMAT = "transformers JanusVQVAE"
NORM_GROUPS = 32  # transformers' taming-family VQ blocks: GroupNorm(32, eps=1e-6)
PREFIXES = ("", "model.vqmodel.", "vqmodel.")
FIRST = "encoder.conv_in.weight"

# JanusVQVAEConfig defaults (a saved config.json may leave them out).
DEFAULTS = {
  "embed_dim": 8,
  "num_embeddings": 16384,
  "double_latent": False,
  "latent_channels": 256,
  "in_channels": 3,
  "out_channels": 3,
  "base_channels": 128,
  "channel_multiplier": [1, 1, 2, 2, 4],
  "num_res_blocks": 2,
  "num_patches": 32,
}


def find_prefix(ckpt: HFCheckpoint) -> str:
  """The name prefix of the VQ model's tensors: "" (the VQ model alone) or "model.vqmodel."."""
  for prefix in PREFIXES:
    if prefix + FIRST in ckpt:
      return prefix
  raise UserError(
    f"{ckpt.path} has no tensor {FIRST!r} (nor model.vqmodel.{FIRST}); is it a checkpoint of "
    "the VQ architecture you import it as?"
  )


def vq_config(ckpt: HFCheckpoint, defaults: dict[str, Any]) -> dict[str, Any]:
  """The VQ model's config: `vq_config` of a whole model's config.json, or the file itself,
  over `defaults`."""
  config = ckpt.config.get("vq_config") or ckpt.config
  c = {**defaults, **config}
  if c.get("double_latent"):
    raise UserError(f"{ckpt.path}: double_latent VQ encoders are not supported")
  if c.get("in_channels", 3) != 3 or c.get("out_channels", 3) != 3:
    raise UserError(f"{ckpt.path}: in_channels and out_channels must be 3 (RGB)")
  return c


# ---- the taming layout ---------------------------------------------------------------------------


def res_block(ckpt: HFCheckpoint, p: str) -> dict[str, Any]:
  if f"{p}.conv_shortcut.weight" in ckpt:
    raise UserError(f"{ckpt.path}: {p}.conv_shortcut (a 3x3 skip conv) is not supported")
  out = {
    "norm1": norm(ckpt, f"{p}.norm1"),
    "conv1": conv(ckpt, f"{p}.conv1"),
    "norm2": norm(ckpt, f"{p}.norm2"),
    "conv2": conv(ckpt, f"{p}.conv2"),
  }
  if f"{p}.nin_shortcut.weight" in ckpt:
    out["skip"] = conv(ckpt, f"{p}.nin_shortcut")
  return out


def attn_block(ckpt: HFCheckpoint, p: str) -> dict[str, Any]:
  return {
    "norm": norm(ckpt, f"{p}.norm"),
    "query": conv1x1_dense(ckpt, f"{p}.q"),
    "key": conv1x1_dense(ckpt, f"{p}.k"),
    "value": conv1x1_dense(ckpt, f"{p}.v"),
    "proj": conv1x1_dense(ckpt, f"{p}.proj_out"),
  }


def mid_block(ckpt: HFCheckpoint, p: str) -> tuple[dict[str, Any], bool]:
  """(params, whether it has attention) of `{p}.mid`."""
  out = {"res1": res_block(ckpt, f"{p}.mid.block_1")}
  attention = f"{p}.mid.attn_1.q.weight" in ckpt
  if attention:
    out.update(attn=attn_block(ckpt, f"{p}.mid.attn_1"), res2=res_block(ckpt, f"{p}.mid.block_2"))
  elif f"{p}.mid.block_2.conv1.weight" in ckpt:
    raise UserError(f"{ckpt.path}: {p}.mid has no attn_1 (attn_type not vanilla): not supported")
  return out, attention


def _common(c: dict[str, Any], ckpt: HFCheckpoint, mid_attention: bool) -> dict[str, Any]:
  multipliers = [int(m) for m in c["channel_multiplier"]]
  base = int(c["base_channels"])
  check_groups(NORM_GROUPS, [base * m for m in multipliers], ckpt.path)
  return dict(
    kind="taming",
    channels=base,
    channel_multipliers=tuple(multipliers),
    mid_attention=mid_attention,
    z_channels=int(c["latent_channels"]),
    norm_groups=NORM_GROUPS,
    norm_eps=NORM_EPS,
  )


def taming_encoder(
  ckpt: HFCheckpoint, prefix: str, c: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(TamingEncoder kwargs, params) of `{prefix}encoder.*` + `{prefix}quant_conv`; attention
  levels as the checkpoint has them (`encoder.down.{i}.attn.*`)."""
  p = f"{prefix}encoder"
  levels = len(c["channel_multiplier"])
  blocks = int(c["num_res_blocks"])
  attention = tuple(i for i in range(levels) if f"{p}.down.{i}.attn.0.q.weight" in ckpt)
  params: dict[str, Any] = {"conv_in": conv(ckpt, f"{p}.conv_in")}
  for i in range(levels):
    for j in range(blocks):
      params[f"down{i}_res{j}"] = res_block(ckpt, f"{p}.down.{i}.block.{j}")
      if i in attention:
        params[f"down{i}_attn{j}"] = attn_block(ckpt, f"{p}.down.{i}.attn.{j}")
    if i < levels - 1:
      params[f"down{i}_conv"] = conv(ckpt, f"{p}.down.{i}.downsample.conv")
  params["mid"], mid_attention = mid_block(ckpt, p)
  params["norm_out"] = norm(ckpt, f"{p}.norm_out")
  params["conv_out"] = conv(ckpt, f"{p}.conv_out")
  params["quant_conv"] = conv1x1_dense(ckpt, f"{prefix}quant_conv")
  kwargs = dict(
    _common(c, ckpt, mid_attention),
    num_res_blocks=blocks,
    attention_levels=attention,
    latent_dim=int(c["embed_dim"]),
  )
  return kwargs, params


def decoder_order(ckpt: HFCheckpoint, p: str, levels: int) -> list[int]:
  """The level (0 = full resolution) of each `{p}.up.{k}`: transformers' order puts the lowest
  resolution first (up.0 has the upsampling conv), taming's the highest (up.0 has none)."""
  if levels == 1:
    return [0]
  if f"{p}.up.0.upsample.conv.weight" in ckpt:
    return [levels - 1 - k for k in range(levels)]
  if f"{p}.up.{levels - 1}.upsample.conv.weight" in ckpt:
    return list(range(levels))
  raise UserError(f"{ckpt.path} has no tensor {p}.up.0.upsample.conv.weight; not a taming decoder")


def taming_decoder(
  ckpt: HFCheckpoint, prefix: str, c: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(TamingDecoder kwargs, params) of `{prefix}post_quant_conv` + `{prefix}decoder.*`, in either
  order of `up.{k}`; residual-block count and attention levels as the checkpoint has them."""
  p = f"{prefix}decoder"
  levels = len(c["channel_multiplier"])
  order = decoder_order(ckpt, p, levels)
  blocks = 0
  while f"{p}.up.0.block.{blocks}.conv1.weight" in ckpt:
    blocks += 1
  attention = tuple(
    sorted(order[k] for k in range(levels) if f"{p}.up.{k}.attn.0.q.weight" in ckpt)
  )
  params: dict[str, Any] = {
    "post_quant_conv": conv1x1_dense(ckpt, f"{prefix}post_quant_conv"),
    "conv_in": conv(ckpt, f"{p}.conv_in"),
  }
  params["mid"], mid_attention = mid_block(ckpt, p)
  for k, i in enumerate(order):
    for j in range(blocks):
      params[f"up{i}_res{j}"] = res_block(ckpt, f"{p}.up.{k}.block.{j}")
      if i in attention:
        params[f"up{i}_attn{j}"] = attn_block(ckpt, f"{p}.up.{k}.attn.{j}")
    if i > 0:
      params[f"up{i}_conv"] = conv(ckpt, f"{p}.up.{k}.upsample.conv")
  params["norm_out"] = norm(ckpt, f"{p}.norm_out")
  params["conv_out"] = conv(ckpt, f"{p}.conv_out")
  kwargs = dict(
    _common(c, ckpt, mid_attention),
    num_res_blocks=blocks,
    attention_levels=attention,
    out_channels=int(ckpt.shape(f"{p}.conv_out.weight")[0]),
  )
  return kwargs, params


def taming_vq(
  ckpt: HFCheckpoint, prefix: str, c: dict[str, Any], *, lookup_normalize: bool, decoder: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(ImageTokenizer kwargs, variables) of a taming-named VQ model under `prefix`; without
  `decoder` the tokenizer is encode-only (`decoder.kind = "none"`)."""
  enc_kwargs, enc = taming_encoder(ckpt, prefix, c)
  codebook, stats = vq_variables(ckpt, f"{prefix}quantize.embedding.weight")
  k, d = ckpt.shape(f"{prefix}quantize.embedding.weight")
  if d != enc_kwargs["latent_dim"]:
    raise UserError(f"{ckpt.path}: codebook dimension {d} != embed_dim {enc_kwargs['latent_dim']}")
  bottleneck = dict(kind="vq", codebook_size=int(k), beta=0.25, lookup_normalize=lookup_normalize)
  params = {"enc": enc, "quantizer": {"codebook": codebook}}
  if decoder:
    dec_kwargs, params["dec"] = taming_decoder(ckpt, prefix, c)
  else:
    dec_kwargs = {"kind": "none"}
  model_kwargs = {"encoder": enc_kwargs, "decoder": dec_kwargs, "bottleneck": bottleneck}
  return model_kwargs, {"params": params, "batch_stats": {"quantizer": stats}}


def convert(ckpt: HFCheckpoint) -> tuple[dict[str, Any], dict[str, Any]]:
  """A `JanusVQVAE` (or whole Janus) checkpoint -> (ImageTokenizer kwargs, {"params",
  "batch_stats"} of `Lazy` leaves and arrays)."""
  prefix = find_prefix(ckpt)
  c = vq_config(ckpt, DEFAULTS)
  return taming_vq(ckpt, prefix, c, lookup_normalize=True, decoder=True)


def image_size(ckpt: HFCheckpoint) -> int:
  """The image side Janus decodes: `num_patches` codes per side times the down-sampling factor."""
  c = vq_config(ckpt, DEFAULTS)
  return int(c["num_patches"]) * 2 ** (len(c["channel_multiplier"]) - 1)
