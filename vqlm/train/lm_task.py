"""The LM training task: weighted next-token cross-entropy (+ z-loss) and the update step.

The shared loop (`vqlm.train.loop`) jits `train_step` with the state donated. `init` returns the
params *boxed* with logical axis names (the loop derives shardings from them, then unboxes);
`train_step` / `eval_step` accept boxed or unboxed params.

Batch (one LM example per row, as `vqlm.data.sequences` builds them): `tokens`, `targets`,
`segment_ids`, `positions` int32 `[B, S]` and `loss_weights` float32 `[B, S]` (0 on padding and
masked prompts). Metrics are split by the modality of the *target*: image if `image_offset <=
target < image_offset + image_size`, text otherwise.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer, supports_factored_logits
from vqlm.train.lm_losses import factored_token_losses, token_losses
from vqlm.train.state import TrainState

Batch = Mapping[str, jax.Array]

EVAL_SUM_KEYS = (
  "weight",
  "loss_sum",
  "text_weight",
  "text_loss_sum",
  "text_correct",
  "image_weight",
  "image_loss_sum",
  "image_correct",
)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return num / jnp.maximum(den, 1e-8)


class LMTask:
  """Init, train and eval steps of the interleaved text/image LM.

  Args:
    model: the Transformer (vocab_size etc. already set from the Vocab).
    optimizer: an optax transformation (e.g. `vqlm.optim.make_optimizer(...)[0]`).
    z_loss_weight: weight of `mean(log Z ** 2)` added to the loss (0 disables it).
    image_offset, image_size: the image id range of the vocabulary (for per-modality metrics).
    codebook: `[image_size, codebook_dim]` image tokenizer codebook, required when the model uses
      `image_embed_init="codebook"`; stored in `state.extra["codebook"]` (never trained).
    factored_loss: compute the loss from factored logits (`vqlm.train.lm_losses`; exact, and
      several times fewer head products for FSQ level embeddings). None: whenever the model
      allows it (`supports_factored_logits`); False: always from the full logits.
  """

  def __init__(
    self,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    z_loss_weight: float,
    image_offset: int,
    image_size: int,
    codebook: jax.Array | None = None,
    factored_loss: bool | None = None,
  ):
    uses_codebook = model.config.image_embed_init == "codebook"
    if uses_codebook and codebook is None:
      raise UserError(
        "the model embeds images from the tokenizer codebook: pass "
        "LMTask(codebook=<[image_size, codebook_dim] array>)."
      )
    if codebook is not None:
      want = (model.config.image_size, model.config.codebook_dim)
      if not uses_codebook or tuple(codebook.shape) != want:
        raise UserError(
          f"codebook of shape {tuple(codebook.shape)} given; the model needs "
          f"image_embed_init='codebook' and shape {want}."
        )
    self.model = model
    self.optimizer = optimizer
    self.z_loss_weight = float(z_loss_weight)
    self.image_offset = int(image_offset)
    self.image_size = int(image_size)
    self.codebook = codebook
    supported = supports_factored_logits(model.config)
    if factored_loss and not supported:
      raise UserError(
        "factored_loss=True needs tied FSQ level embeddings (image_embed_init='levels')."
      )
    self.factored_loss = supported if factored_loss is None else bool(factored_loss)

  def _variables(self, params: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    variables = {"params": params}
    if "codebook" in extra:
      variables["codebook"] = extra["codebook"]
    return variables

  def _forward(self, variables, batch: Batch, *, factored_logits: bool = False) -> Any:
    """The model's logits `[B, S, vocab_size]` (with `factored_logits`, the factored pair)."""
    logits, _ = self.model.apply(
      variables,
      batch["tokens"],
      positions=batch["positions"],
      segment_ids=batch["segment_ids"],
      factored_logits=factored_logits,
    )
    return logits

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """A fresh state: boxed params, optimizer state, `extra["codebook"]` if the model needs it."""
    one = {k: batch[k][:1] for k in ("tokens", "positions", "segment_ids")}
    variables = self.model.init(
      {"params": rng}, one["tokens"], positions=one["positions"], segment_ids=one["segment_ids"]
    )
    extra = {}
    if self.codebook is not None:
      extra["codebook"] = {"embed": {"vectors": jnp.asarray(self.codebook, jnp.float32)}}
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.optimizer.init(params),
      extra=extra,
    )

  def _token_losses(self, variables, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cross-entropy, log Z ** 2 and correctness `[B, S]`; from factored logits when the model
    allows it (exact, and the `[B, S, vocab_size]` logits are never formed)."""
    cfg = self.model.config
    if not self.factored_loss:
      return token_losses(self._forward(variables, batch), batch["targets"])
    other, levels = self._forward(variables, batch, factored_logits=True)
    return factored_token_losses(
      other, levels, batch["targets"], image_offset=cfg.image_offset, code_levels=cfg.code_levels
    )

  def _losses(self, variables, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums over the batch (float32 scalars), keyed like EVAL_SUM_KEYS + z_sum."""
    targets = batch["targets"]
    weights = batch["loss_weights"].astype(jnp.float32)
    ce, z, correct = self._token_losses(variables, batch)
    is_image = (targets >= self.image_offset) & (targets < self.image_offset + self.image_size)
    w_img = jnp.where(is_image, weights, 0.0)
    w_txt = weights - w_img
    return {
      "weight": weights.sum(),
      "loss_sum": (ce * weights).sum(),
      "z_sum": (z * weights).sum(),
      "text_weight": w_txt.sum(),
      "text_loss_sum": (ce * w_txt).sum(),
      "text_correct": (correct * w_txt).sum(),
      "image_weight": w_img.sum(),
      "image_loss_sum": (ce * w_img).sum(),
      "image_correct": (correct * w_img).sum(),
    }

  def train_step(
    self, state: TrainState, batch: Batch, rng: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update. `rng` is unused (the model has no dropout); kept for the loop's interface.

    Metrics: loss (cross-entropy + z-loss term, per unit weight), ce_loss, text_loss, image_loss,
    text_acc, image_acc, z_loss (mean log Z^2), grad_norm, num_tokens (sum of loss weights).
    """
    del rng

    def loss_fn(params):
      sums = self._losses(self._variables(params, state.extra), batch)
      ce = _safe_div(sums["loss_sum"], sums["weight"])
      z_loss = _safe_div(sums["z_sum"], sums["weight"])
      return ce + self.z_loss_weight * z_loss, (sums, ce, z_loss)

    (loss, (sums, ce, z_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
      "loss": loss,
      "ce_loss": ce,
      "z_loss": z_loss,
      "text_loss": _safe_div(sums["text_loss_sum"], sums["text_weight"]),
      "image_loss": _safe_div(sums["image_loss_sum"], sums["image_weight"]),
      "text_acc": _safe_div(sums["text_correct"], sums["text_weight"]),
      "image_acc": _safe_div(sums["image_correct"], sums["image_weight"]),
      "grad_norm": optax.tree.norm(nn.meta.unbox(grads)),
      "num_tokens": sums["weight"],
    }
    return new_state, metrics

  def eval_step(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums (keys EVAL_SUM_KEYS); add them over batches, then `eval_summary`."""
    sums = self._losses(self._variables(state.params, state.extra), batch)
    return {k: sums[k] for k in EVAL_SUM_KEYS}


def eval_summary(sums: Mapping[str, Any]) -> dict[str, float]:
  """Means and perplexities from summed `eval_step` outputs (modalities without tokens omitted)."""
  out = {}
  for prefix, weight in (("", "weight"), ("text_", "text_weight"), ("image_", "image_weight")):
    w = float(sums[weight])
    if w <= 0:
      continue
    loss = float(sums[f"{prefix}loss_sum"]) / w
    out[f"{prefix}loss"] = loss
    out[f"{prefix}perplexity"] = float(jnp.exp(loss))
    if prefix:
      out[f"{prefix}acc"] = float(sums[f"{prefix}correct"]) / w
  return out
