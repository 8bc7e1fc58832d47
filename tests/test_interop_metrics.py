"""Parity of the metric networks with their torch references: FID's Inception (pytorch-fid) and
the LPIPS perceptual distance (lpips, VGG16), converted by vqlm.interop. Nothing is downloaded:
the trunks are random (pytorch-fid's weight loader is patched; LPIPS with pnet_rand=True) and the
LPIPS lin heads are the ones inside the lpips package."""

import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.interop import fid_inception
from vqlm.interop import lpips as lpips_interop
from vqlm.interop.checkpoint_files import write_safetensors
from vqlm.nn import inception, perceptual

pytestmark = pytest.mark.interop
TOL = 1e-4  # max abs difference, float32


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  from vqlm.testing import torch_refs

  try:
    torch_refs.import_torchvision()
  except ImportError:
    pytest.skip("torchvision is not installed")
  torch.manual_seed(0)
  return torch


def _randomize_(torch, model, seed):
  """Conv weights He-normal, conv biases and BatchNorm affine/statistics around the identity, so
  that every converted array matters and activations stay O(1) through the depth."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
        if m.bias is not None:
          m.bias.normal_(0.0, 0.1, generator=g)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)
        m.bias.normal_(0.0, 0.1, generator=g)
        m.running_mean.normal_(0.0, 0.1, generator=g)


def _numpy(state_dict):
  return {k: v.detach().numpy() for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def fid_model(torch):
  """pytorch-fid's InceptionV3([3]) (the FID blocks) with random weights and its torchvision-named
  inner Inception3, built with pytorch-fid's URL loader returning the model's own weights."""
  pfi = pytest.importorskip("pytorch_fid.inception")
  built = {}

  def inception_v3(*args, **kwargs):
    built["inner"] = real(*args, **kwargs)
    return built["inner"]

  real = pfi._inception_v3
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, "_inception_v3", inception_v3)
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: built["inner"].state_dict())
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  _randomize_(torch, model, seed=1)
  return model, built["inner"]


def test_fid_inception_features_match_pytorch_fid(torch, fid_model, tmp_path):
  from vqlm.eval import fid

  model, inner = fid_model
  # Through a safetensors file of the InceptionV3 module's state dict ("blocks.i.j" names).
  floats = {k: v for k, v in _numpy(model.state_dict()).items() if v.dtype.kind == "f"}
  write_safetensors(str(tmp_path), floats, prefix="fid")
  npz = str(tmp_path / "inception.npz")
  flat = fid_inception.convert_file(str(tmp_path / "fid.safetensors"), npz)
  # The torchvision-named state dict (pytorch-fid's .pth layout, with an fc) converts the same.
  from_inner = fid_inception.convert_state_dict(_numpy(inner.state_dict()))
  assert sorted(from_inner) == sorted(flat) and len(flat) == 470
  for name in flat:
    np.testing.assert_array_equal(from_inner[name], flat[name])

  images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    ref = model(x)[0][:, :, 0, 0].numpy()
  got = fid.inception_features(inception.load_inception_params(npz), images, batch_size=2)
  assert got.shape == ref.shape == (2, inception.FEATURE_DIM)
  assert np.abs(ref).max() > 1.0  # features of a healthy size, so the tolerance means something
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("size", [(64, 48), (331, 300)])
def test_inception_preprocess_matches_pytorch_fid_resize(torch, size):
  import jax.numpy as jnp

  functional = torch.nn.functional
  images = np.random.default_rng(1).integers(0, 256, (2, *size, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  ref = 2 * functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
  got = np.asarray(inception.preprocess(jnp.asarray(images))).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_fid_inception_cli_reads_pth(torch, fid_model, tmp_path):
  _, inner = fid_model
  pth, npz, st = (str(tmp_path / n) for n in ("fid.pth", "fid.npz", "copy.safetensors"))
  torch.save(inner.state_dict(), pth)
  assert fid_inception.main([pth, "--out", npz, "--safetensors", st]) == 0
  expected = fid_inception.convert_state_dict(_numpy(inner.state_dict()))
  loaded = inception.flatten_variables(inception.load_inception_params(npz))
  assert sorted(loaded) == sorted(expected)
  np.testing.assert_array_equal(
    loaded["Mixed_7c/branch_pool/conv/kernel"], expected["Mixed_7c/branch_pool/conv/kernel"]
  )
  assert fid_inception.convert_file(st, npz).keys() == expected.keys()


@pytest.fixture(scope="module")
def lpips_model(torch):
  lpips = pytest.importorskip("lpips")
  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  _randomize_(torch, model.net, seed=2)  # the trunk only: the lin heads are the shipped ones
  return model


def test_lpips_distance_matches(torch, lpips_model, tmp_path):
  import jax
  import jax.numpy as jnp

  write_safetensors(str(tmp_path), _numpy(lpips_model.state_dict()), prefix="lpips")
  npz = str(tmp_path / "lpips.npz")
  weights = lpips_interop.convert_files([str(tmp_path / "lpips.safetensors")], npz)
  assert weights["lin0"].shape == (64,) and (weights["lin4"] > 0).all()
  loaded = perceptual.load_feature_weights(npz)
  rng = np.random.default_rng(3)
  # 50 -> 25 -> 12 -> 6 -> 3: odd sizes, pooled with torch's floor.
  x = rng.uniform(-1, 1, (3, 50, 50, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  y[2] = rng.uniform(-1, 1, y[2].shape)
  with torch.no_grad():
    to_torch = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    ref = lpips_model(to_torch(x), to_torch(y)).reshape(-1).numpy()
  distance = jax.jit(perceptual.perceptual_distance)  # op by op takes several times longer
  got = np.asarray(distance(loaded, jnp.asarray(x), jnp.asarray(y)))
  assert (ref > 1e-2).all()
  np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=0)  # the distances are ~0.03 here
  assert float(jnp.max(jnp.abs(distance(loaded, jnp.asarray(x), jnp.asarray(x))))) == 0.0


def test_lpips_cli_from_vgg16_and_package_heads(torch, lpips_model, tmp_path):
  state = _numpy(lpips_model.state_dict())
  vgg = {
    f"features.{k.split('.', 3)[2]}.{k.rsplit('.', 1)[1]}": v
    for k, v in state.items()
    if k.startswith("net.slice")
  }
  vgg["classifier.0.weight"] = np.zeros((2, 2), np.float32)
  vgg_pth, out = str(tmp_path / lpips_interop.VGG16_FILE), str(tmp_path / "lpips.npz")
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, vgg_pth)
  assert lpips_interop.main(["--out", out, "--vgg", vgg_pth]) == 0
  expected = lpips_interop.convert_state_dict(state)
  loaded = perceptual.load_feature_weights(out)
  assert sorted(loaded) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(loaded[name]), value)
  assert lpips_interop.main(["--out", out, "--vgg", str(tmp_path / "none.pth")]) == 2


def test_lpips_conversion_errors():
  weights = perceptual.random_feature_weights(0, stage_channels=(4,))
  state = {f"features.{i}.weight": np.zeros((2, 2, 3, 3)) for i in (0, 3)}
  with pytest.raises(UserError, match="is not one of VGG16's conv layers"):
    lpips_interop.convert_state_dict(state)
  with pytest.raises(UserError, match="unexpected LPIPS"):
    lpips_interop.convert_state_dict({"foo.weight": weights["stage0.conv0.kernel"]})
  with pytest.raises(UserError, match="'stage0.conv0.kernel' missing"):
    lpips_interop.convert_state_dict({})
  with pytest.raises(UserError, match="unexpected pytorch-fid InceptionV3"):
    fid_inception.torchvision_name("blocks.9.0.conv.weight")
  with pytest.raises(UserError, match="0 unexpected"):
    fid_inception.convert_state_dict({"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3))})


def test_perceptual_pool_floors_odd_sizes_like_torch():
  import jax.numpy as jnp

  weights = perceptual.random_feature_weights(0, stage_channels=(2, 2, 2, 2), convs_per_stage=1)
  maps = perceptual.feature_maps(weights, jnp.zeros((1, 7, 2, 3)))
  assert [m.shape[1:3] for m in maps] == [(7, 2), (3, 1), (1, 1), (1, 1)]
