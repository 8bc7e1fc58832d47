"""Importing the torch reference libraries the parity tests compare against.

`import_torchvision()` imports torchvision even where its compiled ops cannot load. The `interop`
extra pins torch 2.13.0 (CPU) and torchvision 0.28.0, and torchvision 0.28.0 on PyPI is a CUDA
build: its C extension (`torchvision._C`, the detection ops nms, roi_align, ...) fails to load
beside a CPU torch. torchvision then still imports its Python code, but
`torchvision/_meta_registrations.py` registers a fake (meta) kernel for `torchvision::nms` and
`torchvision::qnms` with `torch.library.register_fake`, which needs the operator's schema, so
`import torchvision` fails with "RuntimeError: operator torchvision::nms does not exist".

The models the parity tests use (VGG16 for LPIPS, Inception v3 for pytorch-fid) are plain Python
modules that never call those ops. So when, and only when, the import fails that way, this module
defines the two schemas (no kernels: calling nms would still fail, loudly) in a
`torch.library.Library` kept alive at module level (a dropped Library object unregisters its
definitions), drops the half-imported torchvision modules and imports torchvision again. Where
torchvision's ops load (a matching CPU build), it is imported unchanged.

Import lpips / pytorch_fid only after `import_torchvision()`: both import torchvision.
"""

import importlib
import sys

# The schemas of the two ops torchvision registers fake kernels for at import time
# (torchvision/_meta_registrations.py), as torchvision's C++ code defines them.
_SCHEMAS = (
  "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
  "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# The torch.library.Library holding the stand-in schemas, once defined; kept alive here because
# the definitions go away with the object.
_LIBRARY = None


def _missing_op_error(error):
  """Whether `error` is the import failure of a torchvision whose C ops did not load."""
  return isinstance(error, RuntimeError) and "operator torchvision::" in str(error)


def _forget_torchvision():
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]


def define_op_schemas():
  """Defines the `torchvision::nms` and `torchvision::qnms` schemas (once per process) so that
  torchvision's Python code imports without its C extension. Returns the Library object."""
  global _LIBRARY
  if _LIBRARY is None:
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
      library.define(schema)
    _LIBRARY = library
  return _LIBRARY


def import_torchvision():
  """Returns the torchvision module, imported normally when it can be and otherwise with the op
  schemas its import needs defined first (see the module docstring). Raises ImportError where
  torch or torchvision is not installed, and any other import error unchanged."""
  if _LIBRARY is None:
    try:
      return importlib.import_module("torchvision")
    except RuntimeError as error:
      if not _missing_op_error(error):
        raise
      _forget_torchvision()
    define_op_schemas()
  return importlib.import_module("torchvision")


def torchvision_ops_loaded():
  """Whether torchvision's compiled ops loaded (False where the stand-in schemas were needed)."""
  torchvision = import_torchvision()
  return _LIBRARY is None and torchvision.extension._has_ops()


def prepare_torch_imports() -> None:
  """Makes `import transformers` / `import diffusers` work beside the interop extra's torchvision
  (transformers imports torchvision when it is installed): imports torchvision the way
  `import_torchvision` does; nothing where torch or torchvision is not installed."""
  try:
    import_torchvision()
  except ImportError:
    pass
