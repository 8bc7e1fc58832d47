"""`vqlm compile --config CONFIG [--mesh data=..,fsdp=..,tensor=..] [--batch N] [--seq_len S]`.

Lowers and compiles one training step ahead of time, on abstract inputs only (shapes, dtypes and
shardings: neither the train state nor a batch is allocated), for the devices this process sees,
and prints XLA's memory analysis per device and the step's FLOPs. Run it before booking machines:
if `total` exceeds a device's memory, change the mesh, the batch or the remat policy first.

The program is compiled for the devices present: on a laptop one CPU, on a GPU node its GPUs, on a
TPU pod host the whole slice (run it on every host, as training does:
`vqlm.runtime.distributed` joins them). LM configs need no data: the vocabulary is a nominal one
of the size's `NOMINAL_VOCAB` (16384 image codes on a 16x16 grid where the size allows; see
`nominal_vocab`).

XLA's cost analysis counts a while loop's body once, so with `scan_layers` its FLOPs cover one
layer; for LMs the model FLOPs (6 N + attention per token, PaLM appendix B) are printed too.
"""

from collections.abc import Mapping
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

GIB = 2.0**30
NOMINAL_IMAGE_CODES = 16384
NOMINAL_GRID = (16, 16)


def _define(f) -> None:
  f.DEFINE_string(
    "mesh",
    "",
    "mesh shape override, e.g. data=2,fsdp=4,tensor=1 (one axis may be -1: all remaining devices)",
  )
  f.DEFINE_integer("batch", 0, "global batch size (default: config.train.batch_size)")
  f.DEFINE_integer("seq_len", 0, "LM tokens per sequence (default: config.train.seq_len)")
  f.DEFINE_integer("vocab_size", 0, "LM vocabulary size (default: the size's nominal one)")
  f.DEFINE_bool("lower_only", False, "stop after lowering (prints the train state's size only)")


def parse_mesh(text: str) -> dict[str, int]:
  """`"data=2,fsdp=4"` -> `{"data": 2, "fsdp": 4}`; ValueError naming the accepted form."""
  from vqlm.runtime.mesh import MESH_AXES

  shape = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    axis, sep, size = item.partition("=")
    axis = axis.strip()
    if not sep or axis not in MESH_AXES:
      raise UserError(
        f"--mesh item '{item}' is not AXIS=SIZE with AXIS in "
        f"{', '.join(MESH_AXES)}; e.g. --mesh data=2,fsdp=4,tensor=1"
      )
    try:
      shape[axis] = int(size)
    except ValueError:
      raise UserError(
        f"--mesh size '{size}' of axis {axis} is not an integer; e.g. --mesh data=2,fsdp=4,tensor=1"
      ) from None
  return shape


def nominal_vocab(size: str, vocab_size: int = 0):
  """A Vocab whose padded size is the LM size's nominal one (no text model, no data needed).

  16384 image codes on a 16x16 grid (a LlamaGen-style 256x256 tokenizer); vocabularies too small
  for that (the test sizes) split evenly between text and image codes.
  """
  from vqlm.nn.presets import NOMINAL_VOCAB
  from vqlm.vocab import DEFAULT_SPECIALS, Vocab

  total = vocab_size or NOMINAL_VOCAB.get(size, 32768)
  image = NOMINAL_IMAGE_CODES if total > 2 * NOMINAL_IMAGE_CODES else total // 2
  reserved = 10
  text = total - image - len(DEFAULT_SPECIALS) - reserved
  if text <= 0:
    raise UserError(
      f"--vocab_size {total} leaves no room for text ids next to {image} image "
      f"codes and {len(DEFAULT_SPECIALS) + reserved} special slots; use at least 64"
    )
  return Vocab(text_size=text, image_size=image, grid=NOMINAL_GRID, num_reserved=reserved)


def build(config: ml_collections.ConfigDict, *, vocab_size: int = 0):
  """(trainer, example_fn, description) for the config's stage; example_fn(batch) -> numpy batch."""
  stage = config.get("stage")
  if stage == "lm":
    from vqlm.stages import lm as lm_stage

    vocab = nominal_vocab(config.get("size", ""), vocab_size)
    trainer = lm_stage.build_trainer(config, vocab, progress=False)
    m = config.model
    desc = (
      f"lm size={config.get('size')} vocab={vocab.padded_size} dtype={m.dtype} "
      f"remat={m.remat_policy} scan_layers={m.scan_layers}"
    )
    return trainer, lm_stage.example_batch, desc
  if stage == "tokenizer":
    from vqlm.stages import tokenizer as tokenizer_stage

    trainer = tokenizer_stage.build_trainer(config, progress=False)
    size = config.data.image_size
    desc = f"image tokenizer {size}x{size} gan={config.loss.gan_weight > 0}"
    return trainer, tokenizer_stage._example_batch, desc
  raise UserError(f"config has unknown stage '{stage}'; valid: lm, tokenizer")


def _with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references()
  c.train.batch_size = batch
  return c


def abstract_batch(config, example_fn, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch as ShapeDtypeStructs sharded over data x fsdp (nothing allocated)."""
  from vqlm.runtime import mesh as mesh_lib

  one = example_fn(_with_batch(config, 1))
  b = config.train.batch_size
  return {
    k: jax.ShapeDtypeStruct(
      (b,) + v.shape[1:], v.dtype, sharding=mesh_lib.batch_sharding(mesh, v.ndim)
    )
    for k, v in one.items()
  }


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def memory_summary(stats: Any) -> dict[str, int]:
  """XLA's CompiledMemoryStats -> bytes per device, with `total` = args + outputs - aliased +
  temporaries + generated code (the donated state's buffers are reused for the new state)."""
  out = {
    "arguments": int(stats.argument_size_in_bytes),
    "outputs": int(stats.output_size_in_bytes),
    "aliased": int(stats.alias_size_in_bytes),
    "temporaries": int(stats.temp_size_in_bytes),
    "generated code": int(stats.generated_code_size_in_bytes),
  }
  out["total"] = (
    out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated code"]
  )
  return out


def _flops(compiled: Any) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not isinstance(cost, Mapping) or "flops" not in cost:
    return None
  return float(cost["flops"])


def _model_flops_per_step(config, trainer, state) -> float:
  """LM training FLOPs of one global step: (6 N + 12 L H Dh S) per token (PaLM appendix B)."""
  from vqlm.nn.flops import flops_per_token

  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  model = trainer.task.model
  per_token = flops_per_token(
    n,
    num_layers=model.config.num_layers,
    num_heads=model.config.num_heads,
    head_dim=model.config.head_size(),
    seq_len=config.train.seq_len,
  )
  return per_token * config.train.batch_size * config.train.seq_len


def _device_memory(device: jax.Device) -> int | None:
  """Bytes XLA may use on `device` (GPU/TPU); None where unknown (CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # Not implemented on every backend.
    return None
  return (stats or {}).get("bytes_limit")


def _gib(b: int) -> str:
  return f"{b / GIB:10.4f} GiB  ({b:,} bytes)"


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(argv, _define, config=True)
  from vqlm.runtime.distributed import maybe_initialize

  maybe_initialize()
  config = flag_lib.require_config(fv)
  config = config.copy_and_resolve_references()
  if fv.mesh:
    for axis, size in parse_mesh(fv.mesh).items():
      config.mesh.shape[axis] = size
  if fv.batch:
    config.train.batch_size = fv.batch
  if fv.seq_len:
    if config.get("stage") != "lm":
      raise UserError("--seq_len applies to LM configs only")
    config.train.seq_len = fv.seq_len

  from vqlm.runtime import mesh as mesh_lib

  trainer, example_fn, desc = build(config, vocab_size=fv.vocab_size)
  mesh = trainer.mesh
  divisor = mesh_lib.batch_divisor(mesh)
  if config.train.batch_size % divisor:
    raise UserError(
      f"batch {config.train.batch_size} is not divisible by data x fsdp = "
      f"{divisor}; pass --batch a multiple of {divisor}"
    )
  device = jax.devices()[0]
  shape = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
  print(
    f"devices: {jax.device_count()} x {device.device_kind} ({device.platform}), "
    f"{jax.process_count()} process(es); mesh {shape}"
  )
  batch = abstract_batch(config, example_fn, mesh)
  first = next(iter(batch.values()))
  print(
    f"model: {desc}; global batch {' x '.join(map(str, first.shape))} "
    f"({first.shape[0] // divisor} per data x fsdp shard)"
  )

  # The state's shapes do not depend on the batch size: trace init on a batch-of-`divisor` one.
  state = trainer.abstract_target(example_fn(_with_batch(config, divisor)))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  parts = {
    "params": shard_bytes(state.params),
    "optimizer": shard_bytes(state.opt_state),
    "other": shard_bytes(state.extra) + shard_bytes(state.step),
  }
  print(
    f"train state per device: {sum(parts.values()) / GIB:.4g} GiB for {num_params:,} "
    f"params (" + ", ".join(f"{k} {v / GIB:.4g}" for k, v in parts.items()) + ")"
  )

  rng = jax.random.key(0)
  start = time.perf_counter()
  with trainer.context():
    lowered = trainer.step_fn.lower(state, batch, rng)
  print(f"lowered in {time.perf_counter() - start:.1f}s")
  if fv.lower_only:
    return 0
  start = time.perf_counter()
  compiled = lowered.compile()
  print(f"compiled in {time.perf_counter() - start:.1f}s")

  stats = compiled.memory_analysis()
  if stats is None:
    print("memory analysis: not available on this backend")
  else:
    print("memory per device (XLA):")
    for name, value in memory_summary(stats).items():
      print(f"  {name:<15}{_gib(value)}")
    limit = _device_memory(device)
    if limit:
      total = memory_summary(stats)["total"]
      verdict = "fits" if total <= limit else "DOES NOT FIT"
      print(f"  device memory  {limit / GIB:10.4f} GiB: {verdict}")
  flops = _flops(compiled)
  if flops is not None:
    note = (
      " (the scanned layer loop's body counted once)"
      if config.model.get("scan_layers", False)
      else ""
    )
    print(f"FLOPs per step per device (XLA cost analysis): {flops:.4g}{note}")
  if config.get("stage") == "lm":
    model_flops = _model_flops_per_step(config, trainer, state)
    print(
      f"model FLOPs per step per device (6N + attention): {model_flops / jax.device_count():.4g}"
    )
  return 0
