"""Janus / Janus-Pro (transformers' `JanusForConditionalGeneration`) as a vqlm LM run plus its
image tokenizer run: `vqlm import janus SRC --out RUN`.

What is imported (names below the checkpoint's root):

```
model.language_model.*  [+ lm_head.weight]    the Llama decoder (vqlm.interop.llama.convert_lm)
model.vqmodel.*                               the VQ image tokenizer -> RUN/tokenizer
                                              (vqlm.interop.janus_vq.convert)
model.generation_embeddings.weight [K, E]     gen_path/embedding [K, E]
model.generation_aligner.fc1 [D, E] (+ bias)  gen_path/aligner_0 kernel [E, D], bias [D]
model.generation_aligner.hidden_layers.i      gen_path/aligner_{i+1} kernel [D, D], bias [D]
model.generation_head.proj_out [H, D]         gen_path/head_proj kernel [D, H], bias [H]
model.generation_head.vision_head [K, H]      gen_path/head_out kernel [H, K], bias [K]
```

The generation path (`TransformerConfig.gen_embed_dim`, `vqlm.nn.image_io`) makes image ids enter
through Janus's generation embedding and aligner and score through its generation head, while
text ids keep the decoder's embedding table and LM head: the unified logits are the LM head's on
text and specials and the generation head's on image codes, so vqlm's sampler runs unchanged.

Ids are permuted: the source ids of bos, eos, pad, `<begin_of_image>` and `<end_of_image>` take
vqlm's `<bos> <eos> <pad> <boi> <eoi>` slots, every other id of the tokenizer keeps its order as a
vqlm text id, and image code k is `image_offset + k`. Rows of the text table past the tokenizer's
ids are dropped. Janus's classifier-free guidance replaces every prompt id but bos and
`<begin_of_image>` by pad in the unconditional branch; the run records that
(`source.cfg_uncond = "pad"`) and `vqlm generate --cfg` does the same.

Not imported: Janus's image *understanding* path (the SigLIP encoder and its aligner). vqlm has
no such encoder, so captioning with such a run is refused in one line, never faked.
"""

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from vqlm.errors import UserError
from vqlm.interop import llama, run_files
from vqlm.interop.checkpoint_files import HFCheckpoint, Lazy, lazy
from vqlm.runs import lm_run
from vqlm.vocab import Vocab

FORMAT = "janus"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_RUN = "tokenizer"  # the image tokenizer run, inside the LM run
LM_PREFIX = "model.language_model."
GEN = "model.generation_"
# vqlm special -> the Janus token string that plays it when no config names its id.
TOKENS = {
  "bos": "<｜begin▁of▁sentence｜>",
  "eos": "<｜end▁of▁sentence｜>",
  "pad": "<｜▁pad▁｜>",
  "boi": "<begin_of_image>",
  "eoi": "<end_of_image>",
}
ROLES = tuple(TOKENS)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return data if isinstance(data, dict) else {}


def tokenizer_tokens(path: str) -> tuple[int, dict[str, int]]:
  """`(ids, {token string: id})` of a Hugging Face tokenizer.json: the largest id + 1 and every
  token of its model vocabulary and added tokens (read as JSON, without `tokenizers`)."""
  data = _json(path)
  vocab = (data.get("model") or {}).get("vocab") or {}
  tokens = dict(vocab) if isinstance(vocab, dict) else {}
  if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
    tokens = {str(p[0]): i for i, p in enumerate(vocab)}
  tokens.update({str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or []})
  if not tokens:
    raise UserError(f"{path} has no vocabulary; is it a Hugging Face tokenizer.json?")
  return max(int(i) for i in tokens.values()) + 1, {k: int(v) for k, v in tokens.items()}


def _token(value: Any) -> str | None:
  if isinstance(value, dict):  # {"content": "<...>", ...} in older tokenizer_config.json files
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def special_roles(src: str, hf_config: dict[str, Any], tokens: dict[str, int]) -> dict[str, int]:
  """`{"bos", "eos", "pad", "boi", "eoi"}` -> the source ids playing them.

  Ids come from `generation_config.json` (`*_token_id`, `boi_token_id` also under
  `generation_kwargs`), then `config.json`'s text config, then the token strings of
  `tokenizer_config.json` (`bos_token`, ..., `boi_token`, `eoi_token`, also under
  `extra_special_tokens`) or Janus's own strings (`TOKENS`), looked up in tokenizer.json."""
  gen = _json(os.path.join(src, "generation_config.json"))
  gen_kwargs = gen.get("generation_kwargs") or {}
  text = hf_config.get("text_config") or {}
  tok_config = _json(os.path.join(src, "tokenizer_config.json"))
  extra = tok_config.get("extra_special_tokens") or {}
  roles: dict[str, int] = {}
  for role in ROLES:
    key = f"{role}_token_id"
    value = gen.get(key, gen_kwargs.get(key, text.get(key)))
    if isinstance(value, (list, tuple)):
      value = value[0] if value else None
    if value is None:
      name = _token(tok_config.get(f"{role}_token")) or _token(extra.get(f"{role}_token"))
      value = tokens.get(name or TOKENS[role])
    if value is None:
      raise UserError(
        f"{src}: no id for Janus's {role} token ({TOKENS[role]!r} is not in {TOKENIZER_FILE}); "
        f"set {key} in generation_config.json"
      )
    roles[role] = int(value)
  if len(set(roles.values())) != len(roles):
    raise UserError(f"{src}: the special ids {roles} repeat; each role needs its own token")
  return roles


def text_id_map(source_rows: int, size: int, roles: dict[str, int], vocab: Vocab) -> np.ndarray:
  """int64 `[source_rows]`: a role's source id -> its vqlm special, other ids below the
  tokenizer's `size` -> the next vqlm text id (order kept), rows past `size` -> -1 (dropped)."""
  return llama.text_id_map(size, roles, vocab, rows=source_rows)


def _linear(ckpt: HFCheckpoint, name: str, dtype: Any) -> dict[str, Lazy]:
  """A torch Linear `{name}.weight [out, in]` (+ `.bias [out]`) -> `{"kernel": [in, out],
  "bias": [out]}`."""
  out, inp = ckpt.shape(name + ".weight")
  params = {"kernel": lazy(ckpt, name + ".weight", lambda w: w.T, shape=(inp, out), dtype=dtype)}
  bias = name + ".bias"
  params["bias"] = (
    lazy(ckpt, bias, dtype=dtype)
    if bias in ckpt
    else Lazy((out,), np.dtype(dtype), lambda: np.zeros(out, np.float32))
  )
  return params


def gen_path(
  ckpt: HFCheckpoint, dim: int, vq_config: dict[str, Any], *, dtype: Any = np.float32
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Janus's generation embedding, aligner and head -> `(TransformerConfig kwargs, params)`:
  `gen_embed_dim`, `gen_aligner_depth`, `gen_head_dim` and the `gen_path` subtree (`Lazy`
  leaves, see the module docstring). Checks the shapes against the decoder width `dim`."""
  act = vq_config.get("hidden_act", "gelu")
  if act != "gelu":
    raise UserError(f"vq_config.hidden_act={act!r}: vqlm's generation path uses exact GELU")
  k, e = ckpt.shape(GEN + "embeddings.weight")
  depth = 1
  while f"{GEN}aligner.hidden_layers.{depth - 1}.weight" in ckpt:
    depth += 1
  names = [GEN + "aligner.fc1"] + [f"{GEN}aligner.hidden_layers.{i}" for i in range(depth - 1)]
  h, d_in = ckpt.shape(GEN + "head.proj_out.weight")
  expect = {names[0]: (dim, e), GEN + "head.vision_head": (k, h)}
  expect.update({n: (dim, dim) for n in names[1:]})
  for name, shape in expect.items():
    if ckpt.shape(name + ".weight") != shape:
      raise UserError(
        f"{name}.weight has shape {ckpt.shape(name + '.weight')}, expected {shape}: vqlm's "
        f"generation path maps codes to the decoder width {dim} (projection_dim = hidden_size)"
      )
  if d_in != dim:
    raise UserError(f"{GEN}head.proj_out reads width {d_in}, but the decoder's is {dim}")
  params: dict[str, Any] = {"embedding": lazy(ckpt, GEN + "embeddings.weight", dtype=dtype)}
  for i, name in enumerate(names):
    params[f"aligner_{i}"] = _linear(ckpt, name, dtype)
  params["head_proj"] = _linear(ckpt, GEN + "head.proj_out", dtype)
  params["head_out"] = _linear(ckpt, GEN + "head.vision_head", dtype)
  kwargs = dict(gen_embed_dim=int(e), gen_aligner_depth=depth, gen_head_dim=int(h))
  return kwargs, params


def convert(
  ckpt: HFCheckpoint, src: str, *, dtype: str | None = None
) -> tuple[dict[str, Any], Vocab, np.ndarray, dict[str, int], dict[str, Any]]:
  """The LM half of a Janus checkpoint: `(model_config, vocab, id_map, roles, params)`.

  `model_config` is `write_lm_run`'s model section (TransformerConfig kwargs without the
  vocabulary's sizes), `id_map[s]` the vqlm id of source id `s` (-1: dropped), `params` the
  Transformer's params (`Lazy` leaves) with the generation path."""
  hf_config = ckpt.config
  if hf_config.get("model_type") != FORMAT or not isinstance(hf_config.get("text_config"), dict):
    raise UserError(
      f"{src} is a {hf_config.get('model_type')!r} model, not Janus "
      "(JanusForConditionalGeneration); use `vqlm import FORMAT` for its family"
    )
  text_config = dict(hf_config["text_config"])
  vq = {"hidden_act": "gelu", **(hf_config.get("vq_config") or {})}
  tokenizer_json = os.path.join(src, TOKENIZER_FILE)
  if not os.path.exists(tokenizer_json):
    raise UserError(f"{src} has no {TOKENIZER_FILE}; vqlm reads Janus's text through it")
  size, tokens = tokenizer_tokens(tokenizer_json)
  roles = special_roles(src, hf_config, tokens)
  embed = LM_PREFIX + "embed_tokens.weight"
  rows = ckpt.shape(embed)[0]
  size = min(size, rows)
  bad = {r: i for r, i in roles.items() if not 0 <= i < size}
  if bad:
    raise UserError(f"special ids {bad} lie outside the {size} text ids; fix the source configs")
  k = ckpt.shape(GEN + "embeddings.weight")[0]
  grid = int(vq.get("num_patches") or round(k**0.5))
  vision = hf_config.get("vision_config") or {}
  tokens_per_image = int(vision.get("num_image_tokens", grid * grid))
  if tokens_per_image != grid * grid:
    raise UserError(
      f"vision_config.num_image_tokens={tokens_per_image} is not vq_config.num_patches**2 = "
      f"{grid * grid}; fix config.json so that the VQ grid holds the generated codes"
    )
  vocab = Vocab(
    text_size=size - len(roles), image_size=k, grid=(grid, grid), text_model=lm_run.TEXT_MODEL
  )
  id_map = text_id_map(rows, size, roles, vocab)
  if dtype is None:
    dtype = "bfloat16" if ckpt.dtype(embed) == np.dtype(ml_dtypes.bfloat16) else "float32"
  np_dtype = np.dtype(_NP_DTYPES[dtype])
  kwargs, params = llama.convert_lm(
    ckpt,
    prefix=LM_PREFIX,
    hf_config=text_config,
    id_map=id_map,
    vocab_rows=vocab.padded_size,
    dtype=np_dtype,
  )
  gen_kwargs, params["gen_path"] = gen_path(ckpt, kwargs["dim"], vq, dtype=np_dtype)
  model_config = {k: v for k, v in kwargs.items() if k != "vocab_size"}
  model_config.update(gen_kwargs, scan_layers=False, remat_policy="none")
  model_config.update(dtype=dtype, param_dtype=dtype)
  return model_config, vocab, id_map, roles, params


def import_run(
  src: str,
  out: str,
  *,
  overwrite: bool = False,
  dtype: str | None = None,
  image_tokenizer: str | None = None,
  **unused: Any,
) -> str:
  """`vqlm import janus SRC --out RUN`: a Hugging Face Janus(-Pro) directory (config.json,
  safetensors, tokenizer.json) -> an LM run in `out` and its VQ image tokenizer run in
  `out/tokenizer` (recorded as the LM's tokenizer); returns `out`'s absolute path.

  `dtype`: "float32" | "bfloat16" for the LM's parameters (default: the checkpoint's)."""
  del unused
  if image_tokenizer:
    raise UserError(
      "vqlm import janus writes Janus's own VQ tokenizer into RUN/tokenizer; drop "
      "--image_tokenizer (the LM's image ids are that VQ's codes)"
    )
  from vqlm.interop import janus_vq
  from vqlm.text_hf import hf_text_model

  src = os.path.abspath(src)
  ckpt = HFCheckpoint(src)
  model_config, vocab, id_map, roles, params = convert(ckpt, src, dtype=dtype)
  vq_kwargs, vq_variables = janus_vq.convert(ckpt)
  image_size = janus_vq.image_size(ckpt)
  text_model = hf_text_model(os.path.join(src, TOKENIZER_FILE), id_map, text_size=vocab.text_size)
  out = os.path.abspath(out)
  tokenizer_dir = os.path.join(out, TOKENIZER_RUN)
  source = {"format": FORMAT, "path": src, "roles": roles, "cfg_uncond": "pad"}
  text_config = ckpt.config["text_config"]
  run_files.write_lm_run(
    out,
    model_config=model_config,
    vocab=vocab,
    text_files={lm_run.TEXT_MODEL: text_model},
    params=params,
    tokenizer_dir=tokenizer_dir,
    source=source,
    seq_len=int(text_config.get("max_position_embeddings") or 4096),
    overwrite=overwrite,
    release=ckpt.close,
  )
  run_files.write_tokenizer_run(
    tokenizer_dir,
    model_kwargs=vq_kwargs,
    image_size=image_size,
    variables=vq_variables,
    source={"format": FORMAT + "_vq", "path": src},
    release=ckpt.close,
  )
  return out
