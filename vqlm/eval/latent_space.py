"""The latent space of a trained image tokenizer: neighbours, interpolation, attributes, samples.

`LatentSpace(run)` wraps any `TokenizerRun` (autoencoder, VAE, VQ, FSQ). Its latents are
float32 `[N, h, w, C]`:

- continuous bottlenecks: what the decoder reads (`run.encode_latent`: the encoder output of an
  autoencoder, the posterior mean of a VAE), decoded by `run.decode_latent`;
- discrete bottlenecks (VQ, FSQ): the encoder output *before* quantisation, so that points between
  two images exist; `decode` quantises them (the run's own nearest-code / rounding) and decodes.

Tools (images are uint8 `[N, H, W, 3]` at the run's size):

    space = LatentSpace(vqlm.load("runs/tok"))
    space.neighbors(queries, pool, k=5)      # Neighbors(indices int32 [Q, k], distances [Q, k])
    space.interpolate(a, b, num=8)           # uint8 [8, H, W, 3], a's and b's reconstructions
    vector = space.attribute_vector(with_, without)   # float32 [h, w, C]: the mean difference
    space.attribute(queries, vector, strength=1.0)    # uint8 [Q, H, W, 3]
    # Or over regions (e.g. each image's object): a [C] vector added where `masks` are set.
    vector = space.attribute_vector(with_, without, with_masks=mw, without_masks=mo)
    space.attribute(queries, vector, strength=2.0, masks=space.region_masks(pixel_masks))
    space.sample(16, seed=0, reference=images)        # uint8 [16, H, W, 3]

`image_set(run, split=..., folder=...)` reads a data split of the run's data set (or a folder) and
`ImageSet.select("caption:red")` / `select("0,3,5-9")` picks groups of it. Every batch goes through
the model padded to `batch_size`, so an image's latent does not depend on the batch it is in (a
pool image is its own neighbour at distance exactly 0). Distances are float32.
"""

from collections.abc import Callable
import dataclasses
import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vqlm import imaging
from vqlm.errors import UserError, check_int

_F32 = np.float32
# Elements of the [q, N, C] difference array `nearest` builds per chunk of queries.
_CHUNK_ELEMENTS = 1 << 24


class Neighbors(NamedTuple):
  """The k nearest pool entries of each query: `indices` int32 `[Q, k]` (nearest first, ties to
  the lower index) and their L2 `distances` float32 `[Q, k]`."""

  indices: np.ndarray
  distances: np.ndarray


def nearest(queries: np.ndarray, pool: np.ndarray, k: int) -> Neighbors:
  """Brute-force k nearest neighbours by float32 L2 distance: queries `[Q, C]`, pool `[N, C]`.

  Distances are `sqrt(sum((q - p)^2))` of the differences (not the expanded `|q|^2 - 2 q.p + |p|^2`
  form), so a query equal to a pool row is at distance exactly 0.
  """
  queries, pool = np.asarray(queries, _F32), np.asarray(pool, _F32)
  if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
    raise UserError(f"queries [Q, C] and pool [N, C] must match, got {queries.shape}, {pool.shape}")
  n = pool.shape[0]
  if n == 0:
    raise UserError("the image set is empty; nothing to search")
  k = check_int("k", k)
  if k > n:
    raise UserError(f"k={k} is larger than the set of {n} images; pass k <= {n}")
  chunk = max(1, _CHUNK_ELEMENTS // max(1, n * pool.shape[1]))
  indices, distances = [], []
  for start in range(0, queries.shape[0], chunk):
    diff = queries[start : start + chunk, None, :] - pool[None, :, :]
    dist = np.sqrt(np.sum(np.square(diff), axis=-1, dtype=_F32), dtype=_F32)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    indices.append(order.astype(np.int32))
    distances.append(np.take_along_axis(dist, order, axis=1))
  if not indices:
    return Neighbors(np.zeros((0, k), np.int32), np.zeros((0, k), _F32))
  return Neighbors(np.concatenate(indices), np.concatenate(distances))


def _pre_quantization(module: Any, images: jax.Array) -> jax.Array:
  """The encoder output `[B, h, w, D]` (what a VQ/FSQ bottleneck quantises)."""
  return module.enc(images)


def _quantize_decode(module: Any, latents: jax.Array) -> jax.Array:
  """Pre-quantisation latents -> quantised (nearest code / FSQ rounding) -> images float32."""
  z_q, _ = module.quantizer.quantize(latents)
  return module.dec(z_q)


def _code_space(module: Any, images: jax.Array) -> jax.Array:
  """Encoder outputs where the bottleneck compares them with its codebook `[B, h, w, code_dim]`:
  VQ after its in-projection (and l2-normalisation); FSQ after its projection and bound, scaled
  as its codebook is (to [-1, 1])."""
  q = module.quantizer
  z = module.enc(images)
  if module.kind == "vq":
    return q._to_code_space(z)  # noqa: SLF001
  if q._project:  # noqa: SLF001
    z = q.proj_in(z)
  return q._bound(z.astype(jnp.float32)) / q._consts()[1]  # noqa: SLF001


# Jitted functions per model config, shared by every LatentSpace of that model (another
# checkpoint of a run, another `vqlm latent` call in the same process): nothing recompiles.
_COMPILED: dict[str, tuple[Callable, ...]] = {}
_MAX_COMPILED = 8


def _compiled(run: Any) -> tuple[Callable, ...]:
  """(latents, decode, decode_codes, code_space), each `fn(variables, batch)`, jitted."""
  key = json.dumps(run.config.model.to_dict(), sort_keys=True, default=str)
  if key not in _COMPILED:
    model = run.model
    if run.is_discrete:
      latents = lambda v, x: model.apply(v, x, method=_pre_quantization)
      decode = lambda v, z: model.apply(v, z, method=_quantize_decode)
    else:
      latents = lambda v, x: model.apply(v, x, method=model.encode_latent)
      decode = lambda v, z: model.apply(v, z, method=model.decode_latent)
    codes = lambda v, c: model.apply(v, c, method=model.decode)
    space = lambda v, x: model.apply(v, x, method=_code_space)
    if len(_COMPILED) >= _MAX_COMPILED:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = tuple(jax.jit(fn) for fn in (latents, decode, codes, space))
  return _COMPILED[key]


class LatentSpace:
  """Latent-space tools of a loaded `TokenizerRun` (see the module docstring).

  Args:
    run: a `vqlm.runs.TokenizerRun` (any bottleneck).
    batch_size: images (or latents) per model call; every call is padded to this size.
  """

  def __init__(self, run: Any, *, batch_size: int = 32):
    self.run = run
    self.batch_size = check_int("batch_size", batch_size)
    self._latents, self._decode, self._decode_codes, self._code_space = _compiled(run)

  @property
  def kind(self) -> str:
    """The run's bottleneck: "identity", "gaussian", "vq" or "fsq"."""
    return self.run.bottleneck

  def _check_images(self, images: np.ndarray, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    size = self.run.image_size
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
      raise UserError(
        f"{what} must be uint8 [N, {size}, {size}, 3] (the run's image size), got "
        f"{images.dtype} {tuple(images.shape)}"
      )
    return images

  def _batched(self, fn: Callable, inputs: np.ndarray) -> np.ndarray:
    """`fn(variables, batch)` over `inputs` [N, ...] in batches padded to `batch_size`."""
    if inputs.shape[0] == 0:
      raise UserError("no images (or latents) given")
    b = self.batch_size
    outs = []
    for start in range(0, inputs.shape[0], b):
      chunk = inputs[start : start + b]
      pad = b - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      out = np.asarray(fn(self.run.variables, jnp.asarray(chunk)))
      outs.append(out[: b - pad])
    return np.concatenate(outs)

  def latents(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[N, H, W, 3]` -> float32 latents `[N, h, w, C]` (pre-quantisation for VQ/FSQ)."""
    images = self._check_images(images)
    return self._batched(self._latents, images.astype(_F32) / 127.5 - 1.0).astype(_F32)

  def pooled(self, images: np.ndarray) -> np.ndarray:
    """float32 `[N, C]`: each image's latents averaged over the grid."""
    return self.latents(images).mean(axis=(1, 2), dtype=_F32)

  def code_space(self, images: np.ndarray) -> np.ndarray:
    """VQ/FSQ: float32 `[N, h, w, code_dim]`, the encoder outputs where the nearest-code search
    sees them (the space of `run.codebook()`; what `vqlm.eval.voronoi` draws)."""
    if not self.run.is_discrete:
      raise UserError(f"code_space needs a VQ or FSQ run, this one's bottleneck is {self.kind!r}")
    images = self._check_images(images)
    return self._batched(self._code_space, images.astype(_F32) / 127.5 - 1.0).astype(_F32)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """float32 latents `[N, h, w, C]` -> uint8 images `[N, H, W, 3]` (quantised first for
    VQ/FSQ)."""
    latents = np.asarray(latents, _F32)
    return imaging.to_uint8(self._batched(self._decode, latents))

  def neighbors(self, queries: np.ndarray, pool: np.ndarray, *, k: int = 5) -> Neighbors:
    """The `k` pool images nearest to each query by the L2 distance of pooled latents.

    queries uint8 `[Q, H, W, 3]`, pool uint8 `[N, H, W, 3]` -> `Neighbors` (`[Q, k]` each)."""
    if len(np.asarray(pool)) < 1:
      raise UserError("the image set is empty; nothing to search")
    return nearest(self.pooled(queries), self.pooled(pool), k)

  def interpolate(self, a: np.ndarray, b: np.ndarray, *, num: int = 8) -> np.ndarray:
    """`num` images decoded from `(1 - t) z_a + t z_b`, t from 0 to 1: uint8 `[num, H, W, 3]`.

    a, b: uint8 `[H, W, 3]` (or `[1, H, W, 3]`). The first and last frames are a's and b's
    reconstructions."""
    num = check_int("num", num, minimum=2)
    z = self.latents(np.concatenate([self._check_images(a, "a"), self._check_images(b, "b")]))
    if z.shape[0] != 2:
      raise UserError(f"interpolate takes one image a and one image b, got {z.shape[0]} in all")
    t = np.linspace(0.0, 1.0, num, dtype=_F32)[:, None, None, None]
    return self.decode((1.0 - t) * z[0] + t * z[1])

  def region_masks(self, pixel_masks: np.ndarray) -> np.ndarray:
    """bool `[N, h, w]`: the latent positions whose `factor x factor` patch holds any pixel of
    `pixel_masks` (bool `[N, H, W]`, e.g. the pixels of an object)."""
    pixel_masks = np.asarray(pixel_masks, bool)
    n, height, width = pixel_masks.shape
    h, w = self.run.latent_shape[:2]
    if height % h or width % w:
      raise UserError(f"masks of {height}x{width} pixels do not tile this run's {h}x{w} latents")
    blocks = pixel_masks.reshape(n, h, height // h, w, width // w)
    return blocks.any(axis=(2, 4))

  def attribute_vector(
    self,
    with_images: np.ndarray,
    without_images: np.ndarray,
    *,
    with_masks: np.ndarray | None = None,
    without_masks: np.ndarray | None = None,
  ) -> np.ndarray:
    """The mean latent of `with_images` minus that of `without_images` (each uint8
    `[N, H, W, 3]`): float32 `[h, w, C]`, position by position; or, given masks (bool
    `[N, h, w]`, e.g. `region_masks` of each image's object), float32 `[C]`: the mean over the
    masked positions of each group, so objects anywhere in the image add to one vector."""
    if (with_masks is None) != (without_masks is None):
      raise UserError("give masks for both groups of an attribute, or for neither")
    groups = []
    sides = ((with_images, with_masks, "with_images"), (without_images, without_masks, "without"))
    for images, masks, what in sides:
      images = self._check_images(images, what)
      if images.shape[0] == 0:
        raise UserError(f"{what} is empty; an attribute needs images on both sides")
      z = self.latents(images)
      if masks is None:
        groups.append(z.mean(axis=0, dtype=_F32))
        continue
      masks = np.asarray(masks, bool)
      if masks.shape != z.shape[:3]:
        raise UserError(f"{what}: masks of shape {masks.shape}, latents {z.shape[:3]}")
      if not masks.any():
        raise UserError(f"{what}: the masks select no latent position")
      groups.append(z[masks].mean(axis=0, dtype=_F32))
    return (groups[0] - groups[1]).astype(_F32)

  def attribute(
    self,
    queries: np.ndarray,
    vector: np.ndarray,
    *,
    strength: float = 1.0,
    masks: np.ndarray | None = None,
  ) -> np.ndarray:
    """uint8 `[Q, H, W, 3]`: each query's latent plus `strength * vector` (`[h, w, C]`, or
    `[C]` at every position), decoded; with `masks` (bool `[Q, h, w]`) only where they are
    set."""
    z = self.latents(queries)
    vector = np.asarray(vector, _F32)
    if vector.shape not in (z.shape[1:], z.shape[-1:]):
      raise UserError(
        f"attribute vector has shape {vector.shape}; this run's latents are {z.shape[1:]}"
      )
    step = _F32(strength) * np.broadcast_to(vector, z.shape)
    if masks is not None:
      masks = np.asarray(masks, bool)
      if masks.shape != z.shape[:3]:
        raise UserError(f"masks of shape {masks.shape}; the queries' latents are {z.shape[:3]}")
      step = step * masks[..., None]
    return self.decode(z + step)

  def latent_statistics(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 per-channel `(mean [C], std [C])` of the latents of `images`, over images and
    positions."""
    z = self.latents(images).astype(np.float64)
    flat = z.reshape(-1, z.shape[-1])
    if flat.shape[0] == 0:
      raise UserError("no reference images to match latent statistics to")
    return flat.mean(0).astype(_F32), flat.std(0).astype(_F32)

  def random_latents(
    self, num: int, *, seed: int = 0, reference: np.ndarray | None = None
  ) -> np.ndarray:
    """Continuous bottlenecks: float32 `[num, h, w, C]` latents drawn without an input image.
    VAE: the prior N(0, I); autoencoder: Gaussian noise with the per-channel mean and std of the
    latents of `reference` (uint8 images, e.g. training images; required)."""
    num = check_int("num", num)
    if self.kind == "gaussian":
      return self.run.sample_prior(num, seed=seed)
    if self.kind != "identity":
      raise UserError(f"random_latents is for continuous runs; this one is {self.kind!r}")
    if reference is None:
      raise UserError("an autoencoder has no prior: pass reference images to match latents to")
    mean, std = self.latent_statistics(reference)
    noise = np.random.default_rng(seed).standard_normal((num, *self.run.latent_shape))
    return (mean + std * noise).astype(_F32)

  def random_codes(self, num: int, *, seed: int = 0) -> np.ndarray:
    """VQ/FSQ: int32 `[num, h, w]` codes drawn uniformly from the codebook."""
    num = check_int("num", num)
    if not self.run.is_discrete:
      raise UserError(f"random_codes needs a VQ or FSQ run; this one is {self.kind!r}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, self.run.codebook_size, (num, *self.run.grid)).astype(np.int32)

  def sample(self, num: int, *, seed: int = 0, reference: np.ndarray | None = None) -> np.ndarray:
    """uint8 `[num, H, W, 3]` decoded from random points: autoencoder, Gaussian latents matched to
    `reference`'s latents; VAE, the prior; VQ/FSQ, uniformly random codes. The same `seed` gives
    the same images."""
    if self.run.is_discrete:
      return imaging.to_uint8(self._batched(self._decode_codes, self.random_codes(num, seed=seed)))
    return self.decode(self.random_latents(num, seed=seed, reference=reference))


@dataclasses.dataclass
class ImageSet:
  """Images with their captions: `images` uint8 `[N, H, W, 3]`, `texts` N strings, `where` the
  split or folder they came from."""

  images: np.ndarray
  texts: list[str]
  where: str = ""

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def indices(self, spec: str) -> np.ndarray:
    """int `[M]` indices a group spec names: "caption:TEXT" (captions containing TEXT, any case)
    or indices and ranges, "0,3,5-9"."""
    spec = str(spec).strip()
    n = len(self)
    if spec.lower().startswith("caption:"):
      text = spec.split(":", 1)[1].strip().lower()
      picked = [i for i, t in enumerate(self.texts) if text in t.lower()]
      if not picked:
        raise UserError(f"no caption of the {n} images of {self.where} contains {text!r}")
      return np.asarray(picked, np.int64)
    if not re.fullmatch(r"\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*", spec):
      raise UserError(
        f"{spec!r} is not a group: pass caption:TEXT, indices such as 0,3,5-9, or a folder"
      )
    picked = []
    for part in spec.split(","):
      first, _, last = part.strip().partition("-")
      lo, hi = int(first), int(last or first)
      if hi < lo or hi >= n:
        raise UserError(f"index {part.strip()} is outside the {n} images of {self.where}")
      picked.extend(range(lo, hi + 1))
    return np.asarray(picked, np.int64)

  def select(self, spec: str) -> np.ndarray:
    """uint8 `[M, H, W, 3]`: the images `indices(spec)` names."""
    return self.images[self.indices(spec)]


def image_set(
  run: Any, *, split: str = "train", folder: str | None = None, num: int | None = 256
) -> ImageSet:
  """The first `num` images (None: all) of a split of the run's data set, or of an image folder
  (every image under it, resized and centre-cropped to the run's size)."""
  from vqlm.data.sources import FolderSource, source_from_config

  if num is not None:
    num = check_int("num", num)
  if folder:
    if not os.path.isdir(folder):
      raise UserError(f"image folder {folder} does not exist or is not a directory")
    source = FolderSource(folder, split="all", image_size=run.image_size)
    where = folder
  else:
    try:
      source = source_from_config(run.config.data, split)
    except UserError:
      raise
    except ValueError as e:  # A split the data set does not have.
      lines = str(e).strip().splitlines()
      raise UserError(
        f"split {split!r} of {run.config.data.name}: {lines[0] if lines else e}"
      ) from None
    where = f"{run.config.data.name}/{split}"
  n = len(source) if num is None else min(num, len(source))
  if n == 0:
    raise UserError(f"{where} has no images")
  items = [source[i] for i in range(n)]
  images = np.stack([item["image"] for item in items]).astype(np.uint8)
  return ImageSet(images, [str(item.get("text", "")) for item in items], where)


def group(run: Any, spec: str, images: ImageSet) -> np.ndarray:
  """uint8 `[M, H, W, 3]`: a folder (when `spec` is a directory) or `images.select(spec)`."""
  if os.path.isdir(str(spec)):
    return image_set(run, folder=str(spec), num=None).images
  return images.select(spec)
