"""`python -m vqlm.bench sample --size small`: text-to-image sampling speed against transformers.

Builds the LM of `configs/lm.py` SIZES[size] with random weights over a vocabulary like the
demo's (1000 text ids + 16 special slots + 512 image codes, an 8x8 grid; `--grid 16` for 256
codes per image) and measures image tokens/s for generating one grid per prompt at each batch
size, compile time excluded (the first call's time is printed separately). In the same process
it times Hugging Face `LlamaForCausalLM.generate(do_sample=True, max_new_tokens=min_new_tokens=
codes)` of the same shape, dtype and sampling settings (temperature 1, top-k 50), with its
static KV cache (`--hf_cache static`, the default; `dynamic` for transformers' own default), and
prints tokens/s and the ratio vqlm / transformers. The timed runs alternate in blocks
(`--blocks` blocks of `--repeats` runs per sampler, each block after one untimed run), so load
changes hit both alike while neither pays for the other's state at every call: right after a
torch `generate` (its OpenMP pool, its caches) a vqlm run is markedly slower than in a block of
its own (docs/benchmarks.md). torch runs with its default thread count (the machine's cores)
and with one thread (`--hf_threads`; its default pool can collapse on a busy machine); the ratio
is against the fastest. torch and transformers (the `bench` extra) are imported lazily; without
them the baseline is skipped with a message.

On a CPU the process starts with one host device per core (`--cpu_devices`, default: the
machine's cores) and vqlm is timed twice: on one device, and with the batch split over all of
them, one decode loop per device (`Sampler` on a data-only mesh; batch sizes that divide). torch
uses the same cores through its thread pool. The ratio is the faster vqlm against the faster
torch.

vqlm's timing is end to end (prompt packing, prefill, the codes plus the forced `<eoi>`, and
the copy back to the host), counting only the image codes. It samples from the image codes'
logits alone (its "image" mode computes only those); `generate` computes and filters the whole
vocabulary's.
"""

import argparse
from collections.abc import Callable
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.runtime import mesh as mesh_lib
from vqlm.sample.processors import SamplingConfig, Settings
from vqlm.sample.sampler import Sampler
from vqlm.testing.torch_refs import prepare_torch_imports
from vqlm.vocab import Vocab

PROMPT_TEXT_LEN = 8  # caption ids in each prompt: <bos> caption <boi>


def demo_vocab(grid: int = 8, codes: int = 512) -> Vocab:
  """1000 text ids, 6 specials + 10 reserved, `codes` image codes, a `grid` x `grid` grid (the
  demo's by default: 512 codes, 8x8)."""
  return Vocab(text_size=1000, image_size=codes, grid=(grid, grid), num_reserved=10)


def model_kwargs(size: str, vocab: Vocab) -> dict[str, Any]:
  from vqlm.nn.presets import TRANSFORMER_SIZES

  if size not in TRANSFORMER_SIZES:
    raise UserError(f"unknown --size {size!r}; valid: {', '.join(TRANSFORMER_SIZES)}")
  return dict(
    vocab_size=vocab.padded_size,
    **TRANSFORMER_SIZES[size],
    image_offset=vocab.image_offset,
    image_size=vocab.image_size,
    grid=vocab.grid,
  )


def prompts(vocab: Vocab, batch: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  text = rng.integers(1, vocab.text_size, size=(batch, PROMPT_TEXT_LEN))
  return np.concatenate(
    [np.full((batch, 1), vocab.bos_id), text, np.full((batch, 1), vocab.boi_id)], axis=1
  ).astype(np.int64)


def use_cpu_devices(count: int) -> str:
  """Starts JAX's CPU backend with `count` host devices (0: one per core); returns what was done.
  Only possible before JAX's first operation, and skipped when XLA_FLAGS already sets a count."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return "host devices from XLA_FLAGS"
  count = count or os.cpu_count() or 1
  if count == 1:
    return "1 host device"
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # JAX already started (e.g. inside a test process): keep its devices.
    return "JAX already started: --cpu_devices not applied"
  return f"{count} host devices"


def data_mesh() -> Mesh | None:
  """A mesh splitting the batch over every CPU device; None on one device or an accelerator."""
  devices = jax.devices()
  if devices[0].platform != "cpu" or len(devices) < 2:
    return None
  return mesh_lib.make_mesh({"data": -1})


def vqlm_runner(
  kw: dict[str, Any],
  vocab: Vocab,
  *,
  top_k: int,
  dtype: str = "float32",
  mesh: Mesh | None = None,
  params: Any = None,
) -> Callable[[int, int], None]:
  """`run(batch, seed)`: one t2i grid per prompt with the vqlm sampler (compiles per batch);
  with `mesh`, one decode loop per device (`run.shards(batch)` of them)."""
  model = Transformer(TransformerConfig(**kw))
  if params is None:
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  sampler = Sampler(model, params, vocab, dtype=None if dtype == "float32" else dtype, mesh=mesh)
  settings = Settings(temperature=1.0, top_k=top_k, top_p=1.0)
  sampling = SamplingConfig(text=settings, image=settings)
  n = vocab.tokens_per_image

  def run(batch: int, seed: int) -> None:
    res = sampler(
      prompts(vocab, batch).tolist(),
      max_new_tokens=n + 1,
      mode="image",
      sampling=sampling,
      seed=seed,
    )
    assert res.tokens.shape == (batch, n + 1)

  run.shards = sampler.loop_shards
  run.params = params
  return run


def transformers_runner(
  kw: dict[str, Any],
  vocab: Vocab,
  *,
  top_k: int,
  dtype: str = "float32",
  device: str = "cpu",
  cache_implementation: str | None = None,
) -> Callable[[int, int, int | None], None] | str:
  """`run(batch, seed, threads)` with `LlamaForCausalLM.generate` on torch `device` ("cpu",
  "cuda"; `threads` applies to the CPU), or a skip message. `cache_implementation`: generate's
  ("static": a preallocated KV cache; None: transformers' default dynamic cache)."""
  prepare_torch_imports()  # the interop extra's torchvision (vqlm.testing.torch_refs)
  try:
    import torch
    import transformers
  except ImportError as e:
    return f"skipped: torch/transformers not installed ({e.name}); pip install -e '.[bench]'"
  config = transformers.LlamaConfig(
    vocab_size=kw["vocab_size"],
    hidden_size=kw["dim"],
    num_hidden_layers=kw["num_layers"],
    num_attention_heads=kw["num_heads"],
    num_key_value_heads=kw["num_kv_heads"],
    intermediate_size=kw["mlp_dim"],
    tie_word_embeddings=kw["tie_embeddings"],
    rms_norm_eps=1e-6,
    rope_theta=10_000.0,
    max_position_embeddings=max(256, 2 * vocab.tokens_per_image + 32),
    bos_token_id=vocab.bos_id,
    eos_token_id=None,
    pad_token_id=vocab.pad_id,
  )
  torch.manual_seed(0)
  model = (
    transformers.LlamaForCausalLM(config).eval().to(device=device, dtype=getattr(torch, dtype))
  )
  n = vocab.tokens_per_image
  default_threads = torch.get_num_threads()
  extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
  sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

  def run(batch: int, seed: int, threads: int | None = None) -> None:
    ids = torch.as_tensor(prompts(vocab, batch), device=device)
    torch.set_num_threads(threads or default_threads)
    torch.manual_seed(seed)
    try:
      with torch.inference_mode():
        res = model.generate(
          ids,
          attention_mask=torch.ones_like(ids),
          use_cache=True,
          do_sample=True,
          max_new_tokens=n,
          min_new_tokens=n,
          temperature=1.0,
          top_k=top_k or None,
          top_p=1.0,
          pad_token_id=vocab.pad_id,
          **extra,
        )
      sync()
    finally:
      torch.set_num_threads(default_threads)
    assert res.shape == (batch, ids.shape[1] + n)

  run.default_threads = default_threads
  return run


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog=argv[0] if argv else "vqlm.bench sample", description=__doc__.splitlines()[0]
  )
  parser.add_argument("--size", default="small", help="configs/lm.py size (default: small)")
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--top_k", type=int, default=50, help="top-k of both samplers (0 = off)")
  parser.add_argument("--repeats", type=int, default=4, help="timed runs per block")
  parser.add_argument(
    "--blocks",
    type=int,
    default=3,
    help="alternating blocks of timed runs per sampler and batch size",
  )
  parser.add_argument("--skip_transformers", action="store_true", help="time vqlm only")
  parser.add_argument(
    "--hf_cache",
    default="static",
    choices=("static", "dynamic"),
    help="transformers' KV cache: static (preallocated, the default) or its dynamic default",
  )
  parser.add_argument(
    "--hf_threads",
    default="default,1",
    help="comma-separated torch thread counts to time ('default': torch's own, the machine's "
    "cores); the ratio is against the fastest (default: default,1)",
  )
  parser.add_argument("--grid", type=int, default=8, help="image grid side (16: 256 tokens)")
  parser.add_argument("--codes", type=int, default=512, help="image codebook size")
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="weights and compute of both samplers (vqlm keeps logits, softmax "
    "and sampling in float32)",
  )
  parser.add_argument(
    "--cpu_devices",
    type=int,
    default=0,
    help="host devices JAX starts on a CPU (default 0: one per core); vqlm is also timed with "
    "the batch split over them, one decode loop per device",
  )
  args = parser.parse_args(argv[1:])
  try:
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
  except ValueError:
    raise UserError(f"--batches={args.batches!r} must be comma-separated integers") from None
  if not batches or min(batches) <= 0 or args.repeats <= 0 or args.blocks <= 0:
    raise UserError("--batches, --repeats and --blocks must be positive")
  hf_threads = [t.strip() for t in args.hf_threads.split(",") if t.strip()]
  if not hf_threads or not all(t == "default" or (t.isdigit() and int(t) > 0) for t in hf_threads):
    raise UserError(
      f"--hf_threads={args.hf_threads!r} must be comma-separated positive counts or 'default'"
    )
  if args.cpu_devices < 0:
    raise UserError(f"--cpu_devices={args.cpu_devices} must be >= 0 (0: one per core)")
  devices_note = use_cpu_devices(args.cpu_devices)
  vocab = demo_vocab(args.grid, args.codes)
  kw = model_kwargs(args.size, vocab)
  n = vocab.tokens_per_image
  print(
    f"sample bench: size={args.size} dim={kw['dim']} layers={kw['num_layers']} "
    f"heads={kw['num_heads']}/{kw['num_kv_heads']} mlp={kw['mlp_dim']} "
    f"vocab={vocab.padded_size} ({vocab.text_size} text, {vocab.image_size} codes), "
    f"{n} image tokens per prompt, temperature 1, top_k={args.top_k}, "
    f"dtype={args.dtype}, device={jax.devices()[0].platform}, hf cache {args.hf_cache}, "
    f"median of {args.blocks} x {args.repeats} runs, {devices_note}"
  )
  ours = {"vqlm": vqlm_runner(kw, vocab, top_k=args.top_k, dtype=args.dtype)}
  mesh = data_mesh()
  if mesh is not None:  # The same weights, the batch split over the host devices.
    params = ours["vqlm"].params
    ours[f"vqlm {mesh.size} dev"] = vqlm_runner(
      kw, vocab, top_k=args.top_k, dtype=args.dtype, mesh=mesh, params=params
    )
  theirs = (
    "skipped: --skip_transformers"
    if args.skip_transformers
    else transformers_runner(
      kw,
      vocab,
      top_k=args.top_k,
      dtype=args.dtype,
      cache_implementation=None if args.hf_cache == "dynamic" else args.hf_cache,
    )
  )
  if isinstance(theirs, str):
    print(f"transformers baseline {theirs}")
  rows = []
  for b in batches:
    # vqlm on one device, and split over the host devices where the batch divides.
    mine = {k: run for k, run in ours.items() if run.shards(b) > 1 or k == "vqlm"}
    for name, run in mine.items():
      first = _timed(run, b, 0)
      print(f"{name} first call at batch {b} (compile + run): {first:.2f} s")
      run(b, 1)  # Warm.
    times = {name: [] for name in mine}
    variants = {}
    if not isinstance(theirs, str):
      # torch's default thread pool can collapse on a busy machine: time 1 thread as well (by
      # default) and compare against the fastest.
      counts = [theirs.default_threads if t == "default" else int(t) for t in hf_threads]
      variants = {f"hf {c} thread{'s' if c > 1 else ''}": c for c in counts}
      for name, threads in variants.items():
        theirs(b, 0, threads)  # Warm.
        times[name] = []
    for block in range(args.blocks):  # Alternating blocks: load changes hit all alike.
      for name, run in mine.items():
        run(b, 1000 + block)  # Untimed: settles the runtime after the other sampler's block.
        times[name] += [_timed(run, b, 2 + block * args.repeats + i) for i in range(args.repeats)]
      for name, threads in variants.items():
        theirs(b, 1000 + block, threads)
        times[name] += [
          _timed(theirs, b, 1 + block * args.repeats + i, threads) for i in range(args.repeats)
        ]
    rate = {name: b * n / statistics.median(t) for name, t in times.items()}
    rows.append((b, rate))
  print_rates(rows, list(ours), list(variants), n)
  return 0


def print_rates(
  rows: list[tuple[int, dict[str, float]]], ours: list[str], theirs: list[str], n: int
) -> None:
  """The table: tokens/s per batch size of each vqlm and torch variant ('-': not timed), and
  the faster vqlm over the faster torch."""
  cell = lambda rate, k, width: f"{rate[k]:>{width}.0f}" if k in rate else f"{'-':>{width}}"
  header = (
    f"{'batch':>5}"
    + "".join(f" | {k + ' tok/s':>{max(10, len(k) + 6)}}" for k in ours)
    + "".join(f" | {k + ' tok/s':>20}" for k in theirs)
    + f" | {'vqlm / best hf':>14}"
  )
  print(header)
  for b, rate in rows:
    line = f"{b:>5}" + "".join(f" | {cell(rate, k, max(10, len(k) + 6))}" for k in ours)
    line += "".join(f" | {cell(rate, k, 20)}" for k in theirs)
    mine = max(rate[k] for k in ours if k in rate)
    best = max((rate[k] for k in theirs), default=None)
    line += f" | {mine / best:>13.2f}x" if best else f" | {'-':>14}"
    print(line + f"   (vqlm {mine / n:.1f} images/s)")
