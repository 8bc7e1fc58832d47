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

`--sampler` (LM configs) compiles instead the step the sampler's decode loop repeats
(`vqlm.sample.sampler`): one token for each of `--batch` rows against a KV cache of `--seq_len`
slots, the parameters sharded by the rules as a loaded run's are, and prints the parameters' and
the cache's bytes per device next to XLA's memory analysis: the memory a sampler needs, sized
without allocating it (e.g. the `7b` size with `--sampler_dtype bfloat16`).

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
from vqlm.errors import UserError, check_int

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
  f.DEFINE_bool(
    "sampler",
    False,
    "LM configs: compile the sampler's decode step instead of the train step (--batch rows, a "
    "KV cache of --seq_len slots)",
  )
  f.DEFINE_string(
    "sampler_dtype",
    "",
    "with --sampler: sample with the weights cast to this dtype and computed in it, e.g. bfloat16 "
    "(as Sampler(dtype=...)); default: the config's dtypes",
  )
  f.DEFINE_enum(
    "distributed",
    None,
    ["auto", "on", "off"],
    "multi-process start-up, as in vqlm train (default: $VQLM_DISTRIBUTED or auto)",
  )


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

    _check_sizes(config, "train.batch_size", "train.seq_len")
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

    _check_sizes(config, "train.batch_size", "data.image_size")
    trainer = tokenizer_stage.build_trainer(config, progress=False)
    size = config.data.image_size
    desc = f"image tokenizer {size}x{size} gan={config.loss.gan_weight > 0}"
    return trainer, tokenizer_stage._example_batch, desc
  raise UserError(f"config has unknown stage '{stage}'; valid: lm, tokenizer")


def _check_sizes(config: ml_collections.ConfigDict, *fields: str) -> None:
  """The example batch's sizes must be positive integers (numpy would raise on negative ones)."""
  for field in fields:
    section, name = field.split(".")
    check_int(f"config.{field}", config[section].get(name))


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


def _compile_into(facts: dict[str, Any], lowered: Any, device: Any) -> None:
  """Compiles `lowered` and records in `facts` the compile time, XLA's memory analysis (and
  whether it fits `device`'s memory) and XLA's FLOP count."""
  start = time.perf_counter()
  compiled = lowered.compile()
  facts["compile_seconds"] = time.perf_counter() - start
  stats = compiled.memory_analysis()
  if stats is not None:
    facts["memory"] = memory_summary(stats)
    facts["device_memory"] = _device_memory(device) or None
    if facts["device_memory"]:
      facts["fits"] = facts["memory"]["total"] <= facts["device_memory"]
  facts["xla_flops"] = _flops(compiled)


def _memory_lines(facts: dict[str, Any], title: str) -> list[str]:
  """The compile time and XLA's memory analysis (with `title`), as report lines."""
  lines = [f"compiled in {facts['compile_seconds']:.1f}s"]
  memory = facts["memory"]
  if memory is None:
    return lines + ["memory analysis: not available on this backend"]
  lines.append(title)
  lines += [f"  {name:<15}{_gib(value)}" for name, value in memory.items()]
  if facts["device_memory"]:
    verdict = "fits" if facts["fits"] else "DOES NOT FIT"
    lines.append(f"  device memory  {facts['device_memory'] / GIB:10.4f} GiB: {verdict}")
  return lines


def apply_overrides(
  config: ml_collections.ConfigDict, *, mesh: str = "", batch: int = 0, seq_len: int = 0
) -> ml_collections.ConfigDict:
  """A resolved copy of `config` with the `--mesh`, `--batch` and `--seq_len` overrides applied."""
  config = config.copy_and_resolve_references()
  if mesh:
    for axis, size in parse_mesh(mesh).items():
      config.mesh.shape[axis] = size
  if batch:
    config.train.batch_size = batch
  if seq_len:
    if config.get("stage") != "lm":
      raise UserError("--seq_len applies to LM configs only")
    config.train.seq_len = seq_len
  return config


def analyze(
  config: ml_collections.ConfigDict, *, vocab_size: int = 0, lower_only: bool = False
) -> dict[str, Any]:
  """Lowers (and unless `lower_only`, compiles) one train step of `config` on abstract inputs.

  Returns plain values (bytes and FLOPs are per device):
    devices, device_kind, platform, processes: what the program was built for;
    mesh: {axis: size}; description: the model in one line;
    batch_shape: the global batch's leading array shape; global_batch; per_shard_batch (per
      data x fsdp shard); num_params; state_bytes: {"params", "optimizer", "other"};
    lower_seconds; scan_layers: whether XLA counts the layer loop's body once;
  and, None when `lower_only` (or, for the memory facts, when the backend does not say):
    compile_seconds; memory: `memory_summary`; xla_flops: XLA's cost analysis;
    model_flops: 6 N + attention (LM configs only); device_memory: bytes XLA may use (GPU/TPU);
    fits: memory["total"] <= device_memory.
  """
  from vqlm.runtime import mesh as mesh_lib

  trainer, example_fn, desc = build(config, vocab_size=vocab_size)
  mesh = trainer.mesh
  divisor = mesh_lib.batch_divisor(mesh)
  if config.train.batch_size % divisor:
    raise UserError(
      f"batch {config.train.batch_size} is not divisible by data x fsdp = "
      f"{divisor}; pass --batch a multiple of {divisor}"
    )
  device = jax.devices()[0]
  batch = abstract_batch(config, example_fn, mesh)
  first = next(iter(batch.values()))
  # The state's shapes do not depend on the batch size: trace init on a batch-of-`divisor` one.
  state = trainer.abstract_target(example_fn(_with_batch(config, divisor)))
  facts: dict[str, Any] = {
    "devices": jax.device_count(),
    "device_kind": device.device_kind,
    "platform": device.platform,
    "processes": jax.process_count(),
    "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
    "description": desc,
    "batch_shape": tuple(int(d) for d in first.shape),
    "global_batch": int(first.shape[0]),
    "per_shard_batch": int(first.shape[0]) // divisor,
    "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
    "state_bytes": {
      "params": shard_bytes(state.params),
      "optimizer": shard_bytes(state.opt_state),
      "other": shard_bytes(state.extra) + shard_bytes(state.step),
    },
    "scan_layers": bool(config.model.get("scan_layers", False)),
    "compile_seconds": None,
    "memory": None,
    "xla_flops": None,
    "model_flops": None,
    "device_memory": None,
    "fits": None,
  }

  rng = jax.random.key(0)
  start = time.perf_counter()
  with trainer.context():
    lowered = trainer.step_fn.lower(state, batch, rng)
  facts["lower_seconds"] = time.perf_counter() - start
  if lower_only:
    return facts
  _compile_into(facts, lowered, device)
  if config.get("stage") == "lm":
    facts["model_flops"] = _model_flops_per_step(config, trainer, state) / jax.device_count()
  return facts


def report(facts: Mapping[str, Any]) -> list[str]:
  """The lines `vqlm compile` prints for `analyze`'s facts."""
  shape = " ".join(f"{k}={v}" for k, v in facts["mesh"].items())
  parts = facts["state_bytes"]
  lines = [
    f"devices: {facts['devices']} x {facts['device_kind']} ({facts['platform']}), "
    f"{facts['processes']} process(es); mesh {shape}",
    f"model: {facts['description']}; global batch {' x '.join(map(str, facts['batch_shape']))} "
    f"({facts['per_shard_batch']} per data x fsdp shard)",
    f"train state per device: {sum(parts.values()) / GIB:.4g} GiB for {facts['num_params']:,} "
    f"params (" + ", ".join(f"{k} {v / GIB:.4g}" for k, v in parts.items()) + ")",
    f"lowered in {facts['lower_seconds']:.1f}s",
  ]
  if facts["compile_seconds"] is None:
    return lines
  lines += _memory_lines(facts, "memory per device (XLA):")
  if facts["xla_flops"] is not None:
    note = " (the scanned layer loop's body counted once)" if facts["scan_layers"] else ""
    lines.append(f"FLOPs per step per device (XLA cost analysis): {facts['xla_flops']:.4g}{note}")
  if facts["model_flops"] is not None:
    lines.append(f"model FLOPs per step per device (6N + attention): {facts['model_flops']:.4g}")
  return lines


def _cache_sharding(mesh: Any, rules: Any, leaf: Any, rows: int, layered: bool) -> Any:
  """A KV cache leaf's sharding: rows over data x fsdp when they divide evenly (as the sampler
  places its batch), the KV heads of `k`/`v` as the rules shard `kv_heads`, the rest whole."""
  import flax.linen as nn
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from vqlm.runtime import mesh as mesh_lib

  def fits(axes: Any, size: int) -> Any:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if names and size % int(np.prod([mesh.shape[n] for n in names])) == 0 else None

  batch, heads = nn.logical_to_mesh_axes(("batch", "kv_heads"), rules)
  spec = [None] * len(leaf.shape)
  lead = 1 if layered else 0
  if rows % mesh_lib.batch_divisor(mesh) == 0:
    spec[lead] = fits(batch, rows)
  if len(leaf.shape) >= lead + 4:  # k [B, KVH, L / P, Dh, P], v [B, KVH, L, Dh]
    spec[lead + 1] = fits(heads, leaf.shape[lead + 1])
  return NamedSharding(mesh, P(*spec))


def analyze_sampler(
  config: ml_collections.ConfigDict,
  *,
  vocab_size: int = 0,
  dtype: str = "",
  lower_only: bool = False,
) -> dict[str, Any]:
  """Lowers (and unless `lower_only`, compiles) the sampler's decode step for `config`'s LM.

  The step is `model.apply(variables, feed[R, 1], positions=[R, 1], cache=..., decode=True)`
  with the cache donated, as each iteration of the sampler's loop runs it (full-vocabulary
  logits, as in its interleaved and text modes), for R = `config.train.batch_size` rows (with
  classifier-free guidance the sampler runs 2B rows for B prompts) and a cache of
  `config.train.seq_len` slots in the compute dtype (the Sampler's default). `dtype` casts
  weights and computation as `Sampler(dtype=...)` does. Parameters are sharded by the config's
  mesh and rules as a loaded run's are; nothing is allocated.

  Returns plain values (bytes and FLOPs per device): devices, device_kind, platform, processes,
  mesh, description, rows, cache_slots, num_params, params_bytes, cache_bytes, dtype,
  cache_dtype, lower_seconds; and, None when `lower_only` (or unknown): compile_seconds, memory
  (`memory_summary`), xla_flops, device_memory, fits.
  """
  if config.get("stage") != "lm":
    raise UserError(f"--sampler applies to LM configs only, not to stage {config.get('stage')!r}")
  _check_sizes(config, "train.batch_size", "train.seq_len")
  import jax.numpy as jnp

  from vqlm.nn import attention
  from vqlm.nn.transformer import Transformer
  from vqlm.runs import restore
  from vqlm.runs.lm_run import abstract_params, transformer_config
  from vqlm.runtime import mesh as mesh_lib

  vocab = nominal_vocab(config.get("size", ""), vocab_size)
  model_config = transformer_config(config, vocab)
  if dtype:
    model_config = model_config.replace(dtype=dtype, param_dtype=dtype)
  model = Transformer(model_config)
  mesh = mesh_lib.make_mesh(dict(config.mesh.shape))
  rules = mesh_lib.rules_from_config(config.mesh.rules)
  rows, slots = int(config.train.batch_size), int(config.train.seq_len)
  params = restore.placed_abstract(abstract_params(model, 1), mesh, rules)
  variables: dict[str, Any] = {"params": params}
  if model_config.image_embed_init == "codebook":
    shape = (model_config.image_size, model_config.codebook_dim)
    vectors = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=mesh_lib.replicated(mesh))
    variables["codebook"] = {"embed": {"vectors": vectors}}
  cache_dtype = model_config.dtype
  cache = jax.eval_shape(lambda: model.init_cache(rows, slots, cache_dtype))
  cache = {
    name: jax.tree.map(
      lambda x, layered=(name == "layers" and model_config.scan_layers): jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=_cache_sharding(mesh, rules, x, rows, layered)
      ),
      tree,
    )
    for name, tree in cache.items()
  }
  row_sharding = _cache_sharding(
    mesh, rules, jax.ShapeDtypeStruct((rows, 1), jnp.int32), rows, False
  )
  feed = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=row_sharding)

  def step(variables, cache, feed, positions):
    return model.apply(variables, feed, positions=positions, cache=cache, decode=True)

  device = jax.devices()[0]
  facts: dict[str, Any] = {
    "devices": jax.device_count(),
    "device_kind": device.device_kind,
    "platform": device.platform,
    "processes": jax.process_count(),
    "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
    "description": (
      f"lm size={config.get('size')} vocab={vocab.padded_size} "
      f"scan_layers={model_config.scan_layers}"
    ),
    "rows": rows,
    "cache_slots": attention.cache_slots(slots),
    "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
    "params_bytes": shard_bytes(variables),
    "cache_bytes": shard_bytes(cache),
    "dtype": jnp.dtype(model_config.param_dtype).name,
    "cache_dtype": jnp.dtype(cache_dtype).name,
    "compile_seconds": None,
    "memory": None,
    "xla_flops": None,
    "device_memory": None,
    "fits": None,
  }
  start = time.perf_counter()
  with mesh_lib.activate(mesh, rules):
    lowered = jax.jit(step, donate_argnums=(1,)).lower(variables, cache, feed, feed)
  facts["lower_seconds"] = time.perf_counter() - start
  if lower_only:
    return facts
  _compile_into(facts, lowered, device)
  return facts


def report_sampler(facts: Mapping[str, Any]) -> list[str]:
  """The lines `vqlm compile --sampler` prints for `analyze_sampler`'s facts."""
  shape = " ".join(f"{k}={v}" for k, v in facts["mesh"].items())
  lines = [
    f"devices: {facts['devices']} x {facts['device_kind']} ({facts['platform']}), "
    f"{facts['processes']} process(es); mesh {shape}",
    f"sampler decode step: {facts['description']}; {facts['rows']} rows, a KV cache of "
    f"{facts['cache_slots']} slots ({facts['cache_dtype']})",
    f"per device: params {facts['params_bytes'] / GIB:.4g} GiB ({facts['num_params']:,} "
    f"{facts['dtype']} params), KV cache {facts['cache_bytes'] / GIB:.4g} GiB",
    f"lowered in {facts['lower_seconds']:.1f}s",
  ]
  if facts["compile_seconds"] is None:
    return lines
  lines += _memory_lines(
    facts, "memory per device (XLA; the cache is donated: aliased to the new one):"
  )
  if facts["xla_flops"] is not None:
    lines.append(f"FLOPs per decode step per device (XLA cost analysis): {facts['xla_flops']:.4g}")
  return lines


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(argv, _define, config=True)
  from vqlm.runtime.distributed import maybe_initialize

  maybe_initialize(fv.distributed)
  config = apply_overrides(
    flag_lib.require_config(fv), mesh=fv.mesh, batch=fv.batch, seq_len=fv.seq_len
  )
  if fv.sampler:
    facts = analyze_sampler(
      config, vocab_size=fv.vocab_size, dtype=fv.sampler_dtype, lower_only=fv.lower_only
    )
    print("\n".join(report_sampler(facts)))
    return 0
  if fv.sampler_dtype:
    raise UserError("--sampler_dtype applies with --sampler only")
  facts = analyze(config, vocab_size=fv.vocab_size, lower_only=fv.lower_only)
  print("\n".join(report(facts)))
  return 0
