"""Inception-v3 feature extractor of FID (pool3, 2048-d) in flax.linen, weights from a `.npz`.

The architecture is the one pytorch-fid uses (`fid_inception_v3`: the TensorFlow FID graph):
torchvision's Inception-v3 trunk with the FID patches, i.e. the average pools inside Mixed_5*,
Mixed_6b..e and Mixed_7b exclude the zero padding from the mean (`count_include_pad=False`), and
Mixed_7c's pool branch is a 3x3 MAX pool. No classifier, no aux head. Every conv is a "BasicConv":
conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

Input `x[B, H, W, 3]` float in [-1, 1] with H, W >= 75 (FID uses 299, see `preprocess`);
output `[B, 2048]`, the spatial mean of Mixed_7c.

Weight file (a flat `numpy.savez` archive, float32); per BasicConv named P:
  "P/conv/kernel"  [kh, kw, C_in, C_out]   (HWIO; torch's [C_out, C_in, kh, kw] transposed)
  "P/bn/scale"     [C_out]                 (torch bn.weight)
  "P/bn/bias"      [C_out]                 (torch bn.bias)
  "P/bn/mean"      [C_out]                 (torch bn.running_mean)
  "P/bn/var"       [C_out]                 (torch bn.running_var)
P is the torch module path with "/" for ".": the stem convs "Conv2d_1a_3x3" [3x3, 3->32, stride 2],
"Conv2d_2a_3x3" [3x3, 32->32], "Conv2d_2b_3x3" [3x3, 32->64, pad 1], "Conv2d_3b_1x1" [1x1, 64->80],
"Conv2d_4a_3x3" [3x3, 80->192]; then "<block>/<branch>" for the blocks
  Mixed_5b/5c/5d (A; in 192/256/288, pool features 32/64/64): branch1x1, branch5x5_1, branch5x5_2,
      branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3, branch_pool
  Mixed_6a (B; in 288): branch3x3, branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3
  Mixed_6b/6c/6d/6e (C; in 768, c7 = 128/160/160/192): branch1x1, branch7x7_1..3,
      branch7x7dbl_1..5, branch_pool
  Mixed_7a (D; in 768): branch3x3_1, branch3x3_2, branch7x7x3_1..4
  Mixed_7b/7c (E; in 1280/2048): branch1x1, branch3x3_1, branch3x3_2a, branch3x3_2b,
      branch3x3dbl_1, branch3x3dbl_2, branch3x3dbl_3a, branch3x3dbl_3b, branch_pool
e.g. "Mixed_7c/branch_pool/conv/kernel" is [1, 1, 2048, 192]. 94 BasicConvs, 470 arrays,
21,785,568 parameters besides the BatchNorm statistics. `export_param_names()` lists every name
with its shape.

Converting the pytorch-fid weights (pt_inception-2015-12-05-6726825d.pth; a .safetensors of the
same state dict needs no torch):
  python -m vqlm.interop.fid_inception pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz
then pass `vqlm eval --inception_weights inception_fid.npz`. Nothing here downloads anything. The
features match pytorch-fid's `InceptionV3([3])` to ~1e-5 (tests/test_interop_metrics.py).
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlm.errors import UserError

FLAG = "--inception_weights"
IMAGE_SIZE = 299
MIN_SIZE = 75
FEATURE_DIM = 2048
_STATS = ("mean", "var")
_TORCH_SUFFIX = {
  "conv.weight": "conv/kernel",
  "bn.weight": "bn/scale",
  "bn.bias": "bn/bias",
  "bn.running_mean": "bn/mean",
  "bn.running_var": "bn/var",
}
_TORCH_SKIP = ("fc.", "AuxLogits.")

Variables = dict[str, dict]


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; `[B, H, W, C] -> [B, h, w, F]`."""

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=jax.lax.Precision.HIGHEST,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 stride-1 mean over the unpadded neighbours (TensorFlow's / FID's average pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """FIDInceptionA: `[B, H, W, C] -> [B, H, W, 224 + pool_features]`."""

  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction (Mixed_6a): `[B, H, W, C] -> [B, (H-3)//2+1, (W-3)//2+1, 480 + C]`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (factorised 7x7): `[B, H, W, C] -> [B, H, W, 768]`."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction (Mixed_7a): `[B, H, W, C] -> [B, (H-3)//2+1, (W-3)//2+1, 512 + C]`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool="avg"), FIDInceptionE_2 (pool="max"): [B, H, W, C] -> [B, H, W, 2048]."""

  pool: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool not in ("avg", "max"):
      raise UserError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3 to pool3: `x[B, H, W, 3]` in [-1, 1] (H, W >= 75) -> float32 `[B, 2048]`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_SIZE:
      raise UserError(
        f"InceptionV3 needs x[B, H, W, 3] with H, W >= {MIN_SIZE} (resize with "
        f"vqlm.nn.inception.preprocess), got {list(x.shape)}"
      )
    x = x.astype(jnp.float32)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def preprocess(images: jax.Array, *, image_size: int = IMAGE_SIZE) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32 `[B, S, S, 3]` in [-1, 1], bilinear resize to S = 299.

  Matches pytorch-fid (`F.interpolate(bilinear, align_corners=False)` on x / 255, then 2x - 1):
  half-pixel centres, no antialiasing.
  """
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise UserError(
      "Inception input must be uint8[B, H, W, 3] (convert with np.clip(x, 0, 255)"
      f".astype(np.uint8)), got {images.dtype}{list(images.shape)}"
    )
  x = images.astype(jnp.float32) / 255.0
  x = jax.image.resize(
    x, (x.shape[0], image_size, image_size, 3), method="bilinear", antialias=False
  )
  return 2.0 * x - 1.0


def init_inception_params(seed: int = 0) -> Variables:
  """Random variables `{"params", "batch_stats"}` with the FID net's shapes (tests, benchmarks).

  Kernels LeCun-normal (flax's default); BatchNorm scale, bias, mean, var drawn around the
  identity (scale, var in [0.5, 1.5]; bias, mean ~ N(0, 0.1^2)) so every array matters. NumPy,
  not `jax.jit(init)`, which takes ~45 s to compile on 2 CPU cores.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in export_param_names().items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    flat[name] = value.astype(np.float32)
  return unflatten_variables(flat)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    out.update(_flatten(v, name) if isinstance(v, Mapping) else {name: v})
  return out


def flatten_variables(variables: Mapping) -> dict[str, np.ndarray]:
  """`{"params", "batch_stats"}` -> flat `{"Conv2d_1a_3x3/conv/kernel": array, ...}`, sorted."""
  flat = {}
  for collection in ("params", "batch_stats"):
    flat.update({k: np.asarray(v) for k, v in _flatten(variables.get(collection, {})).items()})
  return dict(sorted(flat.items()))


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> Variables:
  """Inverse of `flatten_variables`: names ending in bn/mean or bn/var go to "batch_stats"."""
  variables: Variables = {"params": {}, "batch_stats": {}}
  for name, value in flat.items():
    parts = name.split("/")
    node = variables["batch_stats" if parts[-1] in _STATS else "params"]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return variables


def export_param_names(variables: Mapping | None = None) -> dict[str, tuple[int, ...]]:
  """Every weight-file name with its shape, sorted (of `variables`, default the expected ones)."""
  if variables is None:
    return dict(_expected_names())
  flat = _flatten(variables.get("params", {})) | _flatten(variables.get("batch_stats", {}))
  return {k: tuple(int(d) for d in flat[k].shape) for k in sorted(flat)}


@functools.lru_cache(maxsize=1)
def _expected_names() -> dict[str, tuple[int, ...]]:
  shapes = jax.eval_shape(
    InceptionV3().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32),
  )
  return export_param_names(shapes)


def save_inception_params(path: str, variables: Mapping) -> None:
  """Writes `variables` as the flat float32 `.npz` that `load_inception_params` reads."""
  np.savez(path, **{k: v.astype(np.float32) for k, v in flatten_variables(variables).items()})


def load_inception_params(path: str | os.PathLike | None) -> Variables:
  """Reads and checks a weight `.npz` (names and shapes in the module docstring) -> variables."""
  if not path or not os.path.isfile(path):
    raise UserError(
      f"Inception weights not found at {str(path)!r}: pass {FLAG} PATH.npz "
      "(FID Inception-v3 weights; see vqlm.nn.inception for the format)"
    )
  with np.load(path) as data:
    flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  expected = export_param_names()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise UserError(
      f"Inception weights {str(path)!r}: {len(missing)} missing names (first: "
      f"{missing[:3]}), {len(extra)} unexpected (first: {extra[:3]}); names are "
      "listed by vqlm.nn.inception.export_param_names()"
    )
  for name, shape in expected.items():
    if flat[name].shape != shape:
      raise UserError(
        f"Inception weights {str(path)!r}: {name!r} has shape "
        f"{list(flat[name].shape)}, expected {list(shape)}"
      )
  return jax.tree.map(jnp.asarray, unflatten_variables(flat))


def from_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid / torchvision Inception-v3 state dict (NumPy arrays) -> weight-file dict.

  "Mixed_5b.branch1x1.conv.weight" [O, I, kh, kw] -> "Mixed_5b/branch1x1/conv/kernel"
  [kh, kw, I, O];
  bn.weight/bias/running_mean/running_var -> bn/scale/bias/mean/var. The classifier ("fc.*"), the
  aux head ("AuxLogits.*") and "num_batches_tracked" are dropped.
  """
  out = {}
  for key, value in state_dict.items():
    if key.startswith(_TORCH_SKIP) or key.endswith("num_batches_tracked"):
      continue
    module, _, suffix = key.rpartition(".")
    module, _, layer = module.rpartition(".")
    target = _TORCH_SUFFIX.get(f"{layer}.{suffix}")
    if target is None or not module:
      raise UserError(
        f"unexpected Inception state-dict key {key!r} (expected '<module>.conv"
        ".weight' or '<module>.bn.{weight,bias,running_mean,running_var}')"
      )
    value = np.asarray(value, np.float32)
    if target == "conv/kernel":
      value = value.transpose(2, 3, 1, 0)
    out[f"{module.replace('.', '/')}/{target}"] = value
  return out
