"""Image-tokenizer training: reconstruction, perceptual, bottleneck and GAN losses in one step.

The shared loop (`vqlm.train.loop`) calls `TokenizerTask.init` and `TokenizerTask.train_step`
under `jax.jit` (state donated). One step is one compiled program whatever the step number: the
GAN terms switch on at `disc_start` through `jnp.where` on `state.step`, never Python branching.

Generator gradient (one backward pass through the autoencoder): the losses are differentiated
with respect to the reconstruction first, combined as cotangent
`d nll/d recon + gan_weight * w * d g/d recon` (w: taming's adaptive weight, the ratio of the two
losses' gradient norms at the decoder's last conv), and pulled back through the model once
together with the bottleneck loss.

State layout: `params` = the tokenizer's params, `extra["batch_stats"]` = its non-trainable
collection (VQ codebook EMA / counters; `{}` when none), and with a GAN
`extra["disc_params"]`, `extra["disc_opt_state"]`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vqlm.errors import UserError
from vqlm.nn.autoencoder import output_conv
from vqlm.nn.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from vqlm.nn.image_tokenizer import LAST_LAYER, ImageTokenizer
from vqlm.nn.perceptual import load_feature_weights, perceptual_loss
from vqlm.train.state import TrainState

_F32 = jnp.float32

LOSS_DEFAULTS: dict[str, Any] = {
  "recon": "l1",  # "l1" or "l2" pixel loss on [-1, 1] images.
  "recon_weight": 1.0,
  "perceptual_weight": 0.0,  # > 0 needs perceptual_weights_path (vqlm.nn.perceptual).
  "perceptual_weights_path": "",
  "gan_weight": 0.0,  # > 0 enables the PatchGAN (needs a disc_optimizer).
  "disc_start": 0,  # Step from which the discriminator trains and the G term acts.
  "adaptive_weight": True,  # Scale the G term by |grad nll| / |grad g| at the last layer.
  "max_adaptive_weight": 1e4,
  "disc": {},  # NLayerDiscriminator kwargs.
}


def loss_config(loss: Mapping[str, Any] | None) -> dict[str, Any]:
  """LOSS_DEFAULTS updated by `loss`; unknown keys or bad values raise ValueError."""
  cfg = dict(LOSS_DEFAULTS)
  for key, value in dict(loss or {}).items():
    if key not in cfg:
      raise UserError(f"unknown tokenizer loss option {key!r}; valid: {', '.join(cfg)}")
    cfg[key] = value
  if cfg["recon"] not in ("l1", "l2"):
    raise UserError(f"loss.recon must be 'l1' or 'l2', got {cfg['recon']!r}")
  cfg["disc"] = dict(cfg["disc"] or {})
  return cfg


def psnr(recon: jax.Array, images: jax.Array) -> jax.Array:
  """Mean over images of the PSNR (dB) in [0, 1] units; recon is clipped to [-1, 1]."""
  diff = (jnp.clip(recon.astype(_F32), -1.0, 1.0) - images.astype(_F32)) * 0.5
  mse = jnp.mean(diff**2, axis=(1, 2, 3))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


class TokenizerTask:
  """Init, train step, eval step and reconstruction of an `ImageTokenizer`.

  Args:
    model_kwargs: ImageTokenizer kwargs: {"encoder": {...}, "bottleneck": {"kind": ..., ...},
      "decoder": {...} or absent}.
    loss: overrides of LOSS_DEFAULTS.
    optimizer: the tokenizer's optax transformation.
    disc_optimizer: the discriminator's; required when loss["gan_weight"] > 0.
  """

  def __init__(
    self,
    *,
    model_kwargs: Mapping[str, Any],
    loss: Mapping[str, Any] | None = None,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation | None = None,
  ):
    self.model = ImageTokenizer(**dict(model_kwargs))
    self.loss = loss_config(loss)
    self.tx = optimizer
    self.gan = self.loss["gan_weight"] > 0
    if self.gan and disc_optimizer is None:
      raise UserError("loss.gan_weight > 0 needs a discriminator optimizer (disc_optimizer)")
    self.disc_tx = disc_optimizer
    self.disc = NLayerDiscriminator(**self.loss["disc"]) if self.gan else None
    self.perceptual = None
    if self.loss["perceptual_weight"] > 0:
      self.perceptual = load_feature_weights(self.loss["perceptual_weights_path"])

  # -- helpers ---------------------------------------------------------------------------------

  @staticmethod
  def variables(params: Any, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The model's variables {"params", "batch_stats"} from state parts."""
    return {"params": params, "batch_stats": extra.get("batch_stats", {})}

  def _recon_loss(self, recon: jax.Array, images: jax.Array) -> jax.Array:
    diff = recon.astype(_F32) - images.astype(_F32)
    return jnp.mean(jnp.abs(diff)) if self.loss["recon"] == "l1" else jnp.mean(diff**2)

  def _nll(self, recon: jax.Array, images: jax.Array) -> tuple[jax.Array, dict]:
    """The non-adversarial image loss and its parts (float32 scalars)."""
    rec = self._recon_loss(recon, images)
    total, parts = self.loss["recon_weight"] * rec, {"recon_loss": rec}
    if self.perceptual is not None:
      p = perceptual_loss(self.perceptual, recon, images)
      total = total + self.loss["perceptual_weight"] * p
      parts["perceptual_loss"] = p
    return total, parts

  @staticmethod
  def _images(batch: Any) -> jax.Array:
    images = batch["image"] if isinstance(batch, Mapping) else batch
    return jnp.asarray(images).astype(_F32)

  # -- the task interface ----------------------------------------------------------------------

  def init(self, rng: jax.Array, images: Any) -> TrainState:
    """A fresh state; `images` is an example batch (array [B,H,W,3] or {"image": ...})."""
    images = self._images(images)
    k_params, k_sample, k_restart, k_disc = jax.random.split(rng, 4)
    variables = self.model.init(
      {"params": k_params, "sample": k_sample, "restart": k_restart}, images, train=False
    )
    params = variables["params"]
    extra: dict[str, Any] = {"batch_stats": dict(variables.get("batch_stats", {}))}
    if self.gan:
      disc_params = self.disc.init(k_disc, images)["params"]
      extra["disc_params"] = disc_params
      extra["disc_opt_state"] = self.disc_tx.init(disc_params)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), extra=extra
    )

  def train_step(
    self, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of the tokenizer (and discriminator); metrics are float32 scalars."""
    images = self._images(batch)
    sample_rng, restart_rng = jax.random.split(rng)
    cfg = self.loss

    def forward(params):
      (recon, aux), new_vars = self.model.apply(
        self.variables(params, state.extra),
        images,
        train=True,
        rngs={"sample": sample_rng, "restart": restart_rng},
        mutable=["batch_stats", "intermediates"],
      )
      features = new_vars["intermediates"]["dec"]["last_features"][0]
      return (recon, aux["loss"]), (aux, dict(new_vars.get("batch_stats", {})), features)

    (recon, bn_loss), pullback, (aux, batch_stats, features) = jax.vjp(
      forward, state.params, has_aux=True
    )
    (nll, parts), g_nll = jax.value_and_grad(lambda r: self._nll(r, images), has_aux=True)(recon)
    cotangent, loss = g_nll, nll + bn_loss
    metrics = dict(parts)
    extra = dict(state.extra)
    extra["batch_stats"] = batch_stats

    if self.gan:
      disc_params, disc_opt_state = state.extra["disc_params"], state.extra["disc_opt_state"]
      active = state.step >= cfg["disc_start"]
      g_loss, g_g = jax.value_and_grad(
        lambda r: hinge_g_loss(self.disc.apply({"params": disc_params}, r))
      )(recon)
      if cfg["adaptive_weight"]:
        kernel = _get(state.params, LAST_LAYER)["kernel"]
        _, conv_vjp = jax.vjp(lambda k: output_conv(features, k), kernel.astype(_F32))
        nll_norm = jnp.linalg.norm(conv_vjp(g_nll)[0])
        g_norm = jnp.linalg.norm(conv_vjp(g_g)[0])
        d_weight = jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, cfg["max_adaptive_weight"])
        d_weight = jnp.where(jnp.isfinite(d_weight), d_weight, 0.0)
      else:
        d_weight = jnp.ones((), _F32)
      coef = jnp.where(active, cfg["gan_weight"] * d_weight, 0.0).astype(_F32)
      cotangent = cotangent + coef * g_g
      loss = loss + coef * g_loss

      def d_loss_fn(dp):
        both = jnp.concatenate([images, jax.lax.stop_gradient(recon)], axis=0)
        logits = self.disc.apply({"params": dp}, both)
        real, fake = jnp.split(logits, 2, axis=0)
        return hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

      (d_loss, (logits_real, logits_fake)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
        disc_params
      )
      d_updates, new_d_opt = self.disc_tx.update(d_grads, disc_opt_state, disc_params)
      new_dp = optax.apply_updates(disc_params, d_updates)
      keep = lambda new, old: jnp.where(active, new, old)
      extra["disc_params"] = jax.tree.map(keep, new_dp, disc_params)
      extra["disc_opt_state"] = jax.tree.map(keep, new_d_opt, disc_opt_state)
      metrics.update(
        g_loss=g_loss,
        d_loss=d_loss,
        d_weight=d_weight,
        disc_active=active.astype(_F32),
        logits_real=logits_real,
        logits_fake=logits_fake,
        disc_grad_norm=optax.tree.norm(d_grads),
      )

    (grads,) = pullback((cotangent, jnp.ones_like(bn_loss)))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update({k: v for k, v in aux.items() if k not in ("loss", "indices")})
    metrics.update(
      loss=loss, bottleneck_loss=bn_loss, psnr=psnr(recon, images), grad_norm=optax.tree.norm(grads)
    )
    metrics = {k: jnp.asarray(v, _F32) for k, v in metrics.items()}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra)
    return new_state, metrics

  def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Reconstruction without state change: "recon" [B,H,W,3], "recon_loss", "psnr", code
    statistics and (discrete bottlenecks) "codes" int32 [B,h,w]."""
    images = self._images(batch)
    recon, aux = self.model.apply(self.variables(state.params, state.extra), images, train=False)
    out = {k: jnp.asarray(v, _F32) for k, v in aux.items() if k != "indices"}
    out.update(recon=recon, recon_loss=self._recon_loss(recon, images), psnr=psnr(recon, images))
    if "indices" in aux:
      out["codes"] = aux["indices"].astype(jnp.int32)
    return out

  def reconstruct(self, params: Any, extra: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """Reconstructions [B,H,W,3] float32 (not clipped) of images [B,H,W,3] in [-1, 1]."""
    recon, _ = self.model.apply(self.variables(params, extra), self._images(images), train=False)
    return recon
