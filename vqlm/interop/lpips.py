"""LPIPS (VGG16 trunk + the linear heads of the `lpips` package) -> vqlm's perceptual weights.

`vqlm.nn.perceptual.perceptual_distance` with the converted weights is `lpips.LPIPS(net="vgg")`'s
forward (version 0.1, spatial=False, inputs in [-1, 1]): the scaling layer, the five VGG16 stages
tapped at relu1_2 .. relu5_3, channel-unit-normalised features, the 1x1 "lin" heads, spatial means
summed over stages (parity to ~1e-6 in float32: tests/test_interop_metrics.py).

Accepted state dicts (torch names; values NumPy arrays), merged from any number of files:
  - an `lpips.LPIPS(net="vgg")` module's: "net.slice{1..5}.{i}.weight/bias" (i: the conv's index
    in torchvision's `vgg16().features`), "lin{s}.model.1.weight" [1, C_s, 1, 1] (or "lins.{s}.*",
    "model.0" without dropout), "scaling_layer.shift/scale" [1, 3, 1, 1];
  - torchvision's VGG16 ("features.{i}.weight/bias"; the "classifier.*" is dropped), e.g.
    `vgg16-397923af.pth`, plus the lin heads the lpips package ships
    (`lpips/weights/v0.1/vgg.pth`: "lin{s}.model.1.weight").
Output (`vqlm.nn.perceptual` format): "stage{s}.conv{j}.kernel" [3, 3, C_in, C_out] and ".bias",
"lin{s}" [C_s], "input_shift" / "input_scale" [3] (the LPIPS constants when the source has none).

Files: `.safetensors` are read without torch; `.pth` / `.pt` need torch (the `interop` extra).

Command line (nothing is downloaded):
  python -m vqlm.interop.lpips --out lpips_vgg.npz [--vgg vgg16-397923af.pth] [--lin vgg.pth]
--vgg defaults to torchvision's cached ImageNet VGG16, `$TORCH_HOME/hub/checkpoints/
vgg16-397923af.pth` (`~/.cache/torch/...`; present once torchvision or lpips has loaded the
pretrained VGG16), --lin to the heads inside the installed lpips package. Then train with
`--config.loss.perceptual_weights_path=lpips_vgg.npz --config.loss.perceptual_weight=W`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import importlib.util
import os
import re
import sys

import numpy as np

from vqlm.errors import UserError
from vqlm.interop.fid_inception import read_state_dict
from vqlm.nn import perceptual

# The indices of the 13 convs of torchvision's `vgg16().features`, by LPIPS stage (slice1..5);
# the max pools at 4, 9, 16, 23 start stages 1..4.
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_FILE = "vgg16-397923af.pth"
_CONV = re.compile(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)$")
_LIN = re.compile(r"lins?\.?(\d)\.model\.\d\.weight$")
_SKIP = re.compile(r"classifier\.")


def convert_state_dict(
  state_dict: Mapping[str, np.ndarray], *, require_lin: bool = True
) -> dict[str, np.ndarray]:
  """LPIPS-VGG16 (or VGG16 + lin heads) state dict -> the flat float32 dict of
  `vqlm.nn.perceptual` (format in the module docstring); all 13 convs are required, the five lin
  heads unless `require_lin=False` (perceptual then weights every channel 1)."""
  stage_of = {i: (s, j) for s, convs in enumerate(VGG16_STAGES) for j, i in enumerate(convs)}
  out = {
    "input_shift": perceptual.LPIPS_SHIFT.copy(),
    "input_scale": perceptual.LPIPS_SCALE.copy(),
  }
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    if conv := _CONV.search(key):
      index, part = int(conv.group(1)), conv.group(2)
      if index not in stage_of:
        raise UserError(f"{key!r} is not one of VGG16's conv layers (indices {sorted(stage_of)})")
      s, j = stage_of[index]
      name = f"stage{s}.conv{j}.{'kernel' if part == 'weight' else 'bias'}"
      out[name] = value.transpose(2, 3, 1, 0) if part == "weight" else value
    elif lin := _LIN.search(key):
      out[f"lin{lin.group(1)}"] = value.reshape(-1)
    elif key.endswith("scaling_layer.shift"):
      out["input_shift"] = value.reshape(3)
    elif key.endswith("scaling_layer.scale"):
      out["input_scale"] = value.reshape(3)
    elif not _SKIP.match(key):
      raise UserError(f"unexpected LPIPS / VGG16 state-dict key {key!r}")
  expected = {}
  c_in = 3
  for s, (convs, c_out) in enumerate(zip(VGG16_STAGES, VGG16_CHANNELS)):
    for j in range(len(convs)):
      expected[f"stage{s}.conv{j}.kernel"] = (3, 3, c_in, c_out)
      expected[f"stage{s}.conv{j}.bias"] = (c_out,)
      c_in = c_out
    if require_lin or f"lin{s}" in out:
      expected[f"lin{s}"] = (c_out,)
  for name, shape in expected.items():
    if name not in out:
      raise UserError(
        f"LPIPS weights: {name!r} missing (need VGG16's 13 convs"
        + (" and the lpips package's lin heads, --lin)" if require_lin else ")")
      )
    if out[name].shape != shape:
      raise UserError(f"LPIPS weights: {name!r} has shape {list(out[name].shape)}, want {shape}")
  extra = sorted(set(out) - set(expected) - {"input_shift", "input_scale"})
  if extra:
    raise UserError(f"LPIPS weights: unexpected {extra[:3]} (a VGG16 has 5 stages)")
  return dict(sorted(out.items()))


def package_lin_path() -> str:
  """The VGG lin heads inside the installed lpips package (`lpips/weights/v0.1/vgg.pth`); found
  without importing lpips (which imports torchvision)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise UserError("the lpips package is not installed (pip install lpips==0.1.4), or pass --lin")
  return os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")


def cached_vgg16_path() -> str:
  """Where torchvision keeps its downloaded ImageNet VGG16 (`$TORCH_HOME/hub/checkpoints`)."""
  home = os.environ.get("TORCH_HOME") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
  )
  return os.path.join(home, "hub", "checkpoints", VGG16_FILE)


def convert_files(paths: Sequence[str], out: str, *, require_lin: bool = True) -> dict:
  """Merges the state dicts of `paths` (.pth / .safetensors), converts, writes the `.npz` that
  `vqlm.nn.perceptual.load_feature_weights` reads to `out`; returns the converted dict."""
  state_dict: dict[str, np.ndarray] = {}
  for path in paths:
    state_dict.update(read_state_dict(path))
  weights = convert_state_dict(state_dict, require_lin=require_lin)
  perceptual.save_feature_weights(out, weights)
  return weights


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m vqlm.interop.lpips",
    description="Write LPIPS-VGG16 weights as vqlm's --config.loss.perceptual_weights_path .npz.",
  )
  parser.add_argument("--out", required=True, help="the .npz to write")
  parser.add_argument(
    "--vgg",
    default=None,
    help=f"torchvision VGG16 or LPIPS state dict (default: {VGG16_FILE} in the torch hub cache)",
  )
  parser.add_argument("--lin", default=None, help="lin heads (default: the lpips package's)")
  parser.add_argument(
    "--no_lin", action="store_true", help="no lin heads: every channel weighs 1 (not LPIPS)"
  )
  args = parser.parse_args(argv)
  try:
    vgg = args.vgg or cached_vgg16_path()
    if not os.path.isfile(vgg):
      raise UserError(
        f"VGG16 weights not found at {vgg!r}: pass --vgg PATH ({VGG16_FILE}, torchvision's "
        "ImageNet VGG16); nothing is downloaded here"
      )
    paths = [vgg] if args.no_lin else [vgg, args.lin or package_lin_path()]
    weights = convert_files(paths, args.out, require_lin=not args.no_lin)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(
    f"wrote {args.out}: {len(weights)} arrays; train with "
    f"{perceptual.FLAG}={args.out} --config.loss.perceptual_weight=W"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
