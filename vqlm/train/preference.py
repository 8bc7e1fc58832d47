"""Preference tuning of the LM: DPO and a GRPO-style policy gradient (pure jittable functions, all
log-probs and losses in float32), and `DPOTask`, a train step for the shared loop.

Log-probs of a sequence are summed over its *assistant-weighted* tokens (`loss_weights` of a chat
example, `vqlm.data.sequences.chat_example`: 1 on assistant turns, 0 on user turns and padding):

    logp(y | x) = sum_t w_t * log p(target_t | tokens_<=t)                  (`sequence_logps`)

DPO (Rafailov et al. 2023), with the reference model's log-probs fixed:

    loss = -mean log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))       (`dpo_loss`)

GRPO-style (Shao et al. 2024): rewards `[G, N]` (N samples per prompt) -> advantages normalised
per group, a PPO-clipped ratio against the sampling policy and a k3 KL penalty to the reference
(`exp(r) - r - 1`, r = ref - policy log-prob per token), averaged over assistant tokens:

    loss = -sum_t w_t (min(rho A, clip(rho, 1 - eps, 1 + eps) A) - kl_coef k3_t) / sum_t w_t
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer
from vqlm.train.lm_task import LMTask
from vqlm.train.state import TrainState

Batch = Mapping[str, jax.Array]
_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per token, float32 `[B, T]`, from logits `[B, T, V]` and targets `[B, T]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def sequence_logps(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted sum of token log-probs per row, float32 `[B]` (weights `[B, T]`, e.g. 1 on the
  assistant's tokens)."""
  return jnp.sum(token_logps(logits, targets) * weights.astype(jnp.float32), axis=-1)


def dpo_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  beta: float,
) -> jax.Array:
  """Mean DPO loss (float32 scalar) of `[B]` sequence log-probs; the reference terms get no
  gradient. Lowering it raises the chosen log-prob and lowers the rejected one."""
  margin = dpo_margin(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
  )
  return -jnp.mean(jax.nn.log_sigmoid(margin))


def dpo_margin(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  beta: float,
) -> jax.Array:
  """`beta * ((pi_c - ref_c) - (pi_r - ref_r))` per pair, float32 `[B]` (> 0: chosen preferred)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  ref_c, ref_r = (jax.lax.stop_gradient(f32(x)) for x in (ref_chosen_logps, ref_rejected_logps))
  chosen = f32(policy_chosen_logps) - ref_c
  rejected = f32(policy_rejected_logps) - ref_r
  return beta * (chosen - rejected)


def group_advantages(rewards: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """Rewards `[G, N]` (N samples of each of G prompts) -> `(r - mean_g) / (std_g + eps)`,
  float32 `[G, N]` (population std; a group of equal rewards gets advantages 0)."""
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 2:
    raise UserError(f"rewards of shape {rewards.shape} must be [groups, samples].")
  mean = jnp.mean(rewards, axis=1, keepdims=True)
  std = jnp.std(rewards, axis=1, keepdims=True)
  return (rewards - mean) / (std + eps)


def grpo_loss(
  logps: jax.Array,
  old_logps: jax.Array,
  ref_logps: jax.Array,
  advantages: jax.Array,
  weights: jax.Array,
  *,
  clip_eps: float = 0.2,
  kl_coef: float = 0.04,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped policy-gradient loss with a k3 KL penalty, averaged over weighted tokens.

  Args:
    logps: `[B, T]` token log-probs of the sampled completions under the policy being trained.
    old_logps: `[B, T]` under the policy that sampled them (no gradient).
    ref_logps: `[B, T]` under the reference model (no gradient).
    advantages: `[B]` per completion (e.g. `group_advantages(rewards).reshape(-1)`).
    weights: `[B, T]` 1 on the completion's (assistant) tokens, 0 elsewhere.
    clip_eps: the PPO clip range of the ratio.
    kl_coef: weight of the KL penalty.

  Returns:
    The float32 loss and metrics: `kl` (mean k3), `clip_frac` (tokens whose ratio is clipped),
    `ratio` (mean).
  """
  logps = jnp.asarray(logps, jnp.float32)
  old = jax.lax.stop_gradient(jnp.asarray(old_logps, jnp.float32))
  ref = jax.lax.stop_gradient(jnp.asarray(ref_logps, jnp.float32))
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))[:, None]
  w = jnp.asarray(weights, jnp.float32)
  ratio = jnp.exp(logps - old)
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
  r = ref - logps
  kl = jnp.exp(r) - r - 1
  count = jnp.maximum(w.sum(), 1e-8)
  mean = lambda x: jnp.sum(x * w) / count  # noqa: E731
  loss = -mean(surrogate - kl_coef * kl)
  clipped = (jnp.abs(ratio - 1) > clip_eps).astype(jnp.float32)
  return loss, {"kl": mean(kl), "clip_frac": mean(clipped), "ratio": mean(ratio)}


# ---- DPO as a loop task -------------------------------------------------------------------------


def pair_batch(
  chosen: Sequence[Mapping[str, np.ndarray]], rejected: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
  """Padded chosen and rejected examples (`[S]` each, same prompt per index) -> a DPO batch of
  `[2B, S]` arrays: rows `0..B-1` chosen, rows `B..2B-1` rejected."""
  if len(chosen) != len(rejected) or not chosen:
    raise UserError(f"{len(chosen)} chosen but {len(rejected)} rejected examples; pair them.")
  rows = list(chosen) + list(rejected)
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in _KEYS}


class ReferenceTask(LMTask):
  """An LM task tuned against a frozen reference model (DPO, GRPO): the reference parameters live
  in `state.extra["reference"]` (never updated); `init` copies the initial parameters there, and
  a run that starts from another run's parameters must call `reset_reference(state)` after
  restoring them so the reference is the tuned-from model. No z-loss.

  Args:
    model, optimizer, image_offset, image_size, codebook: as for `LMTask`.
  """

  def __init__(
    self,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    image_offset: int,
    image_size: int,
    codebook: jax.Array | None = None,
  ):
    super().__init__(
      model=model,
      optimizer=optimizer,
      z_loss_weight=0.0,
      image_offset=image_offset,
      image_size=image_size,
      codebook=codebook,
    )

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    return self.reset_reference(super().init(rng, batch))

  @staticmethod
  def reset_reference(state: TrainState) -> TrainState:
    """The state with `extra["reference"]` a copy of its current params."""
    reference = jax.tree.map(jnp.copy, state.params)
    return state.replace(extra={**state.extra, "reference": reference})


class DPOTask(ReferenceTask):
  """DPO on chat examples with the loop's Task interface (init, train_step, eval_step).

  The batch is `pair_batch`'s: `[2B, S]` rows, chosen first; the reference model is
  `ReferenceTask`'s.

  Args:
    model, optimizer, image_offset, image_size, codebook: as for `LMTask`.
    beta: the DPO temperature (larger: stay closer to the reference).
  """

  def __init__(
    self,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    beta: float,
    image_offset: int,
    image_size: int,
    codebook: jax.Array | None = None,
  ):
    if beta <= 0:
      raise UserError(f"beta={beta} must be > 0.")
    super().__init__(
      model=model,
      optimizer=optimizer,
      image_offset=image_offset,
      image_size=image_size,
      codebook=codebook,
    )
    self.beta = float(beta)

  def _logps(self, params: Any, extra: Mapping[str, Any], batch: Batch) -> jax.Array:
    logits = self._forward(self._variables(params, extra), batch)
    return sequence_logps(logits, batch["targets"], batch["loss_weights"])

  def _margin(
    self, params: Any, extra: Mapping[str, Any], batch: Batch
  ) -> tuple[jax.Array, jax.Array]:
    """DPO margins `[B]` and the policy's sequence log-probs `[2B]`."""
    ref = jax.lax.stop_gradient(self._logps(extra["reference"], extra, batch))
    pol = self._logps(params, extra, batch)
    b = pol.shape[0] // 2
    return dpo_margin(pol[:b], pol[b:], ref[:b], ref[b:], self.beta), pol

  def train_step(
    self, state: TrainState, batch: Batch, rng: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One DPO update. Metrics: loss, reward_acc (pairs with margin > 0), margin (mean),
    chosen_logps, rejected_logps (means), grad_norm."""
    del rng

    def loss_fn(params):
      margin, pol = self._margin(params, state.extra, batch)
      return -jnp.mean(jax.nn.log_sigmoid(margin)), (margin, pol)

    (loss, (margin, pol)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    b = pol.shape[0] // 2
    metrics = {
      "loss": loss,
      "reward_acc": jnp.mean((margin > 0).astype(jnp.float32)),
      "margin": jnp.mean(margin),
      "chosen_logps": jnp.mean(pol[:b]),
      "rejected_logps": jnp.mean(pol[b:]),
      "grad_norm": optax.tree.norm(nn.meta.unbox(grads)),
    }
    return new_state, metrics

  def eval_step(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the batch's pairs: `pairs`, `loss_sum`, `correct` (margin > 0)."""
    margin, _ = self._margin(state.params, state.extra, batch)
    return {
      "pairs": jnp.asarray(margin.shape[0], jnp.float32),
      "loss_sum": -jnp.sum(jax.nn.log_sigmoid(margin)),
      "correct": jnp.sum((margin > 0).astype(jnp.float32)),
    }
