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
from typing import Any

import numpy as np

from vqlm.errors import UserError
from vqlm.interop.checkpoint_files import HFCheckpoint, Lazy, lazy

# New rows: mean of the mapped rows + NEW_ROW_NOISE * (their std) * N(0, 1).
NEW_ROW_NOISE = 0.02
_ROPE_TYPES = ("default", None)


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

  Returns `dim, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim, tie_embeddings,
  rope_theta, norm_eps` (`vocab_size` and the image fields come from the caller's `Vocab`).
  Refuses, in one line naming the config key, what vqlm's Transformer cannot compute: a
  `hidden_act` other than silu, rope scaling other than "default", `attention_bias` /
  `mlp_bias`, a `sliding_window`, `partial_rotary_factor` < 1. Keys in `allow` are not checked
  (an importer that handles them itself, e.g. Chameleon's own QK norms).
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
  dh, f = kwargs["head_dim"], kwargs["mlp_dim"]
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
