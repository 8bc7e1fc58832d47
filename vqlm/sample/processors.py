"""Logits processors: temperature, top-k, top-p and greedy, with separate text and image settings.

Every setting is a pytree leaf (a traced array under `jax.jit`), so changing a temperature or a
top-k never recompiles the sampler. Each row of a batch picks its settings at every step from
whether it is inside an image run (`row_settings`). All arithmetic is float32.

Order (as in Hugging Face `generate`): temperature, then top-k, then top-p on the tempered and
top-k-filtered distribution. A row with `temperature <= 0` is greedy (argmax; top-k/top-p cannot
change it). Masked ids get `-inf`; a processor never unmasks an id that was already `-inf` (the
modality constraints are applied before the processors).
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

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
      raise ValueError(f"{name}.temperature={t} must be >= 0 (0 = greedy).")
    if k < 0:
      raise ValueError(f"{name}.top_k={k} must be >= 0 (0 = off).")
    if not 0.0 < p <= 1.0:
      raise ValueError(f"{name}.top_p={p} must be in (0, 1] (1 = off).")
    return self

  def as_arrays(self) -> "Settings":
    """The same settings as float32 / int32 scalars (fixed dtypes: no recompiles)."""
    return Settings(temperature=jnp.asarray(self.temperature, jnp.float32),
                    top_k=jnp.asarray(self.top_k, jnp.int32),
                    top_p=jnp.asarray(self.top_p, jnp.float32))


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


def row_settings(config: SamplingConfig, in_image: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row `(temperature [B] f32, top_k [B] i32, top_p [B] f32)`: image settings where
  `in_image[B]` is True, text settings elsewhere."""
  pick = lambda a, b, dtype: jnp.where(in_image, jnp.asarray(a, dtype), jnp.asarray(b, dtype))
  return (pick(config.image.temperature, config.text.temperature, jnp.float32),
          pick(config.image.top_k, config.text.top_k, jnp.int32),
          pick(config.image.top_p, config.text.top_p, jnp.float32))


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """`logits[B, V] / temperature[B]`; greedy rows (`<= 0`) are left unscaled."""
  logits = jnp.asarray(logits, jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)
  t = jnp.where(t > 0, t, 1.0)
  return logits / t[..., None]


def _ranks(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(order, ranks)`: ids sorted by decreasing logit (ties: lower id first), and each id's rank."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  v = logits.shape[-1]
  ranks = jnp.zeros_like(order).at[
      jnp.arange(logits.shape[0])[:, None], order].set(jnp.arange(v, dtype=order.dtype))
  return order, ranks


def top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Which ids survive top-k then top-p: `logits[B, V]` (already tempered) -> bool `[B, V]`.

  top-k keeps exactly `k` ids (ties broken towards the lower id), `k = 0` keeps all. top-p keeps,
  in decreasing order, every id whose preceding mass (within the top-k survivors) is `< top_p`, so
  the most likely id always survives and the kept mass is the smallest that reaches `top_p`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  v = logits.shape[-1]
  top_k = jnp.asarray(top_k, jnp.int32)[..., None]
  top_p = jnp.asarray(top_p, jnp.float32)[..., None]
  order, ranks = _ranks(logits)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  rank_ids = jnp.arange(v, dtype=jnp.int32)[None, :]
  keep_k_sorted = rank_ids < k
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  sorted_logits = jnp.where(keep_k_sorted, sorted_logits, NEG_INF)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = keep_k_sorted & ((before < top_p) | (top_p >= 1.0) | (rank_ids == 0))
  return jnp.take_along_axis(keep_sorted, ranks, axis=-1)


def process(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> jax.Array:
  """Temperature, top-k, top-p: `logits[B, V]` -> float32 `[B, V]` with dropped ids at -inf."""
  scaled = apply_temperature(logits, temperature)
  keep = top_k_top_p_mask(scaled, top_k, top_p)
  return jnp.where(keep, scaled, NEG_INF)


def sample(keys: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, filter_ids: bool | jax.Array = True) -> jax.Array:
  """One id per row: greedy where `temperature <= 0`, else a draw from the processed logits.

  Args:
    keys: `[B]` PRNG keys (one per row, so a row's draw does not depend on the batch).
    logits: `[B, V]`; ids that must never be drawn already at `-inf`.
    temperature, top_k, top_p: `[B]` per-row settings.
    filter_ids: run top-k/top-p (a scalar bool; may be traced). With False only the temperature
      is applied, which skips a sort over the vocabulary.
  Returns:
    `[B]` int32 ids.
  """
  logits = jnp.asarray(logits, jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = apply_temperature(logits, temperature)
  scaled = jax.lax.cond(
      jnp.asarray(filter_ids),
      lambda x: jnp.where(top_k_top_p_mask(x, top_k, top_p), x, NEG_INF),
      lambda x: x, scaled)
  drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
  return jnp.where(jnp.asarray(temperature) > 0, drawn, greedy)


def needs_filtering(config: SamplingConfig) -> jax.Array:
  """Scalar bool: does any top-k or top-p setting filter ids (else the sort is skipped)?"""
  def on(s):
    return (jnp.asarray(s.top_k) > 0) | (jnp.asarray(s.top_p) < 1.0)
  return on(config.text) | on(config.image)
