"""Grouped-query self-attention with RoPE, optional QK-norm, packing masks and a KV cache.

Masks are boolean, True where a query may attend to a key, shaped `[B, 1, S, T]` (broadcast over
heads):
  * training / full forward: `causal & (segment_ids[q] == segment_ids[k])` (`make_attention_mask`);
    `mask=None` means plain causal attention over the sequence.
  * cached decoding: `key_slot <= query_position` (`make_decode_mask`).

KV cache (one layer): a plain dict `{"k": [B, KVH, Dh, L], "v": [B, KVH, L, Dh]}` (`init_kv_cache`),
head-major so that a decode step reads each head's keys contiguously, with no transpose. Keys are
stored transposed (slots last), so that both attention matmuls of a decode step are plain
`[.., M, K] x [.., K, N]` products: XLA:CPU runs the `q k^T` form with a transposed right-hand
side markedly slower (docs/benchmarks.md; `python -m vqlm.bench sample` times the sampler).
Design: *slot = position*. A token at position p writes its k/v into slot p of its row and attends
to every slot <= p. Rows are independent, so prompts of different lengths share one batch with
static shapes: right-pad the prompts, prefill them at positions 0..S-1, and continue each row at its
own length n_b (the next token gets position n_b). Pad slots of a row always lie at positions the
row has not reached yet, so the causal-by-position mask hides them, and each is overwritten by the
row's real token before that token's position becomes visible. No lengths are stored: the caller
tracks each row's next position. Positions must be < L (out-of-range writes are dropped).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import UserError
from vqlm.nn import layers

DType = Any
KVCache = dict[str, jax.Array]

IMPLEMENTATIONS = ("xla", "cudnn")
# Added to masked logits: exp() of it underflows to exactly 0, and unlike finfo.min it cannot
# overflow to -inf when added to a logit (a fully masked row softmaxes to uniform, not NaN).
_MASKED = -1e30


def make_attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal + same-segment mask for packed sequences: `segment_ids[B, S]` -> `[B, 1, S, S]`."""
  s = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & causal)[:, None]


def make_decode_mask(positions: jax.Array, cache_len: int) -> jax.Array:
  """Cache mask: query at position p sees slots 0..p. `positions[B, S]` -> `[B, 1, S, L]`."""
  slots = jnp.arange(cache_len, dtype=jnp.int32)
  return (slots[None, None, :] <= positions[:, :, None])[:, None]


def init_kv_cache(
  batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: DType = jnp.float32
) -> KVCache:
  """Zero cache of one layer: `{"k": [batch, num_kv_heads, head_dim, max_len],
  "v": [batch, num_kv_heads, max_len, head_dim]}`."""
  return {
    "k": jnp.zeros((batch, num_kv_heads, head_dim, max_len), dtype),
    "v": jnp.zeros((batch, num_kv_heads, max_len, head_dim), dtype),
  }


def write_kv_cache(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
  """Writes `k, v[B, S, KVH, Dh]` into slots `positions[B, S]` of each row (a per-row scatter)."""
  rows = jnp.arange(k.shape[0])[:, None]
  # Advanced indices on axes 0 and 2 (or 3) put their [B, S] dims first: the update is
  # [B, S, KVH, Dh].
  new_k = cache["k"].at[rows, :, :, positions].set(k.astype(cache["k"].dtype))
  new_v = cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype))
  return {
    "k": layers.constrain(new_k, ("batch", "kv_heads", "head_dim", "cache_length")),
    "v": layers.constrain(new_v, ("batch", "kv_heads", "cache_length", "head_dim")),
  }


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  *,
  implementation: str = "xla",
  query_chunks: int = 1,
) -> jax.Array:
  """Grouped-query attention. `q[B, S, N, Dh]`, `k, v[B, T, K, Dh]` (N divisible by K).

  `mask[B, 1, S, T]` bool (True = attend) or None for causal attention (requires S == T).
  "xla": einsums with logits and softmax in float32. "cudnn": `jax.nn.dot_product_attention`'s
  fused cuDNN kernel (GPU only, bf16/fp16 inputs). Returns `[B, S, N, Dh]` in q's dtype.

  `query_chunks > 1` (xla only, self-attention with S == T and a mask that is at least causal,
  i.e. training or a full forward pass): the queries are cut into that many consecutive chunks
  and chunk `[a, e)` attends only to keys `[0, e)`. The result is identical (the mask hides later
  keys anyway) but about half of the causal logits are never computed, and each chunk's logits
  stay in cache: `python -m vqlm.bench lm` measures the gain on CPU.
  """
  if implementation == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise UserError(
        f"attention_impl='cudnn' needs bfloat16/float16 inputs, got {q.dtype}; "
        "set dtype='bfloat16' or attention_impl='xla'."
      )
    if mask is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if implementation != "xla":
    raise UserError(f"attention_impl={implementation!r}; use one of {IMPLEMENTATIONS}.")
  return attend_head_major(
    q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, query_chunks=query_chunks
  )


def attend_head_major(
  q: jax.Array,
  kh: jax.Array,
  vh: jax.Array,
  mask: jax.Array | None,
  *,
  query_chunks: int = 1,
  keys_transposed: bool = False,
) -> jax.Array:
  """The "xla" attention with keys and values head-major, as the KV cache stores them.

  `q[B, S, N, Dh]`, `kh, vh[B, K, T, Dh]` (`kh[B, K, Dh, T]` with `keys_transposed`),
  `mask[B, 1, S, T]` or None (causal, S == T) -> `[B, S, N, Dh]`; see `dot_product_attention`
  for `query_chunks`.
  """
  b, s, n, dh = q.shape
  kvh, t = vh.shape[1], vh.shape[2]
  if mask is None and s != t:
    raise UserError(f"mask=None means causal self-attention; got {s} queries and {t} keys.")
  g = n // kvh
  # Head-major queries too, so that every einsum below is a plain batched matmul.
  qh = (q * jnp.asarray(dh**-0.5, q.dtype)).reshape(b, s, kvh, g, dh).transpose(0, 2, 3, 1, 4)
  chunks = query_chunks if s == t and s >= 2 * query_chunks else 1
  bounds = [round(i * s / chunks) for i in range(chunks + 1)]
  outs = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    keys = end if chunks > 1 else t
    if mask is None:
      chunk_mask = (jnp.arange(start, end)[:, None] >= jnp.arange(keys)[None, :])[None, None]
    else:
      chunk_mask = mask[:, :, start:end, :keys]
    chunk_keys = kh[..., :keys] if keys_transposed else kh[:, :, :keys]
    outs.append(
      _attend(
        qh[:, :, :, start:end],
        chunk_keys,
        vh[:, :, :keys],
        chunk_mask,
        keys_transposed=keys_transposed,
      )
    )
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, dh).astype(q.dtype)


def _attend(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, keys_transposed: bool = False
) -> jax.Array:
  """`q[B, K, G, S, Dh]` (pre-scaled), `k, v[B, K, T, Dh]` (`k[B, K, Dh, T]` with
  `keys_transposed`), `mask[B or 1, 1, S, T]` bool -> `[B, K, G, S, Dh]`; logits and softmax in
  float32.

  The G query heads that share a key/value head are merged with the query axis (`[B, K, G*S,
  Dh]`), so that each einsum, forward and backward, is a batched matmul with one contracting
  dimension (two contracting dimensions fall back to a slow dot on CPU).
  """
  b, kvh, g, s, dh = q.shape
  t = v.shape[2]
  logits = jnp.einsum(
    "bkqd,bkdt->bkqt" if keys_transposed else "bkqd,bktd->bkqt",
    q.reshape(b, kvh, g * s, dh),
    k,
    preferred_element_type=jnp.float32,
  ).reshape(b, kvh, g, s, t)
  # An additive bias, not a select: its backward pass is free.
  logits = logits + jnp.where(mask[:, :, None], 0.0, _MASKED).astype(jnp.float32)
  # Softmax with the normalisation deferred to the [.., S, Dh] output instead of the [.., S, T]
  # probabilities: one pass fewer over the logits, forward and backward. The row max
  # contributes exp(0) = 1, so the denominator is >= 1.
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - top)
  denominator = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum(
    "bkqt,bktd->bkqd",
    weights.astype(v.dtype).reshape(b, kvh, g * s, t),
    v,
    preferred_element_type=jnp.float32,
  ).reshape(b, kvh, g, s, dh)
  return (out / denominator).astype(v.dtype)


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with RoPE.

  Params: `query[embed, heads, head_dim]`, `key` and `value[embed, kv_heads, head_dim]`,
  `out[heads, head_dim, embed]`; with `qk_norm`, RMSNorm scales `query_norm` / `key_norm`
  over head_dim.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool = False
  attention_impl: str = "xla"
  query_chunks: int = 1
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    sin: jax.Array,
    cos: jax.Array,
    mask: jax.Array | None,
    cache: KVCache | None = None,
    positions: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Self-attention over `x[B, S, D]`.

    Args:
      x: `[B, S, D]` input.
      sin, cos: `[B, S, head_dim // 2]` rotary angles of the S tokens.
      mask: `[B, 1, S, T]` bool, or None for plain causal (no cache). With a cache, T = L.
      cache: this layer's KV cache; when given, the S tokens' k/v are written into slots
        `positions` and the queries attend over the whole (masked) cache.
      positions: `[B, S]` int32 cache slots; required with a cache.
    Returns:
      `([B, S, D], new cache or None)`.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    q = layers.Dense(
      (self.num_heads, self.head_dim), axes=("embed", "heads", "head_dim"), name="query", **kw
    )(x)
    k = layers.Dense(
      (self.num_kv_heads, self.head_dim), axes=("embed", "kv_heads", "head_dim"), name="key", **kw
    )(x)
    v = layers.Dense(
      (self.num_kv_heads, self.head_dim), axes=("embed", "kv_heads", "head_dim"), name="value", **kw
    )(x)
    if self.qk_norm:
      q = layers.RMSNorm(self.norm_eps, name="query_norm", **kw)(q)
      k = layers.RMSNorm(self.norm_eps, name="key_norm", **kw)(k)
    q = layers.constrain(layers.apply_rope(q, sin, cos), layers.ACT_HEADS)
    k = layers.constrain(layers.apply_rope(k, sin, cos), layers.ACT_KV_HEADS)
    v = layers.constrain(v, layers.ACT_KV_HEADS)

    new_cache = None
    if cache is not None:
      if positions is None or mask is None:
        raise UserError("Attention with a KV cache needs `positions` and a decode `mask`.")
      new_cache = write_kv_cache(cache, k, v, positions)
      kh, vh = (new_cache[name].astype(self.dtype) for name in ("k", "v"))
      if self.attention_impl == "xla":
        out = attend_head_major(q, kh, vh, mask, keys_transposed=True)
      else:
        out = dot_product_attention(
          q,
          kh.transpose(0, 3, 1, 2),
          vh.transpose(0, 2, 1, 3),
          mask,
          implementation=self.attention_impl,
        )
    else:
      out = dot_product_attention(
        q, k, v, mask, implementation=self.attention_impl, query_chunks=self.query_chunks
      )
    out = layers.constrain(out, layers.ACT_HEADS)
    y = layers.Dense(dim, axes=("heads", "head_dim", "embed"), in_dims=2, name="out", **kw)(out)
    return y, new_cache
