"""PatchGAN discriminator (pix2pix / taming `NLayerDiscriminator`) and hinge GAN losses.

The discriminator maps images [B,H,W,3] in [-1, 1] to a grid of real/fake logits [B,h,w,1]
(float32), one per receptive-field patch. GroupNorm replaces BatchNorm so there is no batch
state to carry; "SAME" padding keeps small images (16x16, 32x32) from shrinking to nothing.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import UserError
from vqlm.nn.autoencoder import num_groups

Dtype = Any


class NLayerDiscriminator(nn.Module):
  """conv4x4/2 -> lrelu, (num_layers - 1) x [conv4x4/2 -> norm -> lrelu],
  conv4x4/1 -> norm -> lrelu, conv4x4/1 -> 1 logit per patch.

  Attributes:
    channels: width of the first layer; layer n has channels * min(2**n, 8).
    num_layers: number of stride-2 layers (the patch grid is H / 2**num_layers).
    norm: "group" (GroupNorm) or "none".
  """

  channels: int = 64
  num_layers: int = 3
  norm: str = "group"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if self.norm not in ("group", "none"):
      raise UserError(f"discriminator norm must be 'group' or 'none', got {self.norm!r}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def block(h, features, stride, name, normalize=True):
      h = nn.Conv(features, (4, 4), strides=(stride, stride), padding="SAME", name=name, **kw)(h)
      if normalize and self.norm == "group":
        h = nn.GroupNorm(num_groups(features), name=f"{name}_norm", **kw)(h)
      return nn.leaky_relu(h, 0.2)

    h = block(images, self.channels, 2, "conv0", normalize=False)
    for n in range(1, self.num_layers):
      h = block(h, self.channels * min(2**n, 8), 2, f"conv{n}")
    h = block(h, self.channels * min(2**self.num_layers, 8), 1, f"conv{self.num_layers}")
    logits = nn.Conv(1, (4, 4), padding="SAME", name="logits", **kw)(h)
    return logits.astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))), float32 scalar."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(fake logits), float32 scalar (the generator's hinge loss)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))
