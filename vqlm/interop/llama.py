"""Hugging Face Llama-family decoders in and out of vqlm's `Transformer`.

`convert_lm` maps the weights of a Hugging Face Llama decoder onto vqlm's `Transformer` params,
lazily (a nested dict of `Lazy` leaves, read one tensor at a time). The two models compute the
same function: RMSNorm scales are copied as they are, both use rotate-half RoPE (no permutation
of the q/k rows is needed), attention is scaled by `head_dim ** -0.5`, the MLP is SwiGLU.

Weight names (HF, below `prefix`, e.g. "model.")  ->  vqlm params (`scan_layers=False`):

```
embed_tokens.weight [Vs, D]                      embed/embedding [V, D]     rows by id_map
layers.N.input_layernorm.weight [D]             layer_N/attn_norm/scale [D]
layers.N.self_attn.q_proj.weight [H*Dh, D]      layer_N/attn/query/kernel [D, H, Dh]
layers.N.self_attn.k_proj.weight [KVH*Dh, D]    layer_N/attn/key/kernel [D, KVH, Dh]
layers.N.self_attn.v_proj.weight [KVH*Dh, D]    layer_N/attn/value/kernel [D, KVH, Dh]
layers.N.self_attn.o_proj.weight [D, H*Dh]      layer_N/attn/out/kernel [H, Dh, D]
layers.N.post_attention_layernorm.weight [D]    layer_N/mlp_norm/scale [D]
layers.N.mlp.gate_proj.weight [F, D]            layer_N/mlp/wi_gate/kernel [D, F]
layers.N.mlp.up_proj.weight [F, D]              layer_N/mlp/wi_up/kernel [D, F]
layers.N.mlp.down_proj.weight [D, F]            layer_N/mlp/wo/kernel [F, D]
norm.weight [D]                                 final_norm/scale [D]
lm_head.weight [Vs, D] (`head`, not below prefix) head/kernel [D, V]        columns by id_map
```

With `tie_word_embeddings` (or no `lm_head.weight`) the vqlm model is tied (`tie_embeddings`).

Ids: `id_map[s]` is the vqlm id of source id `s` (-1: dropped, e.g. the padded tail of a source
table; source rows past `len(id_map)` are dropped too). Every vqlm row that no source id maps to
(new specials, image codes, the padded tail) is initialised by `new_rows`: the mean of the mapped
source rows plus Gaussian noise of `NEW_ROW_NOISE` times their standard deviation (deterministic,
seeded). This holds for the embedding table and for the untied head alike. Logits of the mapped
ids are then exactly the source model's (the new rows only add logits for the new ids, each near
the average logit), and a new id's embedding starts as an "average token".

Reuse (Chameleon, Janus): call `lm_kwargs(hf_config, allow=...)` for the shape and
`convert_lm(ckpt, prefix=..., head=..., id_map=..., vocab_rows=...)` for the params, then edit the
returned tree (e.g. add `layer_N/attn/query_norm/scale` and set `qk_norm=True` in the kwargs);
`layer_params`, `permute_rows` and `new_rows` are the pieces it is made of.
"""

from collections.abc import Iterable
import json
import os
from typing import Any

import flax.linen as nn
import ml_dtypes
import numpy as np

from vqlm.errors import UserError
from vqlm.interop import run_files
from vqlm.interop.checkpoint_files import HFCheckpoint, Lazy, lazy
from vqlm.runs import lm_run, saved_config, tokenizer_run
from vqlm.vocab import Vocab

# New rows: mean of the mapped rows + NEW_ROW_NOISE * (their std) * N(0, 1).
NEW_ROW_NOISE = 0.02
_ROPE_TYPES = ("default", None)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Written beside an exported run's weights (vqlm.interop.llama_export): the run, its image
# tokenizer and text model.
EXPORT_FILE = "vqlm.json"


def _rope(hf_config: dict[str, Any]) -> tuple[float, str | None, str]:
  """`(theta, rope type, the config key it came from)`; transformers 5 writes `rope_parameters`,
  earlier versions `rope_theta` + `rope_scaling`."""
  params = hf_config.get("rope_parameters")
  if isinstance(params, dict) and params:
    return float(params.get("rope_theta", 10_000.0)), params.get("rope_type"), "rope_parameters"
  scaling = hf_config.get("rope_scaling")
  kind = None
  if isinstance(scaling, dict):
    kind = scaling.get("rope_type", scaling.get("type"))
  return float(hf_config.get("rope_theta", 10_000.0)), kind, "rope_scaling"


def lm_kwargs(hf_config: dict[str, Any], *, allow: Iterable[str] = ()) -> dict[str, Any]:
  """`TransformerConfig` kwargs of a Hugging Face Llama-family `config.json` (as a dict).

  Returns `dim, num_layers, num_heads, num_kv_heads, head_dim (None when dim // num_heads),
  mlp_dim, tie_embeddings, rope_theta, norm_eps` (`vocab_size` and the image fields come from
  the caller's `Vocab`). Refuses, in one line naming the config key, what vqlm's Transformer
  cannot compute: a `hidden_act` other than silu, rope scaling other than "default",
  `attention_bias` / `mlp_bias`, a `sliding_window`, `partial_rotary_factor` < 1. Keys in
  `allow` are not checked (an importer that handles them itself, e.g. Chameleon's QK norms).
  """
  allow = set(allow)

  def refuse(key: str, value: Any, why: str) -> None:
    if key not in allow:
      raise UserError(f"config.json {key}={value!r}: {why}; vqlm imports plain Llama decoders")

  act = hf_config.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    refuse("hidden_act", act, "vqlm's MLP is SwiGLU (silu)")
  theta, kind, key = _rope(hf_config)
  if kind not in _ROPE_TYPES:
    refuse(key, kind, "vqlm's RoPE has no scaling (only rope_type 'default')")
  for name in ("attention_bias", "mlp_bias"):
    if hf_config.get(name):
      refuse(name, True, "vqlm's projections have no bias")
  if hf_config.get("sliding_window"):
    refuse("sliding_window", hf_config["sliding_window"], "vqlm attends over the whole context")
  factor = hf_config.get("partial_rotary_factor", 1.0)
  if factor != 1.0:
    refuse("partial_rotary_factor", factor, "vqlm rotates the whole head")
  try:
    dim = int(hf_config["hidden_size"])
    heads = int(hf_config["num_attention_heads"])
    out = dict(
      dim=dim,
      num_layers=int(hf_config["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
      head_dim=int(hf_config.get("head_dim") or dim // heads),
      mlp_dim=int(hf_config["intermediate_size"]),
    )
    if out["head_dim"] * heads == dim:
      out["head_dim"] = None  # derived, as vqlm's configs write it
  except KeyError as e:
    raise UserError(f"config.json lacks {e.args[0]!r}; is it a Llama-family decoder?") from None
  out.update(
    tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    rope_theta=theta,
    norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
  )
  return out


def check_id_map(id_map: np.ndarray | None, source_rows: int, vocab_rows: int) -> np.ndarray:
  """`id_map` as int64 `[n]` (n <= source_rows) after checking it: targets in `[-1, vocab_rows)`,
  no target twice. None means the identity over the source rows (which must fit)."""
  if id_map is None:
    if source_rows > vocab_rows:
      raise UserError(
        f"the source table has {source_rows} rows but the vqlm vocab only {vocab_rows}; "
        "pass an id_map that drops the extra rows"
      )
    return np.arange(source_rows, dtype=np.int64)
  id_map = np.asarray(id_map, np.int64).reshape(-1)
  if id_map.size > source_rows:
    raise UserError(f"id_map has {id_map.size} entries for a source table of {source_rows} rows")
  kept = id_map[id_map >= 0]
  if id_map.size and (id_map.min() < -1 or id_map.max() >= vocab_rows):
    raise UserError(f"id_map targets must lie in [-1, {vocab_rows}), got [{id_map.min()}, ...]")
  if np.unique(kept).size != kept.size:
    raise UserError("id_map sends two source ids to one vqlm id; keep one of them")
  return id_map


def new_rows(mapped: np.ndarray, num: int, *, seed: int = 0) -> np.ndarray:
  """`[num, D]` float32 rows for vqlm ids with no source id: the mean of `mapped [n, D]` plus
  `NEW_ROW_NOISE * std(mapped) * N(0, 1)` (a `np.random.default_rng(seed)` draw)."""
  mapped = np.asarray(mapped, np.float32)
  mean = mapped.mean(axis=0) if mapped.size else np.zeros(mapped.shape[-1], np.float32)
  std = float(mapped.std()) if mapped.size else 0.0
  noise = np.random.default_rng(seed).standard_normal((num, mapped.shape[-1]), np.float32)
  return mean[None] + np.float32(NEW_ROW_NOISE * std) * noise


def permute_rows(
  source: np.ndarray, id_map: np.ndarray, vocab_rows: int, *, seed: int = 0
) -> np.ndarray:
  """`source [Vs, D]` -> `[vocab_rows, D]` float32: row `id_map[s]` is `source[s]` (entries -1
  dropped), every other row from `new_rows(seed=seed)`."""
  source = np.asarray(source, np.float32)
  id_map = np.asarray(id_map, np.int64)
  keep = np.nonzero(id_map >= 0)[0]
  out = np.empty((vocab_rows, source.shape[1]), np.float32)
  filled = np.zeros(vocab_rows, bool)
  out[id_map[keep]] = source[keep]
  filled[id_map[keep]] = True
  out[~filled] = new_rows(source[keep], int((~filled).sum()), seed=seed)
  return out


def _linear(ckpt: HFCheckpoint, name: str, shape: tuple[int, ...], dtype: Any) -> Lazy:
  """A torch Linear weight `[out, in]` as a vqlm kernel `[in, ...]` of `shape`."""
  return lazy(ckpt, name, lambda w: w.T.reshape(shape), shape=shape, dtype=dtype)


def layer_params(
  ckpt: HFCheckpoint, layer_prefix: str, kwargs: dict[str, Any], *, dtype: Any = np.float32
) -> dict[str, Any]:
  """One decoder layer (`layer_prefix` = e.g. "model.layers.3.") as the vqlm Block params:
  `{"attn_norm", "attn": {"query", "key", "value", "out"}, "mlp_norm", "mlp": {"wi_gate",
  "wi_up", "wo"}}` of `Lazy` leaves, shapes as in the module docstring (`kwargs` from
  `lm_kwargs`). Checks every tensor's shape against `kwargs` before anything is read."""
  d, h, kvh = kwargs["dim"], kwargs["num_heads"], kwargs["num_kv_heads"]
  dh, f = kwargs["head_dim"] or d // h, kwargs["mlp_dim"]
  p = layer_prefix
  expect = {
    "input_layernorm.weight": (d,),
    "post_attention_layernorm.weight": (d,),
    "self_attn.q_proj.weight": (h * dh, d),
    "self_attn.k_proj.weight": (kvh * dh, d),
    "self_attn.v_proj.weight": (kvh * dh, d),
    "self_attn.o_proj.weight": (d, h * dh),
    "mlp.gate_proj.weight": (f, d),
    "mlp.up_proj.weight": (f, d),
    "mlp.down_proj.weight": (d, f),
  }
  for name, shape in expect.items():
    if ckpt.shape(p + name) != shape:
      raise UserError(
        f"{p + name} has shape {ckpt.shape(p + name)}, config.json implies {shape}; "
        "the weights and config.json are of different models"
      )
  o_proj = lambda w: w.T.reshape(h, dh, d)  # [D, H*Dh] -> [H*Dh, D] -> [H, Dh, D]
  return {
    "attn_norm": {"scale": lazy(ckpt, p + "input_layernorm.weight", dtype=dtype)},
    "attn": {
      "query": {"kernel": _linear(ckpt, p + "self_attn.q_proj.weight", (d, h, dh), dtype)},
      "key": {"kernel": _linear(ckpt, p + "self_attn.k_proj.weight", (d, kvh, dh), dtype)},
      "value": {"kernel": _linear(ckpt, p + "self_attn.v_proj.weight", (d, kvh, dh), dtype)},
      "out": {
        "kernel": lazy(ckpt, p + "self_attn.o_proj.weight", o_proj, shape=(h, dh, d), dtype=dtype)
      },
    },
    "mlp_norm": {"scale": lazy(ckpt, p + "post_attention_layernorm.weight", dtype=dtype)},
    "mlp": {
      "wi_gate": {"kernel": _linear(ckpt, p + "mlp.gate_proj.weight", (d, f), dtype)},
      "wi_up": {"kernel": _linear(ckpt, p + "mlp.up_proj.weight", (d, f), dtype)},
      "wo": {"kernel": _linear(ckpt, p + "mlp.down_proj.weight", (f, d), dtype)},
    },
  }


def convert_lm(
  ckpt: HFCheckpoint,
  *,
  prefix: str = "model.",
  hf_config: dict[str, Any] | None = None,
  id_map: np.ndarray | None = None,
  vocab_rows: int,
  head: str = "lm_head.weight",
  allow: Iterable[str] = (),
  seed: int = 0,
  dtype: Any = np.float32,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A Hugging Face Llama-family decoder -> `(transformer_kwargs, params)` of vqlm's Transformer.

  Args:
    ckpt: the checkpoint (`HFCheckpoint(directory)`).
    prefix: where the decoder's tensors are: `{prefix}embed_tokens.weight`,
      `{prefix}layers.N....`, `{prefix}norm.weight` (Janus: "language_model.model.").
    hf_config: the decoder's config (default `ckpt.config`; Janus/Chameleon: their text config).
    id_map: int `[n]`, source id -> vqlm id (-1 drops it); None = identity. See the module
      docstring for the rows no source id maps to.
    vocab_rows: rows of the vqlm tables (`Vocab.padded_size`).
    head: the full name of the output projection `[Vs, D]`; ignored (tied) when the config says
      `tie_word_embeddings` or the checkpoint has no such tensor.
    allow: config keys `lm_kwargs` should not refuse (the caller handles them).
    seed: seeds the new rows (the head's use `seed + 1`).
    dtype: the params' dtype.
  Returns:
    `transformer_kwargs`: `lm_kwargs(hf_config)` + `vocab_size=vocab_rows` (add `image_offset`,
    `image_size`, `grid` from the Vocab, then `TransformerConfig(**kwargs)`); `params`: a nested
    dict of `Lazy` for `scan_layers=False` (`embed/embedding [vocab_rows, D]`, `layer_N/...`,
    `final_norm/scale [D]`, `head/kernel [D, vocab_rows]` when untied).
  """
  hf_config = ckpt.config if hf_config is None else hf_config
  kwargs = lm_kwargs(hf_config, allow=allow)
  kwargs["vocab_size"] = int(vocab_rows)
  embed_name = prefix + "embed_tokens.weight"
  rows, d = ckpt.shape(embed_name)
  if d != kwargs["dim"]:
    raise UserError(f"{embed_name} is {rows}x{d} but config.json hidden_size={kwargs['dim']}")
  id_map = check_id_map(id_map, rows, vocab_rows)
  n = id_map.size
  tied = kwargs["tie_embeddings"] or head not in ckpt
  kwargs["tie_embeddings"] = tied

  def table(name: str, seed: int, transpose: bool) -> Lazy:
    def load(a: np.ndarray) -> np.ndarray:
      out = permute_rows(a[:n], id_map, vocab_rows, seed=seed)
      return out.T if transpose else out

    shape = (d, vocab_rows) if transpose else (vocab_rows, d)
    return lazy(ckpt, name, load, shape=shape, dtype=dtype)

  params: dict[str, Any] = {"embed": {"embedding": table(embed_name, seed, False)}}
  for i in range(kwargs["num_layers"]):
    params[f"layer_{i}"] = layer_params(ckpt, f"{prefix}layers.{i}.", kwargs, dtype=dtype)
  params["final_norm"] = {"scale": lazy(ckpt, prefix + "norm.weight", dtype=dtype)}
  if not tied:
    if ckpt.shape(head) != (rows, d):
      raise UserError(f"{head} has shape {ckpt.shape(head)}, expected {(rows, d)}")
    params["head"] = {"kernel": table(head, seed + 1, True)}
  return kwargs, params


# ---- vqlm import llama ------------------------------------------------------------------------

ROLES = ("bos", "eos", "pad")  # source special ids that take a vqlm special's slot
TOKENIZER_FILE = "tokenizer.json"


def tokenizer_size(path: str) -> int:
  """Ids of a Hugging Face `tokenizer.json` (its model's vocabulary and added tokens): the
  largest id + 1. Read as JSON; the `tokenizers` package is not needed."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  vocab = (data.get("model") or {}).get("vocab") or {}
  ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
  ids += [int(t["id"]) for t in data.get("added_tokens") or []]
  if not ids:
    raise UserError(f"{path} has no vocabulary; is it a Hugging Face tokenizer.json?")
  return max(int(i) for i in ids) + 1


def _first(value: Any) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def special_roles(hf_config: dict[str, Any], src: str) -> dict[str, int]:
  """`{"bos": id, "eos": id[, "pad": id]}`: the source ids that play vqlm's specials, from
  `generation_config.json` where it has them, else `config.json` (the first of a list of eos
  ids; the others stay text ids). A pad that is the bos or eos id is not a role (vqlm's pad gets
  a new row)."""
  gen: dict[str, Any] = {}
  path = os.path.join(src, "generation_config.json")
  if os.path.exists(path):
    with open(path) as f:
      gen = json.load(f)
  roles = {}
  for role in ROLES:
    key = f"{role}_token_id"
    value = _first(gen.get(key, hf_config.get(key)))
    if value is not None and value not in roles.values():
      roles[role] = value
    elif role in ("bos", "eos") and value is None:
      raise UserError(f"{src}: config.json has no {key}; set it to the source's {role} token id")
  if "eos" not in roles:
    raise UserError(f"{src}: bos and eos are the same id; vqlm needs two distinct specials")
  return roles


def text_id_map(
  source_size: int, roles: dict[str, int], vocab: Vocab, *, rows: int | None = None
) -> np.ndarray:
  """int64 `[rows]` (default `source_size`): role ids -> their vqlm special, every other source
  id below `source_size` -> the next vqlm text id (source order kept; `vocab.text_size ==
  source_size - len(roles)`), rows past `source_size` (a table padded beyond its tokenizer)
  -> -1 (dropped)."""
  role_of = {i: vocab.special(r) for r, i in roles.items()}
  rows = source_size if rows is None else rows
  out = np.full(rows, -1, np.int64)
  text = 0
  for i in range(min(rows, source_size)):
    if i in role_of:
      out[i] = role_of[i]
    else:
      out[i] = text
      text += 1
  if text != vocab.text_size:
    raise ValueError(f"{text} text ids for a vocab of text_size {vocab.text_size}")
  return out


def image_layout(tokenizer_dir: str) -> tuple[int, tuple[int, int]]:
  """`(codebook size, (h, w) code grid)` of a vqlm image tokenizer run, from its config alone
  (traced; its checkpoint is not read)."""
  import jax
  import jax.numpy as jnp

  config = saved_config.load_config(tokenizer_dir)
  if config.get("stage") != tokenizer_run.STAGE:
    raise UserError(
      f"--image_tokenizer {tokenizer_dir} is a {config.get('stage')} run; pass a vqlm image "
      "tokenizer run (vqlm train --config configs/tokenizer.py, or vqlm import vqmodel)"
    )
  model = tokenizer_run.tokenizer_model(config)
  if model.codebook_size <= 0:
    raise UserError(f"--image_tokenizer {tokenizer_dir} has continuous latents; pass a VQ/FSQ run")
  size = int(config.data.image_size)
  abstract = nn.meta.unbox(tokenizer_run.abstract_variables(model, size))
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  codes = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), abstract, images)
  return int(model.codebook_size), tuple(int(g) for g in codes.shape[1:])


def _model_config(kwargs: dict[str, Any], dtype: str) -> dict[str, Any]:
  """`write_lm_run`'s model section: the converted shape, unscanned, in the source's dtype."""
  out = {k: v for k, v in kwargs.items() if k != "vocab_size"}
  out.update(scan_layers=False, remat_policy="none", dtype=dtype, param_dtype=dtype)
  return out


def _source_dtype(ckpt: HFCheckpoint, name: str) -> str:
  return "bfloat16" if ckpt.dtype(name) == np.dtype(ml_dtypes.bfloat16) else "float32"


def import_run(
  src: str,
  out: str,
  *,
  image_tokenizer: str | None = None,
  overwrite: bool = False,
  dtype: str | None = None,
  **unused: Any,
) -> str:
  """`vqlm import llama SRC --out OUT [--image_tokenizer TOK]`: a Hugging Face Llama directory
  (`config.json`, safetensors, `tokenizer.json`) -> a vqlm LM run in `out`; returns its path.

  Ids are permuted, never renumbered in blocks: the source's bos / eos (/ pad, when it is its
  own id) take vqlm's `<bos>` / `<eos>` / `<pad>` slots, every other source id keeps its order as
  a vqlm text id (`text_id_map`), and the image codes of `image_tokenizer` (a vqlm tokenizer run)
  are new ids at `image_offset + code`. Rows of new ids (`<boi>`, `<eoi>`, `<frame>`, a missing
  `<pad>`, the reserved slots, the image codes, the padded tail) are `new_rows` (mean + small
  noise), so the logits of the text ids are exactly the source model's. The run's text model is
  the source's `tokenizer.json` with that id map (`vqlm.text_hf`).

  vqlm's vocabulary always has image codes, so `image_tokenizer` is required (a UserError says
  so), except for a directory written by `export_run` (it has a `vocab.json`): that one is read
  back with its own vocabulary and the identity id map, `image_tokenizer` defaulting to the one
  recorded at export. `dtype` ("float32" | "bfloat16") is the run's parameter and compute dtype
  (default: bfloat16 for a bfloat16 checkpoint, else float32); other keyword arguments (flags of
  other formats) are ignored.
  """
  del unused
  if dtype is not None and dtype not in _NP_DTYPES:
    raise UserError(f"--dtype {dtype}: use one of {sorted(_NP_DTYPES)}")
  ckpt = HFCheckpoint(src)
  hf_config = ckpt.config
  arch = hf_config.get("architectures") or ["LlamaForCausalLM"]
  if hf_config.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
    raise UserError(
      f"{src} is a {hf_config.get('model_type')} model ({arch[0]}), not LlamaForCausalLM; use "
      "`vqlm import FORMAT` for its family (chameleon, janus, vqmodel)"
    )
  if os.path.exists(os.path.join(src, lm_run.VOCAB_FILE)):
    return _import_exported(
      ckpt, src, out, image_tokenizer=image_tokenizer, overwrite=overwrite, dtype=dtype
    )
  tokenizer_json = os.path.join(src, TOKENIZER_FILE)
  if not os.path.exists(tokenizer_json):
    raise UserError(f"{src} has no {TOKENIZER_FILE}; vqlm reads Llama text through it")
  if not image_tokenizer:
    raise UserError(
      "vqlm LM runs always have image ids: pass --image_tokenizer TOK (a vqlm image tokenizer "
      "run; its codes become new ids and the text logits stay the source's)"
    )
  codes, grid = image_layout(image_tokenizer)
  roles = special_roles(hf_config, src)
  size = tokenizer_size(tokenizer_json)
  rows = ckpt.shape("model.embed_tokens.weight")[0]
  if size > rows:
    raise UserError(f"{TOKENIZER_FILE} has {size} ids but the embedding table only {rows} rows")
  bad = {r: i for r, i in roles.items() if not 0 <= i < size}
  if bad:
    raise UserError(f"special ids {bad} lie outside the tokenizer's {size} ids; fix config.json")
  vocab = Vocab(
    text_size=size - len(roles), image_size=codes, grid=grid, text_model=lm_run.TEXT_MODEL
  )
  id_map = text_id_map(size, roles, vocab)
  dtype = dtype or _source_dtype(ckpt, "model.embed_tokens.weight")
  kwargs, params = convert_lm(
    ckpt, id_map=id_map, vocab_rows=vocab.padded_size, dtype=np.dtype(_NP_DTYPES[dtype])
  )
  from vqlm import text_hf

  text_model = text_hf.hf_text_model(tokenizer_json, id_map, text_size=vocab.text_size)
  source = {"format": "llama", "path": os.path.abspath(src), "roles": roles}
  return run_files.write_lm_run(
    out,
    model_config=_model_config(kwargs, dtype),
    vocab=vocab,
    text_files={lm_run.TEXT_MODEL: text_model},
    params=params,
    tokenizer_dir=image_tokenizer,
    source=source,
    seq_len=_seq_len(hf_config),
    overwrite=overwrite,
    release=ckpt.close,
  )


def _seq_len(hf_config: dict[str, Any]) -> int:
  return int(hf_config.get("max_position_embeddings") or 2048)


def _import_exported(
  ckpt: HFCheckpoint,
  src: str,
  out: str,
  *,
  image_tokenizer: str | None,
  overwrite: bool,
  dtype: str | None,
) -> str:
  """A directory of `export_run`: its vocab.json, text model and the identity id map."""
  vocab = Vocab.load(os.path.join(src, lm_run.VOCAB_FILE))
  rows = ckpt.shape("model.embed_tokens.weight")[0]
  if rows != vocab.padded_size:
    raise UserError(
      f"{src}: vocab.json has {vocab.padded_size} ids but the embedding table {rows} rows; "
      "it was not written by `vqlm export --format llama`"
    )
  recorded: dict[str, Any] = {}
  marker = os.path.join(src, EXPORT_FILE)
  if os.path.exists(marker):
    with open(marker) as f:
      recorded = json.load(f)
  tokenizer_dir = image_tokenizer or recorded.get("image_tokenizer") or None
  if tokenizer_dir and not os.path.isdir(tokenizer_dir):
    tokenizer_dir = None  # moved: LMRun asks for --tokenizer when images are needed
  if tokenizer_dir and image_tokenizer:
    codes, grid = image_layout(tokenizer_dir)
    if (codes, grid) != (vocab.image_size, vocab.grid):
      raise UserError(
        f"--image_tokenizer {tokenizer_dir} has {codes} codes on a {grid} grid but {src} was "
        f"exported for {vocab.image_size} codes on {vocab.grid}; pass the run it was trained with"
      )
  given = dtype
  dtype = dtype or _source_dtype(ckpt, "model.embed_tokens.weight")
  kwargs, params = convert_lm(ckpt, vocab_rows=vocab.padded_size, dtype=np.dtype(_NP_DTYPES[dtype]))
  model_config = _model_config(kwargs, dtype)
  # How the run computed (not what): its compute dtype unless --dtype, chunking, remat, kernel.
  saved = recorded.get("model") or {}
  for key in ("dtype", "remat_policy", "attention_impl", "query_chunks"):
    if key in saved and not (key == "dtype" and given):
      model_config[key] = saved[key]
  text = os.path.join(src, recorded.get("text_model", vocab.text_model))
  return run_files.write_lm_run(
    out,
    model_config=model_config,
    vocab=vocab,
    text_files={lm_run.TEXT_MODEL: text},
    params=params,
    tokenizer_dir=tokenizer_dir,
    source={"format": "llama", "path": os.path.abspath(src), "exported_by": "vqlm"},
    seq_len=_seq_len(ckpt.config),
    overwrite=overwrite,
    release=ckpt.close,
  )
