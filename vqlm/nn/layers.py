"""Building blocks of the transformer: projections and embeddings with logical axes, RMSNorm,
a SwiGLU MLP and rotary position embeddings (1D, and 2D for image tokens).

Every parameter is boxed with logical axis names (`nn.with_logical_partitioning`), e.g. a kernel
`("embed", "mlp")` or an embedding table `("vocab", "embed")`; the config's rules map those names
to mesh axes. Activations are constrained with `nn.with_logical_constraint` (a no-op outside a
mesh). Modules take `dtype` (compute) and `param_dtype` (storage, float32 by default); norms,
softmax statistics and logits are computed in float32.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import UserError

DType = Any
Initializer = Callable[..., jax.Array]

# Logical names of the common activation layouts.
ACT_EMBED = ("batch", "length", "embed")
ACT_MLP = ("batch", "length", "mlp")
ACT_HEADS = ("batch", "length", "heads", "head_dim")
ACT_KV_HEADS = ("batch", "length", "kv_heads", "head_dim")
ACT_VOCAB = ("batch", "length", "vocab")


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`nn.with_logical_constraint` (sharding hint for activations; a no-op without a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """A linear map contracting the last `in_dims` input dimensions, with named kernel axes.

  The kernel has shape `x.shape[-in_dims:] + features` and logical names `axes` (one per kernel
  dimension): e.g. a query projection `features=(heads, head_dim)`, `axes=("embed", "heads",
  "head_dim")`; an output projection `in_dims=2`, `axes=("heads", "head_dim", "embed")`.

  Attributes:
    features: output size(s).
    axes: logical axis names of the kernel, `in_dims + len(features)` of them.
    in_dims: number of trailing input dimensions contracted.
    use_bias: add a bias (named by the output axes).
    kernel_init: defaults to fan-in truncated normal over the contracted dimensions.
    dtype: compute dtype; param_dtype: storage dtype.
  """

  features: int | Sequence[int]
  axes: Sequence[str]
  in_dims: int = 1
  use_bias: bool = False
  kernel_init: Initializer | None = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, out_slice: tuple[int, int] | None = None) -> jax.Array:
    """`[..., *in] -> [..., *features]`.

    `out_slice=(start, size)` (one output dimension only): just outputs `[start, start + size)`,
    computed from that slice of the kernel (e.g. the logits of a range of ids).
    """
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = tuple(x.shape[-self.in_dims :])
    ndim = self.in_dims + len(features)
    if len(self.axes) != ndim:
      raise UserError(
        f"Dense {self.name}: axes={tuple(self.axes)} must name all {ndim} kernel "
        f"dimensions (in {in_shape} + out {features})."
      )
    init = self.kernel_init or nn.initializers.variance_scaling(
      1.0,
      "fan_in",
      "truncated_normal",
      in_axis=tuple(range(self.in_dims)),
      out_axis=tuple(range(self.in_dims, ndim)),
    )
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(init, tuple(self.axes)),
      in_shape + features,
      self.param_dtype,
    )
    x = jnp.asarray(x, self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    lead = x.shape[: x.ndim - self.in_dims]
    kernel = kernel.reshape(math.prod(in_shape), -1)
    bias = None
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(
          nn.initializers.zeros_init(), tuple(self.axes[self.in_dims :])
        ),
        features,
        self.param_dtype,
      )
      bias = jnp.asarray(bias, self.dtype)
    if out_slice is not None:
      start, size = out_slice
      if len(features) != 1 or start < 0 or size <= 0 or start + size > features[0]:
        raise UserError(
          f"Dense {self.name}: out_slice={out_slice} must be a range inside one "
          f"output dimension, got features {features}."
        )
      kernel = kernel[:, start : start + size]
      bias = None if bias is None else bias[start : start + size]
      features = (size,)
    # One 2D matmul (a multi-axis dot_general makes XLA:CPU transpose in the backward pass),
    # accumulated in float32 (also the fast path of bfloat16 matmuls on CPUs with AVX512-BF16).
    y = jnp.dot(
      x.reshape(-1, math.prod(in_shape)), kernel, preferred_element_type=jnp.float32
    ).astype(self.dtype)
    y = y.reshape(lead + features)
    return y if bias is None else y + bias


class Embed(nn.Module):
  """A lookup table `[num_embeddings, features]` named `("vocab", "embed")` by default.

  `__call__(ids[...]) -> [..., features]` in `dtype`; `attend(x[..., features]) -> [...,
  num_embeddings]` is the tied output projection, accumulated and returned in float32.
  """

  num_embeddings: int
  features: int
  axes: tuple[str, str] = ("vocab", "embed")
  embedding_init: Initializer | None = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    init = self.embedding_init or nn.initializers.normal(stddev=1.0 / math.sqrt(self.features))
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(init, self.axes),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(self.embedding, self.dtype), ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    table = jnp.asarray(self.embedding, self.dtype)
    return jnp.einsum(
      "...d,vd->...v", jnp.asarray(x, self.dtype), table, preferred_element_type=jnp.float32
    )


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32, returned in `dtype`.

  The learned `scale` (initialised to ones) is named `axes` (default `("norm",)`, which no rule
  shards).
  """

  eps: float = 1e-6
  axes: tuple[str, ...] = ("norm",)
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), self.axes),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = jnp.asarray(x, jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * jnp.asarray(scale, jnp.float32)
    return jnp.asarray(y, self.dtype)


class HeadLayerNorm(nn.Module):
  """LayerNorm of each head's vector with per-head affine parameters (Chameleon's QK norm).

  `x[..., H, D]` -> same shape: mean and variance over the last axis D only (in float32), then
  `* scale + bias`, both `[H, D]` (a separate gamma and beta per head), named `axes` (default
  `("heads", "head_dim")`; `("kv_heads", "head_dim")` for keys). Returned in `dtype`.
  """

  eps: float = 1e-5
  axes: tuple[str, str] = ("heads", "head_dim")
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(x.shape[-2:])
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), self.axes),
      shape,
      self.param_dtype,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes),
      shape,
      self.param_dtype,
    )
    x32 = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * jnp.asarray(scale, jnp.float32) + jnp.asarray(bias, jnp.float32)
    return jnp.asarray(y, self.dtype)


class MLP(nn.Module):
  """SwiGLU feed-forward: `wo(silu(x wi_gate) * (x wi_up))`, `[B, S, D] -> [B, S, D]`."""

  mlp_dim: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Dense(self.mlp_dim, axes=("embed", "mlp"), name="wi_gate", **kw)(x)
    up = Dense(self.mlp_dim, axes=("embed", "mlp"), name="wi_up", **kw)(x)
    h = constrain(nn.silu(gate) * up, ACT_MLP)
    return Dense(dim, axes=("mlp", "embed"), name="wo", **kw)(h)


# ---- rotary position embeddings ---------------------------------------------------------------
#
# Convention: a rotary "pair" i of a head vector x[..., D] is (x[i], x[i + D/2]) ("rotate half",
# as in Llama/GPT-NeoX). `rope_1d` / `rope_2d` return (sin, cos) of shape [B, S, D/2], one angle per
# pair, computed once per forward pass and shared by all layers; `apply_rope` rotates q or k.
# Attention scores only see q.k, so any fixed assignment of angles to pairs is equivalent to the
# "first half of head_dim for rows, second half for columns" layout up to a permutation of the
# head dimension applied to both q and k.


def _inv_frequencies(num_pairs: int, theta: float) -> jax.Array:
  return theta ** (-jnp.arange(num_pairs, dtype=jnp.float32) / num_pairs)


def rope_1d(
  positions: jax.Array, head_dim: int, theta: float = 10_000.0
) -> tuple[jax.Array, jax.Array]:
  """Angles of standard RoPE: `positions[B, S]` -> `(sin, cos)` each `[B, S, head_dim // 2]`."""
  if head_dim % 2:
    raise UserError(f"RoPE needs an even head_dim, got {head_dim}.")
  angles = jnp.asarray(positions, jnp.float32)[..., None] * _inv_frequencies(head_dim // 2, theta)
  return jnp.sin(angles), jnp.cos(angles)


def rope_2d(
  rows: jax.Array, cols: jax.Array, head_dim: int, theta: float = 10_000.0
) -> tuple[jax.Array, jax.Array]:
  """2D RoPE: half the rotary pairs turn with `rows[B, S]`, the other half with `cols[B, S]`.

  Each half uses the frequencies of a 1D RoPE over `head_dim // 2` dimensions. Returns `(sin,
  cos)` each `[B, S, head_dim // 2]`. With `rows == cols == positions` this is a 1D RoPE (with a
  coarser frequency ladder), which is how text tokens are encoded next to image tokens.
  """
  if head_dim % 4:
    raise UserError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}.")
  freqs = _inv_frequencies(head_dim // 4, theta)
  angles = jnp.concatenate(
    [
      jnp.asarray(rows, jnp.float32)[..., None] * freqs,
      jnp.asarray(cols, jnp.float32)[..., None] * freqs,
    ],
    axis=-1,
  )
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates `x[B, S, H, D]` by angles `sin/cos[B, S, D/2]` (in float32; returns x's dtype).

  `x * [cos, cos] + rotate_half(x) * [sin, sin]` with `rotate_half(x) = [-x2, x1]` computed as a
  matmul with a signed permutation matrix: exact, and on CPU much quicker (forward and backward)
  than the split + concatenate it replaces, whose concatenate fusions are slow on XLA:CPU
  (docs/benchmarks.md).
  """
  d = x.shape[-1]
  half = d // 2
  eye = jnp.eye(half, dtype=jnp.float32)
  zero = jnp.zeros((half, half), jnp.float32)
  rotate_half = jnp.block([[zero, eye], [-eye, zero]])  # [x1, x2] @ R = [-x2, x1]
  x32 = jnp.asarray(x, jnp.float32)
  cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :]
  sin = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :]
  rotated = jnp.einsum("bshd,de->bshe", x32, rotate_half, precision=jax.lax.Precision.HIGHEST)
  return jnp.asarray(x32 * cos + rotated * sin, x.dtype)


def image_run_index(
  is_image: jax.Array, starts: jax.Array | None = None, previous: jax.Array | None = None
) -> jax.Array:
  """Number of consecutive image tokens ending at each token (0 on non-image tokens).

  Args:
    is_image: `[B, S]` bool.
    starts: optional `[B, S]` bool, True where a new segment begins (the count restarts there).
    previous: optional `[B]` int32, the count at the token just before this chunk (decoding).
  Returns:
    `[B, S]` int32; the k-th token of an image run gets k (1-based).
  """
  _, s = is_image.shape
  t1 = jnp.arange(1, s + 1, dtype=jnp.int32)[None, :]
  # A "break" at token t is the 1-based index of the last position that does not continue a run.
  brk = jnp.where(~is_image, t1, 0)
  if starts is not None:
    brk = jnp.maximum(brk, jnp.where(starts, t1 - 1, 0))
  last = jax.lax.cummax(brk, axis=1)
  run = t1 - last
  if previous is not None:
    run = run + jnp.where(last == 0, previous[:, None], 0)
  return jnp.where(is_image, run, 0).astype(jnp.int32)


def image_rows_cols(
  positions: jax.Array, run: jax.Array, grid: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
  """2D RoPE coordinates: image tokens get (row, col) offsets from their image's first position.

  The k-th token (0-based, `k = (run - 1) mod h*w`) of an image whose first token sits at position
  `p0 = p - k` gets `(p0 + k // w, p0 + k % w)`; other tokens get `(p, p)`. Positions stay
  monotone: text after an image has both coordinates above every coordinate inside it.

  Args:
    positions: `[B, S]` int32 1D positions.
    run: `[B, S]` from `image_run_index` (0 on non-image tokens).
    grid: `(h, w)` of one image.
  """
  h, w = grid
  k = jnp.mod(jnp.maximum(run - 1, 0), h * w)
  p0 = positions - k
  rows = jnp.where(run > 0, p0 + k // w, positions)
  cols = jnp.where(run > 0, p0 + k % w, positions)
  return rows, cols
