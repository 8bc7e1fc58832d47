"""An LPIPS-style perceptual distance through a VGG-like feature network loaded from .npz.

Weight file format (a flat `numpy.savez` archive; VGG16 + LPIPS converts to it one to one):
  "stage{s}.conv{j}.kernel"  float [3, 3, C_in, C_out]   (HWIO)
  "stage{s}.conv{j}.bias"    float [C_out]
  "lin{s}"                   optional float [C_s] >= 0: per-channel weights of stage s
                             (LPIPS "lin" layers); default all ones
  "input_shift", "input_scale"  optional float [3]: inputs in [-1, 1] become (x - shift) / scale;
                             default the LPIPS scaling layer's values
Stages s = 0, 1, ... each run their 3x3 convs (zero padding 1, ReLU after every conv); stage
s > 0 starts with a 2x2 stride-2 max-pool that floors odd sizes like torch's MaxPool2d (a side of
1 stays 1). The ReLU output of each stage's last conv is a tapped feature map (VGG16: the relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3 taps).

Distance (per image): sum over stages of the spatial mean of sum_c lin_c * (f1_c - f2_c)^2, where
f1, f2 are the feature maps unit-normalised over channels. Zero for identical images, symmetric.
With VGG16 + the LPIPS heads (`python -m vqlm.interop.lpips`) this is `lpips.LPIPS(net="vgg")`'s
forward on inputs in [-1, 1].
"""

from collections.abc import Mapping, Sequence
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from vqlm.errors import UserError

# The LPIPS scaling layer (lpips.ScalingLayer): inputs in [-1, 1] -> (x - shift) / scale.
LPIPS_SHIFT = np.asarray([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.asarray([0.458, 0.448, 0.450], np.float32)
_CONV_KEY = re.compile(r"stage(\d+)\.conv(\d+)\.(kernel|bias)$")
FLAG = "--config.loss.perceptual_weights_path"

FeatureWeights = Mapping[str, jax.Array]


def _structure(weights: Mapping[str, np.ndarray]) -> list[int]:
  """Number of convs per stage, checking the keys form stages 0..S-1 and convs 0..J-1."""
  convs: dict[int, set[int]] = {}
  for key in weights:
    m = _CONV_KEY.match(key)
    if m:
      convs.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  if not convs or sorted(convs) != list(range(len(convs))):
    raise UserError("feature weights need keys 'stage{s}.conv{j}.kernel/bias' for stages 0..S-1")
  out = []
  for s in range(len(convs)):
    if sorted(convs[s]) != list(range(len(convs[s]))):
      raise UserError(f"feature weights: stage {s} convs are not numbered 0..J-1")
    for j in convs[s]:
      for part in ("kernel", "bias"):
        if f"stage{s}.conv{j}.{part}" not in weights:
          raise UserError(f"feature weights: missing 'stage{s}.conv{j}.{part}'")
    out.append(len(convs[s]))
  return out


def load_feature_weights(path: str) -> dict[str, jax.Array]:
  """Reads and checks a feature-network .npz (format in the module docstring)."""
  if not path or not os.path.isfile(path):
    raise UserError(
      f"perceptual feature weights not found at {path!r}: set {FLAG} to a .npz "
      "of feature-net weights, or set --config.loss.perceptual_weight=0"
    )
  with np.load(path) as data:
    weights = {k: np.asarray(data[k], np.float32) for k in data.files}
  _structure(weights)
  return {k: jnp.asarray(v) for k, v in weights.items()}


def save_feature_weights(path: str, weights: Mapping[str, np.ndarray]) -> None:
  """Writes weights in the .npz format `load_feature_weights` reads."""
  _structure(weights)
  np.savez(path, **{k: np.asarray(v, np.float32) for k, v in weights.items()})


def random_feature_weights(
  seed: int, stage_channels: Sequence[int] = (16, 32), convs_per_stage: int = 2
) -> dict[str, np.ndarray]:
  """He-initialised random weights (for tests and as a weak stand-in for a trained net)."""
  rng = np.random.default_rng(seed)
  weights, c_in = {}, 3
  for s, c_out in enumerate(stage_channels):
    for j in range(convs_per_stage):
      fan_in = 9 * c_in
      weights[f"stage{s}.conv{j}.kernel"] = (
        rng.normal(size=(3, 3, c_in, c_out)) * np.sqrt(2.0 / fan_in)
      ).astype(np.float32)
      weights[f"stage{s}.conv{j}.bias"] = np.zeros((c_out,), np.float32)
      c_in = c_out
  return weights


def feature_maps(weights: FeatureWeights, images: jax.Array) -> list[jax.Array]:
  """The tapped feature maps (float32 [B, h_s, w_s, C_s], one per stage) of images in [-1, 1]."""
  shift = jnp.asarray(weights.get("input_shift", LPIPS_SHIFT), jnp.float32)
  scale = jnp.asarray(weights.get("input_scale", LPIPS_SCALE), jnp.float32)
  h = (images.astype(jnp.float32) - shift) / scale
  taps = []
  for s, n_convs in enumerate(_structure(weights)):
    if s > 0:
      h = _max_pool_2x2(h)
    for j in range(n_convs):
      h = jax.lax.conv_general_dilated(
        h,
        weights[f"stage{s}.conv{j}.kernel"].astype(jnp.float32),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      h = jax.nn.relu(h + weights[f"stage{s}.conv{j}.bias"].astype(jnp.float32))
    taps.append(h)
  return taps


def _max_pool_2x2(h: jax.Array) -> jax.Array:
  """2x2 stride-2 max pool of `[B, H, W, C]` -> `[B, H // 2, W // 2, C]` (torch's floor; a side
  of 1 stays 1, where torch would fail)."""
  pad = [(0, 0)] + [(0, 1 if n == 1 else 0) for n in h.shape[1:3]] + [(0, 0)]
  return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), pad)


def _unit(f: jax.Array, eps: float = 1e-20) -> jax.Array:
  # max() instead of sqrt(x) + eps keeps gradients finite where a feature vector is all zero.
  return f * jax.lax.rsqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), eps))


def perceptual_distance(weights: FeatureWeights, x: jax.Array, y: jax.Array) -> jax.Array:
  """LPIPS-style distance per image, float32 [B]; x, y: [B, H, W, 3] in [-1, 1]."""
  fx, fy = feature_maps(weights, x), feature_maps(weights, y)
  total = jnp.zeros((x.shape[0],), jnp.float32)
  for s, (a, b) in enumerate(zip(fx, fy)):
    lin = jnp.asarray(weights.get(f"lin{s}", np.ones((a.shape[-1],), np.float32)), jnp.float32)
    d = jnp.sum(lin * (_unit(a) - _unit(b)) ** 2, axis=-1)
    total = total + jnp.mean(d, axis=(1, 2))
  return total


def perceptual_loss(weights: FeatureWeights, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean perceptual distance over the batch, float32 scalar."""
  return jnp.mean(perceptual_distance(weights, x, y))
