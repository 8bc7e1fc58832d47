"""Convolutional ResNet encoder and decoder of the image tokenizer (taming / MaskGIT family).

Resolution scheme: one *level* per entry of `channel_multipliers`; level `i` works at
`channels * channel_multipliers[i]` channels (its width) and runs `num_res_blocks` residual blocks.
Between consecutive levels the encoder halves the resolution with a stride-2 3x3 conv that also
changes the width to the next level's; the decoder doubles it with nearest-neighbour up-sampling
and a 3x3 conv to the next (lower) level's width. So the down-sampling factor is
`2 ** (len(channel_multipliers) - 1)`: (1, 2) -> 2, (1, 2, 2) -> 4, (1, 1, 2, 2) -> 8,
(1, 1, 2, 2, 4) -> 16. At the lowest resolution a middle block (residual block, optional
self-attention + another residual block) sits between the levels and the latent projection.
With `num_res_blocks=0` only the strided / up-sampling convs and the middle block remain, which
keeps full-resolution work small (fast CPU configs).

The decoder output is float32 whatever the compute `dtype`.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import UserError, check_int
from vqlm.nn.upsample_conv import UpsampleConv

Dtype = Any


def num_groups(channels: int, max_groups: int = 32) -> int:
  """The largest group count <= `max_groups` that divides `channels` (GroupNorm)."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def factor_of(channel_multipliers: Sequence[int]) -> int:
  """The spatial down-sampling factor implied by `channel_multipliers`."""
  if not channel_multipliers:
    raise UserError("channel_multipliers must have at least one entry, e.g. (1, 2, 2)")
  return 2 ** (len(channel_multipliers) - 1)


# The integer fields of Encoder / PatchEncoder / Decoder and their smallest valid values.
_INT_FIELDS = {
  "channels": 1,
  "num_res_blocks": 0,
  "latent_dim": 1,
  "mlp_blocks": 0,
  "colour_channels": 1,
  "out_channels": 1,
}


def check_kwargs(kwargs: dict[str, Any], where: str) -> None:
  """Fails with a UserError naming `where.field` when the integer fields among an encoder's or
  decoder's kwargs (absent ones keep their defaults) are not integers of a valid size."""
  for name, minimum in _INT_FIELDS.items():
    if name in kwargs:
      check_int(f"{where}.{name}", kwargs[name], minimum=minimum)
  if "channel_multipliers" in kwargs:
    multipliers = kwargs["channel_multipliers"]
    if isinstance(multipliers, (str, bytes)) or not isinstance(multipliers, Sequence):
      raise UserError(
        f"{where}.channel_multipliers={multipliers!r} must be a tuple of integers, e.g. (1, 2, 2)"
      )
    factor_of(multipliers)
    for m in multipliers:
      check_int(f"{where}.channel_multipliers entry", m)


def group_norm(channels: int, groups: int | None, eps: float, name: str, **kw: Any) -> nn.GroupNorm:
  """GroupNorm over `channels` with `groups` groups (None: `num_groups(channels)`)."""
  g = groups or num_groups(channels)
  if channels % g:
    raise UserError(f"norm_groups={g} does not divide {channels} channels; pick a divisor")
  return nn.GroupNorm(g, epsilon=eps, name=name, **kw)


class ResBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3, twice, plus a (1x1-projected) skip.  [B,H,W,C] -> [B,H,W,F].

  `groups`: GroupNorm groups (None: the largest divisor of the channels <= 32); `eps` its epsilon.
  """

  features: int
  groups: int | None = None
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, name: nn.Conv(
      f, (k, k), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    norm = lambda c, name: group_norm(
      c, self.groups, self.eps, name, dtype=self.dtype, param_dtype=self.param_dtype
    )
    h = conv(self.features, 3, "conv1")(nn.swish(norm(x.shape[-1], "norm1")(x)))
    h = conv(self.features, 3, "conv2")(nn.swish(norm(self.features, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, "skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, residual.  [B,H,W,C] -> [B,H,W,C].

  Logits and softmax are computed in float32. `groups` / `eps`: its GroupNorm's, as `ResBlock`.
  """

  groups: int | None = None
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda name: nn.Dense(c, name=name, **kw)
    h = group_norm(c, self.groups, self.eps, "norm", **kw)(x).reshape(b, hh * ww, c)
    q, k, v = dense("query")(h), dense("key")(h), dense("value")(h)
    logits = jnp.einsum("bqc,bkc->bqk", q.astype(jnp.float32), k.astype(jnp.float32))
    weights = jax.nn.softmax(logits / jnp.sqrt(jnp.float32(c)), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights.astype(self.dtype), v)
    return x + dense("proj")(out).reshape(b, hh, ww, c)


class MiddleBlock(nn.Module):
  """The lowest-resolution block: ResBlock [-> AttnBlock -> ResBlock].  [B,h,w,C] -> [B,h,w,F].

  `groups` / `eps`: the GroupNorms', as `ResBlock`.
  """

  features: int
  attention: bool
  groups: int | None = None
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(groups=self.groups, eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResBlock(self.features, name="res1", **kw)(x)
    if self.attention:
      x = AttnBlock(name="attn", **kw)(x)
      x = ResBlock(self.features, name="res2", **kw)(x)
    return x


class Encoder(nn.Module):
  """Images [B,H,W,3] in [-1, 1] -> latents [B,H/f,W/f,latent_dim] (f = `factor`)."""

  channels: int = 64
  channel_multipliers: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attention_at_lowest: bool = False
  latent_dim: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    return factor_of(self.channel_multipliers)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Conv(self.channels, (3, 3), padding="SAME", name="conv_in", **kw)(images)
    levels = len(self.channel_multipliers)
    for i, mult in enumerate(self.channel_multipliers):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, name=f"down{i}_res{j}", **kw)(h)
      if i < levels - 1:
        h = nn.Conv(
          self.channels * self.channel_multipliers[i + 1],
          (3, 3),
          strides=(2, 2),
          padding="SAME",
          name=f"down{i}_conv",
          **kw,
        )(h)
    top = self.channels * self.channel_multipliers[-1]
    h = MiddleBlock(top, self.attention_at_lowest, name="mid", **kw)(h)
    h = nn.swish(nn.GroupNorm(num_groups(top), name="norm_out", **kw)(h))
    return nn.Conv(self.latent_dim, (1, 1), name="conv_out", **kw)(h)


def residual_mlp_blocks(h: jax.Array, *, width: int, blocks: int, prefix: str, **kw) -> jax.Array:
  """`blocks` pre-norm residual MLP blocks on the last axis of `h` [..., width] (LayerNorm, Dense
  to 2 x width, swish, Dense back), named `{prefix}{i}_norm/_in/_out`; called inside a compact
  module's method, so the layers are that module's."""
  for i in range(blocks):
    y = nn.Dense(2 * width, name=f"{prefix}{i}_in", **kw)(
      nn.LayerNorm(name=f"{prefix}{i}_norm", **kw)(h)
    )
    h = h + nn.Dense(width, name=f"{prefix}{i}_out", **kw)(nn.swish(y))
  return h


class PatchEncoder(Encoder):
  """Images [B,H,W,3] in [-1, 1] -> latents [B,H/f,W/f,latent_dim], each from its own f x f patch.

  A patchify convolution (kernel = stride = f, f = `factor`), then `mlp_blocks` pre-norm residual
  MLP blocks applied at each position, with LayerNorm over channels only: no spatial mixing and no
  image-wide statistics (GroupNorm), so a code depends on what is drawn in its patch and on nothing
  else. The same patch content always gets the same code, wherever it is and whatever surrounds
  it; the decoder still sees all codes. `Encoder`'s fields, plus `mlp_blocks`: channels and
  channel_multipliers set the width `channels * channel_multipliers[-1]` and the factor;
  `num_res_blocks` and `attention_at_lowest` are not used.
  """

  mlp_blocks: int = 2

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    f = self.factor
    width = self.channels * self.channel_multipliers[-1]
    h = nn.Conv(width, (f, f), strides=(f, f), padding="VALID", name="patch_in", **kw)(images)
    h = residual_mlp_blocks(h, width=width, blocks=self.mlp_blocks, prefix="mlp", **kw)
    h = nn.swish(nn.LayerNorm(name="norm_out", **kw)(h))
    return nn.Dense(self.latent_dim, name="conv_out", **kw)(h)


class SplitPatchEncoder(PatchEncoder):
  """Images [B,H,W,3] in [-1, 1] -> latents [B,H/f,W/f,latent_dim] from each f x f patch alone,
  with the patch's form and its colour in separate channels.

  The first `latent_dim - colour_channels` channels see only the patch's form: each pixel's
  intensity (its largest RGB value in [0, 1]) divided by the patch's brightest, so a red and a
  blue triangle edge give them the same input. The last `colour_channels` see only the patch's
  colour: the RGB mean of its pixels weighted by their intensity (3 numbers, nothing of where the
  pixels are). With an FSQ bottleneck of exactly `latent_dim` channels (no projection), a code's
  digits then split into form digits and colour digits, so an LM with per-channel level
  embeddings can draw a colour-shape pair it never saw from digits it saw with other pairs. Each
  part has `PatchEncoder`'s residual MLP blocks. Colour stays one value per patch: meant for flat
  colours (the `shapes` data), coarse for photos.
  """

  colour_channels: int = 2

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    f, width = self.factor, self.channels * self.channel_multipliers[-1]
    if not 0 < self.colour_channels < self.latent_dim:
      raise UserError(
        f"encoder colour_channels={self.colour_channels} must be in 1..latent_dim - 1 "
        f"(latent_dim={self.latent_dim})"
      )
    b, h, w = images.shape[0], images.shape[1] // f, images.shape[2] // f
    pixels = (images.astype(jnp.float32) + 1.0) / 2.0
    pixels = pixels.reshape(b, h, f, w, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, f * f, 3)
    intensity = pixels.max(axis=-1)  # [B, h, w, f*f]
    form = intensity / jnp.maximum(intensity.max(axis=-1, keepdims=True), 0.05)
    weight = intensity[..., None]
    colour = (pixels * weight).sum(axis=-2) / jnp.maximum(weight.sum(axis=-2), 1e-3)  # [B,h,w,3]

    def mlp(x: jax.Array, name: str, out: int) -> jax.Array:
      x = nn.Dense(width, name=f"{name}_in", **kw)(x.astype(self.dtype))
      x = residual_mlp_blocks(x, width=width, blocks=self.mlp_blocks, prefix=name, **kw)
      x = nn.swish(nn.LayerNorm(name=f"{name}_norm_out", **kw)(x))
      return nn.Dense(out, name=f"{name}_out", **kw)(x)

    return jnp.concatenate(
      [
        mlp(form, "form", self.latent_dim - self.colour_channels),
        mlp(colour, "colour", self.colour_channels),
      ],
      axis=-1,
    )


ENCODERS = {"conv": Encoder, "patch": PatchEncoder, "split": SplitPatchEncoder}


class Decoder(nn.Module):
  """Latents [B,h,w,C] -> images [B,h*f,w*f,out_channels] float32 (f = `factor`).

  The features entering the final 3x3 convolution `conv_out` are sown as
  `intermediates/last_features` (when that collection is mutable) so a training step can compute
  gradients with respect to the last layer (adaptive GAN weight) without a second backward pass.
  """

  channels: int = 64
  channel_multipliers: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attention_at_lowest: bool = False
  out_channels: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    return factor_of(self.channel_multipliers)

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    top = self.channels * self.channel_multipliers[-1]
    h = nn.Conv(top, (3, 3), padding="SAME", name="conv_in", **kw)(z)
    h = MiddleBlock(top, self.attention_at_lowest, name="mid", **kw)(h)
    levels = len(self.channel_multipliers)
    for i in reversed(range(levels)):
      features = self.channels * self.channel_multipliers[i]
      for j in range(self.num_res_blocks):
        h = ResBlock(features, name=f"up{i}_res{j}", **kw)(h)
      if i > 0:
        features = self.channels * self.channel_multipliers[i - 1]
        h = UpsampleConv(features, name=f"up{i}_conv", **kw)(h)
    h = nn.swish(nn.GroupNorm(num_groups(h.shape[-1]), name="norm_out", **kw)(h))
    self.sow("intermediates", "last_features", h)
    out = nn.Conv(self.out_channels, (3, 3), padding="SAME", name="conv_out", **kw)(h)
    return out.astype(jnp.float32)


def output_conv(features: jax.Array, kernel: jax.Array) -> jax.Array:
  """The decoder's `conv_out` without bias, as a function of its kernel (for last-layer grads).

  Args:
    features: [B, H, W, C] the sown `last_features`.
    kernel: [3, 3, C, out_channels] `conv_out/kernel`.
  Returns:
    [B, H, W, out_channels] float32.
  """
  return jax.lax.conv_general_dilated(
    features.astype(jnp.float32),
    kernel.astype(jnp.float32),
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
