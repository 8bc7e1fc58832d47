import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn import inception

# torchvision's inception_v3 has 27,161,264 parameters; minus its 1000-way classifier (2,049,000)
# and aux head (3,326,696) that leaves the FID trunk (running BatchNorm statistics not counted).
TRUNK_PARAMS = 21_785_568


def _random_variables(module, x, seed=0):
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key == "kernel":
      return rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    if path[-1].key in ("scale", "var"):
      return rng.uniform(0.5, 1.5, s.shape)
    return 0.1 * rng.standard_normal(s.shape)

  return jax.tree_util.tree_map_with_path(lambda p, s: draw(p, s).astype(np.float32), shapes)


def _np_conv(x, kernel, stride=1, pad=(0, 0)):
  ph, pw = pad
  x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  kh, kw = kernel.shape[:2]
  h = (x.shape[1] - kh) // stride + 1
  w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride]
      out += np.einsum("bhwc,co->bhwo", patch, kernel[i, j])
  return out


def _np_basic(x, variables, name, stride=1, pad=(0, 0)):
  p, s = variables["params"][name], variables["batch_stats"][name]["bn"]
  y = _np_conv(x, p["conv"]["kernel"], stride, pad)
  y = (y - s["mean"]) / np.sqrt(s["var"] + 1e-3) * p["bn"]["scale"] + p["bn"]["bias"]
  return np.maximum(y, 0.0)


def _np_pool_3x3(x, kind):
  """3x3 stride-1 pool with padding 1: mean over in-image neighbours only, or max."""
  fill = -np.inf if kind == "max" else 0.0
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
  ones = np.pad(np.ones(x.shape[1:3]), 1)
  h, w = x.shape[1:3]
  windows = [xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]
  if kind == "max":
    return np.max(windows, axis=0)
  counts = sum(ones[i : i + h, j : j + w] for i in range(3) for j in range(3))
  return sum(windows) / counts[None, :, :, None]


def test_param_names_shapes_and_count():
  names = inception.export_param_names()
  assert len(names) == 470
  assert sum(k.endswith("/conv/kernel") for k in names) == 94
  assert (
    sum(int(np.prod(s)) for k, s in names.items() if not k.endswith(("/mean", "/var")))
    == TRUNK_PARAMS
  )
  assert names["Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert names["Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert names["Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
  assert names["Mixed_7c/branch_pool/bn/var"] == (192,)


def test_block_a_matches_numpy_reference():
  x = np.random.default_rng(1).standard_normal((2, 5, 6, 8)).astype(np.float32)
  block = inception.InceptionA(pool_features=16)
  v = _random_variables(block, x)
  got = block.apply(v, x)
  ref = np.concatenate(
    [
      _np_basic(x, v, "branch1x1"),
      _np_basic(_np_basic(x, v, "branch5x5_1"), v, "branch5x5_2", pad=(2, 2)),
      _np_basic(
        _np_basic(_np_basic(x, v, "branch3x3dbl_1"), v, "branch3x3dbl_2", pad=(1, 1)),
        v,
        "branch3x3dbl_3",
        pad=(1, 1),
      ),
      _np_basic(_np_pool_3x3(x, "avg"), v, "branch_pool"),
    ],
    axis=-1,
  )
  assert got.shape == (2, 5, 6, 64 + 64 + 96 + 16)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_block_e_matches_numpy_reference(pool):
  x = np.random.default_rng(2).standard_normal((1, 4, 3, 8)).astype(np.float32)
  block = inception.InceptionE(pool=pool)
  v = _random_variables(block, x, seed=3)
  got = block.apply(v, x)
  b3 = _np_basic(x, v, "branch3x3_1")
  bd = _np_basic(_np_basic(x, v, "branch3x3dbl_1"), v, "branch3x3dbl_2", pad=(1, 1))
  ref = np.concatenate(
    [
      _np_basic(x, v, "branch1x1"),
      _np_basic(b3, v, "branch3x3_2a", pad=(0, 1)),
      _np_basic(b3, v, "branch3x3_2b", pad=(1, 0)),
      _np_basic(bd, v, "branch3x3dbl_3a", pad=(0, 1)),
      _np_basic(bd, v, "branch3x3dbl_3b", pad=(1, 0)),
      _np_basic(_np_pool_3x3(x, pool), v, "branch_pool"),
    ],
    axis=-1,
  )
  assert got.shape == (1, 4, 3, 2048)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_reduction_blocks_shapes():
  x = jnp.zeros((1, 9, 9, 8))
  for block, channels in ((inception.InceptionB(), 480 + 8), (inception.InceptionD(), 512 + 8)):
    out = jax.eval_shape(lambda x, b=block: b.init_with_output(jax.random.key(0), x)[0], x)
    assert out.shape == (1, 4, 4, channels)
  out = jax.eval_shape(
    lambda x: inception.InceptionC(channels_7x7=16).init_with_output(jax.random.key(0), x)[0], x
  )
  assert out.shape == (1, 9, 9, 768)


def test_npz_round_trip_keeps_features(tmp_path):
  variables = inception.init_inception_params(seed=1)
  assert inception.export_param_names(variables) == inception.export_param_names()
  path = tmp_path / "inception.npz"
  inception.save_inception_params(str(path), variables)
  with np.load(path) as data:
    assert sorted(data.files) == sorted(inception.export_param_names())
  loaded = inception.load_inception_params(str(path))
  jax.tree.map(np.testing.assert_array_equal, variables, jax.device_get(loaded))

  apply = jax.jit(inception.InceptionV3().apply)
  x = jax.random.uniform(jax.random.key(0), (2, 75, 75, 3), minval=-1.0, maxval=1.0)
  before = apply(variables, x)
  after = apply(loaded, x)
  assert before.shape == (2, inception.FEATURE_DIM) and before.dtype == jnp.float32
  assert np.all(np.isfinite(before)) and np.std(before) > 0
  np.testing.assert_array_equal(before, after)
  assert not np.allclose(before[0], before[1])


def test_full_net_on_one_299_image():
  variables = inception.init_inception_params(seed=2)
  image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  x = inception.preprocess(jnp.asarray(image))
  assert x.shape == (1, 299, 299, 3)
  features = jax.jit(inception.InceptionV3().apply)(variables, x)
  assert features.shape == (1, 2048)
  assert np.all(np.isfinite(features)) and np.all(features >= 0) and np.max(features) > 0


def _np_resize_like_torch(x, size):
  """Bilinear, align_corners=False (half-pixel centres, clamped at the borders), no antialias."""

  def weights(n_in):
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    m = np.zeros((size, n_in))
    np.add.at(m, (np.arange(size), i0), 1 - (src - i0))
    np.add.at(m, (np.arange(size), i1), src - i0)
    return m

  rows = np.einsum("ph,bhwc->bpwc", weights(x.shape[1]), x)
  return np.einsum("qw,bpwc->bpqc", weights(x.shape[2]), rows)


@pytest.mark.parametrize("size", [7, 400])
def test_preprocess_matches_torch_style_bilinear(size):
  images = np.random.default_rng(size).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  got = np.asarray(inception.preprocess(jnp.asarray(images)))
  ref = 2.0 * _np_resize_like_torch(images / 255.0, 299) - 1.0
  np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 sample positions: ~5e-5 at most.
  assert got.min() >= -1.0 and got.max() <= 1.0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="uint8"):
    inception.preprocess(jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="H, W >= 75"):
    inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="pool must be"):
    inception.InceptionE(pool="min").init(jax.random.key(0), jnp.zeros((1, 3, 3, 4)))


def test_missing_or_bad_weight_file(tmp_path):
  for path in (None, "", str(tmp_path / "nope.npz")):
    with pytest.raises(ValueError, match="--inception_weights") as err:
      inception.load_inception_params(path)
    assert "\n" not in str(err.value)
  flat = {k: np.zeros(s, np.float32) for k, s in inception.export_param_names().items()}
  bad_shape = dict(flat, **{"Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 32, 3), np.float32)})
  np.savez(tmp_path / "shape.npz", **bad_shape)
  with pytest.raises(ValueError, match="Conv2d_1a_3x3/conv/kernel.*expected \\[3, 3, 3, 32\\]"):
    inception.load_inception_params(str(tmp_path / "shape.npz"))
  missing = {k: v for k, v in flat.items() if k != "Mixed_5b/branch1x1/bn/mean"}
  np.savez(tmp_path / "missing.npz", **missing, extra=np.zeros(3))
  with pytest.raises(ValueError, match="1 missing.*Mixed_5b/branch1x1/bn/mean.*1 unexpected"):
    inception.load_inception_params(str(tmp_path / "missing.npz"))


def test_from_torch_state_dict():
  flat = inception.flatten_variables(inception.init_inception_params(seed=3))
  torch_names = {
    "kernel": "conv.weight",
    "scale": "bn.weight",
    "bias": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
  }
  state_dict = {"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008)}
  for name, value in flat.items():
    module = ".".join(name.split("/")[:-2])
    leaf = name.split("/")[-1]
    state_dict[f"{module}.{torch_names[leaf]}"] = (
      value.transpose(3, 2, 0, 1) if leaf == "kernel" else value
    )
    if leaf == "mean":
      state_dict[f"{module}.bn.num_batches_tracked"] = np.array(0)
  converted = inception.from_torch_state_dict(state_dict)
  assert sorted(converted) == sorted(flat)
  for name in flat:
    np.testing.assert_array_equal(converted[name], flat[name])
  with pytest.raises(ValueError, match="unexpected Inception state-dict key"):
    inception.from_torch_state_dict({"Mixed_5b.branch1x1.conv.bias": np.zeros(3)})
