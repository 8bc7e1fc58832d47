"""A trained image tokenizer loaded for use: `TokenizerRun(workdir)`.

`encode(images uint8 [B, H, W, 3]) -> codes int32 [B, h, w]` and `decode(codes) -> images uint8
[B, H, W, 3]`, both jitted; `codebook() -> float32 [K, D]`. Every bottleneck (continuous ones too)
has `encode_latent` / `decode_latent` / `reconstruct`; a Gaussian (VAE) one also has `posterior`
(mean, log-variance) and `sample_prior`. Only the parameters and the bottleneck's statistics are
read from the checkpoint (no optimizer or discriminator state), on a mesh of the devices present.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm import imaging
from vqlm.errors import UserError
from vqlm.nn.bottlenecks import GaussianBottleneck
from vqlm.nn.image_tokenizer import ImageTokenizer
from vqlm.runs import restore
from vqlm.runs.saved_config import load_config
from vqlm.runtime.config import as_kwargs

STAGE = "tokenizer"


def tokenizer_model(config: ml_collections.ConfigDict) -> ImageTokenizer:
  """The image tokenizer a tokenizer config describes."""
  return ImageTokenizer(**as_kwargs(config.model))


def abstract_variables(model: ImageTokenizer, image_size: int) -> dict[str, Any]:
  """Boxed ShapeDtypeStructs of `model.init` (params and any `batch_stats`); nothing allocated.
  Encoder-only tokenizers (imported without decoder weights) too."""
  rngs = {name: jax.random.key(i) for i, name in enumerate(("params", "sample", "restart"))}
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(rngs, images, method=ImageTokenizer.initialize))


class TokenizerRun:
  """A trained image tokenizer read from its run directory.

  Args:
    workdir: the run directory of `vqlm train --config configs/tokenizer.py ...`.
    step: the checkpoint step to load (default: the newest).
    mesh_shape: the mesh to place parameters on (default: data-parallel over all devices).
  """

  def __init__(
    self, workdir: str, *, step: int | None = None, mesh_shape: dict[str, int] | None = None
  ):
    self.workdir = os.path.abspath(workdir)
    self.config = load_config(workdir)
    if self.config.get("stage") != STAGE:
      raise UserError(
        f"{workdir} is not an image-tokenizer run (stage="
        f"{self.config.get('stage')}); point --tokenizer at a run made with "
        "configs/tokenizer.py"
      )
    self.model = tokenizer_model(self.config)
    self.mesh = restore.inference_mesh(mesh_shape)
    self.rules = self.config.mesh.rules
    boxed = abstract_variables(self.model, self.image_size)
    target = {"params": restore.placed_abstract(boxed["params"], self.mesh, self.rules)}
    if "batch_stats" in boxed:
      target["extra"] = {
        "batch_stats": restore.placed_abstract(boxed["batch_stats"], self.mesh, self.rules)
      }
    self.step, restored = restore.restore_subtree(
      os.path.join(workdir, "checkpoints"), target, step=step
    )
    self.variables = {"params": restored["params"]}
    if "extra" in restored:
      self.variables["batch_stats"] = restored["extra"]["batch_stats"]
    self._encode = jax.jit(lambda v, x: self.model.apply(v, x, method=self.model.encode))
    self._decode = jax.jit(lambda v, c: self.model.apply(v, c, method=self.model.decode))
    self._encode_latent = jax.jit(
      lambda v, x: self.model.apply(v, x, method=self.model.encode_latent)
    )
    self._decode_latent = jax.jit(
      lambda v, z: self.model.apply(v, z, method=self.model.decode_latent)
    )
    self._posterior = jax.jit(lambda v, x: _posterior(self.model, v, x))

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def is_discrete(self) -> bool:
    """Whether the bottleneck gives integer codes (VQ, FSQ) rather than continuous latents."""
    return self.model.codebook_size > 0

  @property
  def has_decoder(self) -> bool:
    """False for a tokenizer imported without decoder weights (it encodes; decode refuses)."""
    return self.model.has_decoder

  @property
  def bottleneck(self) -> str:
    """The bottleneck kind: "identity", "gaussian", "vq" or "fsq"."""
    return self.model.kind

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """`(h, w, C)` of one image's latents (what `encode_latent` gives, `decode_latent` reads)."""
    size = self.image_size
    latents = jax.eval_shape(
      lambda v, x: self.model.apply(v, x, method=self.model.encode_latent),
      self.variables,
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    )
    return tuple(latents.shape[1:])

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 (or float in [-1, 1]) `[B, H, W, 3]` -> int32 codes `[B, h, w]`."""
    return np.asarray(self._encode(self.variables, jnp.asarray(_to_float(images))))

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """int32 codes `[B, h, w]` -> uint8 images `[B, H, W, 3]`."""
    return imaging.to_uint8(np.asarray(self._decode(self.variables, jnp.asarray(codes))))

  def encode_latent(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[B, H, W, 3]` -> float32 latents `[B, h, w, C]` the decoder reads (every bottleneck:
    quantised vectors for VQ/FSQ, the mean for a VAE, the encoder output for an autoencoder)."""
    return np.asarray(self._encode_latent(self.variables, jnp.asarray(_to_float(images))))

  def decode_latent(self, latents: np.ndarray) -> np.ndarray:
    """float32 latents `[B, h, w, C]` -> uint8 images `[B, H, W, 3]`."""
    return imaging.to_uint8(
      np.asarray(self._decode_latent(self.variables, jnp.asarray(latents, jnp.float32)))
    )

  def posterior(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian (VAE) bottlenecks: uint8 `[B, H, W, 3]` -> float32 `(mean, logvar)`, each
    `[B, h, w, C]`, of q(z | x) (the log-variance clipped as the bottleneck clips it)."""
    self._check_gaussian("posterior")
    mean, logvar = self._posterior(self.variables, jnp.asarray(_to_float(images)))
    return np.asarray(mean), np.asarray(logvar)

  def sample_prior(self, num: int, *, seed: int = 0) -> np.ndarray:
    """Gaussian (VAE) bottlenecks: `num` float32 latents `[num, h, w, C]` drawn from the prior
    N(0, I); `decode_latent` turns them into images."""
    self._check_gaussian("sample_prior")
    shape = (num, *self.latent_shape)
    return np.asarray(GaussianBottleneck.sample_prior(jax.random.key(seed), shape))

  def _check_gaussian(self, what: str) -> None:
    if self.bottleneck != "gaussian":
      raise UserError(
        f"{what} needs a Gaussian (VAE) bottleneck, this run's is {self.bottleneck!r}; use "
        "encode_latent / decode_latent"
      )

  def reconstruct(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[B, H, W, 3]` -> uint8 reconstructions (through codes when the bottleneck is
    discrete, through latents otherwise)."""
    if self.is_discrete:
      return self.decode(self.encode(images))
    return self.decode_latent(self.encode_latent(images))

  def codebook(self) -> np.ndarray:
    """float32 `[K, D]`: the code vectors the decoder sees."""
    return np.asarray(self.model.apply(self.variables, method=self.model.codebook))

  @functools.cached_property
  def grid(self) -> tuple[int, int]:
    """`(h, w)` of the code grid (traced once, nothing computed)."""
    size = self.image_size
    codes = jax.eval_shape(
      lambda v, x: self.model.apply(v, x, method=self.model.encode),
      self.variables,
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
    )
    return tuple(codes.shape[1:])

  @property
  def codebook_size(self) -> int:
    """Codes of a discrete bottleneck (the rows of `codebook()`); 0 for a continuous one."""
    return int(self.model.codebook_size)


# The name of the Gaussian bottleneck's Dense that predicts mean and log-variance, and its
# log-variance clip (both as in `vqlm.nn.bottlenecks.GaussianBottleneck`).
_MOMENTS = "moments"
_LOGVAR_RANGE = (-30.0, 20.0)


def _posterior(model: ImageTokenizer, variables: Any, images: jax.Array) -> tuple[jax.Array, ...]:
  """(mean, logvar) float32 of a Gaussian bottleneck: the output of its "moments" Dense, captured
  while the model encodes (the bottleneck itself returns only the mean outside training)."""
  _, state = model.apply(
    variables,
    images,
    method=model.encode_latent,
    capture_intermediates=lambda module, method: module.name == _MOMENTS and method == "__call__",
    mutable=["intermediates"],
  )
  (moments,) = state["intermediates"]["quantizer"][_MOMENTS]["__call__"]
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, *_LOGVAR_RANGE)


def _to_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1]; float images pass through."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images
