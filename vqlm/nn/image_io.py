"""A separate image-generation path of the LM (Janus): image codes in and out through their own
small networks instead of rows of the text embedding table and output projection.

With `TransformerConfig.gen_embed_dim = E > 0`, an image id `image_offset + k` enters the model
as `aligner(gen_embedding[k])` (a `[K, E]` table, then an MLP `E -> D`: `Linear`, then `GELU,
Linear` for each further layer) and its logit is `gen_head(x)[k]` (`Linear D -> H, GELU, Linear
H -> K`), while every other id keeps the text table and the LM head. The logits of the one
vocabulary are the LM head's outside the image ids and the generation head's on them, so a
sampler over unified ids needs no change. GELU is the exact (erf) one, as in Janus.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.nn import layers

DType = Any


class ImageGenPath(nn.Module):
  """Janus's generation embedding, aligner and head.

  Attributes:
    image_size: K, the number of image codes.
    dim: D, the transformer width.
    embed_dim: E, the width of the generation embedding table `[K, E]`.
    aligner_depth: linear layers of the aligner (the first `E -> D`, the others `D -> D`).
    head_dim: H, the hidden width of the head (`D -> H -> K`).
  """

  image_size: int
  dim: int
  embed_dim: int
  aligner_depth: int = 2
  head_dim: int = 0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    init = nn.initializers.normal(stddev=1.0)
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(init, ("vocab", "codebook")),
      (self.image_size, self.embed_dim),
      self.param_dtype,
    )
    # Params: aligner_0 ... aligner_{depth-1}, head_proj, head_out (names from the attributes).
    self.aligner = [layers.Dense(self.dim, axes=("codebook", "embed"), **kw)] + [
      layers.Dense(self.dim, axes=(None, "embed"), **kw) for _ in range(1, self.aligner_depth)
    ]
    hidden = self.head_dim or self.dim
    self.head_proj = layers.Dense(hidden, axes=("embed", "mlp"), **kw)
    self.head_out = layers.Dense(self.image_size, axes=("mlp", "vocab"), **kw)

  def embed(self, codes: jax.Array) -> jax.Array:
    """`codes[...]` int32 in `[0, K)` (clipped) -> `[..., D]` input embeddings."""
    codes = jnp.clip(codes, 0, self.image_size - 1)
    h = jnp.take(jnp.asarray(self.embedding, self.dtype), codes, axis=0)
    h = self.aligner[0](h)
    for layer in self.aligner[1:]:
      h = layer(jax.nn.gelu(h, approximate=False))
    return h

  def logits(self, x: jax.Array, codes: tuple[int, int] | None = None) -> jax.Array:
    """`x[..., D]` -> float32 logits `[..., K]` of the codes (or of codes `[start, start +
    size)` with `codes=(start, size)`)."""
    h = jax.nn.gelu(self.head_proj(x), approximate=False)
    return self.head_out(h, out_slice=codes).astype(jnp.float32)

  def __call__(self, codes: jax.Array) -> jax.Array:  # For `init` alone.
    return self.embed(codes)


def merged_logits(
  base, gen: ImageGenPath, x: jax.Array, vocab_size: int, image_offset: int, rows=None
) -> jax.Array:
  """The unified logits `[B, S, size]` of ids `rows=(start, size)` (default all of
  `vocab_size`): `base(x, (lo, n))` (the LM head's logits of ids `[lo, lo + n)`) outside the image
  ids, the generation head's on them; only the pieces the range covers are computed."""
  start, size = rows if rows is not None else (0, vocab_size)
  stop, image_stop = start + size, image_offset + gen.image_size
  pieces = []
  lo, hi = start, min(stop, image_offset)
  if hi > lo:
    pieces.append(base(x, (lo, hi - lo)))
  lo, hi = max(start, image_offset), min(stop, image_stop)
  if hi > lo:
    whole = lo == image_offset and hi == image_stop
    pieces.append(gen.logits(x, None if whole else (lo - image_offset, hi - lo)))
  lo, hi = max(start, image_stop), stop
  if hi > lo:
    pieces.append(base(x, (lo, hi - lo)))
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
