"""Grouped-query self-attention with RoPE, optional QK-norm, packing masks and a KV cache.

Masks are boolean, True where a query may attend to a key, shaped `[B, 1, S, T]` (broadcast over
heads):
  * training / full forward: `causal & (segment_ids[q] == segment_ids[k])` (`make_attention_mask`);
    `mask=None` means plain causal attention over the sequence.
  * cached decoding: `key_slot <= query_position` (`make_decode_mask`).

KV cache (one layer): a plain dict `{"k": [B, L, KVH, Dh], "v": [B, L, KVH, Dh]}` (`init_kv_cache`).
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

from vqlm.nn import layers

DType = Any
KVCache = dict[str, jax.Array]

IMPLEMENTATIONS = ("xla", "cudnn")


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


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                  dtype: DType = jnp.float32) -> KVCache:
  """Zero cache of one layer: `{"k", "v"}` each `[batch, max_len, num_kv_heads, head_dim]`."""
  shape = (batch, max_len, num_kv_heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_kv_cache(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
  """Writes `k, v[B, S, KVH, Dh]` into slots `positions[B, S]` of each row (a per-row scatter)."""
  rows = jnp.arange(k.shape[0])[:, None]
  new = {"k": cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype)),
         "v": cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))}
  return {name: layers.constrain(x, ("batch", "cache_length", "kv_heads", "head_dim"))
          for name, x in new.items()}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          *, implementation: str = "xla") -> jax.Array:
  """Grouped-query attention. `q[B, S, N, Dh]`, `k, v[B, T, K, Dh]` (N divisible by K).

  `mask[B, 1, S, T]` bool (True = attend) or None for causal attention (requires S == T).
  "xla": einsums with logits and softmax in float32. "cudnn": `jax.nn.dot_product_attention`'s
  fused cuDNN kernel (GPU only, bf16/fp16 inputs). Returns `[B, S, N, Dh]` in q's dtype.
  """
  b, s, n, dh = q.shape
  t, kvh = k.shape[1], k.shape[2]
  if implementation == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention_impl='cudnn' needs bfloat16/float16 inputs, got {q.dtype}; "
                       "set dtype='bfloat16' or attention_impl='xla'.")
    if mask is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"attention_impl={implementation!r}; use one of {IMPLEMENTATIONS}.")
  if mask is None:
    mask = jnp.tril(jnp.ones((s, t), bool))[None, None]
  g = n // kvh
  qg = q.reshape(b, s, kvh, g, dh)
  logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (dh ** -0.5)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v)
  return out.reshape(b, s, n, dh).astype(q.dtype)


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
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, sin: jax.Array, cos: jax.Array,
               mask: jax.Array | None, cache: KVCache | None = None,
               positions: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
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
    q = layers.Dense((self.num_heads, self.head_dim), axes=("embed", "heads", "head_dim"),
                     name="query", **kw)(x)
    k = layers.Dense((self.num_kv_heads, self.head_dim), axes=("embed", "kv_heads", "head_dim"),
                     name="key", **kw)(x)
    v = layers.Dense((self.num_kv_heads, self.head_dim), axes=("embed", "kv_heads", "head_dim"),
                     name="value", **kw)(x)
    if self.qk_norm:
      q = layers.RMSNorm(self.norm_eps, name="query_norm", **kw)(q)
      k = layers.RMSNorm(self.norm_eps, name="key_norm", **kw)(k)
    q = layers.constrain(layers.apply_rope(q, sin, cos), layers.ACT_HEADS)
    k = layers.constrain(layers.apply_rope(k, sin, cos), layers.ACT_KV_HEADS)
    v = layers.constrain(v, layers.ACT_KV_HEADS)

    new_cache = None
    if cache is not None:
      if positions is None or mask is None:
        raise ValueError("Attention with a KV cache needs `positions` and a decode `mask`.")
      new_cache = write_kv_cache(cache, k, v, positions)
      k = new_cache["k"].astype(self.dtype)
      v = new_cache["v"].astype(self.dtype)
    out = dot_product_attention(q, k, v, mask, implementation=self.attention_impl)
    out = layers.constrain(out, layers.ACT_HEADS)
    y = layers.Dense(dim, axes=("heads", "head_dim", "embed"), in_dims=2, name="out", **kw)(out)
    return y, new_cache
