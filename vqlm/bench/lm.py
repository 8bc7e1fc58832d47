"""`python -m vqlm.bench lm --config configs/lm.py:size=small [--batch 8 --seq_len 256]`.

Training throughput of the LM (tokens/s, compile time excluded) and, on an accelerator, model-FLOPs
utilisation: (6 N + 12 L H Dh S) FLOPs per token (PaLM appendix B) over the device's peak.
On CPU it also trains the same-shaped Hugging Face `transformers` LlamaForCausalLM (PyTorch, the
optional `bench` extra) in the same process and prints the ratio vqlm / transformers. Both use the
config's compute dtype over float32 parameters (`dtype=bfloat16`: torch under `torch.autocast`).

`time_vqlm` and `time_torch` take plain model kwargs (`vqlm.nn.presets.TRANSFORMER_SIZES` keys
plus `dtype`, `remat_policy`, ...) and import no config library: `vqlm.bench.device` times them
on an accelerator.
"""

from collections.abc import Callable, Mapping
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqlm.bench import peak
from vqlm.errors import UserError
from vqlm.nn.flops import flops_per_token
from vqlm.testing.torch_refs import prepare_torch_imports


def _define(f):
  f.DEFINE_integer("batch", 8, "sequences per step")
  f.DEFINE_integer("seq_len", 256, "tokens per sequence")
  f.DEFINE_integer("vocab", 0, "vocabulary size (default: the size's nominal one)")
  f.DEFINE_integer("steps", 10, "timed steps (after 2 warm-up steps)")
  f.DEFINE_integer("repeats", 3, "timed repeats; the best is reported")
  f.DEFINE_bool("torch", True, "also time transformers' LlamaForCausalLM (CPU only)")
  f.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default)")
  f.DEFINE_bool(
    "compare_full_loss",
    False,
    "with FSQ level embeddings (model.image_embed_init=levels), also time the loss from the "
    "full logits (LMTask(factored_loss=False)) and print the ratio",
  )


def _vqlm_step(
  kw: Mapping[str, Any], vocab: int, batch: int, seq_len: int, factored_loss: bool | None = None
):
  from vqlm.nn.transformer import Transformer, TransformerConfig
  from vqlm.train.lm_task import LMTask
  from vqlm.train.optim import make_optimizer

  # Image codes fill the top half of the vocabulary; with FSQ level embeddings, exactly
  # prod(code_levels) ids below the top.
  levels = kw.get("code_levels") if kw.get("image_embed_init") == "levels" else None
  image_size = int(np.prod(levels)) if levels else vocab // 2
  image_offset = vocab - image_size if levels else vocab // 2
  if image_offset <= 0:
    raise UserError(f"--vocab {vocab} leaves no room for text beside {image_size} image codes")
  model = Transformer(
    TransformerConfig(vocab_size=vocab, image_offset=image_offset, image_size=image_size, **kw)
  )
  opt, _ = make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=1000, weight_decay=0.1)
  task = LMTask(
    model=model,
    optimizer=opt,
    z_loss_weight=0.0,
    image_offset=image_offset,
    image_size=image_size,
    factored_loss=factored_loss,
  )
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)
  data = {
    "tokens": jnp.asarray(tokens[:, :-1]),
    "targets": jnp.asarray(tokens[:, 1:]),
    "loss_weights": jnp.ones((batch, seq_len), jnp.float32),
    "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
    "positions": jnp.tile(jnp.arange(seq_len, dtype=jnp.int32), (batch, 1)),
  }
  import flax.linen as nn

  state = jax.jit(lambda r: nn.meta.unbox(task.init(r, data)))(jax.random.key(0))
  step = jax.jit(task.train_step, donate_argnums=0)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return model, state, step, data, n


def time_vqlm(kw: Mapping[str, Any], vocab, batch, seq_len, steps, repeats, factored_loss=None):
  """(tokens/s, compile seconds, parameters, model) of the jitted LMTask train step of a
  `Transformer(vocab_size=vocab, **kw)` on `[batch, seq_len]` random tokens (best of repeats)."""
  model, state, step, data, n = _vqlm_step(kw, vocab, batch, seq_len, factored_loss)
  key = jax.random.key(1)
  start = time.perf_counter()
  state, m = step(state, data, key)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - start
  state, m = step(state, data, key)
  jax.block_until_ready(m["loss"])
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, data, key)
    jax.block_until_ready(m["loss"])
    best = min(best, time.perf_counter() - start)
  return batch * seq_len * steps / best, compile_s, n, model


def time_torch(
  kw: Mapping[str, Any],
  vocab,
  batch,
  seq_len,
  steps,
  repeats,
  threads=0,
  *,
  device: str = "cpu",
  quiet: bool = False,
):
  """Tokens/s of a transformers LlamaForCausalLM (SDPA attention) of the same shape as
  `Transformer(**kw)`, trained with AdamW on `device` ("cpu", "cuda"), float32 parameters under
  `torch.autocast` in kw["dtype"]; None (with a message unless `quiet`) without torch."""
  prepare_torch_imports()  # the interop extra's torchvision (vqlm.testing.torch_refs)
  try:
    import torch
    import transformers
  except ImportError:
    if not quiet:
      print("transformers baseline skipped: install the bench extra (pip install -e '.[bench]')")
    return None
  if threads:
    torch.set_num_threads(threads)
  cfg = transformers.LlamaConfig(
    vocab_size=vocab,
    hidden_size=kw["dim"],
    intermediate_size=kw["mlp_dim"],
    num_hidden_layers=kw["num_layers"],
    num_attention_heads=kw["num_heads"],
    num_key_value_heads=kw.get("num_kv_heads") or kw["num_heads"],
    max_position_embeddings=max(seq_len, 2048),
    tie_word_embeddings=kw.get("tie_embeddings", True),
    rms_norm_eps=kw.get("norm_eps", 1e-6),
    attention_bias=False,
  )
  cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, vocab, (batch, seq_len), device=device)
  # The same mixed precision as vqlm: float32 parameters, matmuls in the config's compute dtype.
  dtype = {"float32": None, "bfloat16": torch.bfloat16}[str(kw.get("dtype", "float32"))]
  kind = torch.device(device).type
  sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)

  def one():
    with torch.autocast(kind, dtype=dtype, enabled=dtype is not None):
      out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  return batch * seq_len / best_step_seconds(one, steps=steps, repeats=repeats, sync=sync)


def best_step_seconds(
  step: Callable[[], Any], *, steps: int, repeats: int, sync: Callable
) -> float:
  """Seconds per call of a PyTorch training `step`: two warm-up calls, then the best of `repeats`
  timed runs of `steps` calls, each closed by `sync()` (the device's synchronize)."""
  step()
  step()
  sync()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      step()
    sync()
    best = min(best, time.perf_counter() - start)
  return best / steps


def main(argv: list[str]) -> int:
  from vqlm.commands import flags as flag_lib
  from vqlm.nn.presets import NOMINAL_VOCAB
  from vqlm.runtime.config import as_kwargs

  fv = flag_lib.parse(argv, _define, config=True)
  config = flag_lib.require_config(fv)
  kw = as_kwargs(config.model)
  vocab = fv.vocab or NOMINAL_VOCAB.get(config.get("size", ""), 32768)
  device = jax.devices()[0]
  tps, compile_s, n, model = time_vqlm(kw, vocab, fv.batch, fv.seq_len, fv.steps, fv.repeats)
  print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform})")
  print(
    f"model: size={config.get('size')} params={n:,} vocab={vocab} batch={fv.batch} "
    f"seq_len={fv.seq_len} dtype={config.model.dtype}"
  )
  print(f"vqlm: {tps:,.0f} tokens/s (compile {compile_s:.1f}s, excluded)")
  if fv.compare_full_loss:
    from vqlm.nn.transformer import supports_factored_logits

    if not supports_factored_logits(model.config):
      print("the model has no factored logits (needs model.image_embed_init=levels): no A/B")
    else:
      full, _, _, _ = time_vqlm(kw, vocab, fv.batch, fv.seq_len, fv.steps, fv.repeats, False)
      print(f"vqlm, loss from the full logits: {full:,.0f} tokens/s")
      print(f"ratio factored / full loss: {tps / full:.2f}")
  peak_flops = peak.peak_flops(device, config.model.dtype)
  if peak_flops:
    fpt = flops_per_token(
      n,
      num_layers=model.config.num_layers,
      num_heads=model.config.num_heads,
      head_dim=model.config.head_size(),
      seq_len=fv.seq_len,
    )
    mfu = tps * fpt / (peak_flops * jax.device_count())
    print(
      f"MFU: {100 * mfu:.1f}% ({fpt / 1e9:.2f} GFLOP/token, peak "
      f"{peak_flops / 1e12:.0f} TFLOP/s per device)"
    )
  if fv.torch and device.platform == "cpu":
    ref = time_torch(kw, vocab, fv.batch, fv.seq_len, fv.steps, fv.repeats, fv.threads)
    if ref:
      print(f"transformers LlamaForCausalLM: {ref:,.0f} tokens/s")
      print(f"ratio vqlm / transformers: {tps / ref:.2f}")
  return 0
