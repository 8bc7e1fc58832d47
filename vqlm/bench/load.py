"""`python -m vqlm.bench load [--size_mb 300] [--devices 8] [--out load.json]`: peak host memory
of placing a safetensors checkpoint on a mesh.

Writes a generated Llama-shaped checkpoint (HF names, bfloat16 like released Llama weights, random
values) of about `--size_mb` MB as `--shards` safetensors files into a temporary directory, maps
each tensor to its vqlm parameter (the transposes and head reshapes a Llama import needs, as
`Lazy` leaves with a slice reader) and places it on `--devices` faked CPU devices
(`--xla_force_host_platform_device_count`), sharded by the default rules over `--mesh`
(fsdp x tensor). Each way of loading runs in a fresh process that reports its peak resident
memory (VmHWM, reset with /proc/self/clear_refs after start-up) minus its resident memory before
loading and minus the bytes of the placed arrays (faked devices live in host memory):

  naive    every tensor read into NumPy (`materialize`), then one `jax.device_put` of the tree;
  mapped   `place_params` one tensor at a time, whole tensors, the files left mapped until done;
  lazy     `place_params` one tensor at a time, whole tensors, `release=ckpt.close` after each;
  slices   as lazy, but each device's slice read on its own (`Lazy.load_slice`).

The bound the lazy loads should stay under is the largest parameter (in the placed dtype) plus
the largest safetensors file; every mode's placed parameters must have the same checksum.
`--out FILE` writes the figures as JSON (`-`: stdout). Figures: docs/benchmarks.md.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import ml_dtypes
import numpy as np

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import HFCheckpoint, Lazy, write_safetensors

MODES = ("naive", "mapped", "lazy", "slices")
MB = 2.0**20


def llama_shape(size_mb: float) -> dict[str, int]:
  """A Llama-like shape of about `size_mb` MB in bfloat16: the widest of dim 256/512/1024 that
  gets at least 4 layers, heads of 64, 4 query heads per KV head (at least 2 KV heads), mlp
  ~2.75 dim, vocab 8 dim."""
  budget = size_mb * MB / 2  # parameters
  for dim in (1024, 512, 256):
    heads, mlp, vocab = dim // 64, 256 * round(2.75 * dim / 256), 8 * dim
    kv = max(2, heads // 4)
    layer = 2 * dim * dim + 2 * dim * kv * 64 + 3 * dim * mlp + 2 * dim
    layers = round((budget - 2 * vocab * dim - dim) / layer)
    if layers >= 4 or dim == 256:
      layers = max(1, layers)
      return dict(
        dim=dim, num_layers=layers, num_heads=heads, num_kv_heads=kv, mlp_dim=mlp, vocab_size=vocab
      )
  raise AssertionError


def hf_tensors(shape: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
  """Random bfloat16 tensors under transformers' LlamaForCausalLM names, in its order."""
  rng = np.random.default_rng(seed)
  d, m, v = shape["dim"], shape["mlp_dim"], shape["vocab_size"]
  q, kv = shape["num_heads"] * 64, shape["num_kv_heads"] * 64
  bf16 = lambda *s: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  out = {"model.embed_tokens.weight": bf16(v, d)}
  for i in range(shape["num_layers"]):
    p = f"model.layers.{i}."
    out[p + "input_layernorm.weight"] = bf16(d)
    out[p + "self_attn.q_proj.weight"] = bf16(q, d)
    out[p + "self_attn.k_proj.weight"] = bf16(kv, d)
    out[p + "self_attn.v_proj.weight"] = bf16(kv, d)
    out[p + "self_attn.o_proj.weight"] = bf16(d, q)
    out[p + "post_attention_layernorm.weight"] = bf16(d)
    out[p + "mlp.gate_proj.weight"] = bf16(m, d)
    out[p + "mlp.up_proj.weight"] = bf16(m, d)
    out[p + "mlp.down_proj.weight"] = bf16(d, m)
  out["model.norm.weight"] = bf16(d)
  out["lm_head.weight"] = bf16(v, d)
  return out


def _rows(index: slice, n: int, width: int) -> tuple[slice, int]:
  """Rows `[a * width, b * width)` of a `[n * width, ...]` matrix for heads `index` of `n`."""
  a, b, _ = index.indices(n)
  return slice(a * width, b * width), b - a


def _plain(ckpt: HFCheckpoint, name: str, dtype: Any, transpose: bool) -> Lazy:
  """`W` (or `W.T`): an embedding, norm scale, MLP or head matrix."""
  shape = ckpt.shape(name)[::-1] if transpose else ckpt.shape(name)
  if not transpose:
    return Lazy(
      shape,
      dtype,
      lambda: ckpt.read(name, np.float32),
      lambda idx: ckpt.read_slice(name, idx, np.float32),
    )
  return Lazy(
    shape,
    dtype,
    lambda: ckpt.read(name, np.float32).T,
    lambda idx: ckpt.read_slice(name, idx[::-1], np.float32).T,
  )


def _heads_in(ckpt: HFCheckpoint, name: str, dtype: Any, heads: int, head_dim: int) -> Lazy:
  """`q/k/v_proj.weight [H * Dh, D]` -> kernel `[D, H, Dh]` (`W.T` with the rows split)."""
  d = ckpt.shape(name)[1]

  def load_slice(idx: tuple[slice, ...]) -> np.ndarray:
    rows, n = _rows(idx[1], heads, head_dim)
    part = ckpt.read_slice(name, (rows, idx[0]), np.float32)
    return part.T.reshape(part.shape[1], n, head_dim)[:, :, idx[2]]

  load = lambda: ckpt.read(name, np.float32).T.reshape(d, heads, head_dim)
  return Lazy((d, heads, head_dim), dtype, load, load_slice)


def _heads_out(ckpt: HFCheckpoint, name: str, dtype: Any, heads: int, head_dim: int) -> Lazy:
  """`o_proj.weight [D, H * Dh]` -> kernel `[H, Dh, D]` (`W.T` with the rows split)."""
  d = ckpt.shape(name)[0]

  def load_slice(idx: tuple[slice, ...]) -> np.ndarray:
    cols, n = _rows(idx[0], heads, head_dim)
    part = ckpt.read_slice(name, (idx[2], cols), np.float32)
    return part.T.reshape(n, head_dim, part.shape[0])[:, idx[1], :]

  load = lambda: ckpt.read(name, np.float32).T.reshape(heads, head_dim, d)
  return Lazy((heads, head_dim, d), dtype, load, load_slice)


def llama_tree(ckpt: HFCheckpoint, shape: dict[str, int], dtype: Any) -> dict[str, Any]:
  """The vqlm params of a Transformer(tie_embeddings=False) as `Lazy` leaves of `ckpt`'s Llama
  tensors (each with a slice reader); `dtype` is the parameters' dtype."""
  h, kv = shape["num_heads"], shape["num_kv_heads"]
  tree: dict[str, Any] = {
    "embed": {"embedding": _plain(ckpt, "model.embed_tokens.weight", dtype, False)},
    "final_norm": {"scale": _plain(ckpt, "model.norm.weight", dtype, False)},
    "head": {"kernel": _plain(ckpt, "lm_head.weight", dtype, True)},
  }
  for i in range(shape["num_layers"]):
    p = f"model.layers.{i}."
    tree[f"layer_{i}"] = {
      "attn_norm": {"scale": _plain(ckpt, p + "input_layernorm.weight", dtype, False)},
      "attn": {
        "query": {"kernel": _heads_in(ckpt, p + "self_attn.q_proj.weight", dtype, h, 64)},
        "key": {"kernel": _heads_in(ckpt, p + "self_attn.k_proj.weight", dtype, kv, 64)},
        "value": {"kernel": _heads_in(ckpt, p + "self_attn.v_proj.weight", dtype, kv, 64)},
        "out": {"kernel": _heads_out(ckpt, p + "self_attn.o_proj.weight", dtype, h, 64)},
      },
      "mlp_norm": {"scale": _plain(ckpt, p + "post_attention_layernorm.weight", dtype, False)},
      "mlp": {
        "wi_gate": {"kernel": _plain(ckpt, p + "mlp.gate_proj.weight", dtype, True)},
        "wi_up": {"kernel": _plain(ckpt, p + "mlp.up_proj.weight", dtype, True)},
        "wo": {"kernel": _plain(ckpt, p + "mlp.down_proj.weight", dtype, True)},
      },
    }
  return tree


def _status(field: str) -> int:
  """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise UserError(f"/proc/self/status has no {field}; the load benchmark needs Linux")


def _reset_peak() -> bool:
  """Resets VmHWM to the current resident size (Linux >= 4.0); False where not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(spec: dict[str, Any]) -> dict[str, Any]:
  """One mode's load in this (fresh) process: `spec` = directory, shape, mesh, dtype, mode."""
  from vqlm.runtime import host_memory

  malloc = host_memory.reuse_host_memory()
  import jax
  import jax.numpy as jnp

  from vqlm.interop import placement
  from vqlm.interop.checkpoint_files import materialize
  from vqlm.nn.transformer import Transformer, TransformerConfig
  from vqlm.runs import restore
  from vqlm.runs.lm_run import abstract_params
  from vqlm.runtime import mesh as mesh_lib
  from vqlm.runtime.config import DEFAULT_RULES

  shape, dtype, mode = spec["shape"], np.dtype(spec["dtype"]), spec["mode"]
  config = TransformerConfig(**shape, tie_embeddings=False, param_dtype=dtype.name)
  boxed = abstract_params(Transformer(config), 8)
  mesh = mesh_lib.make_mesh(spec["mesh"])
  for device in jax.devices():  # start the runtime before measuring
    jax.block_until_ready(jax.device_put(np.zeros(1024, np.float32), device))
  reset = _reset_peak()
  before = _status("VmRSS")
  start = time.perf_counter()
  ckpt = HFCheckpoint(spec["directory"])
  tree = llama_tree(ckpt, shape, dtype)
  if mode == "naive":
    arrays = materialize(tree)
    shardings = jax.tree.map(
      lambda a: a.sharding, restore.placed_abstract(boxed, mesh, DEFAULT_RULES)
    )
    params = jax.block_until_ready(jax.device_put(arrays, shardings))
    del arrays
    reads = len(jax.tree.leaves(params))
  else:
    stats: dict[str, Any] = {}
    params = placement.place_params(
      tree,
      boxed,
      mesh,
      DEFAULT_RULES,
      release=None if mode == "mapped" else ckpt.close,
      use_slices=mode == "slices",
      stats=stats,
    )
    params = jax.block_until_ready(params)
    reads = sum(stats["reads"].values())
  seconds = time.perf_counter() - start
  peak = _status("VmHWM")
  ckpt.close()
  placed = placement.placed_bytes(params)
  checksum = sum(float(jnp.sum(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(params))
  return {
    "mode": mode,
    "devices": jax.device_count(),
    "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
    "malloc_reuse": malloc,
    "peak_reset": reset,
    "rss_before": before,
    "peak_rss": peak,
    "placed_bytes": placed,
    "extra_bytes": peak - before - placed,
    "reads": reads,
    "seconds": seconds,
    "checksum": checksum,
  }


def _run_child(spec: dict[str, Any], devices: int, malloc: str) -> dict[str, Any]:
  env = dict(
    os.environ,
    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
    f"{devices}".strip(),
    JAX_PLATFORMS="cpu",
    VQLM_HOST_MALLOC=malloc,
  )
  code = (
    "import json, sys; from vqlm.bench import load; "
    "print(json.dumps(load.child(json.loads(sys.argv[1]))))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True
  )
  if proc.returncode:
    raise RuntimeError(f"load mode {spec['mode']} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_mesh(text: str) -> dict[str, int]:
  """`"fsdp=4,tensor=2"` -> `{"fsdp": 4, "tensor": 2}`."""
  out = {}
  for item in filter(None, (p.strip() for p in text.split(","))):
    axis, _, size = item.partition("=")
    if axis not in ("data", "fsdp", "tensor") or not size.lstrip("-").isdigit():
      raise UserError(f"--mesh item {item!r} is not AXIS=SIZE (data, fsdp, tensor)")
    out[axis] = int(size)
  return out


def run(
  *,
  size_mb: float,
  devices: int,
  mesh: dict[str, int],
  shards: int,
  dtype: str,
  modes: list[str],
  malloc: str,
  directory: str,
) -> dict[str, Any]:
  """Writes the checkpoint into `directory`, loads it once per mode (each in its own process)
  and returns the figures (bytes, seconds)."""
  shape = llama_shape(size_mb)
  tensors = hf_tensors(shape)
  total = sum(t.nbytes for t in tensors.values())
  largest = max(tensors.values(), key=lambda t: t.size)
  max_shard = math.ceil(total / shards) + largest.nbytes // 2
  files = write_safetensors(directory, tensors, max_shard_bytes=max_shard)
  del tensors
  itemsize = np.dtype(dtype).itemsize
  facts: dict[str, Any] = {
    "shape": shape,
    "dtype": dtype,
    "checkpoint_bytes": total,
    "files": len(files),
    "largest_file_bytes": max(os.path.getsize(f) for f in files),
    "largest_tensor_stored_bytes": largest.nbytes,
    "largest_tensor_bytes": largest.size * itemsize,
    "devices": devices,
    "mesh": mesh,
    "malloc": malloc,
    "modes": {},
  }
  facts["bound_bytes"] = facts["largest_tensor_bytes"] + facts["largest_file_bytes"]
  spec = dict(directory=directory, shape=shape, mesh=mesh, dtype=dtype)
  for mode in modes:
    facts["modes"][mode] = _run_child({**spec, "mode": mode}, devices, malloc)
    facts["mesh"] = facts["modes"][mode]["mesh"]
  return facts


def table(facts: dict[str, Any]) -> list[str]:
  """The lines printed for `run`'s figures."""
  s = facts["shape"]
  mesh = " ".join(f"{k}={v}" for k, v in facts["mesh"].items())
  lines = [
    f"checkpoint: {facts['checkpoint_bytes'] / MB:.1f} MB bfloat16 in {facts['files']} files "
    f"(largest {facts['largest_file_bytes'] / MB:.1f} MB); Llama dim {s['dim']}, "
    f"{s['num_layers']} layers, vocab {s['vocab_size']}",
    f"largest tensor: {facts['largest_tensor_bytes'] / MB:.1f} MB as {facts['dtype']} "
    f"({facts['largest_tensor_stored_bytes'] / MB:.1f} MB stored); bound = largest tensor + "
    f"largest file = {facts['bound_bytes'] / MB:.1f} MB",
    f"{facts['devices']} faked CPU devices, mesh {mesh}; VQLM_HOST_MALLOC={facts['malloc']}",
    f"{'mode':<7} | {'placed MB':>9} | {'peak RSS - before - placed MB':>29} | {'/ bound':>7} | "
    f"{'reads':>5} | {'seconds':>7} | checksum",
  ]
  for mode, r in facts["modes"].items():
    lines.append(
      f"{mode:<7} | {r['placed_bytes'] / MB:9.1f} | {r['extra_bytes'] / MB:29.1f} | "
      f"{r['extra_bytes'] / facts['bound_bytes']:7.2f} | {r['reads']:5d} | "
      f"{r['seconds']:7.2f} | {r['checksum']:.6g}"
    )
  sums = {round(r["checksum"], 2) for r in facts["modes"].values()}
  if len(sums) > 1:
    lines.append("CHECKSUMS DIFFER: the modes placed different parameters")
  return lines


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog=argv[0] if argv else "vqlm.bench load", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--size_mb", type=float, default=300, help="checkpoint size (MB, bf16)")
  parser.add_argument("--devices", type=int, default=8, help="faked CPU devices")
  parser.add_argument(
    "--mesh", default="fsdp=-1,tensor=2", help="mesh shape (default: fsdp=-1,tensor=2)"
  )
  parser.add_argument("--shards", type=int, default=3, help="safetensors files to write")
  parser.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")
  parser.add_argument(
    "--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES)
  )
  parser.add_argument(
    "--malloc",
    default="system",
    choices=("system", "reuse"),
    help="VQLM_HOST_MALLOC of the loading processes (default: system, glibc's defaults)",
  )
  parser.add_argument("--dir", default="", help="write the checkpoint here (default: a temp dir)")
  parser.add_argument("--out", default="", help="also write the figures as JSON (-: stdout)")
  args = parser.parse_args(argv[1:])
  modes = [m for m in args.modes.split(",") if m]
  unknown = sorted(set(modes) - set(MODES))
  if unknown or not modes:
    raise UserError(f"--modes {args.modes!r}: use some of {', '.join(MODES)}")
  if args.size_mb <= 0 or args.devices < 1 or args.shards < 1:
    raise UserError("--size_mb, --devices and --shards must be positive")
  kw = dict(
    size_mb=args.size_mb,
    devices=args.devices,
    mesh=parse_mesh(args.mesh),
    shards=args.shards,
    dtype=np.dtype(args.dtype).name,
    modes=modes,
    malloc=args.malloc,
  )
  if args.dir:
    facts = run(**kw, directory=args.dir)
  else:
    with tempfile.TemporaryDirectory(prefix="vqlm-load-") as tmp:
      facts = run(**kw, directory=tmp)
  print("\n".join(table(facts)))
  if args.out:
    text = json.dumps(facts, indent=2)
    if args.out == "-":
      print(text)
    else:
      with open(args.out, "w") as f:
        f.write(text + "\n")
  return 0
