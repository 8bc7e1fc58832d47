"""`vqlm export --format llama RUN OUT`: a vqlm LM run as a Hugging Face Llama directory.

```
OUT/config.json             LlamaForCausalLM: vocab_size = the vocab's padded size, the shape,
                            rope_theta, rms_norm_eps, tie_word_embeddings, bos/eos/pad ids
OUT/generation_config.json  bos / eos / pad ids
OUT/model.safetensors       the weights (shards + index when over 5 GiB), names as in
                            `vqlm.interop.llama`'s table, in the run's parameter dtype
OUT/vocab.json, text.model  the run's vocabulary and text model, copied
OUT/vqlm.json               what was exported: the run, its image tokenizer run, the text model,
                            its model section (the import restores how it computed: dtype, ...)
```

Ids are vqlm's unified ids, not a Hugging Face tokenizer's: text ids are the run's text model's
(`vqlm.text.TextTokenizer` for SentencePiece, `vqlm.text_hf` for an imported tokenizer.json),
the specials and image codes sit where `vocab.json` says (`vqlm.vocab.Vocab`), and ids past
`vocab.size` are padding the model was never trained to produce. transformers' LlamaForCausalLM
loads the directory and computes vqlm's logits (within float32 rounding); decoding image codes
needs the vqlm image tokenizer run. `vqlm import llama OUT` reads it back (recognised by its
vocab.json) with the identity id map: the same parameters.

Only options a Llama decoder computes can be exported: `check_llama_compatible` refuses, naming
the option, 2D RoPE, image position embeddings, derived image embeddings (levels, codebook), QK
norms, Swin norms and Janus's generation path.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import write_safetensors
from vqlm.interop.llama import EXPORT_FILE
from vqlm.nn.transformer import TransformerConfig
from vqlm.runs.lm_run import VOCAB_FILE, LMRun

# TransformerConfig fields a Llama decoder has no counterpart for, with the only value it can
# export. Every field not here and not in _FREE must keep its default (so options added later
# are refused until someone decides how they export).
_REQUIRED = {
  "qk_norm": False,
  "swin_norm": False,
  "rope_2d": False,
  "image_pos_embed": False,
  "image_embed_init": "learned",
  "gen_embed_dim": 0,
}
# Fields that export as they are (shapes, RoPE base, epsilon, dtypes), or that never change the
# function (how it is computed, scanned or rematerialised), or that only the refused options read.
_FREE = (
  "vocab_size",
  "dim",
  "num_layers",
  "num_heads",
  "mlp_dim",
  "num_kv_heads",
  "head_dim",
  "tie_embeddings",
  "rope_theta",
  "image_offset",
  "image_size",
  "grid",
  "scan_layers",
  "remat_policy",
  "norm_eps",
  "dtype",
  "param_dtype",
  "attention_impl",
  "query_chunks",
  "codebook_dim",
  "code_levels",
  "gen_aligner_depth",
  "gen_head_dim",
)


# Model fields the vocabulary gives (not recorded in vqlm.json's "model").
_VOCAB_FIELDS = ("vocab_size", "image_offset", "image_size", "grid")


def check_llama_compatible(config: TransformerConfig) -> None:
  """UserError naming the first option of `config` that a Llama decoder cannot compute."""
  for field in dataclasses.fields(config):
    name, value = field.name, getattr(config, field.name)
    if name in _FREE:
      continue
    want = _REQUIRED.get(name, field.default)
    if value != want:
      raise UserError(
        f"model.{name}={value!r} has no Llama counterpart (a Llama decoder needs {want!r}); "
        "only LMs trained without it export as --format llama"
      )


def _blocks(params: dict[str, Any], config: TransformerConfig) -> list[dict[str, Any]]:
  """The per-layer param dicts, unstacked when the run scans its layers."""
  if config.scan_layers:
    stacked = params["layers"]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(config.num_layers)]
  return [params[f"layer_{i}"] for i in range(config.num_layers)]


def hf_tensors(params: dict[str, Any], config: TransformerConfig) -> dict[str, np.ndarray]:
  """vqlm Transformer params (NumPy, unboxed) -> `{HF name: array}`, torch Linear layout
  `[out, in]`; no `lm_head.weight` when the embeddings are tied."""
  d, h, dh = config.dim, config.num_heads, config.head_size()
  lin = lambda k, n_in: np.ascontiguousarray(np.asarray(k).reshape(n_in, -1).T)
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"])}
  for i, block in enumerate(_blocks(params, config)):
    p = f"model.layers.{i}."
    attn, mlp = block["attn"], block["mlp"]
    out[p + "input_layernorm.weight"] = np.asarray(block["attn_norm"]["scale"])
    out[p + "self_attn.q_proj.weight"] = lin(attn["query"]["kernel"], d)
    out[p + "self_attn.k_proj.weight"] = lin(attn["key"]["kernel"], d)
    out[p + "self_attn.v_proj.weight"] = lin(attn["value"]["kernel"], d)
    out[p + "self_attn.o_proj.weight"] = lin(attn["out"]["kernel"], h * dh)
    out[p + "post_attention_layernorm.weight"] = np.asarray(block["mlp_norm"]["scale"])
    out[p + "mlp.gate_proj.weight"] = lin(mlp["wi_gate"]["kernel"], d)
    out[p + "mlp.up_proj.weight"] = lin(mlp["wi_up"]["kernel"], d)
    out[p + "mlp.down_proj.weight"] = lin(mlp["wo"]["kernel"], config.mlp_dim)
  out["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
  if not config.tie_embeddings:
    out["lm_head.weight"] = lin(params["head"]["kernel"], d)
  return out


def hf_config(config: TransformerConfig, vocab: Any, seq_len: int) -> dict[str, Any]:
  """The `config.json` of a LlamaForCausalLM computing `Transformer(config)` (both spellings of
  the RoPE base: `rope_theta` for transformers 4, `rope_parameters` for 5)."""
  dtype = np.dtype(config.param_dtype).name
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": config.vocab_size,
    "hidden_size": config.dim,
    "intermediate_size": config.mlp_dim,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.kv_heads(),
    "head_dim": config.head_size(),
    "hidden_act": "silu",
    "max_position_embeddings": int(seq_len),
    "rms_norm_eps": config.norm_eps,
    "rope_theta": config.rope_theta,
    "rope_scaling": None,
    "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": config.tie_embeddings,
    "bos_token_id": vocab.bos_id,
    "eos_token_id": vocab.eos_id,
    "pad_token_id": vocab.pad_id,
    "torch_dtype": dtype,
    "dtype": dtype,
    "use_cache": True,
  }


def export_run(run: str, out: str, *, overwrite: bool = False) -> str:
  """Writes LM run `run` as a Hugging Face Llama directory `out` (layout in the module docstring);
  returns its absolute path. Refuses a non-empty `out` unless `overwrite`, and LMs with options a
  Llama decoder lacks (`check_llama_compatible`)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    if not overwrite:
      raise UserError(f"{out} exists and is not empty; pick a new OUT or pass --overwrite")
    if not os.path.isfile(os.path.join(out, "config.json")):
      raise UserError(
        f"{out} is not a checkpoint directory (no config.json), so --overwrite will not delete "
        "it; pick a new or empty OUT"
      )
  lm = LMRun(run)
  config = lm.model.config
  check_llama_compatible(config)
  tmp = f"{out}.exporting-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _write(lm, tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out):
    shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
  os.replace(tmp, out)
  return out


def _write(lm: LMRun, out_dir: str) -> None:
  """The files of `export_run` for the loaded run `lm`, into the existing `out_dir`."""
  config = lm.model.config
  params = jax.device_get(nn.meta.unbox(lm.params))
  tensors = hf_tensors(params, config)
  seq_len = int(lm.config.train.seq_len)
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(out_dir, tensors)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(config, lm.vocab, seq_len), f, indent=2)
  generation = {
    "bos_token_id": lm.vocab.bos_id,
    "eos_token_id": lm.vocab.eos_id,
    "pad_token_id": lm.vocab.pad_id,
  }
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(generation, f, indent=2)
  shutil.copyfile(os.path.join(lm.workdir, VOCAB_FILE), os.path.join(out_dir, VOCAB_FILE))
  text = lm.vocab.text_model
  shutil.copyfile(os.path.join(lm.workdir, text), os.path.join(out_dir, text))
  tokenizer = lm.config.data.get("tokenizer") or ""
  record = {
    "format": "vqlm.llama_export/1",
    "run": lm.workdir,
    "step": int(lm.step),
    "image_tokenizer": os.path.abspath(tokenizer) if tokenizer else "",
    "text_model": text,
    "seq_len": seq_len,
    "model": {k: v for k, v in config.to_dict().items() if k not in _VOCAB_FIELDS},
  }
  with open(os.path.join(out_dir, EXPORT_FILE), "w") as f:
    json.dump(record, f, indent=2)
