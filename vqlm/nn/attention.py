"""Grouped-query self-attention with RoPE, optional QK-norm, packing masks and a KV cache.

QK-norm (`qk_norm`, one of QK_NORMS): False; True or "rms" (RMSNorm over head_dim, one scale
shared by the heads); "layernorm" (Chameleon's: a LayerNorm over head_dim, eps
QK_LAYERNORM_EPS, with a scale and a bias per head, `[heads, head_dim]` for queries and
`[kv_heads, head_dim]` for keys; `layers.HeadLayerNorm`). Applied before RoPE.

Masks are boolean, True where a query may attend to a key, shaped `[B, 1, S, T]` (broadcast over
heads):
  * training / full forward: `causal & (segment_ids[q] == segment_ids[k])` (`make_attention_mask`);
    `mask=None` means plain causal attention over the sequence.
  * cached decoding: `key_slot <= query_position` (`make_decode_mask`).

KV cache (one layer): a plain dict `{"k": [B, KVH, L / P, Dh, P], "v": [B, KVH, L, Dh]}`
(`init_kv_cache`, P = `KEY_PANEL` slots, L a multiple of P), head-major so that a decode step
reads each head's keys and values contiguously, with no transpose. Keys are stored transposed in
panels of P slots: `k[b, h, j, :, i]` is the key of slot `j * P + i`. Both matmuls of a decode
step are then plain `[.., M, K] x [.., K, N]` products whose right-hand side XLA:CPU reads as
stored: the logits are a batched `[G*S, Dh] x [Dh, P]` product per panel, 2.2-2.7x faster at
batch 64 than one `[G*S, Dh] x [Dh, L]` product over all slots (slots-last keys), itself faster
than the `q k^T` form with a transposed right-hand side (docs/benchmarks.md; `python -m
vqlm.bench sample` times the sampler).
Design: *slot = position*. A token at position p writes its k/v into slot p of its row and attends
to every slot <= p. Rows are independent, so prompts of different lengths share one batch with
static shapes: right-pad the prompts, prefill them at positions 0..S-1, and continue each row at its
own length n_b (the next token gets position n_b). Pad slots of a row always lie at positions the
row has not reached yet, so the causal-by-position mask hides them, and each is overwritten by the
row's real token before that token's position becomes visible. No lengths are stored: the caller
tracks each row's next position. Positions must be < L (out-of-range writes are dropped).
`grow_kv_cache` appends slots, so a decode loop can attend over the slots it has reached
(`vqlm.sample.sampler` grows its cache panel by panel).

Implementations (`attention_impl`, `IMPLEMENTATIONS`), all taking and returning `[B, T, H, Dh]`:
  * "xla": einsums with float32 logits and softmax (`attend_head_major`); runs everywhere.
  * "cudnn": `jax.nn.dot_product_attention`'s fused cuDNN kernel (GPU, bf16/fp16 inputs).
  * "splash": the Pallas TPU Splash attention kernel (causal, packed segments from `segment_ids`,
    grouped-query heads); on other backends it runs in Pallas interpret mode (slow: for tests).
  * "auto" (the default): `resolve_implementation` picks one of those at trace time from the
    backend: "cudnn" on a CUDA GPU with bf16/fp16 compute, "splash" on TPU, else "xla".
The kernels serve the cache-free path (training, full forward passes). Cached decoding and
prefill always use "xla" unless "cudnn" is asked for by name: a decode step has one query per row
and a per-row mask, which Splash's static masks do not express.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vqlm.errors import UserError
from vqlm.nn import layers

DType = Any
KVCache = dict[str, jax.Array]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
QK_NORMS = (False, True, "rms", "layernorm")
# Chameleon's QK LayerNorm epsilon (fixed there, independent of the RMSNorm epsilon).
QK_LAYERNORM_EPS = 1e-5
# Splash's block sizes must be multiples of 128 (TPU lanes): sequences are padded to a multiple of
# SPLASH_MIN_BLOCK, and each block is the largest of SPLASH_BLOCKS that divides the padded length.
SPLASH_MIN_BLOCK = 128
SPLASH_BLOCKS = (512, 256, 128)
# Added to masked logits: exp() of it underflows to exactly 0, and unlike finfo.min it cannot
# overflow to -inf when added to a logit (a fully masked row softmaxes to uniform, not NaN).
_MASKED = -1e30


def qk_norm_kind(qk_norm: bool | str) -> str | None:
  """None, "rms" or "layernorm" for a `qk_norm` setting (True means "rms"); else a UserError."""
  if isinstance(qk_norm, str) and qk_norm in ("rms", "layernorm"):
    return qk_norm
  if isinstance(qk_norm, (bool, int)) and qk_norm in (0, 1):
    return "rms" if qk_norm else None
  raise UserError(f"qk_norm={qk_norm!r}; use one of {QK_NORMS}.")


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


# Slots per key panel of the KV cache (see the module docstring): the width at which XLA:CPU's
# batched decode-logits matmul reads the keys fastest (batch 64, 192-256 slots: 32-slot panels
# 1.35x slower, 128-slot panels 2.2x slower, 16-slot panels 2.9x slower).
KEY_PANEL = 64


def cache_slots(max_len: int) -> int:
  """The slots of a cache for `max_len` positions: `max_len` rounded up to a multiple of
  KEY_PANEL."""
  return max(KEY_PANEL, -(-max_len // KEY_PANEL) * KEY_PANEL)


def init_kv_cache(
  batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: DType = jnp.float32
) -> KVCache:
  """Zero cache of one layer with L = `cache_slots(max_len)` slots: `{"k": [batch, num_kv_heads,
  L / KEY_PANEL, head_dim, KEY_PANEL], "v": [batch, num_kv_heads, L, head_dim]}`."""
  slots = cache_slots(max_len)
  return {
    "k": jnp.zeros((batch, num_kv_heads, slots // KEY_PANEL, head_dim, KEY_PANEL), dtype),
    "v": jnp.zeros((batch, num_kv_heads, slots, head_dim), dtype),
  }


def grow_kv_cache(cache: KVCache, max_len: int) -> KVCache:
  """One layer's cache (any leading axes, e.g. a stacked layer axis) with zero slots appended up
  to `cache_slots(max_len)`. Slot = position is unchanged, so decoding continues as before, and
  a decode step reads only the slots the cache has so far."""
  length, slots = cache["v"].shape[-2], cache_slots(max_len)
  if slots < length:
    raise UserError(f"grow_kv_cache: max_len={max_len} is below the cache's {length} slots.")
  pad_k = [(0, 0)] * (cache["k"].ndim - 3) + [(0, (slots - length) // KEY_PANEL), (0, 0), (0, 0)]
  pad_v = [(0, 0)] * (cache["v"].ndim - 2) + [(0, slots - length), (0, 0)]
  return {"k": jnp.pad(cache["k"], pad_k), "v": jnp.pad(cache["v"], pad_v)}


def keys_slot_major(k: jax.Array) -> jax.Array:
  """Cached keys `[B, KVH, L / P, Dh, P]` -> `[B, L, KVH, Dh]` (a copy)."""
  b, kvh, panels, dh, width = k.shape
  return k.transpose(0, 2, 4, 1, 3).reshape(b, panels * width, kvh, dh)


def write_kv_cache(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
  """Writes `k, v[B, S, KVH, Dh]` into slots `positions[B, S]` of each row (a per-row scatter)."""
  rows = jnp.arange(k.shape[0])[:, None]
  width = cache["k"].shape[-1]
  # Separated advanced indices put their [B, S] dims first: both updates are [B, S, KVH, Dh].
  new_k = (
    cache["k"].at[rows, :, positions // width, :, positions % width].set(k.astype(cache["k"].dtype))
  )
  new_v = cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype))
  return {
    "k": layers.constrain(new_k, ("batch", "kv_heads", "cache_length", "head_dim", "cache_panel")),
    "v": layers.constrain(new_v, ("batch", "kv_heads", "cache_length", "head_dim")),
  }


def resolve_implementation(
  implementation: str,
  dtype: DType,
  *,
  head_dim: int | None = None,
  platform: str | None = None,
) -> str:
  """The concrete attention kernel for `implementation` (one of IMPLEMENTATIONS).

  "auto" becomes "cudnn" on a CUDA GPU when `dtype` (the compute dtype) is bfloat16/float16 and
  `head_dim` (if given) suits cuDNN's fused kernel (a multiple of 8, at most 128), "splash" on
  TPU, and "xla" otherwise. Any other name is returned unchanged (an unknown one is a UserError).
  `platform`: "cpu", "cuda", "rocm", "tpu" ("gpu" counts as "cuda"); default `backend_platform()`.
  """
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f"attention_impl={implementation!r}; use one of {IMPLEMENTATIONS}.")
  if implementation != "auto":
    return implementation
  platform = platform or backend_platform()
  if platform == "tpu":
    return "splash"
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
  if platform in ("gpu", "cuda") and half and head_ok:
    return "cudnn"
  return "xla"


def backend_platform() -> str:
  """The default backend as `resolve_implementation` names it: "cpu", "tpu", "cuda" or "rocm"
  (GPUs told apart by the backend's platform version)."""
  platform = jax.default_backend()
  if platform != "gpu":
    return platform
  version = jax.devices()[0].client.platform_version.lower()
  return "rocm" if "rocm" in version else "cuda"


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  *,
  implementation: str = "xla",
  query_chunks: int = 1,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """Grouped-query attention. `q[B, S, N, Dh]`, `k, v[B, T, K, Dh]` (N divisible by K).

  `mask[B, 1, S, T]` bool (True = attend) or None for causal attention (requires S == T).
  `segment_ids[B, S]` (optional, self-attention only): the packing segments that `mask` was made
  from (`make_attention_mask`); "splash" uses them instead of the dense mask. Implementations:
  "xla": einsums with logits and softmax in float32. "cudnn": `jax.nn.dot_product_attention`'s
  fused cuDNN kernel (GPU only, bf16/fp16 inputs). "splash": the Pallas TPU Splash kernel
  (causal self-attention; interpret mode off TPU). "auto": `resolve_implementation`, falling back
  to "xla" where the kernel cannot express the mask. Returns `[B, S, N, Dh]` in q's dtype.

  `query_chunks > 1` (xla only, self-attention with S == T and a mask that is at least causal,
  i.e. training or a full forward pass): the queries are cut into that many consecutive chunks
  and chunk `[a, e)` attends only to keys `[0, e)`. The result is identical (the mask hides later
  keys anyway) but about half of the causal logits are never computed, and each chunk's logits
  stay in cache: `python -m vqlm.bench lm` measures the gain on CPU.
  """
  requested = implementation
  implementation = resolve_implementation(implementation, q.dtype, head_dim=q.shape[-1])
  if implementation == "splash":
    dense_only = mask is not None and segment_ids is None
    if requested == "auto" and (dense_only or q.shape[1] != k.shape[1]):
      implementation = "xla"
    else:
      if dense_only:
        raise UserError(
          "attention_impl='splash' needs the packing segment_ids, not a dense mask (cached "
          "decoding uses 'xla'); pass segment_ids or use attention_impl='xla'."
        )
      return splash_attention(q, k, v, segment_ids)
  if implementation == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise UserError(
        f"attention_impl='cudnn' needs bfloat16/float16 inputs, got {q.dtype}; "
        "set dtype='bfloat16' or attention_impl='xla'."
      )
    if mask is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    # A packing mask is causal too: saying so lets cuDNN skip the blocks above the diagonal.
    causal = segment_ids is not None
    return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=causal, implementation="cudnn"
    )
  return attend_head_major(
    q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, query_chunks=query_chunks
  )


def splash_block(length: int) -> int:
  """Splash's block size for a (padded) sequence of `length`, a multiple of SPLASH_MIN_BLOCK."""
  return next(b for b in SPLASH_BLOCKS if length % b == 0)


def _splash_kernel(num_heads: int, length: int, interpret: bool) -> Any:
  """A causal Splash MHA kernel over `[num_heads, length, Dh]` queries (grouped-query keys
  `[K, length, Dh]` with K dividing num_heads are mapped by the kernel, head h to h // (N/K))."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  block = splash_block(length)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  # Built in the trace that uses it (under shard_map, its arrays belong to that trace's mesh);
  # the kernel caches the mask's block tables itself.
  return splash.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _shards(mesh: Any, axes: str | tuple[str, ...] | None) -> int:
  """How many shards the mesh `axes` (a PartitionSpec entry) cut a dimension into."""
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in names)


def splash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
  """Causal self-attention with the Splash kernel: `q[B, T, N, Dh]`, `k, v[B, T, K, Dh]`,
  `segment_ids[B, T]` int (packing; None = one segment) -> `[B, T, N, Dh]` in q's dtype.

  q is scaled by `Dh ** -0.5` as in "xla". T is padded to a multiple of SPLASH_MIN_BLOCK (the
  pad keys come after every real query, so causality hides them). Under a mesh
  (`jax.set_mesh`), the kernel runs per shard (`jax.shard_map`): batch and heads split as the
  logical rules place "batch" and "heads" / "kv_heads", sequence and head_dim whole. Off TPU it
  runs in Pallas interpret mode.
  """
  b, t, n, dh = q.shape
  if k.shape[1] != t:
    raise UserError(
      f"attention_impl='splash' is self-attention; got {t} queries, {k.shape[1]} keys."
    )
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  padded = -(-t // SPLASH_MIN_BLOCK) * SPLASH_MIN_BLOCK
  q = q * jnp.asarray(dh**-0.5, q.dtype)
  if padded != t:
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, [(0, 0), (0, padded - t)], constant_values=-1)
  interpret = jax.default_backend() != "tpu"

  def local(q, k, v, seg):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _splash_kernel(q.shape[2], q.shape[1], interpret)
    # The kernel is head-major, one sequence at a time: [N, T, Dh], mapped over the batch.
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s))
    out = jax.vmap(one)(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), seg.astype(jnp.int32))
    return out.transpose(0, 2, 1, 3)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = local(q, k, v, segment_ids)
  else:
    q_spec = nn.logical_to_mesh_axes(("batch", None, "heads", None))
    kv_spec = nn.logical_to_mesh_axes(("batch", None, "kv_heads", None))
    batch = q_spec[0] if b % _shards(mesh, q_spec[0]) == 0 else None  # Else whole batches.
    heads = q_spec[2] if n % _shards(mesh, q_spec[2]) == 0 else None
    kv_heads = kv_spec[2] if k.shape[2] % _shards(mesh, kv_spec[2]) == 0 else None
    if kv_heads != heads and k.shape[2] != n:
      # Heads split unlike kv_heads: give every query head its own key/value head.
      k, v = (jnp.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
      kv_heads = heads
    q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
    out = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)),
      out_specs=q_spec,
      check_vma=False,
    )(q, k, v, segment_ids)
  return out[:, :t].astype(q.dtype)


def attend_head_major(
  q: jax.Array,
  kh: jax.Array,
  vh: jax.Array,
  mask: jax.Array | None,
  *,
  query_chunks: int = 1,
  keys_paneled: bool = False,
) -> jax.Array:
  """The "xla" attention with keys and values head-major, as the KV cache stores them.

  `q[B, S, N, Dh]`, `kh, vh[B, K, T, Dh]` (with `keys_paneled`, `kh[B, K, T / P, Dh, P]`, the
  KV cache's layout), `mask[B, 1, S, T]` or None (causal, S == T) -> `[B, S, N, Dh]`; see
  `dot_product_attention` for `query_chunks` (not with `keys_paneled`).
  """
  b, s, n, dh = q.shape
  kvh, t = vh.shape[1], vh.shape[2]
  if mask is None and s != t:
    raise UserError(f"mask=None means causal self-attention; got {s} queries and {t} keys.")
  g = n // kvh
  # Head-major queries too, so that every einsum below is a plain batched matmul.
  qh = (q * jnp.asarray(dh**-0.5, q.dtype)).reshape(b, s, kvh, g, dh).transpose(0, 2, 3, 1, 4)
  chunks = query_chunks if s == t and s >= 2 * query_chunks and not keys_paneled else 1
  bounds = [round(i * s / chunks) for i in range(chunks + 1)]
  outs = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    keys = end if chunks > 1 else t
    if mask is None:
      chunk_mask = (jnp.arange(start, end)[:, None] >= jnp.arange(keys)[None, :])[None, None]
    else:
      chunk_mask = mask[:, :, start:end, :keys]
    chunk_keys = kh if keys_paneled else kh[:, :, :keys]
    outs.append(_attend(qh[:, :, :, start:end], chunk_keys, vh[:, :, :keys], chunk_mask))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, dh).astype(q.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`q[B, K, G, S, Dh]` (pre-scaled), `k, v[B, K, T, Dh]` (or `k[B, K, T / P, Dh, P]`: keys in
  the KV cache's panels), `mask[B or 1, 1, S, T]` bool -> `[B, K, G, S, Dh]`; logits and softmax
  in float32.

  The G query heads that share a key/value head are merged with the query axis (`[B, K, G*S,
  Dh]`), so that each einsum, forward and backward, is a batched matmul with one contracting
  dimension (two contracting dimensions fall back to a slow dot on CPU).
  """
  b, kvh, g, s, dh = q.shape
  t = v.shape[2]
  q = q.reshape(b, kvh, g * s, dh)
  if k.ndim == 5:
    # One [G*S, Dh] x [Dh, P] product per panel (the queries broadcast over the panels), then
    # the panels side by side: the same sums as one product over all T slots.
    panels = k.shape[2]
    q = jnp.broadcast_to(q[:, :, None], (b, kvh, panels, g * s, dh))
    logits = jnp.einsum("bkpqd,bkpdn->bkpqn", q, k, preferred_element_type=jnp.float32)
    logits = logits.transpose(0, 1, 3, 2, 4).reshape(b, kvh, g, s, t)
  else:
    logits = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kvh, g, s, t)
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
  `out[heads, head_dim, embed]`; with `qk_norm` True / "rms", RMSNorm scales `query_norm` /
  `key_norm` `[head_dim]`; with "layernorm", `query_norm` `{scale, bias}[heads, head_dim]` and
  `key_norm` `{scale, bias}[kv_heads, head_dim]` (see QK_NORMS).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool | str = False
  attention_impl: str = "auto"
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
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Self-attention over `x[B, S, D]`.

    Args:
      x: `[B, S, D]` input.
      sin, cos: `[B, S, head_dim // 2]` rotary angles of the S tokens.
      mask: `[B, 1, S, T]` bool, or None for plain causal (no cache). With a cache, T = L.
      cache: this layer's KV cache; when given, the S tokens' k/v are written into slots
        `positions` and the queries attend over the whole (masked) cache.
      positions: `[B, S]` int32 cache slots; required with a cache.
      segment_ids: `[B, S]` int32 packing segments that `mask` was made from (no cache); the
        "splash" kernel reads them instead of the dense mask.
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
    norm = qk_norm_kind(self.qk_norm)
    if norm == "rms":
      q = layers.RMSNorm(self.norm_eps, name="query_norm", **kw)(q)
      k = layers.RMSNorm(self.norm_eps, name="key_norm", **kw)(k)
    elif norm == "layernorm":
      eps = QK_LAYERNORM_EPS
      q = layers.HeadLayerNorm(eps, ("heads", "head_dim"), name="query_norm", **kw)(q)
      k = layers.HeadLayerNorm(eps, ("kv_heads", "head_dim"), name="key_norm", **kw)(k)
    q = layers.constrain(layers.apply_rope(q, sin, cos), layers.ACT_HEADS)
    k = layers.constrain(layers.apply_rope(k, sin, cos), layers.ACT_KV_HEADS)
    v = layers.constrain(v, layers.ACT_KV_HEADS)

    new_cache = None
    if cache is not None:
      if positions is None or mask is None:
        raise UserError("Attention with a KV cache needs `positions` and a decode `mask`.")
      new_cache = write_kv_cache(cache, k, v, positions)
      kh, vh = (new_cache[name].astype(self.dtype) for name in ("k", "v"))
      if self.attention_impl == "cudnn":  # Asked for by name; "auto" and "splash" use "xla".
        out = dot_product_attention(
          q, keys_slot_major(kh), vh.transpose(0, 2, 1, 3), mask, implementation="cudnn"
        )
      else:
        resolve_implementation(self.attention_impl, self.dtype)  # Validates the name.
        out = attend_head_major(q, kh, vh, mask, keys_paneled=True)
    else:
      out = dot_product_attention(
        q,
        k,
        v,
        mask,
        implementation=self.attention_impl,
        query_chunks=self.query_chunks,
        segment_ids=segment_ids,
      )
    out = layers.constrain(out, layers.ACT_HEADS)
    y = layers.Dense(dim, axes=("heads", "head_dim", "embed"), in_dims=2, name="out", **kw)(out)
    return y, new_cache
