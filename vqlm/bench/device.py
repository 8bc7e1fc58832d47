"""`python -m vqlm.bench device [--parts lm,tokenizer,sample] [--out device.json] [--dry_run]`.

vqlm against PyTorch on one accelerator, in one process, each part with its own time limit:

  lm         the `large` LM preset's training step (bfloat16 compute over float32 parameters,
             scanned layers, remat `dots_with_no_batch_dims`, attention_impl "auto"): tokens/s
             and MFU (`vqlm.nn.flops.flops_per_token` over `vqlm.bench.peak`'s dense bf16 peak),
             against the same-shaped transformers LlamaForCausalLM (SDPA attention, the same
             mixed precision under `torch.autocast`; `vqlm.bench.lm`).
  tokenizer  the `base` image tokenizer's generator step (256x256 images, L1 + VQ losses, no
             discriminator): images/s against the same-shaped diffusers `VQModel` (float32 in
             both; PyTorch may use TF32 as XLA does by default).
  sample     drawing one 16x16 grid (256 image tokens) per prompt with the `large` LM at batch
             8, 64 and 1, in that order (bfloat16): image tokens/s against transformers
             `generate` with a static KV cache (`vqlm.bench.sample`).

Each part prints one table (vqlm, PyTorch, vqlm / PyTorch); `--out FILE` also writes every
figure as JSON (`--out -`: to stdout). PyTorch runs on the CUDA device when there is one; on a
TPU (or without torch, transformers or diffusers) its lines say why they were skipped. A part
over its time limit keeps what it measured and says where it stopped. `--dry_run` runs tiny
shapes in seconds on the CPU (tests/test_bench_device.py), or as a smoke test on the device.

Imports neither ml-collections, grain, TFDS nor diffusers (diffusers only for its line), so it
runs on an accelerator image that has only jax, flax, optax (and torch + transformers).
"""

import argparse
from collections.abc import Callable, Mapping
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqlm.bench import peak
from vqlm.errors import UserError

PARTS = ("lm", "tokenizer", "sample")
# Each part's time limit in seconds (`--time_limit` sets one for all): 7 minutes together, and
# each is interrupted HARD_GRACE seconds past its limit at the latest, so the three stay under 8.5.
# On an H200 the LM part took 37 s and the tokenizer's vqlm step 62 s; sampling compiles for
# about 43 s per batch size on each side, so it gets the most.
PART_SECONDS = {"lm": 90.0, "tokenizer": 100.0, "sample": 230.0}
HARD_GRACE = 30.0

# How `configs/lm.py` trains the LM sizes the parts use (vqlm.stages.lm_config RECIPES, which
# imports ml-collections; tests/test_bench_device.py keeps the two in step), with the new
# default attention.
LM_TRAINING = dict(
  dtype="bfloat16",
  scan_layers=True,
  remat_policy="dots_with_no_batch_dims",
  query_chunks=8,
  attention_impl="auto",
)

# Full runs (an accelerator) and `--dry_run` (tiny shapes on the CPU).
SETTINGS = {
  "full": dict(
    lm_size="large",
    lm_overrides={},
    lm_batch=8,
    lm_seq_len=2048,
    lm_steps=10,
    tokenizer_size="base",
    tokenizer_batch=32,
    tokenizer_steps=5,
    sample_size="large",
    sample_grid=16,
    sample_codes=16384,
    # The batches the speed bars name first: a part that runs out of time loses batch 1.
    sample_batches=(8, 64, 1),
    sample_dtype="bfloat16",
    repeats=2,
  ),
  "dry_run": dict(
    lm_size="tiny",
    # One float32 layer, nothing scanned or rematerialised: the CPU compiles it in seconds.
    lm_overrides=dict(
      num_layers=1, dtype="float32", scan_layers=False, remat_policy="none", query_chunks=1
    ),
    lm_batch=2,
    lm_seq_len=32,
    lm_steps=1,
    tokenizer_size="dry_run",
    tokenizer_batch=2,
    tokenizer_steps=1,
    sample_size="tiny",
    sample_grid=2,
    sample_codes=16,
    sample_batches=(1,),
    sample_dtype="float32",
    repeats=1,
  ),
}
# A tokenizer shape both implementations can build (GroupNorm of 32 groups, a residual block per
# level) and the CPU compiles in seconds (no k-means codebook init).
DRY_RUN_TOKENIZER = dict(
  image_size=8,
  channels=32,
  channel_multipliers=(1,),
  num_res_blocks=1,
  attention=False,
  latent_dim=8,
  codebook_size=16,
  code_dim=4,
  kmeans_init=False,
)


class OutOfTime(Exception):
  """A part ran past its time limit."""


class Budget:
  """A part's time limit: `check(what)` raises OutOfTime before `what` once it has passed."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()

  def check(self, what: str) -> None:
    if self.left() <= 0:
      raise OutOfTime(f"stopped at the {self.seconds:.0f} s limit, before {what}")


@contextlib.contextmanager
def hard_limit(seconds: float):
  """Interrupts the part `seconds` after it began (SIGALRM; a running compile or kernel is
  interrupted when it returns to Python). A no-op off the main thread, without SIGALRM, or while
  another timer runs (e.g. pytest-timeout's), which it leaves alone."""
  if (
    not hasattr(signal, "SIGALRM")
    or threading.current_thread() is not threading.main_thread()
    or signal.getitimer(signal.ITIMER_REAL)[0] > 0
  ):
    yield
    return

  def handler(signum, frame):
    raise OutOfTime(f"interrupted at the {seconds:.0f} s hard limit")

  previous = signal.signal(signal.SIGALRM, handler)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def lm_model_kwargs(size: str) -> dict[str, Any]:
  """Transformer kwargs (without the vocabulary) of LM `size` as `configs/lm.py` trains it."""
  from vqlm.nn.presets import TRANSFORMER_SIZES

  return {**TRANSFORMER_SIZES[size], **LM_TRAINING}


def tokenizer_model_kwargs(size: str) -> tuple[dict[str, Any], int]:
  """(ImageTokenizer kwargs, image size) of tokenizer `size` as `configs/tokenizer.py` builds it
  (conv encoder, VQ bottleneck; "dry_run": DRY_RUN_TOKENIZER)."""
  from vqlm.nn.presets import AUTOENCODER_SIZES

  s = DRY_RUN_TOKENIZER if size == "dry_run" else AUTOENCODER_SIZES[size]
  autoencoder = dict(
    channels=s["channels"],
    channel_multipliers=tuple(s["channel_multipliers"]),
    num_res_blocks=s["num_res_blocks"],
    attention_at_lowest=s["attention"],
  )
  vq = dict(
    kind="vq",
    latent_dim=s["latent_dim"],
    codebook_size=s["codebook_size"],
    code_dim=s["code_dim"],
    beta=0.25,
    ema_decay=None,
    l2_normalize=True,
    kmeans_init=s.get("kmeans_init", True),
    restart_after=50,
  )
  kw = dict(
    encoder=dict(autoencoder, latent_dim=s["latent_dim"]), decoder=dict(autoencoder), bottleneck=vq
  )
  return kw, s["image_size"]


# -- the PyTorch side ---------------------------------------------------------------------------


def torch_device() -> tuple[str | None, str]:
  """(torch device for the baselines, or None, and why not / which): CUDA when JAX runs on a GPU
  and torch sees one, the CPU when JAX does, else None."""
  try:
    import torch
  except ImportError:
    return None, "skipped: torch not installed (pip install -e '.[bench]')"
  platform = jax.default_backend()
  if platform == "cpu":
    return "cpu", f"torch {torch.__version__} on the CPU"
  if platform == "gpu" and torch.cuda.is_available():
    return "cuda", f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"
  return None, f"skipped: no device for PyTorch next to JAX's {platform}"


def _free_torch_memory() -> None:
  if "torch" in sys.modules:
    import torch

    if torch.cuda.is_available():
      torch.cuda.empty_cache()


# -- the parts ----------------------------------------------------------------------------------


def _row(what: str, unit: str, ours: float | None, theirs: float | str | None, **extra) -> dict:
  """One table line: vqlm and PyTorch figures in `unit`, or a note why PyTorch's is missing."""
  row = dict(what=what, unit=unit, vqlm=ours, pytorch=None, ratio=None, pytorch_note="")
  if isinstance(theirs, str):
    row["pytorch_note"] = theirs
  elif theirs:
    row["pytorch"] = float(theirs)
    row["ratio"] = ours / theirs if ours else None
  row.update(extra)
  return row


def part_lm(s: Mapping[str, Any], budget: Budget, rows: list[dict]) -> str:
  from vqlm.bench import lm as lm_bench
  from vqlm.nn import attention
  from vqlm.nn.flops import flops_per_token
  from vqlm.nn.presets import NOMINAL_VOCAB

  size, b, t = s["lm_size"], s["lm_batch"], s["lm_seq_len"]
  kw = {**lm_model_kwargs(size), **s["lm_overrides"]}
  vocab = NOMINAL_VOCAB[size]
  steps, repeats = s["lm_steps"], s["repeats"]
  budget.check("the vqlm step")
  tps, compile_s, n, model = lm_bench.time_vqlm(kw, vocab, b, t, steps, repeats)
  impl = attention.resolve_implementation(
    kw["attention_impl"], kw["dtype"], head_dim=model.config.head_size()
  )
  fpt = flops_per_token(
    n,
    num_layers=model.config.num_layers,
    num_heads=model.config.num_heads,
    head_dim=model.config.head_size(),
    seq_len=t,
  )
  device = jax.devices()[0]
  peak_flops = peak.peak_flops(device, kw["dtype"])
  mfu = lambda rate: rate * fpt / peak_flops if peak_flops else None  # The step uses one device.
  what = f"LM {size} train step, {b} x {t} tokens, {kw['dtype']}, attention "
  what += f"{kw['attention_impl']} -> {impl}"
  what += "".join(f", {k}={v}" for k, v in s["lm_overrides"].items() if k != "dtype")
  rows.append(
    _row(what, "tokens/s", tps, "not run yet", params=n, compile_s=compile_s, flops_per_token=fpt)
  )
  mfu_what = f"  MFU (dense {kw['dtype']} peak)"
  rows.append(_row(mfu_what, "%", _pct(mfu(tps)), "not run yet"))
  if peak_flops is None:
    rows[-1]["pytorch_note"] = f"no peak FLOP/s for {device.device_kind}"
  where, why = torch_device()
  theirs: float | str | None = why
  if where:
    budget.check("the PyTorch step")
    theirs = lm_bench.time_torch(kw, vocab, b, t, steps, repeats, device=where, quiet=True)
    theirs = theirs or "skipped: transformers not installed"
    _free_torch_memory()
  rows[-2] = _row(what, "tokens/s", tps, theirs, **_extra(rows[-2]), torch=why)
  if peak_flops:
    rows[-1] = _row(
      mfu_what,
      "%",
      _pct(mfu(tps)),
      _pct(mfu(theirs)) if isinstance(theirs, float) else theirs,
      peak_flops=peak_flops,
    )
  return f"LM `{size}` training step: vqlm vs transformers LlamaForCausalLM (SDPA)"


def _pct(x: float | None) -> float | None:
  return None if x is None else 100.0 * x


def _extra(row: dict) -> dict:
  return {k: v for k, v in row.items() if k not in _row("", "", None, None)}


def part_tokenizer(s: Mapping[str, Any], budget: Budget, rows: list[dict]) -> str:
  import flax.linen as nn

  from vqlm.bench import tokenizer as tokenizer_bench
  from vqlm.bench.tokenizer import time_calls
  from vqlm.train.optim import make_optimizer
  from vqlm.train.tokenizer_task import TokenizerTask

  size, b = s["tokenizer_size"], s["tokenizer_batch"]
  kw, image_size = tokenizer_model_kwargs(size)
  optimizer, _ = make_optimizer(
    learning_rate=1e-4, warmup_steps=10, total_steps=1000, b2=0.99, weight_decay=0.0
  )
  task = TokenizerTask(model_kwargs=kw, loss=dict(recon="l1"), optimizer=optimizer)
  what = f"tokenizer {size} generator step, {b} x {image_size}x{image_size}, float32"
  # PyTorch first: its cache goes back to the driver before XLA's pool grows (XLA keeps what it
  # took, and after the vqlm step at 32 x 256x256 too little was left for PyTorch's).
  where, why = torch_device()
  theirs: float | str = why
  if where:
    budget.check("the PyTorch step")
    theirs = tokenizer_bench.time_torch_tokenizer(
      kw, image_size, b, s["tokenizer_steps"], s["repeats"], device=where
    )
    _free_torch_memory()
    rows.append(_row(what, "images/s", None, theirs, torch=why))  # kept if vqlm's step stops
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (b, image_size, image_size, 3)).astype(np.float32))
  budget.check("the vqlm step")
  state = jax.jit(lambda r: nn.meta.unbox(task.init(r, images)))(jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = jax.jit(task.train_step, donate_argnums=0)
  key = jax.random.key(1)
  compile_s, per_step, state = time_calls(
    lambda st: step(st, {"image": images}, key)[0],
    state,
    steps=s["tokenizer_steps"],
    repeats=s["repeats"],
  )
  del state
  row = _row(what, "images/s", b / per_step, theirs, params=n, compile_s=compile_s, torch=why)
  rows[len(rows) - 1 if where else len(rows) :] = [row]
  return f"image tokenizer `{size}` training step: vqlm vs diffusers VQModel"


def part_sample(s: Mapping[str, Any], budget: Budget, rows: list[dict]) -> str:
  from vqlm.bench import sample as sample_bench

  size, dtype = s["sample_size"], s["sample_dtype"]
  vocab = sample_bench.demo_vocab(s["sample_grid"], s["sample_codes"])
  kw = sample_bench.model_kwargs(size, vocab)
  n = vocab.tokens_per_image
  top_k = 50
  budget.check("building the vqlm sampler")
  ours = sample_bench.vqlm_runner(kw, vocab, top_k=top_k, dtype=dtype)
  where, why = torch_device()
  theirs: Callable | str = why
  if where:
    theirs = sample_bench.transformers_runner(
      kw, vocab, top_k=top_k, dtype=dtype, device=where, cache_implementation="static"
    )
  for b in s["sample_batches"]:
    what = f"sample {size}, {n} image tokens, batch {b}, {dtype}, top-k {top_k}"
    budget.check(f"batch {b}")
    compile_s = _timed(ours, b, 0)
    ours(b, 1)
    mine = statistics.median(_timed(ours, b, 2 + i) for i in range(s["repeats"]))
    rows.append(_row(what, "tokens/s", b * n / mine, "not run yet", first_call_s=compile_s))
    other: float | str = theirs if isinstance(theirs, str) else "not run yet"
    if not isinstance(theirs, str):
      budget.check(f"PyTorch at batch {b}")
      theirs(b, 0)
      other = b * n / statistics.median(_timed(theirs, b, 1 + i) for i in range(s["repeats"]))
    rows[-1] = _row(what, "tokens/s", b * n / mine, other, **_extra(rows[-1]), torch=why)
  _free_torch_memory()
  return f"sampling with the `{size}` LM: vqlm Sampler vs transformers generate (static cache)"


def _timed(fn: Callable, *args) -> float:
  start = time.perf_counter()
  fn(*args)
  return time.perf_counter() - start


PART_FUNCTIONS = {"lm": part_lm, "tokenizer": part_tokenizer, "sample": part_sample}


# -- output -------------------------------------------------------------------------------------


def _fmt(x: float | None, unit: str) -> str:
  if x is None:
    return "-"
  if unit == "%":
    return f"{x:.1f}%"
  return f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def format_table(title: str, rows: list[dict]) -> str:
  """The rows of one part as a Markdown table (vqlm, PyTorch, vqlm / PyTorch, unit, notes)."""
  lines = [
    f"### {title}",
    "",
    "| what | vqlm | PyTorch | vqlm / PyTorch | unit | notes |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    notes = [r["pytorch_note"]] if r["pytorch_note"] else []
    if r.get("compile_s") is not None:
      notes.append(f"vqlm compile {r['compile_s']:.1f} s")
    if r.get("first_call_s") is not None:
      notes.append(f"vqlm first call {r['first_call_s']:.1f} s")
    ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
    lines.append(
      f"| {r['what']} | {_fmt(r['vqlm'], r['unit'])} | {_fmt(r['pytorch'], r['unit'])} | "
      f"{ratio} | {r['unit']} | {'; '.join(notes)} |"
    )
  return "\n".join(lines)


def device_info() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(
    platform=device.platform,
    device_kind=device.device_kind,
    device_count=jax.device_count(),
    jax=jax.__version__,
    torch=torch_device()[1],
  )


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog=argv[0] if argv else "vqlm.bench device",
    description=__doc__.splitlines()[0],
    epilog="Example: python -m vqlm.bench device --out $OUT/device.json",
  )
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {PARTS}")
  parser.add_argument("--out", default="", help="write the figures as JSON here ('-': stdout)")
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes (seconds on a CPU)")
  parser.add_argument(
    "--time_limit",
    type=float,
    default=0.0,
    help="seconds per part: later measurements are skipped past it, and the part is "
    f"interrupted {HARD_GRACE:.0f} s after it (default: {PART_SECONDS})",
  )
  parser.add_argument("--lm_batch", type=int, default=0, help="LM sequences per step")
  parser.add_argument("--lm_seq_len", type=int, default=0, help="LM tokens per sequence")
  parser.add_argument("--tokenizer_batch", type=int, default=0, help="images per step")
  parser.add_argument("--sample_batches", default="", help="comma-separated batch sizes")
  parser.add_argument(
    "--lm_model",
    default="",
    help="comma-separated KEY=VALUE overrides of the LM step's model, e.g. "
    "remat_policy=none,query_chunks=1 (PyTorch's model follows the shapes)",
  )
  return parser.parse_args(argv[1:])


def _lm_model_overrides(text: str, size: str) -> dict[str, Any]:
  """`--lm_model` as a dict: integers, true/false, else strings; keys of `lm_model_kwargs`."""
  known = lm_model_kwargs(size)
  out: dict[str, Any] = {}
  for item in filter(None, (i.strip() for i in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or key not in known:
      raise UserError(f"--lm_model item {item!r}: use KEY=VALUE with KEY in {', '.join(known)}")
    low = value.lower()
    out[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(low, value)
  return out


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
  """The sizes to run: SETTINGS["full"] or ["dry_run"] with the flags' overrides."""
  s = dict(SETTINGS["dry_run" if args.dry_run else "full"])
  for name in ("lm_batch", "lm_seq_len", "tokenizer_batch"):
    value = getattr(args, name)
    if value < 0:
      raise UserError(f"--{name}={value} must be positive")
    s[name] = value or s[name]
  if args.lm_model:
    s["lm_overrides"] = {**s["lm_overrides"], **_lm_model_overrides(args.lm_model, s["lm_size"])}
  if args.sample_batches:
    try:
      s["sample_batches"] = tuple(int(b) for b in args.sample_batches.split(",") if b.strip())
    except ValueError:
      raise UserError(f"--sample_batches={args.sample_batches!r}: comma-separated ints") from None
    if not s["sample_batches"] or min(s["sample_batches"]) <= 0:
      raise UserError("--sample_batches must be positive")
  return s


def main(argv: list[str]) -> int:
  args = _parse(argv)
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown or not parts:
    raise UserError(f"--parts={args.parts!r}: choose from {', '.join(PARTS)}")
  if args.time_limit < 0:
    raise UserError("--time_limit must be positive")
  settings = settings_from(args)
  # JAX and PyTorch share the device: let XLA grow its pool instead of taking 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  info = device_info()
  print(
    f"device: {info['device_count']} x {info['device_kind']} ({info['platform']}); "
    f"jax {info['jax']}; PyTorch: {info['torch']}" + (" [dry run]" if args.dry_run else "")
  )
  report: dict[str, Any] = dict(
    command=" ".join(["python -m vqlm.bench device", *argv[1:]]),
    device=info,
    dry_run=args.dry_run,
    settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
    parts={},
  )
  for name in parts:
    rows: list[dict] = []
    title, status = name, "ok"
    start = time.perf_counter()
    limit = args.time_limit or PART_SECONDS[name]
    budget = Budget(limit)
    try:
      with hard_limit(limit + HARD_GRACE):
        title = PART_FUNCTIONS[name](settings, budget, rows)
    except OutOfTime as e:
      status = str(e)
    except Exception as e:  # noqa: BLE001 - one failing part must not cost the others' figures.
      status = f"error: {type(e).__name__}: {e}"
    for row in rows:  # Measurements a stop or an error cut short.
      if row["pytorch_note"] == "not run yet":
        row["pytorch_note"] = "not run: " + status
    seconds = time.perf_counter() - start
    report["parts"][name] = dict(title=title, status=status, seconds=seconds, rows=rows)
    print()
    print(format_table(title, rows) if rows else f"### {title}")
    print(f"\n{name}: {status} ({seconds:.0f} s)")
    sys.stdout.flush()
  if args.out == "-":
    print(json.dumps(report, indent=2))
  elif args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
  failed = [n for n, p in report["parts"].items() if p["status"].startswith("error")]
  return 1 if failed else 0
