"""Shared pieces of `configs/<family>.py:get_config(arg)` files.

`arg` is `key=value,key=value` (big_vision style): `configs/tokenizer.py:data=shapes,size=small`.
Values are parsed as Python literals where possible (ints, floats, bools, tuples), otherwise kept as
strings. Unknown keys fail with the list of valid ones, so a typo never silently does nothing.
"""

import ast
from typing import Any

import ml_collections

from vqlm.errors import UserError


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `key=value,...` into a ConfigDict of `defaults` with the given keys overridden.

  A bare word without `=` sets a boolean flag of that name to True (`runlocal` -> runlocal=True).
  Raises ValueError on keys not in `defaults`, naming the valid ones.
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      valid = ", ".join(sorted(defaults))
      raise UserError(f"unknown config argument '{key}'; valid: {valid}")
    parsed = _literal(value.strip()) if sep else True
    default = defaults[key]
    if isinstance(default, bool) and not isinstance(parsed, bool):
      raise UserError(f"config argument '{key}' takes True or False, not '{value}'")
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(parsed, float):
      raise UserError(f"config argument '{key}' takes an integer, not '{value}'")
    if isinstance(default, str) and not isinstance(parsed, str):
      parsed = str(value.strip())
    values[key] = parsed
  return ml_collections.ConfigDict(values)


def as_kwargs(value: Any) -> Any:
  """Config values -> plain module kwargs: ConfigDicts and dicts become dicts, lists tuples."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: as_kwargs(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(as_kwargs(v) for v in value)
  return value


def choose(name: str, value: str, options: dict[str, Any]) -> Any:
  """Returns `options[value]`, or raises ValueError listing the valid choices for `name`."""
  if value not in options:
    raise UserError(f"unknown {name} '{value}'; valid: {', '.join(options)}")
  return options[value]


def mesh_config(
  data: int = -1, fsdp: int = 1, tensor: int = 1, rules: tuple[tuple[str, Any], ...] | None = None
) -> ml_collections.ConfigDict:
  """Mesh shape (one axis may be -1: all remaining devices) and logical -> mesh axis rules."""
  if rules is None:
    rules = DEFAULT_RULES
  return ml_collections.ConfigDict(
    {
      "shape": {"data": data, "fsdp": fsdp, "tensor": tensor},
      "rules": [list(rule) for rule in rules],
    }
  )


# Logical axis -> mesh axes. Batch-like axes split over data x fsdp; weights' embed dimension is
# sharded by fsdp (ZeRO-3 style), and heads / mlp / vocab by tensor (Megatron style).
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("vocab", "tensor"),
  ("layers", None),
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("codebook", None),
)
