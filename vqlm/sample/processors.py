"""Logits processors: temperature, top-k, top-p and greedy, with separate text and image settings.

Every setting is a pytree leaf (a traced array under `jax.jit`), so changing a temperature or a
top-k never recompiles the sampler. Each row of a batch picks its settings at every step from
whether it is inside an image run (`row_settings`). All arithmetic is float32.

Order (as in Hugging Face `generate`): temperature, then top-k, then top-p on the tempered and
top-k-filtered distribution. A row with `temperature <= 0` is greedy (argmax; top-k/top-p cannot
change it). Masked ids get `-inf`; a processor never unmasks an id that was already `-inf` (the
modality constraints are applied before the processors).

Speed (one call per decode step): no sort over the vocabulary. Top-k and top-p boundaries are
found exactly by bisecting the logits' float bits (32 masked counts/sums over `[B, V]`), except
that a top-k of at most `FAST_TOP_K` ids over rows of more than `FAST_TOP_K_MIN_IDS` ids is one
`lax.top_k`. Each stage is skipped when no row uses it (the argmax, when no row is greedy), and a
draw is an inverse-CDF lookup with one uniform per row.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from vqlm.errors import UserError

NEG_INF = -jnp.inf


@flax.struct.dataclass
class Settings:
  """Sampling settings of one modality.

  Attributes:
    temperature: softmax temperature; `<= 0` means greedy (argmax).
    top_k: keep the k most likely ids; `0` keeps all.
    top_p: keep the smallest set of most likely ids whose probability reaches `top_p`
      (nucleus sampling); `1.0` keeps all.
  """

  temperature: Any = 1.0
  top_k: Any = 0
  top_p: Any = 1.0

  def check(self, name: str = "settings") -> "Settings":
    """Raises ValueError on out-of-range values (host-side; call before jitting)."""
    t, k, p = float(self.temperature), int(self.top_k), float(self.top_p)
    if t < 0:
      raise UserError(f"{name}.temperature={t} must be >= 0 (0 = greedy).")
    if k < 0:
      raise UserError(f"{name}.top_k={k} must be >= 0 (0 = off).")
    if not 0.0 < p <= 1.0:
      raise UserError(f"{name}.top_p={p} must be in (0, 1] (1 = off).")
    return self

  def as_arrays(self) -> "Settings":
    """The same settings as float32 / int32 scalars (fixed dtypes: no recompiles)."""
    return Settings(
      temperature=jnp.asarray(self.temperature, jnp.float32),
      top_k=jnp.asarray(self.top_k, jnp.int32),
      top_p=jnp.asarray(self.top_p, jnp.float32),
    )


GREEDY = Settings(temperature=0.0)


@flax.struct.dataclass
class SamplingConfig:
  """Settings for text tokens and for image codes (rows inside an image run use `image`)."""

  text: Settings = Settings()
  image: Settings = Settings()

  @classmethod
  def greedy(cls) -> "SamplingConfig":
    return cls(text=GREEDY, image=GREEDY)

  def check(self) -> "SamplingConfig":
    self.text.check("sampling.text")
    self.image.check("sampling.image")
    return self

  def as_arrays(self) -> "SamplingConfig":
    return SamplingConfig(text=self.text.as_arrays(), image=self.image.as_arrays())


def row_settings(
  config: SamplingConfig, in_image: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row `(temperature [B] f32, top_k [B] i32, top_p [B] f32)`: image settings where
  `in_image[B]` is True, text settings elsewhere."""
  pick = lambda a, b, dtype: jnp.where(in_image, jnp.asarray(a, dtype), jnp.asarray(b, dtype))
  return (
    pick(config.image.temperature, config.text.temperature, jnp.float32),
    pick(config.image.top_k, config.text.top_k, jnp.int32),
    pick(config.image.top_p, config.text.top_p, jnp.float32),
  )


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """`logits[B, V] / temperature[B]`; greedy rows (`<= 0`) are left unscaled."""
  logits = jnp.asarray(logits, jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)
  t = jnp.where(t > 0, t, 1.0)
  return logits / t[..., None]


def _sortable(x: jax.Array) -> jax.Array:
  """float32 -> int32 keys in the same order (-inf lowest), so thresholds can be bisected."""
  i = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _bisect_max(pred, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Per row, the largest `t` in `[lo, hi)` with `pred(t)` (monotone: true up to a point, and
  true at `lo`). 32 halvings cover the int32 range."""

  def body(_, carry):
    lo, hi = carry
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
    ok = pred(mid)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _take_prefix(
  key: jax.Array, threshold: jax.Array, weight: jax.Array, budget: jax.Array
) -> jax.Array:
  """Ids with `key > threshold`, plus ids at the threshold in id order while the running
  `weight` of those before them stays `< budget` (ties broken towards the lower id)."""
  above = key > threshold[:, None]
  at = key == threshold[:, None]

  def with_ties(_):
    before = jnp.cumsum(jnp.where(at, weight, 0), axis=-1) - jnp.where(at, weight, 0)
    return above | (at & (before < budget[:, None]))

  # Ties at the threshold are rare: skip the cumulative sum when every row has at most one.
  ties = jnp.any(jnp.sum(at, axis=-1) > 1)
  return jax.lax.cond(ties, with_ties, lambda _: above | at, None)


# top-k up to this many ids over rows of more than FAST_TOP_K_MIN_IDS ids takes the fast path:
# `lax.top_k` of this width (exact, ties towards the lower id) instead of the 32-pass bisection.
# XLA:CPU's top_k partially sorts each row, a cost per row that mispredicted branches dominate
# (10-17 us on fresh logits of 512-1536 ids, this CPU); the bisection's vectorised passes cost in
# proportion to the ids: less for up to about a thousand ids (512 ids: 2.2x faster at batch 64,
# 1.9x at batch 8, as fast at batch 1), more beyond (4096 ids: 1.5x slower at batch 8).
FAST_TOP_K = 64
FAST_TOP_K_MIN_IDS = 1024


def top_k_mask(
  logits: jax.Array,
  top_k: jax.Array,
  *,
  fast_top_k: int = FAST_TOP_K,
  fast_min_ids: int = FAST_TOP_K_MIN_IDS,
) -> jax.Array:
  """bool `[B, V]`: exactly the `top_k[B]` largest logits per row (ties towards the lower id);
  `top_k <= 0` keeps all. Exact either way: with `V > fast_min_ids`, when every row keeps at most
  `fast_top_k` ids (or all), the ids come from one `lax.top_k`; otherwise the k-th largest value
  is bisected."""
  logits = jnp.asarray(logits, jnp.float32)
  b, v = logits.shape
  k = jnp.asarray(top_k, jnp.int32)
  k = jnp.where(k > 0, jnp.minimum(k, v), v)
  width = min(fast_top_k, v) if v > fast_min_ids else 0

  def fast():
    # lax.top_k orders equal values by index, so the first k entries break ties as documented.
    _, ids = jax.lax.top_k(logits, width)
    chosen = jnp.arange(width)[None, :] < k[:, None]
    rows = jnp.arange(b)[:, None]
    mask = jnp.zeros((b, v), bool).at[rows, ids].set(chosen)
    return mask | (k >= v)[:, None]

  def bisect():
    key = _sortable(logits)
    kth = _bisect_max(
      lambda t: jnp.sum(key >= t[:, None], axis=-1) >= k, key.min(axis=-1), key.max(axis=-1) + 1
    )
    above = jnp.sum(key > kth[:, None], axis=-1)
    return _take_prefix(key, kth, jnp.ones_like(key), (k - above).astype(jnp.int32))

  if width <= 0:
    return bisect()
  return jax.lax.cond(jnp.all((k <= width) | (k >= v)), fast, bisect)


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """bool `[B, V]`: in decreasing order, every id whose preceding probability mass is
  `< top_p[B]` (the smallest set reaching `top_p`; the most likely id always stays); `top_p >= 1`
  keeps all. Exact, by bisecting the boundary value (no sort)."""
  logits = jnp.asarray(logits, jnp.float32)
  p = jnp.asarray(top_p, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  key = _sortable(logits)
  boundary = _bisect_max(
    lambda t: jnp.sum(jnp.where(key >= t[:, None], probs, 0.0), axis=-1) >= p,
    key.min(axis=-1),
    key.max(axis=-1) + 1,
  )
  above = jnp.sum(jnp.where(key > boundary[:, None], probs, 0.0), axis=-1)
  return _take_prefix(key, boundary, probs, p - above) | (p >= 1.0)[:, None]


def top_k_top_p_mask(
  logits: jax.Array,
  top_k: jax.Array,
  top_p: jax.Array,
  *,
  fast_top_k: int = FAST_TOP_K,
  fast_min_ids: int = FAST_TOP_K_MIN_IDS,
) -> jax.Array:
  """Which ids survive top-k then top-p: `logits[B, V]` (already tempered) -> bool `[B, V]`.

  top-k keeps exactly `k` ids (ties broken towards the lower id), `k = 0` keeps all. top-p then
  keeps, in decreasing order, every id whose preceding mass within the top-k survivors is
  `< top_p`. Each stage runs only when some row uses it (`lax.cond`). `fast_top_k`,
  `fast_min_ids`: see `top_k_mask`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  everything = jnp.ones(logits.shape, bool)
  keep = jax.lax.cond(
    jnp.any(top_k > 0),
    lambda: top_k_mask(logits, top_k, fast_top_k=fast_top_k, fast_min_ids=fast_min_ids),
    lambda: everything,
  )
  kept = jnp.where(keep, logits, NEG_INF)
  keep_p = jax.lax.cond(jnp.any(top_p < 1.0), lambda: top_p_mask(kept, top_p), lambda: everything)
  return keep & keep_p


def process(
  logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """Temperature, top-k, top-p: `logits[B, V]` -> float32 `[B, V]` with dropped ids at -inf."""
  scaled = apply_temperature(logits, temperature)
  keep = top_k_top_p_mask(scaled, top_k, top_p)
  return jnp.where(keep, scaled, NEG_INF)


def _last_true(mask: jax.Array) -> jax.Array:
  n = mask.shape[-1]
  return n - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


def categorical(u: jax.Array, logits: jax.Array, *, block: int = 32) -> jax.Array:
  """Inverse-CDF draw: `u[B]` uniform in [0, 1), `logits[B, V]` (-inf = never) -> `[B]` int32.

  Exact sampling from `softmax(logits)` with one uniform per row (a Gumbel-max draw needs V).
  The CDF is taken in two levels (blocks of `block` ids, then inside the chosen block) so no
  scan runs over the whole vocabulary; ids with zero probability are never returned.
  """
  logits = jnp.asarray(logits, jnp.float32)
  b, v = logits.shape
  vp = -(-v // block) * block
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.pad(jnp.exp(logits - top), ((0, 0), (0, vp - v)))
  blocks = p.reshape(b, vp // block, block)
  block_mass = blocks.sum(axis=-1)
  block_cdf = jnp.cumsum(block_mass, axis=-1)
  target = jnp.asarray(u, jnp.float32) * block_cdf[:, -1]
  bi = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_true(block_mass > 0))
  prev = jnp.take_along_axis(block_cdf, jnp.maximum(bi - 1, 0)[:, None], axis=1)[:, 0]
  prev = jnp.where(bi > 0, prev, 0.0)
  inner = jnp.take_along_axis(blocks, bi[:, None, None], axis=1)[:, 0]
  j = jnp.sum(jnp.cumsum(inner, axis=-1) <= (target - prev)[:, None], axis=-1)
  j = jnp.minimum(j, _last_true(inner > 0))
  return (bi * block + j).astype(jnp.int32)


def sample(
  keys: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
  """One id per row: greedy where `temperature <= 0`, else a draw from the processed logits.

  Args:
    keys: `[B]` PRNG keys (one per row, so a row's draw does not depend on the batch).
    logits: `[B, V]`; ids that must never be drawn already at `-inf`.
    temperature, top_k, top_p: `[B]` per-row settings.
  Returns:
    `[B]` int32 ids.
  """
  logits = jnp.asarray(logits, jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  sampled = temperature > 0
  b = logits.shape[0]
  # Each path runs only when some row takes it (a decode step of an all-sampled batch skips the
  # argmax pass over [B, V], a greedy one the filtering and the draw).
  greedy = jax.lax.cond(
    jnp.any(~sampled),
    lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
    lambda: jnp.zeros((b,), jnp.int32),
  )

  def draw():
    # Greedy rows do not need filtering: switch it off for them (the stages may then be skipped).
    k = jnp.where(sampled, jnp.asarray(top_k, jnp.int32), 0)
    p = jnp.where(sampled, jnp.asarray(top_p, jnp.float32), 1.0)
    scaled = process(logits, temperature, k, p)
    return categorical(jax.vmap(jax.random.uniform)(keys), scaled)

  drawn = jax.lax.cond(jnp.any(sampled), draw, lambda: jnp.zeros((b,), jnp.int32))
  return jnp.where(sampled, drawn, greedy)
