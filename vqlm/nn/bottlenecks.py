"""Bottlenecks between the image encoder and decoder, all with one interface.

`bottleneck(z[B,h,w,D], train) -> (z_q[B,h,w,D'], aux)` where `aux` holds
  "loss": float32 scalar, the bottleneck's total loss term (already weighted; add it as is),
  its named parts ("commitment", "codebook" for VQ; "kl" for the Gaussian),
  "indices": int32 [B,h,w] (VQ and FSQ only), and code statistics (VQ and FSQ only):
  "usage" (fraction of the codebook used in this batch), "perplexity" (exp of the entropy of the
  batch's code histogram) and "dead_codes" (codes unused for `restart_after` training steps, or
  `DEFAULT_DEAD_AFTER` when restarts are off).

Non-trainable state lives in the "batch_stats" collection and changes only when `train=True` and
that collection is mutable (`apply(..., mutable=["batch_stats"])`). Training calls need the rng
streams "sample" (Gaussian) and "restart" (VQ k-means initialisation and dead-code restarts).
Distances, argmin, losses and statistics are float32 whatever the compute dtype.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlm.errors import MAX_SIZE, UserError, check_int

Dtype = Any
DEFAULT_DEAD_AFTER = 100
_F32 = jnp.float32


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def squared_distances(x: jax.Array, codes: jax.Array) -> jax.Array:
  """Squared Euclidean distances [N, K] between x [N, C] and codes [K, C], in float32."""
  x, codes = x.astype(_F32), codes.astype(_F32)
  cross = jnp.dot(x, codes.T, precision=jax.lax.Precision.HIGHEST)
  return (
    jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * cross + jnp.sum(codes * codes, axis=-1)[None, :]
  )


def nearest_code(x: jax.Array, codes: jax.Array) -> jax.Array:
  """Index int32 [N] of the nearest row of codes [K, C] for each row of x [N, C]."""
  return jnp.argmin(squared_distances(x, codes), axis=-1).astype(jnp.int32)


def kmeans(
  rng: jax.Array, x: jax.Array, k: int, *, iters: int, normalize: bool = False
) -> jax.Array:
  """k-means++ seeding then `iters` Lloyd iterations, jittable.  x [N, C] -> centres [K, C].

  With `normalize`, centres are projected back to the unit sphere after each update (spherical
  k-means, for l2-normalised codebooks). Empty clusters keep their previous centre.
  """
  x = x.astype(_F32)
  n, c = x.shape
  rng, first_rng = jax.random.split(rng)
  first = x[jax.random.randint(first_rng, (), 0, n)]
  centres = jnp.zeros((k, c), _F32).at[0].set(first)
  d2 = jnp.sum((x - first) ** 2, axis=-1)

  def seed(i, carry):
    centres, d2, rng = carry
    rng, pick_rng = jax.random.split(rng)
    total = jnp.sum(d2)
    # Sample proportionally to d2; uniformly if every point already coincides with a centre.
    logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 0.0)), 0.0)
    centre = x[jax.random.categorical(pick_rng, logits)]
    return (centres.at[i].set(centre), jnp.minimum(d2, jnp.sum((x - centre) ** 2, axis=-1)), rng)

  centres, _, _ = jax.lax.fori_loop(1, k, seed, (centres, d2, rng))

  def lloyd(_, centres):
    assign = nearest_code(x, centres)
    sums = jax.ops.segment_sum(x, assign, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones((n,), _F32), assign, num_segments=k)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)
    return _l2_normalize(new) if normalize else new

  return jax.lax.fori_loop(0, iters, lloyd, centres)


def code_statistics(indices: jax.Array, codebook_size: int) -> tuple[jax.Array, dict]:
  """Histogram [K] of `indices` and the batch statistics "usage" and "perplexity" (float32)."""
  flat = indices.reshape(-1)
  counts = jnp.zeros((codebook_size,), _F32).at[flat].add(1.0)
  probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0))
  return counts, {"usage": jnp.mean((counts > 0).astype(_F32)), "perplexity": jnp.exp(entropy)}


class _UnusedCounter:
  """Per-code count of consecutive training steps without use, in "batch_stats/steps_unused"."""

  def __init__(self, module: nn.Module, codebook_size: int):
    self.var = module.variable(
      "batch_stats", "steps_unused", lambda: jnp.zeros((codebook_size,), jnp.int32)
    )

  def update(self, counts: jax.Array) -> None:
    self.var.value = jnp.where(counts > 0, 0, self.var.value + 1).astype(jnp.int32)

  def dead(self, after: int) -> jax.Array:
    return self.var.value >= after


class IdentityBottleneck(nn.Module):
  """A plain autoencoder: z_q = z, no loss."""

  latent_dim: int | None = None  # Accepted for a uniform constructor; unused.

  def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    del train
    return z, {"loss": jnp.zeros((), _F32)}


class GaussianBottleneck(nn.Module):
  """A VAE bottleneck: a 1x1 conv predicts mean and log-variance of a diagonal Gaussian.

  z [B,h,w,D] -> sample (train, rng stream "sample") or mean (eval) [B,h,w,latent_dim].
  "kl" is KL(q(z|x) || N(0, I)) averaged over latent elements (batch, positions, channels);
  "loss" = kl_weight * kl.
  """

  latent_dim: int = 16
  kl_weight: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    check_int("latent_dim", self.latent_dim)
    m = nn.Dense(
      2 * self.latent_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="moments"
    )(z).astype(_F32)
    mean, logvar = jnp.split(m, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    if train:
      noise = jax.random.normal(self.make_rng("sample"), mean.shape, _F32)
      z_q = mean + jnp.exp(0.5 * logvar) * noise
    else:
      z_q = mean
    kl = jnp.mean(0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar))
    return z_q, {"loss": self.kl_weight * kl, "kl": kl}

  @staticmethod
  def sample_prior(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Latents drawn from the prior N(0, I); `shape` is the full latent shape [B,h,w,C]."""
    return jax.random.normal(rng, tuple(shape), _F32)


class VectorQuantizer(nn.Module):
  """Vector quantisation with a straight-through estimator (VQ-VAE, LlamaGen-style options).

  Attributes:
    codebook_size: K.
    latent_dim: D, channels of the input and output.
    code_dim: channels of the codebook vectors; when set and != D, z is projected D -> code_dim
      before quantisation and back after it (Dense in/out projections).
    beta: commitment weight: "commitment" = beta * mean((z - sg(q))^2).
    ema_decay: None learns the codebook by the "codebook" loss mean((sg(z) - q)^2) (codebook in
      params); a float in (0, 1) learns it by exponential moving averages of assigned counts and
      sums (in batch_stats, "codebook" loss is 0).
    l2_normalize: l2-normalise codes and (projected) inputs before the nearest-neighbour search.
    lookup_normalize: l2-normalise only the codebook rows that come out (z_q, `lookup`,
      `codebook()`), while the nearest-neighbour search compares the raw inputs with the raw
      codebook (transformers' JanusVQVAE: argmin over raw codes, unit rows when decoding).
    kmeans_init: initialise the codebook by k-means++ and `kmeans_iters` Lloyd iterations on the
      first training batch (inside jit; batch_stats "initialized" records that it ran).
    kmeans_max_points: at most this many batch vectors (a random subset) feed k-means.
    restart_after: when set, codes unused for this many training steps are replaced by random
      (projected) encoder outputs of the current batch (rng stream "restart").
  Losses and the straight-through estimator act in code space (after projection/normalisation).
  """

  codebook_size: int = 512
  latent_dim: int = 16
  code_dim: int | None = None
  beta: float = 0.25
  ema_decay: float | None = None
  l2_normalize: bool = False
  lookup_normalize: bool = False
  kmeans_init: bool = False
  kmeans_iters: int = 5
  kmeans_max_points: int = 16384
  restart_after: int | None = None
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def _code_dim(self) -> int:
    return self.code_dim or self.latent_dim

  def setup(self):
    check_int("codebook_size", self.codebook_size)
    check_int("latent_dim", self.latent_dim)
    if self.code_dim is not None:
      check_int("code_dim", self.code_dim, minimum=0)  # 0: latent_dim
    check_int("kmeans_iters", self.kmeans_iters, minimum=0)
    check_int("kmeans_max_points", self.kmeans_max_points)
    if self.restart_after is not None:
      check_int("restart_after", self.restart_after, minimum=0)
    k, c = self.codebook_size, self._code_dim
    if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
      raise UserError(f"ema_decay must be None or in (0, 1), got {self.ema_decay}")
    if c != self.latent_dim:
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      self.proj_in = nn.Dense(c, name="proj_in", **kw)
      self.proj_out = nn.Dense(self.latent_dim, name="proj_out", **kw)
    init = nn.initializers.normal(1.0)
    if self.ema_decay is None:
      self.codebook_param = self.param("codebook", init, (k, c), self.param_dtype)
      # Overwrites by k-means / restarts act through this offset (params are read-only here).
      self.codebook_offset = self.variable(
        "batch_stats", "codebook_offset", lambda: jnp.zeros((k, c), _F32)
      )
    else:
      self.cluster_size = self.variable("batch_stats", "cluster_size", lambda: jnp.ones((k,), _F32))
      self.embed_sum = self.variable(
        "batch_stats", "embed_sum", lambda: init(self.make_rng("params"), (k, c), _F32)
      )
    self.initialized = self.variable(
      "batch_stats", "initialized", lambda: jnp.array(not self.kmeans_init)
    )
    self.unused = _UnusedCounter(self, k)

  def _raw_codebook(self) -> jax.Array:
    if self.ema_decay is None:
      return self.codebook_param.astype(_F32) + self.codebook_offset.value
    n = jnp.sum(self.cluster_size.value)
    smoothed = (self.cluster_size.value + self.eps) / (n + self.codebook_size * self.eps) * n
    return self.embed_sum.value / smoothed[:, None]

  def codebook(self) -> jax.Array:
    """The codebook [K, code_dim] float32 the decoder sees (unit rows when `l2_normalize` or
    `lookup_normalize`)."""
    raw = self._raw_codebook()
    return _l2_normalize(raw) if self.l2_normalize or self.lookup_normalize else raw

  def _search_codebook(self) -> jax.Array:
    """The codebook [K, code_dim] float32 the nearest-neighbour search compares inputs with."""
    raw = self._raw_codebook()
    return _l2_normalize(raw) if self.l2_normalize else raw

  def _to_code_space(self, z: jax.Array) -> jax.Array:
    if self._code_dim != self.latent_dim:
      z = self.proj_in(z)
    z = z.astype(_F32)
    return _l2_normalize(z) if self.l2_normalize else z

  def _from_code_space(self, q: jax.Array) -> jax.Array:
    if self._code_dim != self.latent_dim:
      q = self.proj_out(q).astype(_F32)
    return q

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z [B,h,w,D] -> (z_q [B,h,w,D] float32, indices int32 [B,h,w]); no state change."""
    ze = self._to_code_space(z)
    flat = ze.reshape(-1, ze.shape[-1])
    indices = nearest_code(flat, self._search_codebook()).reshape(ze.shape[:-1])
    return self.lookup(indices), indices

  def lookup(self, indices: jax.Array) -> jax.Array:
    """indices int [B,h,w] -> z_q [B,h,w,D] float32 (codebook rows, out-projected)."""
    return self._from_code_space(jnp.take(self.codebook(), indices, axis=0))

  def _set_codebook(self, new: jax.Array, which: jax.Array) -> None:
    """Sets the rows of the (raw) codebook where `which` [K] is True to `new` [K, C]."""
    if self.ema_decay is None:
      target = new - self.codebook_param.astype(_F32)
      self.codebook_offset.value = jnp.where(which[:, None], target, self.codebook_offset.value)
    else:
      # With cluster_size 1 the smoothed normaliser is ~1, so the row reads back as `new`.
      self.embed_sum.value = jnp.where(which[:, None], new, self.embed_sum.value)
      self.cluster_size.value = jnp.where(which, 1.0, self.cluster_size.value)

  def _maybe_kmeans_init(self, flat: jax.Array) -> None:
    rng = self.make_rng("restart")
    n = flat.shape[0]
    points = flat
    if n > self.kmeans_max_points:
      rng, pick_rng = jax.random.split(rng)
      points = flat[jax.random.permutation(pick_rng, n)[: self.kmeans_max_points]]
    names = ("codebook_offset",) if self.ema_decay is None else ("cluster_size", "embed_sum")
    current = tuple(getattr(self, name).value for name in names)

    def run_kmeans(_):
      centres = kmeans(
        rng, points, self.codebook_size, iters=self.kmeans_iters, normalize=self.l2_normalize
      )
      if self.ema_decay is None:
        return (centres - self.codebook_param.astype(_F32),)
      # EMA statistics as if every past batch had looked like this one, so the next update moves
      # each code (1 - decay) of the way towards its new mean.
      counts, _ = code_statistics(nearest_code(flat, centres), self.codebook_size)
      counts = jnp.maximum(counts, 1.0)
      return (counts, centres * counts[:, None])

    new = jax.lax.cond(self.initialized.value, lambda _: current, run_kmeans, None)
    for name, value in zip(names, new):
      getattr(self, name).value = value
    self.initialized.value = jnp.array(True)

  def _ema_update(self, flat: jax.Array, indices: jax.Array, counts: jax.Array) -> None:
    d = self.ema_decay
    sums = jax.ops.segment_sum(flat, indices, num_segments=self.codebook_size)
    self.cluster_size.value = d * self.cluster_size.value + (1.0 - d) * counts
    self.embed_sum.value = d * self.embed_sum.value + (1.0 - d) * sums

  def _restart(self, flat: jax.Array) -> None:
    dead = self.unused.dead(self.restart_after)
    pick = jax.random.randint(self.make_rng("restart"), (self.codebook_size,), 0, flat.shape[0])
    self._set_codebook(flat[pick], dead)
    self.unused.var.value = jnp.where(dead, 0, self.unused.var.value)

  def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    ze = self._to_code_space(z)
    flat = ze.reshape(-1, ze.shape[-1])
    update = train and self.is_mutable_collection("batch_stats")
    if update and self.kmeans_init:
      self._maybe_kmeans_init(jax.lax.stop_gradient(flat))
    indices = nearest_code(flat, self._search_codebook())
    q = jnp.take(self.codebook(), indices, axis=0)
    commitment = self.beta * jnp.mean((flat - jax.lax.stop_gradient(q)) ** 2)
    if self.ema_decay is None:
      codebook_loss = jnp.mean((jax.lax.stop_gradient(flat) - q) ** 2)
    else:
      codebook_loss = jnp.zeros((), _F32)
    q_st = flat + jax.lax.stop_gradient(q - flat)
    counts, stats = code_statistics(indices, self.codebook_size)
    if update:
      if self.ema_decay is not None:
        self._ema_update(jax.lax.stop_gradient(flat), indices, counts)
      self.unused.update(counts)
    # Counted before restarts revive them, so the metric shows how many were dead.
    dead_after = self.restart_after or DEFAULT_DEAD_AFTER
    stats["dead_codes"] = jnp.sum(self.unused.dead(dead_after)).astype(_F32)
    if update and self.restart_after:
      self._restart(jax.lax.stop_gradient(flat))
    z_q = self._from_code_space(q_st.reshape(ze.shape))
    aux = {
      "loss": commitment + codebook_loss,
      "commitment": commitment,
      "codebook": codebook_loss,
      "indices": indices.reshape(ze.shape[:-1]),
      **stats,
    }
    return z_q, aux


class FSQ(nn.Module):
  """Finite scalar quantisation (Mentzer et al., 2023).

  Each of len(levels) channels is bounded and rounded to one of levels[i] values (straight-through
  rounding); the implicit codebook has prod(levels) entries. When latent_dim != len(levels), Dense
  in/out projections map D -> len(levels) -> D. Codes lie in [-1, 1].
  """

  levels: Sequence[int] = (8, 5, 5, 5)
  latent_dim: int | None = None
  eps: float = 1e-3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def codebook_size(self) -> int:
    return int(math.prod(self.levels))

  @property
  def _project(self) -> bool:
    return self.latent_dim is not None and self.latent_dim != len(self.levels)

  def setup(self):
    try:
      levels = [int(l) for l in self.levels]
    except (TypeError, ValueError):
      raise UserError(f"FSQ levels must be integers >= 2, got {self.levels!r}") from None
    if any(l < 2 for l in levels):
      raise UserError(f"FSQ levels must all be >= 2, got {tuple(self.levels)}")
    if math.prod(levels) > MAX_SIZE:
      raise UserError(f"FSQ levels {tuple(levels)} give more than {MAX_SIZE} codes")
    if self.latent_dim is not None:
      check_int("latent_dim", self.latent_dim)
    if self._project:
      kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
      self.proj_in = nn.Dense(len(self.levels), name="proj_in", **kw)
      self.proj_out = nn.Dense(self.latent_dim, name="proj_out", **kw)
    self.unused = _UnusedCounter(self, self.codebook_size)

  def _consts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    levels = np.asarray(self.levels, np.int64)
    half_width = (levels // 2).astype(np.float32)
    basis = np.concatenate([[1], np.cumprod(levels[:-1])]).astype(np.int64)
    return levels, half_width, basis

  def _bound(self, z: jax.Array) -> jax.Array:
    levels = np.asarray(self.levels, np.float32)
    half = (levels - 1.0) * (1.0 + self.eps) / 2.0
    offset = np.where(np.asarray(self.levels) % 2 == 0, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(offset / half).astype(np.float32)
    return jnp.tanh(z + shift) * half - offset

  def _quantize_codes(self, z: jax.Array) -> jax.Array:
    """Bounded, straight-through rounded codes in [-1, 1], float32 [..., len(levels)]."""
    if self._project:
      z = self.proj_in(z)
    b = self._bound(z.astype(_F32))
    rounded = b + jax.lax.stop_gradient(jnp.round(b) - b)
    return rounded / self._consts()[1]

  def codes_to_indices(self, codes: jax.Array) -> jax.Array:
    """codes [..., len(levels)] on the grid -> int32 indices [...]."""
    _, half_width, basis = self._consts()
    digits = jnp.round(codes * half_width + half_width).astype(jnp.int32)
    return jnp.sum(digits * basis.astype(np.int32), axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """int indices [...] -> codes float32 [..., len(levels)]."""
    levels, half_width, basis = self._consts()
    digits = (indices[..., None] // basis.astype(np.int32)) % levels.astype(np.int32)
    return (digits.astype(_F32) - half_width) / half_width

  def _from_codes(self, codes: jax.Array) -> jax.Array:
    return self.proj_out(codes).astype(_F32) if self._project else codes

  def codebook(self) -> jax.Array:
    """All prod(levels) codes [K, len(levels)] float32, row i = indices_to_codes(i)."""
    return self.indices_to_codes(jnp.arange(self.codebook_size, dtype=jnp.int32))

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes = self._quantize_codes(z)
    return self._from_codes(codes), self.codes_to_indices(codes)

  def lookup(self, indices: jax.Array) -> jax.Array:
    return self._from_codes(self.indices_to_codes(indices))

  def __call__(self, z: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    codes = self._quantize_codes(z)
    indices = self.codes_to_indices(codes)
    counts, stats = code_statistics(indices, self.codebook_size)
    if train and self.is_mutable_collection("batch_stats"):
      self.unused.update(counts)
    stats["dead_codes"] = jnp.sum(self.unused.dead(DEFAULT_DEAD_AFTER)).astype(_F32)
    return self._from_codes(codes), {"loss": jnp.zeros((), _F32), "indices": indices, **stats}


BOTTLENECKS = {
  "identity": IdentityBottleneck,
  "gaussian": GaussianBottleneck,
  "vq": VectorQuantizer,
  "fsq": FSQ,
}
DISCRETE = ("vq", "fsq")


def make_bottleneck(kind: str, **kwargs) -> nn.Module:
  """A bottleneck by name: one of "identity", "gaussian", "vq", "fsq"."""
  if kind not in BOTTLENECKS:
    raise UserError(f"unknown bottleneck kind {kind!r}; valid kinds: {', '.join(BOTTLENECKS)}")
  return BOTTLENECKS[kind](**kwargs)
