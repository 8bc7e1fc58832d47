"""The taming-transformers VQGAN encoder and decoder layout (also LlamaGen / Janus, Chameleon and
diffusers' `VQModel`), for image tokenizers imported from those checkpoints.

It differs from `vqlm.nn.autoencoder.Encoder` / `Decoder` where the reference models differ:
- a level's *first residual block* changes the width (the strided down-sampling conv and the
  up-sampling conv keep it), and a level may follow each residual block with self-attention
  (`attention_levels`, level 0 = full resolution);
- the down-sampling conv pads one row and column at the bottom and right only (taming's
  asymmetric padding), then runs a 3x3 stride-2 conv with no other padding;
- GroupNorm has a fixed group count (`norm_groups`, 32 in the references) and epsilon;
- optional 1x1 convs between the encoder and the codebook (`quant_conv`, from `z_channels` to
  `latent_dim`) and between the codebook and the decoder (`post_quant_conv`).

The decoder runs `num_res_blocks` per level as given (the references run one more than their
encoders: importers pass that count). Select it with `encoder.kind = "taming"` (the decoder then
mirrors it unless `decoder.kind` says otherwise). The decoder output is float32.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import UserError
from vqlm.nn.autoencoder import AttnBlock, MiddleBlock, ResBlock, factor_of, group_norm
from vqlm.nn.upsample_conv import UpsampleConv

Dtype = Any


def _check_levels(levels: Sequence[int], count: int) -> tuple[int, ...]:
  out = tuple(int(i) for i in levels)
  if any(not 0 <= i < count for i in out):
    raise UserError(f"attention_levels {out} must be level indices in [0, {count}), e.g. (0,)")
  return out


class TamingEncoder(nn.Module):
  """Images [B,H,W,3] in [-1, 1] -> latents [B,H/f,W/f,latent_dim] (f = `factor`).

  Attributes:
    channels: width of `conv_in`; level i works at `channels * channel_multipliers[i]`.
    channel_multipliers: one entry per level; f = 2 ** (levels - 1).
    num_res_blocks: residual blocks per level.
    attention_levels: levels whose residual blocks are each followed by self-attention.
    mid_attention: self-attention (between two residual blocks) in the middle block.
    z_channels: when set, `conv_out` gives `z_channels` and a 1x1 `quant_conv` maps them to
      `latent_dim`; None: `conv_out` gives `latent_dim`.
    latent_dim: channels of the latents (the codebook's dimension).
    norm_groups, norm_eps: every GroupNorm's groups and epsilon.
  """

  channels: int = 128
  channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = ()
  mid_attention: bool = True
  z_channels: int | None = None
  latent_dim: int = 256
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    return factor_of(self.channel_multipliers)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    nkw = dict(groups=self.norm_groups, eps=self.norm_eps, **kw)
    levels = len(self.channel_multipliers)
    attention = _check_levels(self.attention_levels, levels)
    h = nn.Conv(self.channels, (3, 3), padding="SAME", name="conv_in", **kw)(images)
    for i, mult in enumerate(self.channel_multipliers):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, name=f"down{i}_res{j}", **nkw)(h)
        if i in attention:
          h = AttnBlock(name=f"down{i}_attn{j}", **nkw)(h)
      if i < levels - 1:
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        width = h.shape[-1]
        h = nn.Conv(width, (3, 3), (2, 2), padding="VALID", name=f"down{i}_conv", **kw)(h)
    width = h.shape[-1]
    h = MiddleBlock(width, self.mid_attention, name="mid", **nkw)(h)
    h = nn.swish(group_norm(width, self.norm_groups, self.norm_eps, "norm_out", **kw)(h))
    out = self.z_channels or self.latent_dim
    h = nn.Conv(out, (3, 3), padding="SAME", name="conv_out", **kw)(h)
    if self.z_channels:
      h = nn.Dense(self.latent_dim, name="quant_conv", **kw)(h)
    return h


class TamingDecoder(nn.Module):
  """Latents [B,h,w,C] -> images [B,h*f,w*f,out_channels] float32 (f = `factor`).

  Attributes as `TamingEncoder` (without latent_dim; the input's channels are whatever the
  bottleneck gives), plus `out_channels`. With `z_channels` a 1x1 `post_quant_conv` maps the
  input to `z_channels` first. The features entering `conv_out` are sown as
  `intermediates/last_features`, as `vqlm.nn.autoencoder.Decoder` does.
  """

  channels: int = 128
  channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 3
  attention_levels: Sequence[int] = ()
  mid_attention: bool = True
  z_channels: int | None = None
  out_channels: int = 3
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    return factor_of(self.channel_multipliers)

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    nkw = dict(groups=self.norm_groups, eps=self.norm_eps, **kw)
    levels = len(self.channel_multipliers)
    attention = _check_levels(self.attention_levels, levels)
    h = z
    if self.z_channels:
      h = nn.Dense(self.z_channels, name="post_quant_conv", **kw)(h)
    width = self.channels * self.channel_multipliers[-1]
    h = nn.Conv(width, (3, 3), padding="SAME", name="conv_in", **kw)(h)
    h = MiddleBlock(width, self.mid_attention, name="mid", **nkw)(h)
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.channels * self.channel_multipliers[i], name=f"up{i}_res{j}", **nkw)(h)
        if i in attention:
          h = AttnBlock(name=f"up{i}_attn{j}", **nkw)(h)
      if i > 0:
        h = UpsampleConv(h.shape[-1], name=f"up{i}_conv", **kw)(h)
    h = nn.swish(group_norm(h.shape[-1], self.norm_groups, self.norm_eps, "norm_out", **kw)(h))
    self.sow("intermediates", "last_features", h)
    out = nn.Conv(self.out_channels, (3, 3), padding="SAME", name="conv_out", **kw)(h)
    return out.astype(jnp.float32)
