"""`vqlm import chameleon SRC --out RUN`: Chameleon / Anole (transformers'
`ChameleonForConditionalGeneration`) as a vqlm LM run plus its image tokenizer run.

SRC is a Hugging Face directory: `config.json` (with `vocabulary_map`, the BPE vocabulary),
safetensors weights (`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head`,
`model.vqmodel.*`) and `tokenizer.json`. The result:

```
RUN/             the LM run (vqlm.interop.run_files.write_lm_run): config.json, vocab.json,
                 text.model (the tokenizer.json with the id map, vqlm.text_hf), checkpoints/
RUN/tokenizer/   the image tokenizer run (vqlm.interop.chameleon_vq; encode-only when the
                 checkpoint has no VQGAN decoder), recorded as the LM's `data.tokenizer`
```

Ids. Chameleon's image codes are BPE tokens scattered through its vocabulary (`IMGIMG<letters>Z`,
the letters A-J spelling the code's decimal digits, as transformers'
`ChameleonImageVocabularyMapping.bpe2img` reads them). vqlm's `Vocab` stays contiguous, so source
ids are permuted (`id_map`): the token of image code k -> `image_offset + k`; the ids playing a
vqlm special's role (`special_roles`: bos / eos / pad from the config, boi `<racm3:break>` and
eoi `<eoss>` as the processor names them) -> those specials; every other source id, in order ->
the next vqlm text id. Embedding and head rows move with their ids (`vqlm.interop.llama
.convert_lm`); vqlm ids with no source id (`<frame>`, the reserved slots, the padded tail) get
new rows, which no sampling mode draws.

The LM is Llama's with two options (`vqlm.nn`): `qk_norm="layernorm"` (Chameleon's QK LayerNorm
over head_dim with a scale and bias per head, eps 1e-5: `q_norm`/`k_norm` `[heads, head_dim]`)
and `swin_norm` (the norms after attention and MLP, Chameleon-30B). Chameleon's head_dim is
always `hidden_size // num_attention_heads`; RMSNorm eps, RoPE theta and the untied head come
from the config as for Llama (`llama.lm_kwargs` refuses rope scaling, biases, other
activations). transformers' forward sets the image tokens' logits to the float minimum (Chameleon
answers in text); vqlm's sampler does the same in mode `"free"` (`vqlm.sample.constraints`),
while its image modes let Anole draw codes.
"""

import json
import os
import shutil
from typing import Any

import ml_dtypes
import numpy as np

from vqlm.errors import UserError
from vqlm.interop import llama, run_files
from vqlm.interop.checkpoint_files import HFCheckpoint, lazy
from vqlm.runs import lm_run
from vqlm.vocab import Vocab

IMAGE_PREFIX = "IMGIMG"
# The processor's begin / end of image tokens (tokenizer_config.json may name others as
# `boi_token` / `eoi_token`).
BOI_TOKEN, EOI_TOKEN = "<racm3:break>", "<eoss>"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_CONFIG = "tokenizer_config.json"
PREFIX = "model."
HEAD = "lm_head.weight"
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def image_codes(vocabulary_map: dict[str, int]) -> dict[int, int]:
  """`{source id: image code}` of the `IMGIMG...` tokens, exactly as transformers'
  `ChameleonImageVocabularyMapping.bpe2img`: the name between the prefix and its last character,
  letters A-J read as digits 0-9."""
  digits = {chr(ord("A") + i): str(i) for i in range(10)}
  out = {}
  for name, source in vocabulary_map.items():
    if name.startswith(IMAGE_PREFIX):
      spelled = "".join(digits.get(c, c) for c in name[len(IMAGE_PREFIX) : -1])
      try:
        out[int(source)] = int(spelled)
      except ValueError:
        raise UserError(
          f"vocabulary_map token {name!r} is not an image code (A-J digits then one letter); "
          "fix config.json's vocabulary_map"
        ) from None
  return out


def _named_token(src: str, key: str, default: str) -> str:
  path = os.path.join(src, TOKENIZER_CONFIG)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      value = json.load(f).get(key)
    if isinstance(value, dict):  # an AddedToken written out
      value = value.get("content")
    if isinstance(value, str) and value:
      return value
  return default


def special_roles(src: str, hf_config: dict[str, Any]) -> dict[str, int]:
  """`{"bos", "eos"[, "pad"], "boi", "eoi"}` -> source id: bos / eos / pad as for Llama
  (`llama.special_roles`: generation_config.json, else config.json), boi / eoi the ids of the
  processor's `<racm3:break>` / `<eoss>` in `vocabulary_map`."""
  roles = llama.special_roles(hf_config, src)
  vocabulary_map = hf_config["vocabulary_map"]
  for role, key, default in (("boi", "boi_token", BOI_TOKEN), ("eoi", "eoi_token", EOI_TOKEN)):
    token = _named_token(src, key, default)
    if token not in vocabulary_map:
      raise UserError(
        f"{src}: vocabulary_map has no {token!r} ({role}); set {key} in {TOKENIZER_CONFIG}"
      )
    roles[role] = int(vocabulary_map[token])
  if len(set(roles.values())) != len(roles):
    raise UserError(f"{src}: special ids {roles} repeat an id; fix config.json's token ids")
  return roles


def id_map(size: int, roles: dict[str, int], images: dict[int, int], vocab: Vocab) -> np.ndarray:
  """int64 `[size]`, source id -> vqlm id: role ids -> their special, image tokens ->
  `vocab.image_offset + code`, every other source id -> the next text id (order kept)."""
  out = np.full(size, -1, np.int64)
  for role, source in roles.items():
    out[source] = vocab.special(role)
  for source, code in images.items():
    out[source] = vocab.image_offset + code
  text = np.nonzero(out < 0)[0]
  if text.size != vocab.text_size:
    raise ValueError(f"{text.size} text ids for a vocab of text_size {vocab.text_size}")
  out[text] = np.arange(text.size)
  return out


def lm_params(
  ckpt: HFCheckpoint, hf_config: dict[str, Any], ids: np.ndarray, vocab: Vocab, dtype: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(TransformerConfig kwargs, params of Lazy leaves)`: `llama.convert_lm` with the rows
  permuted by `ids`, plus the QK LayerNorms (`layer_N/attn/{query,key}_norm/{scale,bias}`)."""
  config = {k: v for k, v in hf_config.items() if k != "head_dim"}  # always dim // heads
  kwargs, params = llama.convert_lm(
    ckpt,
    prefix=PREFIX,
    hf_config=config,
    id_map=ids,
    vocab_rows=vocab.padded_size,
    head=HEAD,
    dtype=dtype,
  )
  h, kvh = kwargs["num_heads"], kwargs["num_kv_heads"]
  dh = kwargs["dim"] // h
  for i in range(kwargs["num_layers"]):
    attn = params[f"layer_{i}"]["attn"]
    for name, heads, ours in (("q_norm", h, "query_norm"), ("k_norm", kvh, "key_norm")):
      p = f"{PREFIX}layers.{i}.self_attn.{name}."
      for hf in ("weight", "bias"):
        if ckpt.shape(p + hf) != (heads, dh):
          raise UserError(
            f"{p + hf} has shape {ckpt.shape(p + hf)}, expected {(heads, dh)} (per-head QK "
            "norm); the weights and config.json are of different models"
          )
      attn[ours] = {
        "scale": lazy(ckpt, p + "weight", dtype=dtype),
        "bias": lazy(ckpt, p + "bias", dtype=dtype),
      }
  kwargs.update(head_dim=None, qk_norm="layernorm", swin_norm=bool(hf_config.get("swin_norm")))
  return kwargs, params


def _check_out(out: str, overwrite: bool) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
    raise UserError(f"{out} exists and is not empty; pick a new --out or pass --overwrite")


def _image_tokenizer(ckpt: HFCheckpoint, staging: str) -> str:
  """The Chameleon VQ of `ckpt` written as an image tokenizer run at `staging`."""
  from vqlm.interop import chameleon_vq

  kwargs, variables = chameleon_vq.convert(ckpt)
  return run_files.write_tokenizer_run(
    staging,
    model_kwargs=kwargs,
    image_size=chameleon_vq.image_size(ckpt),
    variables=variables,
    source={"format": "chameleon", "path": ckpt.path, "part": "vqmodel"},
    release=ckpt.close,
  )


def import_run(
  src: str,
  out: str,
  *,
  image_tokenizer: str | None = None,
  dtype: str | None = None,
  overwrite: bool = False,
  **unused: Any,
) -> str:
  """Writes the LM run `out` and its image tokenizer run `out/tokenizer`; returns `out`.

  Args:
    src: a Chameleon / Anole Hugging Face directory (see the module docstring).
    out: the LM run directory to write.
    image_tokenizer: an image tokenizer run to use instead of converting the checkpoint's VQ
      (e.g. one with a decoder); its codebook must have as many codes as the image tokens.
    dtype: "float32" | "bfloat16" parameters (default: the checkpoint's).
    overwrite: replace an existing run in `out`.
  """
  del unused
  out = os.path.abspath(out)
  ckpt = HFCheckpoint(src)
  hf_config = ckpt.config
  if hf_config.get("model_type") != "chameleon":
    raise UserError(
      f"{src} is a {hf_config.get('model_type')!r} model, not chameleon; use `vqlm import "
      "FORMAT` for its family"
    )
  if not hf_config.get("vocabulary_map"):
    raise UserError(f"{src}/config.json has no vocabulary_map; save it with transformers >= 4.44")
  tokenizer_json = os.path.join(src, llama.TOKENIZER_FILE)
  if not os.path.exists(tokenizer_json):
    raise UserError(f"{src} has no {llama.TOKENIZER_FILE}; vqlm reads Chameleon's text with it")
  if dtype is not None and dtype not in _DTYPES:
    raise UserError(f"dtype={dtype!r}; use one of {sorted(_DTYPES)}")
  embed = PREFIX + "embed_tokens.weight"
  if dtype is None:
    bf16 = ckpt.dtype(embed) == np.dtype(ml_dtypes.bfloat16)
    dtype = "bfloat16" if bf16 else "float32"
  _check_out(out, overwrite)

  images = image_codes(hf_config["vocabulary_map"])
  roles = special_roles(src, hf_config)
  size = llama.tokenizer_size(tokenizer_json)
  rows = ckpt.shape(embed)[0]
  if size > rows:
    raise UserError(f"{llama.TOKENIZER_FILE} has {size} ids but the embedding table {rows} rows")
  outside = [i for i in list(images) + list(roles.values()) if not 0 <= i < size]
  if outside:
    raise UserError(f"vocabulary_map ids {outside[:3]} lie outside the tokenizer's {size} ids")
  if set(images) & set(roles.values()):
    raise UserError(f"special ids {roles} include image tokens; fix config.json's token ids")

  staging = None
  if image_tokenizer:
    tokenizer_dir = os.path.abspath(image_tokenizer)
    if os.path.commonpath([tokenizer_dir, out]) == out:
      raise UserError(f"--image_tokenizer {tokenizer_dir} lies inside --out; copy it elsewhere")
  else:
    staging = f"{out}.tokenizer-importing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer_dir = os.path.join(out, TOKENIZER_DIR)
  try:
    codes, grid = llama.image_layout(_image_tokenizer(ckpt, staging) if staging else tokenizer_dir)
    if sorted(images.values()) != list(range(codes)):
      raise UserError(
        f"vocabulary_map has {len(images)} image tokens (codes {min(images.values(), default=0)}"
        f"..{max(images.values(), default=-1)}) for a codebook of {codes}; each code needs one"
      )
    vocab = Vocab(
      text_size=size - len(roles) - len(images),
      image_size=codes,
      grid=grid,
      text_model=lm_run.TEXT_MODEL,
    )
    ids = id_map(size, roles, images, vocab)
    kwargs, params = lm_params(ckpt, hf_config, ids, vocab, np.dtype(_DTYPES[dtype]))
    from vqlm import text_hf

    text_ids = np.where(vocab.is_image(ids), -1, ids)  # image tokens are not text
    text_model = text_hf.hf_text_model(tokenizer_json, text_ids, text_size=vocab.text_size)
    model_config = {k: v for k, v in kwargs.items() if k != "vocab_size"}
    model_config.update(scan_layers=False, remat_policy="none", dtype=dtype, param_dtype=dtype)
    source = {"format": "chameleon", "path": ckpt.path, "roles": roles}
    run_files.write_lm_run(
      out,
      model_config=model_config,
      vocab=vocab,
      text_files={lm_run.TEXT_MODEL: text_model},
      params=params,
      tokenizer_dir=tokenizer_dir,
      source=source,
      seq_len=int(hf_config.get("max_position_embeddings") or 4096),
      overwrite=overwrite,
      release=ckpt.close,  # the source's pages are unmapped after each tensor
    )
    if staging:
      os.replace(staging, tokenizer_dir)
  finally:
    if staging:
      shutil.rmtree(staging, ignore_errors=True)
  return out
