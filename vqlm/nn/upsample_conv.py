"""Nearest-neighbour 2x up-sampling followed by a 3x3 convolution, computed at the low resolution.

`x[B, h, w, C]` up-sampled to `[B, 2h, 2w, C]` and convolved with a 3x3 kernel `W` ("SAME",
zero padding) gives, at output pixel `(2i + a, 2j + b)`, a 2x2 convolution of `x` itself: the
up-sampled rows `2i + a - 1 .. 2i + a + 1` are low-resolution rows `i - 1, i, i` (a = 0) or
`i, i, i + 1` (a = 1), so the taps that land on the same row add up:

    a = 0: row offset -1 gets W[0], offset 0 gets W[1] + W[2]
    a = 1: row offset  0 gets W[0] + W[1], offset +1 gets W[2]

and likewise for columns. `upsample_conv` computes the four output parities as one 2x2
convolution with `4 F` outputs over `x` padded by one pixel and interleaves them: 16 instead of
36 multiply-adds per input channel, output channel and low-resolution pixel, no `[B, 2h, 2w, C]`
copy, and a backward pass at the low resolution. `UpsampleConv` has `nn.Conv(F, (3, 3))`'s
parameters (names, shapes, initialisers), so checkpoints read either way, and its outputs and
gradients equal those of up-sampling + `nn.Conv` up to float rounding
(`tests/test_upsample_conv.py`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def parity_kernels(kernel: jax.Array) -> jax.Array:
  """`[3, 3, C, F]` -> `[2, 2, C, 4 F]`: the 2x2 kernels of the four output parities, parity
  `(a, b)` in channels `[(2a + b) F, (2a + b + 1) F)`, each over the window whose top-left corner
  is the low-resolution pixel `(i - 1 + a, j - 1 + b)`."""

  def fold(k: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    t = [jnp.take(k, n, axis=axis) for n in range(3)]
    return jnp.stack([t[0], t[1] + t[2]], axis=axis), jnp.stack([t[0] + t[1], t[2]], axis=axis)

  parities = []
  for rows in fold(kernel, 0):
    parities.extend(fold(rows, 1))
  return jnp.concatenate(parities, axis=-1)


def upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x[B, h, w, C]`, `kernel[3, 3, C, F]` -> `[B, 2h, 2w, F]`, equal to a "SAME" 3x3
  convolution of `repeat(repeat(x, 2, axis=1), 2, axis=2)`."""
  b, h, w, _ = x.shape
  f = kernel.shape[-1]
  out = jax.lax.conv_general_dilated(
    jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
    parity_kernels(kernel),
    window_strides=(1, 1),
    padding="VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )  # [B, h + 1, w + 1, 4F]; parity (a, b)'s pixel (i, j) sits at out[:, i + a, j + b]
  rows = []
  for a in (0, 1):
    cols = [out[:, a : a + h, p : p + w, (2 * a + p) * f : (2 * a + p + 1) * f] for p in (0, 1)]
    rows.append(jnp.stack(cols, axis=3))  # [B, h, w, 2, F]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, f)  # [B, h, 2, w, 2, F] -> [B, 2h, 2w, F]


class UpsampleConv(nn.Module):
  """Nearest 2x up-sampling, then `nn.Conv(features, (3, 3), padding="SAME")`, computed by
  `upsample_conv`. `[B, h, w, C]` -> `[B, 2h, 2w, features]`."""

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), self.param_dtype
    )
    y = upsample_conv(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y
