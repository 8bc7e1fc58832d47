"""The optimizer both stages use: AdamW, linear warm-up + cosine decay, global-norm clipping,
weight decay only on weight matrices, optional gradient accumulation.

Works on plain and on boxed (`nn.LogicallyPartitioned`) parameter trees: the optimizer state then
carries the same logical axis names as the params.
"""

from collections.abc import Callable, Sequence
import re
from typing import Any

import flax.linen as nn
import jax
import optax

from vqlm.errors import UserError

# A parameter whose path contains one of these (case-insensitive) is never decayed.
NO_DECAY_NAMES = ("embed", "norm", "scale", "bias", "codebook")


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def default_decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: arrays with ndim >= 2 whose path names no norm,
  scale, bias, embedding or codebook. Returns a tree of bools shaped like the unboxed params
  (a prefix of a boxed tree, which is what `optax.masked` needs)."""

  def decay(path, leaf) -> bool:
    names = "/".join(_key_name(k) for k in path).lower()
    return leaf.ndim >= 2 and not any(word in names for word in NO_DECAY_NAMES)

  return jax.tree_util.tree_map_with_path(decay, nn.meta.unbox(params))


def param_paths(params: Any) -> list[str]:
  """`a/b/kernel` for every leaf of a (possibly boxed) parameter tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))
  return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
  """True for leaves whose path (`a/b/kernel`) matches one of the regular expressions.

  Raises:
    UserError: a pattern is not a valid regular expression or matches no parameter.
  """
  compiled = []
  for pattern in patterns:
    if not isinstance(pattern, str) or not pattern:
      raise UserError(
        f"optim.freeze entry {pattern!r} is not a regular expression; give strings, e.g. "
        "--config.optim.freeze=\"('embed/.*',)\""
      )
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise UserError(
        f"optim.freeze pattern {pattern!r} is not a regular expression ({e})"
      ) from None
  paths = param_paths(params)
  for pattern, regex in zip(patterns, compiled):
    if not any(regex.search(p) for p in paths):
      raise UserError(
        f"optim.freeze pattern {pattern!r} matches no parameter (they are named like "
        f"{', '.join(paths[:3])}, ...); see `vqlm compile` for the parameter names"
      )
  return jax.tree_util.tree_map_with_path(
    lambda path, _: any(r.search("/".join(_key_name(k) for k in path)) for r in compiled),
    nn.meta.unbox(params),
  )


def make_schedule(
  *, learning_rate: float, warmup_steps: int, total_steps: int, end_lr_fraction: float = 0.1
) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
  `learning_rate * end_lr_fraction` at `total_steps` (constant afterwards)."""
  if total_steps <= 0 or warmup_steps < 0 or warmup_steps >= total_steps:
    raise UserError(
      f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
      f"total_steps={total_steps}."
    )
  if not 0.0 <= end_lr_fraction <= 1.0:
    raise UserError(f"end_lr_fraction={end_lr_fraction} must be in [0, 1].")
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=learning_rate * end_lr_fraction,
  )


def make_optimizer(
  *,
  learning_rate: float,
  warmup_steps: int,
  total_steps: int,
  end_lr_fraction: float = 0.1,
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  clip_norm: float | None = 1.0,
  grad_accum_steps: int = 1,
  decay_mask_fn: Callable[[Any], Any] = default_decay_mask,
  freeze: Sequence[str] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warm-up + cosine schedule, clipping and masked weight decay.

  Args:
    learning_rate: peak learning rate.
    warmup_steps, total_steps: in optimizer updates (with accumulation, one update per
      `grad_accum_steps` calls; the schedule at train step t is `schedule(t // grad_accum_steps)`).
    end_lr_fraction: final learning rate as a fraction of the peak.
    weight_decay: decoupled weight decay (multiplied by the learning rate), on `decay_mask_fn`
      leaves only.
    b1, b2, eps: Adam moments.
    clip_norm: clip gradients to this global norm (None or 0: no clipping).
    grad_accum_steps: > 1 wraps the chain in `optax.MultiSteps` (mean of the micro-batches).
    decay_mask_fn: params -> tree of bools (True = decay).
    freeze: regular expressions over parameter paths (`blocks_0/attn/q/kernel`); matching
      parameters are never updated (their gradients are zeroed before clipping, so they do not
      count in the global norm, and their updates after AdamW, so no weight decay moves them).
  Returns:
    `(optimizer, schedule)`.
  """
  if grad_accum_steps < 1:
    raise UserError(f"grad_accum_steps={grad_accum_steps} must be >= 1.")
  if clip_norm is not None and clip_norm < 0:
    raise UserError(f"clip_norm={clip_norm} must be >= 0 (0 or None disables clipping).")
  schedule = make_schedule(
    learning_rate=learning_rate,
    warmup_steps=warmup_steps,
    total_steps=total_steps,
    end_lr_fraction=end_lr_fraction,
  )
  parts = []
  if isinstance(freeze, str):
    freeze = (freeze,)
  if not isinstance(freeze, (tuple, list)):
    raise UserError(
      f"optim.freeze={freeze!r} must be a tuple of regular expressions, e.g. "
      "--config.optim.freeze=\"('embed/.*',)\""
    )
  freeze = tuple(freeze)
  if freeze:
    parts.append(optax.masked(optax.set_to_zero(), lambda p: frozen_mask(p, freeze)))
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(
    optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask_fn)
  )
  if freeze:
    parts.append(optax.masked(optax.set_to_zero(), lambda p: frozen_mask(p, freeze)))
  tx = optax.chain(*parts)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps).gradient_transformation()
  return tx, schedule
