"""Peak dense FLOP/s of accelerators, for model-FLOPs utilisation (MFU)."""

import jax

# Dense (not sparse) peak FLOP/s per chip by compute dtype, from vendor data sheets.
PEAKS = {
  "H100": {"bfloat16": 989e12, "float32": 67e12},  # SXM
  "H200": {"bfloat16": 989e12, "float32": 67e12},
  "A100": {"bfloat16": 312e12, "float32": 19.5e12},
  "TPU v4": {"bfloat16": 275e12},
  "TPU v5 lite": {"bfloat16": 197e12},
  "TPU v5e": {"bfloat16": 197e12},
  "TPU v5p": {"bfloat16": 459e12},
  "TPU v5": {"bfloat16": 459e12},  # v5p's device_kind (after "TPU v5 lite": first match wins)
  "TPU v6 lite": {"bfloat16": 918e12},  # v6e
  "TPU v6e": {"bfloat16": 918e12},
}


def peak_flops(device: jax.Device, dtype: str) -> float | None:
  """Peak FLOP/s of `device` for `dtype` ("bfloat16" / "float32"), None if unknown (e.g. CPU).
  The first PEAKS name contained in the device's `device_kind` wins."""
  kind = device.device_kind
  for name, peaks in PEAKS.items():
    if name.lower() in kind.lower():
      return peaks.get(dtype)
  return None
