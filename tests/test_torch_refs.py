"""vqlm.testing.torch_refs: torchvision imports (a CUDA wheel beside CPU torch), its models run."""

import importlib.util

import pytest

pytestmark = pytest.mark.interop


def test_import_torchvision_runs_vgg_and_inception():
  torch = pytest.importorskip("torch")
  if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed")
  from vqlm.testing import torch_refs

  torchvision = torch_refs.import_torchvision()
  assert torch_refs.import_torchvision() is torchvision
  assert isinstance(torch_refs.torchvision_ops_loaded(), bool)
  x = torch.zeros(1, 3, 32, 32)
  with torch.no_grad():
    vgg16_features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    assert vgg16_features(x).shape == (1, 512, 1, 1)
  inception = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
  assert isinstance(inception.Mixed_5b, torch.nn.Module)
  # lpips and pytorch_fid import torchvision themselves: they import once it has.
  pytest.importorskip("lpips")
  pytest.importorskip("pytorch_fid.inception")
