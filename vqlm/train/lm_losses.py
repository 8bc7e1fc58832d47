"""Per-token losses of the LM: cross-entropy, squared log-partition (for the z-loss) and
correctness, all float32 `[B, S]`, from full logits or from the factored logits of a model whose
image codes are FSQ codes embedded as sums of per-channel level embeddings.

With tied level embeddings, image code `k` with digits `d_c` has logit `sum_c s_c[d_c]`, so the
codes' share of the partition function factors over the channels:
`sum_k exp(logit_k) = prod_c sum_l exp(s_c[l])`. `factored_token_losses` computes the exact
cross-entropy over the whole vocabulary from `vocab_size - image_size + sum(levels)` logits per
token (544 instead of 4608 for the demo's 512 text ids and 4096 codes), never forming the
`[B, S, vocab_size]` array.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`logits[B, S, V]`, `targets[B, S]` -> `(cross-entropy, log Z ** 2, correct)`, each `[B, S]`.

  A token is correct when its target's logit is the largest (ties count as correct); this reuses
  the log-sum-exp's max instead of a separate argmax pass over the vocabulary.
  """
  logits = logits.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (target_logit >= top).astype(jnp.float32)
  return log_z - target_logit, jnp.square(log_z), correct


def factored_token_losses(
  other: jax.Array,
  levels: jax.Array,
  targets: jax.Array,
  *,
  image_offset: int,
  code_levels: Sequence[int],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_losses` over the whole vocabulary from factored logits.

  Args:
    other: `[B, S, V - K]` logits of the ids outside the image codes, in id order (ids past the
      codes shifted down by `K = prod(code_levels)`).
    levels: `[B, S, sum(code_levels)]` per-channel level logits, channel after channel.
    targets: `[B, S]` int ids of the whole vocabulary.
    image_offset: the first image code's id.
    code_levels: the FSQ levels (code `k`'s digit in channel c is
      `(k // prod(levels[:c])) % levels[c]`).
  Returns:
    `(cross-entropy, log Z ** 2, correct)`, float32 `[B, S]`, equal to `token_losses` of the
    full logits up to rounding. Correct: the target's logit is the largest (ties count).
  """
  other = other.astype(jnp.float32)
  levels = levels.astype(jnp.float32)
  code_levels = [int(n) for n in code_levels]
  image_size = int(np.prod(code_levels))
  basis = np.concatenate([[1], np.cumprod(code_levels[:-1])]).astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(code_levels[:-1])]).astype(np.int64)
  channels = [levels[..., o : o + n] for o, n in zip(offsets, code_levels)]

  # The image codes' log-partition and largest logit are sums over the channels.
  channel_top = [jax.lax.stop_gradient(jnp.max(c, axis=-1)) for c in channels]
  image_top = sum(channel_top)
  image_log_z = sum(
    t + jnp.log(jnp.sum(jnp.exp(c - t[..., None]), axis=-1)) for c, t in zip(channels, channel_top)
  )
  other_top = jax.lax.stop_gradient(jnp.max(other, axis=-1))
  top = jnp.maximum(other_top, image_top)
  log_z = top + jnp.log(
    jnp.sum(jnp.exp(other - top[..., None]), axis=-1) + jnp.exp(image_log_z - top)
  )

  is_image = (targets >= image_offset) & (targets < image_offset + image_size)
  other_ids = jnp.where(targets >= image_offset + image_size, targets - image_size, targets)
  other_ids = jnp.where(is_image, 0, other_ids)
  other_logit = jnp.take_along_axis(other, other_ids[..., None], axis=-1)[..., 0]
  code = jnp.where(is_image, targets - image_offset, 0)
  image_logit = sum(
    jnp.take_along_axis(c, ((code // int(b)) % n)[..., None], axis=-1)[..., 0]
    for c, b, n in zip(channels, basis, code_levels)
  )
  target_logit = jnp.where(is_image, image_logit, other_logit)
  correct = (target_logit >= top).astype(jnp.float32)
  return log_z - target_logit, jnp.square(log_z), correct
