"""The image tokenizer: encoder -> bottleneck -> decoder, with code-level encode/decode.

Parameter tree: {"enc": Encoder, "quantizer": bottleneck, "dec": Decoder}; VQ/FSQ state lives in
the "batch_stats" collection. A tokenizer imported without decoder weights (`decoder.kind =
"none"`) has no "dec": it encodes, and refuses to decode in one line. Outside training, use the
jit-friendly module-level helpers `encode(model, variables, images)`, `decode(model, variables,
codes)` and `codebook(model, variables)`, where `variables = {"params": ..., "batch_stats": ...}`.
"""

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlm.errors import UserError
from vqlm.nn import autoencoder
from vqlm.nn.autoencoder import Decoder, Encoder, check_kwargs, factor_of
from vqlm.nn.bottlenecks import DISCRETE, make_bottleneck
from vqlm.nn.taming import TamingDecoder, TamingEncoder

ENCODERS = {**autoencoder.ENCODERS, "taming": TamingEncoder}
# Encoder kwargs a mirrored decoder does not take.
ENCODER_ONLY = ("latent_dim", "mlp_blocks", "colour_channels")
# "none": no decoder (an encoder-only import); decode refuses.
DECODERS = {"conv": Decoder, "taming": TamingDecoder, "none": None}

# Where the decoder's last conv lives in the params (adaptive GAN weight).
LAST_LAYER = ("dec", "conv_out")


class ImageTokenizer(nn.Module):
  """A conv autoencoder with a pluggable bottleneck (identity, gaussian, vq, fsq).

  Attributes:
    encoder: Encoder kwargs (channels, channel_multipliers, num_res_blocks, attention_at_lowest,
      latent_dim, dtype, param_dtype), with an optional "kind": "conv" (`Encoder`, the default),
      "patch" (`PatchEncoder`: each code from its own patch only; takes `mlp_blocks`), "split"
      (`SplitPatchEncoder`: the same with a patch's form and colour in separate channels; takes
      `colour_channels`, and an FSQ bottleneck of exactly `latent_dim` levels) or
      "taming" (`vqlm.nn.taming.TamingEncoder`, the layout of imported VQGANs).
    decoder: Decoder kwargs with an optional "kind": "conv" (`Decoder`), "taming"
      (`TamingDecoder`) or "none" (no decoder: encode only); None mirrors the encoder's (without
      latent_dim and mlp_blocks; kind "taming" for a taming encoder, else "conv").
    bottleneck: {"kind": ..., **bottleneck kwargs}; "latent_dim" defaults to the encoder's.
  """

  encoder: Mapping[str, Any]
  bottleneck: Mapping[str, Any]
  decoder: Mapping[str, Any] | None = None

  @property
  def kind(self) -> str:
    return self.bottleneck.get("kind", "")

  @property
  def factor(self) -> int:
    return factor_of(self.encoder.get("channel_multipliers", Encoder.channel_multipliers))

  @property
  def is_discrete(self) -> bool:
    return self.kind in DISCRETE

  @property
  def codebook_size(self) -> int:
    """Number of codes (VQ: codebook_size, FSQ: prod(levels)); 0 for continuous bottlenecks."""
    if self.kind == "vq":
      return int(self.bottleneck.get("codebook_size", 512))
    if self.kind == "fsq":
      return int(math.prod(self.bottleneck.get("levels", (8, 5, 5, 5))))
    return 0

  def grid_shape(self, height: int, width: int) -> tuple[int, int]:
    """The code grid (h, w) of an image of this size."""
    return height // self.factor, width // self.factor

  def setup(self):
    enc = dict(self.encoder)
    encoder_kind = enc.pop("kind", "conv")
    if encoder_kind not in ENCODERS:
      raise UserError(f"unknown encoder kind '{encoder_kind}'; valid: {', '.join(ENCODERS)}")
    check_kwargs(enc, "encoder")
    self.enc = ENCODERS[encoder_kind](**enc)
    if self.decoder is not None:
      dec = dict(self.decoder)
    else:
      dec = {k: v for k, v in enc.items() if k not in ENCODER_ONLY}
      dec["kind"] = "taming" if encoder_kind == "taming" else "conv"
    decoder_kind = dec.pop("kind", "conv")
    if decoder_kind not in DECODERS:
      raise UserError(f"unknown decoder kind '{decoder_kind}'; valid: {', '.join(DECODERS)}")
    if decoder_kind == "none":
      self.dec = None
    else:
      check_kwargs(dec, "decoder")
      self.dec = DECODERS[decoder_kind](**dec)
    bkw = dict(self.bottleneck)
    kind = bkw.pop("kind", None)
    if kind is None:
      raise UserError("bottleneck config needs a 'kind': one of identity, gaussian, vq, fsq")
    latent_dim = enc.get("latent_dim", Encoder.latent_dim)
    if kind == "gaussian":
      bkw.setdefault("latent_dim", latent_dim)
    else:
      if bkw.get("latent_dim", latent_dim) != latent_dim:
        raise UserError(
          f"bottleneck latent_dim {bkw['latent_dim']} != encoder latent_dim "
          f"{latent_dim}; drop it from the bottleneck config"
        )
      bkw["latent_dim"] = latent_dim
    if encoder_kind == "split" and len(bkw.get("levels", ())) != latent_dim:
      raise UserError(
        f"the split encoder needs an FSQ bottleneck with one level per latent channel "
        f"(latent_dim={latent_dim}); set --config.model.encoder.latent_dim and "
        "--config.model.bottleneck.latent_dim to len(levels)"
      )
    self.quantizer = make_bottleneck(kind, **bkw)

  def _check_images(self, images: jax.Array) -> None:
    f = self.factor
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
      raise UserError(
        f"images must be [B, H, W, 3] with H and W divisible by {f}, got shape "
        f"{tuple(images.shape)}"
      )

  def _check_discrete(self, what: str) -> None:
    if not self.is_discrete:
      raise UserError(
        f"{what} needs a discrete bottleneck (vq or fsq), this tokenizer's is "
        f"{self.kind!r}; use encode_latent / decode_latent"
      )

  @property
  def has_decoder(self) -> bool:
    """False for an encoder-only tokenizer (`decoder.kind = "none"`)."""
    return dict(self.decoder or {}).get("kind") != "none"

  def _check_decoder(self) -> None:
    if self.dec is None:
      raise UserError(
        "this image tokenizer has no decoder (its source shipped encoder weights only): it can "
        "encode images but not decode codes; import a checkpoint with decoder weights to decode"
      )

  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    """images [B,H,W,3] in [-1, 1] -> (reconstruction [B,H,W,3] float32, bottleneck aux)."""
    self._check_images(images)
    self._check_decoder()
    z_q, aux = self.quantizer(self.enc(images), train=train)
    return self.dec(z_q), aux

  def initialize(self, images: jax.Array) -> jax.Array:
    """Runs every submodule once (for `init`, decoder-less tokenizers too): images [B,H,W,3]
    -> [B,H,W,3] float32 reconstructions, or the latents [B,h,w,C] without a decoder."""
    self._check_images(images)
    z_q, _ = self.quantizer(self.enc(images), train=False)
    return z_q if self.dec is None else self.dec(z_q)

  def encode_latent(self, images: jax.Array) -> jax.Array:
    """images -> the decoder's input latents [B,h,w,C] (quantised for VQ/FSQ, mean for VAE)."""
    self._check_images(images)
    z_q, _ = self.quantizer(self.enc(images), train=False)
    return z_q

  def decode_latent(self, latents: jax.Array) -> jax.Array:
    """latents [B,h,w,C] -> images [B,H,W,3] float32."""
    self._check_decoder()
    return self.dec(latents)

  def encode(self, images: jax.Array) -> jax.Array:
    """images [B,H,W,3] in [-1, 1] -> codes int32 [B,h,w]."""
    self._check_images(images)
    self._check_discrete("encode")
    _, codes = self.quantizer.quantize(self.enc(images))
    return codes.astype(jnp.int32)

  def decode(self, codes: jax.Array) -> jax.Array:
    """codes int [B,h,w] -> images [B,H,W,3] float32 (not clipped)."""
    self._check_discrete("decode")
    self._check_decoder()
    if codes.ndim != 3:
      raise UserError(f"codes must be [B, h, w] integers, got shape {tuple(codes.shape)}")
    return self.dec(self.quantizer.lookup(codes))

  def codebook(self) -> jax.Array:
    """The codebook [K, code_dim] float32 (FSQ: all implicit codes)."""
    self._check_discrete("codebook")
    return self.quantizer.codebook()


def encode(model: ImageTokenizer, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
  """codes int32 [B,h,w] of images [B,H,W,3] in [-1, 1]."""
  return model.apply(variables, images, method=ImageTokenizer.encode)


def decode(model: ImageTokenizer, variables: Mapping[str, Any], codes: jax.Array) -> jax.Array:
  """images [B,H,W,3] float32 from codes int [B,h,w]."""
  return model.apply(variables, codes, method=ImageTokenizer.decode)


def codebook(model: ImageTokenizer, variables: Mapping[str, Any]) -> jax.Array:
  """The codebook [K, D] float32."""
  return model.apply(variables, method=ImageTokenizer.codebook)
