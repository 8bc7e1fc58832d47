"""Online GRPO-style policy gradient on sampled chat replies, as a task for the shared loop.

A rollout samples `group_size` replies to each of a few prompts with the current policy, scores
them (e.g. `vqlm.eval.scene_reward`) and normalises the rewards within each prompt's group
(`preference.group_advantages`). `GRPOTask.train_step` then takes one clipped policy-gradient step
on that batch (`preference.grpo_loss`) with a k3 KL penalty towards the reference model (the
tuned-from parameters, kept in `state.extra["reference"]`).

One update per rollout batch: the policy that sampled is the one being updated, so the old
log-probs are the current ones under `stop_gradient` (the ratio is 1 in value, its gradient is
the policy gradient) and come from the same forward pass as the log-probs.

Batch: one sampled conversation per row, as `vqlm.data.sequences` lays chats out: `tokens`,
`targets`, `segment_ids`, `positions` int32 `[B, S]`, `loss_weights` float32 `[B, S]` (1 on the
tokens the policy chose, 0 elsewhere), `advantages` float32 `[B]`, `rewards` float32 `[B]`, and
optionally reward parts `reward_<name>` float32 `[B]` (their batch means become metrics).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer
from vqlm.train.preference import ReferenceTask, grpo_loss, token_logps
from vqlm.train.state import TrainState

Batch = Mapping[str, jax.Array]
PART_PREFIX = "reward_"


class GRPOTask(ReferenceTask):
  """GRPO with the loop's Task interface (`init`, `train_step`).

  The reference model (the KL's) is `ReferenceTask`'s: `state.extra["reference"]`.

  Args:
    model, optimizer, image_offset, image_size, codebook: as for `LMTask`.
    kl_coef: weight of the KL penalty towards the reference (0: none).
    clip_eps: the PPO clip range of the probability ratio.
  """

  def __init__(
    self,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    image_offset: int,
    image_size: int,
    kl_coef: float = 0.04,
    clip_eps: float = 0.2,
    codebook: jax.Array | None = None,
  ):
    if kl_coef < 0:
      raise UserError(f"kl_coef={kl_coef} must be >= 0.")
    if not 0 < clip_eps < 1:
      raise UserError(f"clip_eps={clip_eps} must be in (0, 1).")
    super().__init__(
      model=model,
      optimizer=optimizer,
      image_offset=image_offset,
      image_size=image_size,
      codebook=codebook,
    )
    self.kl_coef = float(kl_coef)
    self.clip_eps = float(clip_eps)

  def _token_logps(self, params: Any, extra: Mapping[str, Any], batch: Batch) -> jax.Array:
    """float32 `[B, S]` log-probs of the targets."""
    logits = self._forward(self._variables(params, extra), batch)
    return token_logps(logits, batch["targets"])

  def train_step(
    self, state: TrainState, batch: Batch, rng: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One policy-gradient update. Metrics: loss, reward (mean), kl (mean k3 per weighted token),
    clip_frac, ratio, grad_norm, num_tokens, advantage_abs (mean |A|) and `reward_<part>` means
    of the batch's reward parts."""
    del rng
    ref = jax.lax.stop_gradient(self._token_logps(state.extra["reference"], state.extra, batch))
    weights = batch["loss_weights"]

    def loss_fn(params):
      logps = self._token_logps(params, state.extra, batch)
      old = jax.lax.stop_gradient(logps)
      return grpo_loss(
        logps,
        old,
        ref,
        batch["advantages"],
        weights,
        clip_eps=self.clip_eps,
        kl_coef=self.kl_coef,
      )

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    metrics = {
      "loss": loss,
      "reward": jnp.mean(f32(batch["rewards"])),
      **stats,
      "grad_norm": optax.tree.norm(nn.meta.unbox(grads)),
      "num_tokens": jnp.sum(f32(weights)),
      "advantage_abs": jnp.mean(jnp.abs(f32(batch["advantages"]))),
    }
    for key, value in batch.items():
      if key.startswith(PART_PREFIX):
        metrics[key] = jnp.mean(f32(value))
    return new_state, metrics
