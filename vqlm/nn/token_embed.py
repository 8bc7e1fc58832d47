"""The LM's token embeddings: one table `[vocab_size, dim]` for text ids, specials and image codes,
tied to the output projection (`TokenEmbed.attend`). Image-code rows are learned, a learned
projection of the image tokenizer's fixed codebook, or sums of per-channel FSQ level embeddings
(`level_one_hot`), as `TransformerConfig.image_embed_init` says.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlm.errors import UserError
from vqlm.nn import layers

DType = Any


def level_one_hot(levels: Sequence[int]) -> np.ndarray:
  """`[prod(levels), sum(levels)]` float32: row k is one-hot in each channel's block at k's digit
  (`d_c = (k // prod(levels[:c])) % levels[c]`, the FSQ index layout)."""
  levels = np.asarray(levels, np.int64)
  basis = np.concatenate([[1], np.cumprod(levels[:-1])])
  offsets = np.concatenate([[0], np.cumsum(levels[:-1])])
  k = np.arange(int(np.prod(levels)))
  out = np.zeros((k.size, int(levels.sum())), np.float32)
  for c in range(levels.size):
    out[k, offsets[c] + (k // basis[c]) % levels[c]] = 1.0
  return out


class TokenEmbed(nn.Module):
  """The unified embedding table `[vocab_size, dim]`, tied output projection via `attend`.

  With `codebook_dim > 0`, rows `[image_offset, image_offset + image_size)` are
  `codebook @ codebook_proj` (learned `[codebook_dim, dim]` projection of the fixed codebook
  variable) and the learned `embedding` holds only the other `vocab_size - image_size` rows.

  With `code_levels` (FSQ levels `(L_0, ..., L_{n-1})`, `prod == image_size`), image code `k` has
  digits `d_c = (k // prod(L_0..L_{c-1})) % L_c` (the FSQ index layout) and its row is
  `sum_c level_embedding[offset_c + d_c]`, from a learned `[sum(L), dim]` table. Codes that share
  a channel value share that part of their row, and with the tied head the image logits are
  sums of per-channel logits: `softmax` over codes factors into one distribution per channel.
  A code never seen in training still gets a trained row when its digits were seen.
  """

  vocab_size: int
  dim: int
  image_offset: int = 0
  image_size: int = 0
  codebook_dim: int = 0
  code_levels: Sequence[int] = ()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def parts(self) -> dict[str, jax.Array]:
    """The learned parts in `dtype`: `"rows"` `[vocab_size, dim]` the full table; with
    `code_levels` also `"other"` `[vocab_size - image_size, dim]` (the rows of every id outside
    the image codes, in id order) and `"levels"` `[sum(code_levels), dim]`."""
    init = nn.initializers.normal(stddev=1.0 / math.sqrt(self.dim))
    derived = bool(self.codebook_dim or self.code_levels)
    learned_rows = self.vocab_size - (self.image_size if derived else 0)
    emb = self.param(
      "embedding",
      nn.with_logical_partitioning(init, ("vocab", "embed")),
      (learned_rows, self.dim),
      self.param_dtype,
    )
    emb = jnp.asarray(emb, self.dtype)
    if self.code_levels:
      levels = self.param(
        "level_embedding",
        nn.with_logical_partitioning(init, (None, "embed")),
        (sum(self.code_levels), self.dim),
        self.param_dtype,
      )
      levels = jnp.asarray(levels, self.dtype)
      image_rows = jnp.asarray(level_one_hot(self.code_levels), self.dtype) @ levels
      off = self.image_offset
      rows = jnp.concatenate([emb[:off], image_rows, emb[off:]], axis=0)
      return {"rows": rows, "other": emb, "levels": levels}
    if not self.codebook_dim:
      return {"rows": emb}
    if not self.is_initializing() and not self.has_variable("codebook", "vectors"):
      raise UserError(
        "image_embed_init='codebook' needs the image tokenizer's codebook: pass "
        "variables={'params': ..., 'codebook': {'embed': {'vectors': [K, D]}}}."
      )
    codebook = self.variable(
      "codebook", "vectors", jnp.zeros, (self.image_size, self.codebook_dim), jnp.float32
    ).value
    proj = layers.Dense(
      self.dim,
      axes=("codebook", "embed"),
      name="codebook_proj",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    image_rows = proj(jax.lax.stop_gradient(codebook))
    off = self.image_offset
    return {"rows": jnp.concatenate([emb[:off], image_rows, emb[off:]], axis=0)}

  def table(self) -> jax.Array:
    """The full `[vocab_size, dim]` table in `dtype`."""
    return self.parts()["rows"]

  def __call__(self, ids: jax.Array) -> jax.Array:
    """`ids[B, S]` -> `[B, S, dim]`."""
    return jnp.take(self.table(), ids, axis=0)

  def attend(self, x: jax.Array, rows: tuple[int, int] | None = None) -> jax.Array:
    """`x[B, S, dim]` -> logits `[B, S, vocab_size]` in float32; with `rows=(start, size)` only
    the logits of ids `[start, start + size)`, `[B, S, size]`."""
    table = self.table()
    if rows is not None:
      table = table[rows[0] : rows[0] + rows[1]]
    return jnp.einsum("bsd,vd->bsv", x, table, preferred_element_type=jnp.float32)

  def attend_levels(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tied logits in factored form (needs `code_levels`): `x[B, S, dim]` ->
    `(other [B, S, vocab_size - image_size], levels [B, S, sum(code_levels)])`, float32.

    `other` holds the logits of every id outside the image codes, in id order (ids at and past
    `image_offset + image_size` shifted down by `image_size`); image code `k`'s logit is
    `sum_c levels[..., offset_c + d_c(k)]` (`level_one_hot`'s digits). The same logits as `attend`
    up to rounding, at `vocab_size - image_size + sum(code_levels)` dot products per token
    instead of `vocab_size` (`vqlm.train.lm_losses.factored_token_losses` reads them).
    """
    if not self.code_levels:
      raise UserError("attend_levels needs code_levels (image_embed_init='levels').")
    parts = self.parts()
    product = lambda table: jnp.einsum("bsd,vd->bsv", x, table, preferred_element_type=jnp.float32)
    return product(parts["other"]), product(parts["levels"])
