"""Decoder-only transformer over the unified vocabulary (text ids, specials, image codes).

Pre-norm Llama-style blocks (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP), switches for
scanning the layers (`nn.scan`, params stacked on a leading "layers" axis) and rematerialisation
(`nn.remat` with a `jax.checkpoint_policies` policy), and a KV cache for decoding (see
`vqlm.nn.attention` for the slot = position design).

Image tokens are ids in `[image_offset, image_offset + image_size)`. Their embeddings are either
learned rows of the table (`image_embed_init="learned"`), a learned projection of the image
tokenizer's fixed codebook (`"codebook"`), or, for FSQ codes, sums of learned per-channel level
embeddings (`"levels"`, with `code_levels` the FSQ levels). The codebook
`[image_size, codebook_dim]` is not a parameter but the variable collection `"codebook"`
(`{"embed": {"vectors": ...}}`), passed to `apply` next to the params. With `rope_2d`, image
tokens get 2D rotary positions (row, col of the `grid`) and other tokens 1D positions
(`layers.image_rows_cols`).

Every setting lives in one frozen, validated `TransformerConfig`: the module is
`Transformer(config)`, and `count_params(config)` counts its parameters from the abstract init.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import MAX_SIZE, UserError
from vqlm.nn import attention, image_io, layers
from vqlm.nn.token_embed import TokenEmbed

DType = Any
Cache = dict[str, Any]

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything": jax.checkpoint_policies.everything_saveable,
}
IMAGE_EMBED_INITS = ("learned", "codebook", "levels")


class Block(nn.Module):
  """One pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`; with `swin_norm`
  (Chameleon-30B's "Swin" order) the norms move after the sublayers: `x + norm(attn(x))`, then
  `x + norm(mlp(x))` (the same two RMSNorms, `attn_norm` and `mlp_norm`).

  `__call__(x[B, S, D], cache, sin, cos, mask, positions, segment_ids) -> (x, new_cache)`; all
  arguments are arrays or None so the block can be scanned and rematerialised.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  qk_norm: bool | str = False
  attention_impl: str = "auto"
  query_chunks: int = 1
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  swin_norm: bool = False

  @nn.compact
  def __call__(self, x, cache, sin, cos, mask, positions, segment_ids=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_norm = layers.RMSNorm(self.norm_eps, name="attn_norm", **kw)
    mlp_norm = layers.RMSNorm(self.norm_eps, name="mlp_norm", **kw)
    h = x if self.swin_norm else attn_norm(x)
    h, new_cache = attention.Attention(
      num_heads=self.num_heads,
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      qk_norm=self.qk_norm,
      attention_impl=self.attention_impl,
      query_chunks=self.query_chunks,
      norm_eps=self.norm_eps,
      name="attn",
      **kw,
    )(h, sin=sin, cos=cos, mask=mask, cache=cache, positions=positions, segment_ids=segment_ids)
    x = layers.constrain(x + (attn_norm(h) if self.swin_norm else h), layers.ACT_EMBED)
    h = layers.MLP(self.mlp_dim, name="mlp", **kw)(x if self.swin_norm else mlp_norm(x))
    x = layers.constrain(x + (mlp_norm(h) if self.swin_norm else h), layers.ACT_EMBED)
    return x, new_cache


_SIZES = (
  "vocab_size",
  "dim",
  "num_layers",
  "num_heads",
  "mlp_dim",
  "num_kv_heads",
  "head_dim",
  "image_offset",
  "image_size",
  "codebook_dim",
  "query_chunks",
  "gen_embed_dim",
  "gen_aligner_depth",
  "gen_head_dim",
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Every setting of a `Transformer`, validated once, in `__post_init__` (a ValueError names the
  bad field). Frozen and hashable; `replace(**changes)` returns a new, validated config.

  Attributes:
    vocab_size: size of the unified vocabulary (the padded table size).
    dim, num_layers, num_heads, mlp_dim: width, depth, query heads, SwiGLU hidden size.
    num_kv_heads: key/value heads (grouped-query attention); None (or 0) = num_heads, see
      `kv_heads()`.
    head_dim: None (or 0) = dim // num_heads, see `head_size()`.
    qk_norm: norm of queries and keys per head: False | True or "rms" (RMSNorm over head_dim) |
      "layernorm" (Chameleon's LayerNorm with a scale and bias per head; `attention.QK_NORMS`).
    swin_norm: the RMSNorms after attention and MLP instead of before (Chameleon's `swin_norm`).
    tie_embeddings: logits from the embedding table; else a separate `head[embed, vocab]`.
    rope_theta: RoPE base.
    rope_2d: 2D rotary positions for image tokens (needs image_size, grid, head_dim % 4 == 0).
    image_pos_embed: add a learned embedding of the grid cell `[h * w, dim]` to each image token
      (as DALL-E's row/column embeddings): the k-th code of an image gets row k, so the model
      reads where in the grid it is drawing without deriving it from relative positions.
    image_offset, image_size, grid: where image ids start, how many there are, `(h, w)` per image
      (a tuple; None without images).
    image_embed_init: "learned" | "codebook" (then codebook_dim is the codebook's width) |
      "levels" (FSQ codes; code_levels are the tokenizer's levels, prod == image_size).
    codebook_dim: width of the image tokenizer's codebook (read with "codebook" only).
    code_levels: the FSQ levels, a tuple (read with "levels" only).
    gen_embed_dim: > 0 turns on Janus's separate image-generation path (`vqlm.nn.image_io`):
      image ids embed through a `[image_size, gen_embed_dim]` table and an aligner MLP of
      `gen_aligner_depth` layers, and their logits come from a head `dim -> gen_head_dim (0:
      dim) -> image_size`; text ids keep the table and the LM head. 0 = off.
    scan_layers: `nn.scan` over the blocks (params and cache stacked on a leading layer axis).
    remat_policy: one of REMAT_POLICIES ("none", "full", "dots", "dots_with_no_batch_dims", ...).
    norm_eps: RMSNorm epsilon.
    dtype: compute dtype; param_dtype: parameter dtype. Dtypes or names ("float32", "bfloat16",
      as in JSON configs), stored as `jnp.dtype`s.
    attention_impl: "auto" (default: "cudnn" on a CUDA GPU with bf16/fp16 compute, "splash" on
      TPU, else "xla"; `attention.resolve_implementation`, at trace time) | "xla" (einsum,
      float32 softmax) | "cudnn" (fused kernel on GPU, bf16/fp16) | "splash" (Pallas TPU kernel;
      interpret mode elsewhere). Kernels serve training and full forward passes; cached decoding
      uses "xla" (or "cudnn" when named). No effect on the parameters.
    query_chunks: with "xla", training and full forward passes split the queries into this many
      chunks that skip the masked upper triangle (`attention.dot_product_attention`); 1 = off.
  """

  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  qk_norm: bool | str = False
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  rope_2d: bool = False
  image_pos_embed: bool = False
  image_offset: int = 0
  image_size: int = 0
  grid: tuple[int, int] | None = None
  image_embed_init: str = "learned"
  codebook_dim: int = 0
  code_levels: tuple[int, ...] = ()
  gen_embed_dim: int = 0
  gen_aligner_depth: int = 2
  gen_head_dim: int = 0
  scan_layers: bool = False
  remat_policy: str = "none"
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  attention_impl: str = "auto"
  query_chunks: int = 1
  swin_norm: bool = False

  def __post_init__(self):
    # Normalise (frozen, hence object.__setattr__) so that configs from JSON or a ConfigDict
    # (lists, dtype names, 0 for "derived") compare, hash and behave like hand-written ones.
    set_ = lambda name, value: object.__setattr__(self, name, value)
    for name in ("num_kv_heads", "head_dim"):
      if not getattr(self, name):
        set_(name, None)
    try:
      set_("grid", tuple(int(g) for g in self.grid) if self.grid else None)
      set_("code_levels", tuple(int(l) for l in self.code_levels))
    except (TypeError, ValueError):
      raise UserError(
        f"grid={self.grid!r} and code_levels={self.code_levels!r} must be tuples of integers."
      ) from None
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        dtype = jnp.dtype(value)
      except (TypeError, ValueError) as e:  # numpy: ValueError for strings like "1e+30".
        raise UserError(
          f"{name}={value!r} is not a dtype; use e.g. 'float32' or 'bfloat16'."
        ) from e
      if not jnp.issubdtype(dtype, jnp.floating):
        raise UserError(f"{name}={value!r} must be a floating-point dtype.")
      set_(name, dtype)
    self._validate()

  def _validate(self) -> None:
    for name in ("vocab_size", "dim", "num_layers", "num_heads", "mlp_dim"):
      value = getattr(self, name)
      if value <= 0:
        raise UserError(f"Transformer {name}={value} must be > 0.")
    for name in _SIZES:
      value = getattr(self, name)
      if value is not None and value > MAX_SIZE:
        raise UserError(f"Transformer {name}={value} is too large (at most {MAX_SIZE}).")
    for name in ("num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if value is not None and value < 0:
        raise UserError(f"Transformer {name}={value} must be > 0 (or None: derived).")
    kvh = self.kv_heads()
    if self.num_heads % kvh:
      raise UserError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={kvh}.")
    if not self.head_dim and self.dim % self.num_heads:
      raise UserError(
        f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim."
      )
    hd = self.head_size()
    if hd % 2:
      raise UserError(f"head_dim={hd} must be even for RoPE.")
    off, size = self.image_offset, self.image_size
    if off < 0 or size < 0 or off + size > self.vocab_size:
      raise UserError(
        f"image ids [{off}, {off + size}) must lie inside the vocabulary of size {self.vocab_size}."
      )
    if self.rope_2d and hd % 4:
      raise UserError(f"rope_2d needs head_dim divisible by 4, got {hd}.")
    has_grid = size > 0 and self.grid is not None and len(self.grid) == 2 and min(self.grid) > 0
    for name in ("rope_2d", "image_pos_embed"):
      if getattr(self, name) and not has_grid:
        raise UserError(f"{name} needs image_size > 0 and grid=(h, w) of the image code grid.")
    init = self.image_embed_init
    if init not in IMAGE_EMBED_INITS:
      raise UserError(f"image_embed_init={init!r}; use one of {IMAGE_EMBED_INITS}.")
    if init == "codebook" and (self.codebook_dim <= 0 or size <= 0):
      raise UserError(
        "image_embed_init='codebook' needs image_size > 0 and codebook_dim > 0 "
        "(the image tokenizer's codebook width)."
      )
    levels = self.code_levels
    if init == "levels" and (not levels or min(levels) < 2 or math.prod(levels) != size):
      raise UserError(
        f"image_embed_init='levels' needs code_levels (the FSQ levels, each >= 2) "
        f"whose product is image_size={size}, got {levels}; it applies to FSQ "
        "image tokenizers only."
      )
    if self.gen_embed_dim and (size <= 0 or init != "learned" or self.gen_aligner_depth < 1):
      raise UserError(
        f"gen_embed_dim={self.gen_embed_dim} (the image-generation path) needs image_size > 0, "
        f"image_embed_init='learned' and gen_aligner_depth >= 1 (got {size}, {init!r}, "
        f"{self.gen_aligner_depth})."
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise UserError(f"remat_policy={self.remat_policy!r}; use one of {tuple(REMAT_POLICIES)}.")
    if int(self.query_chunks) < 1:
      raise UserError(f"query_chunks={self.query_chunks} must be >= 1 (1 turns chunking off).")
    attention.qk_norm_kind(self.qk_norm)  # A UserError naming the valid settings.
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise UserError(
        f"attention_impl={self.attention_impl!r}; use one of {attention.IMPLEMENTATIONS}."
      )

  def kv_heads(self) -> int:
    """Key/value heads: `num_kv_heads`, or `num_heads` when unset."""
    return self.num_kv_heads or self.num_heads

  def head_size(self) -> int:
    """Per-head width: `head_dim`, or `dim // num_heads` when unset."""
    return self.head_dim or self.dim // self.num_heads

  def tracks_image_runs(self) -> bool:
    """Whether the model counts image runs (for `rope_2d` or `image_pos_embed`)."""
    return self.rope_2d or self.image_pos_embed

  def replace(self, **changes: Any) -> "TransformerConfig":
    """A copy with `changes` applied (normalised and validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly fields (dtype names, lists); `TransformerConfig(**c.to_dict()) == c`."""
    out = dataclasses.asdict(self)
    out.update(
      dtype=self.dtype.name,
      param_dtype=self.param_dtype.name,
      grid=None if self.grid is None else list(self.grid),
      code_levels=list(self.code_levels),
    )
    return out


class Transformer(nn.Module):
  """Decoder-only LM. `__call__(tokens[B, S]) -> (logits[B, S, vocab_size] float32, cache)`.

  Attributes:
    config: every setting (a `TransformerConfig`, validated when it was built).
  """

  config: TransformerConfig

  def __post_init__(self):
    if not isinstance(self.config, TransformerConfig):
      raise TypeError(
        f"Transformer takes a TransformerConfig, got {type(self.config).__name__}: "
        "use Transformer(TransformerConfig(**kwargs))."
      )
    super().__post_init__()

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int, dtype: DType = jnp.float32) -> Cache:
    """The zero KV cache for `batch` rows of up to `max_len` positions.

    Returns `{"layers": per-layer caches}`: a list of `{"k": [B, KVH, L / P, Dh, P], "v": [B,
    KVH, L, Dh]}` dicts (`attention.init_kv_cache`: L is `max_len` rounded up to a multiple of
    P = `attention.KEY_PANEL`), or, with `scan_layers`, one dict of the same arrays stacked on a
    leading `num_layers` axis. With `rope_2d` or `image_pos_embed` it also holds `"image_run":
    [B, L] int32` (the image-run count at each slot, see `layers.image_run_index`).
    """
    cfg = self.config
    one = lambda: attention.init_kv_cache(batch, max_len, cfg.kv_heads(), cfg.head_size(), dtype)
    if cfg.scan_layers:
      stacked = jax.tree.map(lambda x: jnp.zeros((cfg.num_layers,) + x.shape, x.dtype), one())
      cache = {"layers": stacked}
    else:
      cache = {"layers": [one() for _ in range(cfg.num_layers)]}
    if cfg.tracks_image_runs():
      cache["image_run"] = jnp.zeros((batch, attention.cache_slots(max_len)), jnp.int32)
    return cache

  @nn.nowrap
  def grow_cache(self, cache: Cache, max_len: int) -> Cache:
    """`cache` (from `init_cache`, any contents) with zero slots appended up to `max_len`
    (rounded up as in `init_cache`; `attention.grow_kv_cache`). A decode step reads every slot of
    the cache it is given, so a sampler can start with the slots its first steps need and grow
    the cache as it goes (`vqlm.sample.sampler`): the same logits, less memory traffic per step."""
    layers_ = cache["layers"]
    if isinstance(layers_, dict):
      grown = attention.grow_kv_cache(layers_, max_len)
    else:
      grown = [attention.grow_kv_cache(c, max_len) for c in layers_]
    out = {**cache, "layers": grown}
    if "image_run" in cache:
      run = cache["image_run"]
      pad = attention.cache_slots(max_len) - run.shape[-1]
      out["image_run"] = jnp.pad(run, [(0, 0), (0, pad)])
    return out

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    decode: bool = False,
    logits_slice: tuple[int, int] | None = None,
    factored_logits: bool = False,
  ) -> tuple[jax.Array, Cache | None]:
    """Logits for `tokens[B, S]`.

    Args:
      tokens: `[B, S]` int32 unified ids.
      positions: `[B, S]` int32 (default `0..S-1`); the cache slots when decoding.
      segment_ids: `[B, S]` int32 packing segments (attention stays within a segment; 0 = padding
        is its own segment). Not allowed with `decode`.
      cache: from `init_cache` (or a previous call); only with `decode=True`.
      decode: write the tokens' keys/values into the cache at `positions` and attend over the
        cache. Prefill a right-padded prompt batch at positions 0..S-1 (row b's next-token logits
        are `logits[b, n_b - 1]` for a prompt of n_b tokens), then feed one token per row per
        call at that row's next position (`n_b`, `n_b + 1`, ...). Logits at pad slots are junk.
        Within one call a row's positions must be consecutive.
      logits_slice: `(start, size)`: only the logits of ids `[start, start + size)` (e.g. the
        image codes, when a sampler may only draw codes), from that slice of the output table.
      factored_logits: return the logits as `(other [B, S, vocab_size - image_size], levels
        [B, S, sum(code_levels)])` (`TokenEmbed.attend_levels`; see `supports_factored_logits`).
    Returns:
      `(logits [B, S, vocab_size] float32 (or [B, S, size], or the factored pair), new cache or
      None)`.
    """
    cfg = self.config
    b, s = tokens.shape
    if logits_slice is not None:
      start, size = logits_slice
      if start < 0 or size <= 0 or start + size > cfg.vocab_size:
        raise UserError(
          f"logits_slice={logits_slice} must lie inside the vocabulary [0, {cfg.vocab_size})."
        )
    if decode and (cache is None or positions is None):
      raise UserError("decode=True needs `cache=model.init_cache(...)` and explicit `positions`.")
    if cache is not None and not decode:
      raise UserError("A cache was passed without decode=True; pass decode=True to use it.")
    if decode and segment_ids is not None:
      raise UserError(
        "segment_ids are not supported with decode=True; right-pad prompts and use "
        "per-row positions instead."
      )
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    positions = jnp.asarray(positions, jnp.int32)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    head_dim = cfg.head_size()

    embed = TokenEmbed(
      cfg.vocab_size,
      cfg.dim,
      image_offset=cfg.image_offset,
      image_size=cfg.image_size,
      codebook_dim=cfg.codebook_dim if cfg.image_embed_init == "codebook" else 0,
      code_levels=cfg.code_levels if cfg.image_embed_init == "levels" else (),
      name="embed",
      **kw,
    )
    x = embed(tokens)
    gen = None
    if cfg.gen_embed_dim:
      gen = image_io.ImageGenPath(
        cfg.image_size,
        cfg.dim,
        cfg.gen_embed_dim,
        cfg.gen_aligner_depth,
        cfg.gen_head_dim,
        name="gen_path",
        **kw,
      )
      is_code = (tokens >= cfg.image_offset) & (tokens < cfg.image_offset + cfg.image_size)
      x = jnp.where(is_code[..., None], gen.embed(tokens - cfg.image_offset).astype(x.dtype), x)
    x = layers.constrain(x, layers.ACT_EMBED)

    new_cache = None if cache is None else {}
    if cfg.tracks_image_runs():
      is_image = (tokens >= cfg.image_offset) & (tokens < cfg.image_offset + cfg.image_size)
      if decode:
        prev_slot = jnp.maximum(positions[:, 0] - 1, 0)
        previous = jnp.take_along_axis(cache["image_run"], prev_slot[:, None], axis=1)[:, 0]
        previous = jnp.where(positions[:, 0] > 0, previous, 0)
        run = layers.image_run_index(is_image, previous=previous)
        rows_idx = jnp.arange(b)[:, None]
        new_cache["image_run"] = cache["image_run"].at[rows_idx, positions].set(run)
      else:
        starts = None
        if segment_ids is not None:
          starts = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
          )
        run = layers.image_run_index(is_image, starts=starts)
    if cfg.image_pos_embed:
      cells = cfg.grid[0] * cfg.grid[1]
      table = self.param(
        "image_position",
        nn.with_logical_partitioning(
          nn.initializers.normal(stddev=1.0 / math.sqrt(cfg.dim)), ("image_cells", "embed")
        ),
        (cells, cfg.dim),
        kw["param_dtype"],
      )
      cell = jnp.mod(jnp.maximum(run - 1, 0), cells)
      x = x + jnp.where(
        (run > 0)[..., None],
        jnp.take(jnp.asarray(table, x.dtype), cell, axis=0),
        jnp.zeros((), x.dtype),
      )
      x = layers.constrain(x, layers.ACT_EMBED)
    if cfg.rope_2d:
      rows, cols = layers.image_rows_cols(positions, run, cfg.grid)
      sin, cos = layers.rope_2d(rows, cols, head_dim, cfg.rope_theta)
    else:
      sin, cos = layers.rope_1d(positions, head_dim, cfg.rope_theta)

    if decode:
      values = cache["layers"]["v"] if cfg.scan_layers else cache["layers"][0]["v"]
      cache_len = values.shape[-2]
      mask = attention.make_decode_mask(positions, cache_len)
    elif segment_ids is not None:
      mask = attention.make_attention_mask(segment_ids)
    else:
      mask = None
    layer_positions = positions if decode else None
    layer_segments = None if decode else segment_ids

    block_kw = dict(
      num_heads=cfg.num_heads,
      num_kv_heads=cfg.kv_heads(),
      head_dim=head_dim,
      mlp_dim=cfg.mlp_dim,
      qk_norm=cfg.qk_norm,
      attention_impl=cfg.attention_impl,
      query_chunks=cfg.query_chunks,
      norm_eps=cfg.norm_eps,
      swin_norm=cfg.swin_norm,
      **kw,
    )
    block_cls = Block
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      block_cls = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    layer_cache = None if cache is None else cache["layers"]
    if cfg.scan_layers:
      stack = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, out_cache = stack(name="layers", **block_kw)(
        x, layer_cache, sin, cos, mask, layer_positions, layer_segments
      )
    else:
      out_cache = []
      for i in range(cfg.num_layers):
        c = None if layer_cache is None else layer_cache[i]
        x, c = block_cls(name=f"layer_{i}", **block_kw)(
          x, c, sin, cos, mask, layer_positions, layer_segments
        )
        out_cache.append(c)
    if new_cache is not None:
      new_cache["layers"] = out_cache

    x = layers.RMSNorm(cfg.norm_eps, name="final_norm", **kw)(x)
    if factored_logits:
      if not supports_factored_logits(cfg) or logits_slice is not None:
        raise UserError(
          "factored_logits needs tie_embeddings, image_embed_init='levels' and no "
          "gen_embed_dim or logits_slice."
        )
      other, level_logits = embed.attend_levels(x)
      return (layers.constrain(other, layers.ACT_VOCAB), level_logits), new_cache
    if cfg.tie_embeddings:
      base = lambda h, rows: embed.attend(h, rows=rows)
    else:
      head = layers.Dense(cfg.vocab_size, axes=("embed", "vocab"), name="head", **kw)
      base = lambda h, rows: head(h, out_slice=rows).astype(jnp.float32)
    if gen is None:
      logits = base(x, logits_slice)
    else:
      logits = image_io.merged_logits(
        base, gen, x, cfg.vocab_size, cfg.image_offset, rows=logits_slice
      )
    logits = layers.constrain(logits, layers.ACT_VOCAB)
    return logits, new_cache


def supports_factored_logits(config: TransformerConfig) -> bool:
  """Whether `Transformer(config)` can return factored logits: image codes are FSQ codes embedded
  as sums of level embeddings and the head is tied to them (`vqlm.train.lm_losses`)."""
  return bool(
    config.tie_embeddings
    and config.image_embed_init == "levels"
    and config.code_levels
    and not config.gen_embed_dim
  )


def param_counts(config: TransformerConfig) -> dict[str, int]:
  """Parameters of `Transformer(config)` per top-level module: `"embed"`, `"layers"` (all blocks,
  scanned or not), `"final_norm"` and, when they exist, `"image_position"`, `"gen_path"` and
  `"head"`. Read off the abstract init (`jax.eval_shape`: nothing is computed or allocated); the
  codebook collection is not a parameter and is not counted.

  Settings that leave the parameters alone (remat_policy, attention_impl, query_chunks) are reset
  for the trace, so any config can be counted on any backend.
  """
  plain = config.replace(remat_policy="none", attention_impl="xla", query_chunks=1)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(Transformer(plain).init, jax.random.key(0), tokens)
  counts: dict[str, int] = {}
  for name, tree in nn.meta.unbox(abstract["params"]).items():
    group = "layers" if name.startswith("layer_") else name
    size = sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    counts[group] = counts.get(group, 0) + size
  return counts


def count_params(config: TransformerConfig) -> int:
  """Number of parameters of `Transformer(config)` (the codebook excluded; see `param_counts`)."""
  return sum(param_counts(config).values())
