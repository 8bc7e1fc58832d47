"""pytorch-fid's FID Inception-v3 weights -> vqlm's Inception weight file (`vqlm.nn.inception`).

Accepted state dicts (names as torch writes them, values NumPy arrays):
  - the weight file pytorch-fid downloads, `pt_inception-2015-12-05-6726825d.pth`, which is the
    state dict of `pytorch_fid.inception.fid_inception_v3()` (torchvision names:
    "Mixed_5b.branch1x1.conv.weight", ..., plus the 1008-way "fc.*", dropped here);
  - the state dict of a `pytorch_fid.inception.InceptionV3` module, whose names go through its
    blocks: "blocks.0.0.conv.weight" is Conv2d_1a_3x3, "blocks.2.3.*" is Mixed_6a, ...
    (`BLOCKS` lists them).
Per BasicConv the conv weight [O, I, kh, kw] becomes an HWIO kernel and the BatchNorm's weight,
bias, running mean and variance become bn/scale, bn/bias, bn/mean, bn/var
(`vqlm.nn.inception.from_torch_state_dict`); the result must hold exactly the 470 arrays of
`vqlm.nn.inception.export_param_names()`.

Files: a `.safetensors` file of that state dict is read without torch (`HFCheckpoint`); a `.pth`
/ `.pt` file is read with `torch.load(weights_only=True)`, which needs torch (the `interop` extra).

Command line (nothing is downloaded; pytorch-fid keeps the file it downloaded under
`~/.cache/torch/hub/checkpoints/`):
  python -m vqlm.interop.fid_inception pt_inception-2015-12-05-6726825d.pth \
      --out inception_fid.npz [--safetensors inception_fid.safetensors]
then `vqlm eval --inception_weights inception_fid.npz`. With pytorch-fid's features
(`InceptionV3([3])` on images in [0, 1], resized to 299 bilinearly) vqlm's features agree to
about 1e-5 in float32 (tests/test_interop_metrics.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os
import sys

import numpy as np

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import HFCheckpoint, write_safetensors
from vqlm.nn import inception

# pytorch_fid.inception.InceptionV3's `blocks[i][j]` -> the torchvision module it holds (the
# max and average pools in between hold no weights).
BLOCKS = (
  ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
  ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
  ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
  ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


def torchvision_name(key: str) -> str:
  """ "blocks.2.0.branch1x1.conv.weight" -> "Mixed_5b.branch1x1.conv.weight"; other names as is."""
  if not key.startswith("blocks."):
    return key
  parts = key.split(".")
  try:
    return ".".join([BLOCKS[int(parts[1])][int(parts[2])], *parts[3:]])
  except (IndexError, ValueError):
    raise UserError(f"unexpected pytorch-fid InceptionV3 state-dict key {key!r}") from None


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A pytorch-fid Inception state dict (either naming, see the module docstring) -> the flat
  float32 weight-file dict of `vqlm.nn.inception` (470 names, e.g. "Mixed_7c/branch_pool/conv/
  kernel" [1, 1, 2048, 192]), checked against `export_param_names()`."""
  renamed = {torchvision_name(k): np.asarray(v) for k, v in state_dict.items()}
  flat = inception.from_torch_state_dict(renamed)
  expected = inception.export_param_names()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise UserError(
      f"not a pytorch-fid FID Inception state dict: {len(missing)} missing names (first: "
      f"{missing[:3]}), {len(extra)} unexpected (first: {extra[:3]})"
    )
  for name, shape in expected.items():
    if flat[name].shape != shape:
      raise UserError(
        f"Inception state dict: {name!r} converts to shape {list(flat[name].shape)}, "
        f"expected {list(shape)} (is this the FID Inception, pytorch-fid's weights?)"
      )
  return dict(sorted(flat.items()))


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file (no torch) or a torch `.pth`/`.pt` state dict (torch)."""
  if not os.path.isfile(path):
    raise UserError(f"Inception weights not found at {path!r}")
  if path.endswith(".safetensors"):
    with HFCheckpoint(path) as ckpt:
      return {name: ckpt.read(name) for name in ckpt.names()}
  try:
    import torch  # noqa: PLC0415 - optional: only .pth files need it
  except ImportError:
    raise UserError(
      f"reading {path!r} needs torch (pip install 'vqlm[interop]'); or convert a .safetensors "
      "file of the same state dict"
    ) from None
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise UserError(f"{path!r} does not hold a state dict (got {type(state_dict).__name__})")
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items() if hasattr(v, "numpy")}


def convert_file(src: str, out: str, *, safetensors_out: str | None = None) -> dict:
  """Reads `src` (.pth / .safetensors), writes vqlm's Inception `.npz` to `out` and, if asked,
  the source state dict (float tensors) as one safetensors file; returns the converted dict."""
  state_dict = read_state_dict(src)
  flat = convert_state_dict(state_dict)
  inception.save_inception_params(out, inception.unflatten_variables(flat))
  if safetensors_out:
    directory, file = os.path.split(os.path.abspath(safetensors_out))
    prefix = file.removesuffix(".safetensors")
    tensors = {k: v for k, v in state_dict.items() if v.dtype.kind == "f"}
    write_safetensors(directory, tensors, prefix=prefix, max_shard_bytes=2**40)
  return flat


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m vqlm.interop.fid_inception",
    description="Convert pytorch-fid's FID Inception weights to vqlm's --inception_weights .npz.",
  )
  parser.add_argument("src", help="pt_inception-2015-12-05-6726825d.pth, or a .safetensors of it")
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument("--safetensors", default=None, help="also write the state dict here")
  args = parser.parse_args(argv)
  try:
    flat = convert_file(args.src, args.out, safetensors_out=args.safetensors)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: {len(flat)} arrays; pass --inception_weights {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
