"""`python -m vqlm.bench matmul [--tokens 2048 --shapes 256x768,768x256,256x256,256x1536]`.

The three matmuls of a dense layer's training step, `x[M, K] @ w[K, N]` (forward), `dy @ w.T`
(input gradient) and `x.T @ dy` (weight gradient), timed under `jax.jit` (XLA:CPU) and, when
PyTorch is installed, with `torch` on the same arrays: per product, jax's timed blocks then
torch's, each after an untimed call; the best block counts. This is where the LM benchmark's gap to
PyTorch comes from on CPU (`docs/architecture.md`).
"""

import time

import jax
import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

KINDS = ("forward", "input grad", "weight grad")
# The products named by KINDS, written once for jax arrays and torch tensors alike.
PRODUCTS = (lambda x, w, dy: x @ w, lambda x, w, dy: dy @ w.T, lambda x, w, dy: x.T @ dy)


def _define(f):
  f.DEFINE_integer("tokens", 2048, "M: rows of the activations (batch x sequence)")
  f.DEFINE_string(
    "shapes", "256x768,768x256,256x256,256x1536", "KxN weight shapes, comma-separated"
  )
  f.DEFINE_integer("calls", 20, "calls per timed block")
  f.DEFINE_integer("blocks", 5, "timed blocks per implementation; the best counts")
  f.DEFINE_bool("torch", True, "also time torch (CPU)")


def parse_shapes(text: str) -> list[tuple[int, int]]:
  shapes = []
  for item in text.split(","):
    parts = item.strip().lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise UserError(f"--shapes item {item!r} must be KxN with positive integers, e.g. 256x768")
    shapes.append((int(parts[0]), int(parts[1])))
  return shapes


def _best_ms(fn, args, calls: int, blocks: int, sync) -> float:
  sync(fn(*args))
  best = float("inf")
  for _ in range(blocks):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    sync(out)
    best = min(best, time.perf_counter() - start)
  return 1e3 * best / calls


def run(
  *, tokens: int, shapes: list[tuple[int, int]], calls: int, blocks: int, use_torch: bool
) -> list[dict]:
  """Rows `{"shape", "kind", "jax_ms", "torch_ms" (or None)}`, one per shape and matmul."""
  if tokens <= 0 or calls <= 0 or blocks <= 0:
    raise UserError("--tokens, --calls and --blocks must be positive")
  torch = None
  if use_torch:
    try:
      import torch
    except ImportError:
      print("torch baseline skipped: install the bench extra (pip install -e '.[bench]')")
  rng = np.random.default_rng(0)
  jitted = [jax.jit(product) for product in PRODUCTS]
  rows = []
  for k, n in shapes:
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in ((tokens, k), (k, n), (tokens, n))]
    jax_args = [jax.device_put(a) for a in arrays]
    torch_args = [torch.from_numpy(a) for a in arrays] if torch else None
    for kind, product, jax_product in zip(KINDS, PRODUCTS, jitted):
      jax_ms = _best_ms(jax_product, jax_args, calls, blocks, jax.block_until_ready)
      torch_ms = _best_ms(product, torch_args, calls, blocks, lambda out: out) if torch else None
      rows.append({"shape": (tokens, k, n), "kind": kind, "jax_ms": jax_ms, "torch_ms": torch_ms})
  return rows


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(argv, _define)
  rows = run(
    tokens=fv.tokens,
    shapes=parse_shapes(fv.shapes),
    calls=fv.calls,
    blocks=fv.blocks,
    use_torch=fv.torch,
  )
  print(f"device: {jax.devices()[0].device_kind}; float32; best of {fv.blocks} x {fv.calls} calls")
  print(f"{'M x K x N':>18} | {'matmul':>11} | {'jax ms':>8} | {'torch ms':>8} | jax / torch speed")
  for r in rows:
    shape = "x".join(map(str, r["shape"]))
    torch_ms, speed = "-", "-"
    if r["torch_ms"] is not None:
      torch_ms, speed = f"{r['torch_ms']:.3f}", f"{r['torch_ms'] / r['jax_ms']:.2f}"
    print(f"{shape:>18} | {r['kind']:>11} | {r['jax_ms']:8.3f} | {torch_ms:>8} | {speed}")
  return 0
