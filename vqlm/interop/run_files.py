"""Run directories written from imported parameters, laid out exactly as training writes them.

`write_lm_run` and `write_tokenizer_run` turn parameters read from elsewhere (a Hugging Face
checkpoint, as nested dicts of NumPy arrays or `Lazy` leaves) into a vqlm run directory:

```
OUT/config.json        the stage's full default config (vqlm.stages.lm_config / tokenizer_config)
                       with the `model` section replaced, and `source`: what was imported
OUT/vocab.json         LM runs: the unified vocabulary
OUT/text.model         LM runs: the text model (SentencePiece, or an HF tokenizer, vqlm.text_hf)
OUT/checkpoints/0/     Orbax, as vqlm.runtime.checkpoint.Checkpointer saves a train state:
                       state/ = {step, params[, extra/batch_stats]}, meta/ = {stage, source}
```

so `LMRun(OUT)`, `TokenizerRun(OUT)`, `vqlm.load`, `vqlm generate|caption|eval|report` and
`config.init_from=OUT` read them as trained runs (step 0, no optimizer state: training that
starts from one uses `init_from`, never a resume in OUT itself).

The parameter tree is checked against the model the config describes before anything is read
(the first missing, extra or mis-shaped leaf is one UserError). The directory is written under a
temporary sibling name and renamed when complete, so an interrupted import leaves no half run.
"""

from collections.abc import Callable, Mapping
import os
import shutil
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from vqlm.errors import UserError
from vqlm.interop import placement
from vqlm.nn.transformer import Transformer
from vqlm.runs import lm_run, restore, saved_config, tokenizer_run
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.checkpoint import Checkpointer
from vqlm.stages import lm_config, tokenizer_config
from vqlm.vocab import Vocab

# `place(tree of Lazy / np.ndarray, boxed abstract params, mesh, rules) -> tree of jax.Array`:
# reads each leaf and puts it on the mesh with the sharding its logical axes ask for
# (vqlm.interop.placement.place_params, the default, which reads one leaf at a time and calls
# `release` after each: importers pass `HFCheckpoint.close`, so the source's mapped pages go too).
Place = Callable[[Any, Any, Any, Any], Any]
STEP = 0
SIZE = "imported"  # config.size of an imported run (its shape is the model section, not a preset)


def _json_value(value: Any) -> Any:
  """Config values as JSON: dtypes by name, tuples as lists, nested dicts recursively."""
  if isinstance(value, Mapping):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  if isinstance(value, (type, np.dtype)):  # np.float32, jnp.bfloat16, np.dtype("bfloat16")
    return np.dtype(value).name
  return value


def _with_model(base: ml_collections.ConfigDict, model: Mapping[str, Any], source: Mapping):
  config = ml_collections.ConfigDict(base.to_dict())  # unlocked, so the model section may change
  config.model = ml_collections.ConfigDict(_json_value(dict(model)))
  config.size = SIZE
  config.source = ml_collections.ConfigDict(_json_value(dict(source or {})))
  return config


def lm_run_config(
  model_config: Mapping[str, Any],
  *,
  tokenizer_dir: str | None = None,
  seq_len: int | None = None,
  source: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """The config.json of an imported LM: `configs/lm.py`'s defaults, `model` replaced by
  `model_config` (TransformerConfig kwargs without vocab_size, image_offset, image_size, grid),
  `data.tokenizer` the image tokenizer run, `train.seq_len` the context the model is used at."""
  config = _with_model(lm_config.get_config("size=base"), model_config, source)
  config.data.tokenizer = os.path.abspath(tokenizer_dir) if tokenizer_dir else ""
  config.data.codes = ""
  config.data.text_model = ""
  if seq_len:
    config.train.seq_len = int(seq_len)
  return config


def tokenizer_run_config(
  model_kwargs: Mapping[str, Any], *, image_size: int, source: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """The config.json of an imported image tokenizer: `configs/tokenizer.py`'s defaults with
  `model` replaced by `model_kwargs` (ImageTokenizer kwargs) and `data.image_size` set."""
  config = _with_model(tokenizer_config.get_config("size=base"), model_kwargs, source)
  config.data.image_size = int(image_size)
  return config


# ---- the parameter tree ----------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'blocks_0/attn/q/kernel': leaf} of a nested dict (Lazy, arrays or ShapeDtypeStructs)."""
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}/"))
    return out
  return {prefix.rstrip("/"): tree}


def check_tree(given: Any, abstract: Any, what: str) -> None:
  """UserError naming the first leaf of `given` that is missing, extra or of another shape than
  in `abstract` (an unboxed `jax.eval_shape` tree)."""
  have, want = _flat(given), _flat(abstract)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing or extra:
    name = (missing or extra)[0]
    where = "missing from the imported" if missing else "not in the model's"
    raise UserError(
      f"{what}: {len(missing)} parameter(s) missing and {len(extra)} extra, e.g. {name} is "
      f"{where} parameters; check the model config the importer built against the checkpoint"
    )
  for name, spec in want.items():
    shape = tuple(getattr(have[name], "shape", np.shape(have[name])))
    if shape != tuple(spec.shape):
      raise UserError(
        f"{what}: parameter {name} has shape {shape} but the model expects {tuple(spec.shape)}; "
        "check the model config the importer built against the checkpoint"
      )


def _placed(tree: Any, boxed: Any, place: Place | None, mesh_shape, rules, release) -> Any:
  mesh = restore.inference_mesh(mesh_shape)
  rules = mesh_lib.rules_from_config(rules)
  if place is None:
    return placement.place_params(tree, boxed, mesh, rules, release=release)
  return place(tree, boxed, mesh, rules)


# ---- the directory -----------------------------------------------------------------------------


def _start(out: str, overwrite: bool) -> str:
  """A fresh temporary sibling of `out` to write into, after refusing a non-empty `out`."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    if not overwrite:
      raise UserError(f"{out} exists and is not empty; pick a new --out or pass --overwrite")
    if not os.path.isfile(os.path.join(out, saved_config.CONFIG_FILE)):
      raise UserError(
        f"{out} is not a vqlm run directory (no {saved_config.CONFIG_FILE}), so --overwrite "
        "will not delete it; pick a new or empty --out"
      )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.importing-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def _finish(tmp: str, out: str) -> str:
  out = os.path.abspath(out)
  if os.path.exists(out):
    shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
  os.replace(tmp, out)
  return out


def _save_state(workdir: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
  """Writes `state` as step 0 of `workdir/checkpoints`, as the training loop saves (synchronous,
  the same handlers and commit mode)."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1, async_save=False)
  try:
    ckpt.save(STEP, state, meta=meta)
    ckpt.wait()
  finally:
    ckpt.close()


def _write_text_files(workdir: str, files: Mapping[str, str | bytes]) -> None:
  for name, content in files.items():
    if os.path.basename(name) != name or name in ("", ".", ".."):
      raise UserError(f"text file name {name!r} must be a plain file name (no folders)")
    path = os.path.join(workdir, name)
    if isinstance(content, bytes):
      with open(path, "wb") as f:
        f.write(content)
    elif isinstance(content, str) and os.path.isfile(content):
      shutil.copyfile(content, path)
    else:
      raise UserError(f"text file {name}: {content!r} is neither bytes nor an existing file")


def write_lm_run(
  out: str,
  *,
  model_config: Mapping[str, Any],
  vocab: Vocab,
  text_files: Mapping[str, str | bytes],
  params: Any,
  tokenizer_dir: str | None = None,
  source: Mapping[str, Any] | None = None,
  seq_len: int | None = None,
  place: Place | None = None,
  release: Callable[[], Any] | None = None,
  mesh_shape: Mapping[str, int] | None = None,
  overwrite: bool = False,
) -> str:
  """Writes an LM run directory that `LMRun(out)` loads; returns its absolute path.

  Args:
    out: the run directory to create (refused when it exists and is not empty, unless
      `overwrite`: then an existing run there is replaced).
    model_config: TransformerConfig kwargs without the sizes the vocabulary gives (vocab_size,
      image_offset, image_size, grid); names for dtypes ("bfloat16").
    vocab: the unified vocabulary; the embedding / head rows follow its ids.
    text_files: {file name: source path or bytes} copied into the run; must hold
      `text.model` (a SentencePiece model, or the JSON of `vqlm.text_hf.hf_text_model`), whose
      size must be `vocab.text_size`.
    params: the Transformer's params, a nested dict of arrays or `Lazy` leaves (e.g.
      `embed/embedding` of shape `[vocab.padded_size, dim]`).
    tokenizer_dir: the image tokenizer run the LM's codes belong to (recorded in
      `config.data.tokenizer`; None for an LM that is never asked for images).
    source: what was imported (e.g. {"format": "chameleon", "path": SRC}), kept in config.json.
    seq_len: the context length recorded as `train.seq_len` (default: the config's).
    place: reads and places the leaves on a mesh (see `Place`); default:
      `placement.place_params`, one leaf at a time straight onto the mesh.
    release: called after each leaf is placed by the default `place` (e.g. `HFCheckpoint.close`).
    mesh_shape: the mesh `place` places on (default: data-parallel over all devices).
    overwrite: replace an existing run in `out`.
  """
  if vocab.text_model != lm_run.TEXT_MODEL or lm_run.TEXT_MODEL not in text_files:
    raise UserError(
      f"an LM run reads its text model from {lm_run.TEXT_MODEL}: set vocab.text_model to it "
      f"and pass that file in text_files (got {vocab.text_model!r}, {sorted(text_files)})"
    )
  config = lm_run_config(model_config, tokenizer_dir=tokenizer_dir, seq_len=seq_len, source=source)
  model = Transformer(lm_run.transformer_config(config, vocab))
  boxed = lm_run.abstract_params(model, int(config.train.seq_len))
  check_tree(params, nn.meta.unbox(boxed), "the LM's params")
  tmp = _start(out, overwrite)
  try:
    _write_text_files(tmp, text_files)
    vocab.save(os.path.join(tmp, lm_run.VOCAB_FILE))
    lm_run.load_vocab(tmp)  # the text model fits the vocabulary (size and kind)
    saved_config.save_config(tmp, config, final_dir=out)
    placed = _placed(params, boxed, place, mesh_shape, config.mesh.rules, release)
    meta = {"stage": lm_run.STAGE, "source": _json_value(dict(source or {}))}
    _save_state(tmp, {"step": np.int32(STEP), "params": placed}, meta)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _finish(tmp, out)


def write_tokenizer_run(
  out: str,
  *,
  model_kwargs: Mapping[str, Any],
  image_size: int,
  variables: Mapping[str, Any],
  source: Mapping[str, Any] | None = None,
  place: Place | None = None,
  release: Callable[[], Any] | None = None,
  mesh_shape: Mapping[str, int] | None = None,
  overwrite: bool = False,
) -> str:
  """Writes an image tokenizer run directory that `TokenizerRun(out)` loads; returns its path.

  Args:
    out: the run directory to create (see `write_lm_run`).
    model_kwargs: ImageTokenizer kwargs (`encoder`, `decoder`, `bottleneck` dicts).
    image_size: the side of the square images it encodes (`config.data.image_size`).
    variables: {"params": ..., and "batch_stats": ... when the model has them}, nested dicts of
      arrays or `Lazy` leaves (e.g. the VQ codebook `[K, D]`).
    source, place, release, mesh_shape, overwrite: as for `write_lm_run`.
  """
  config = tokenizer_run_config(model_kwargs, image_size=image_size, source=source)
  model = tokenizer_run.tokenizer_model(config)
  boxed = tokenizer_run.abstract_variables(model, int(image_size))
  given = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  unknown = sorted(set(variables) - set(given))
  if unknown:
    raise UserError(f"variables has collections {unknown}; pass only params and batch_stats")
  want = {k: v for k, v in boxed.items() if k in ("params", "batch_stats")}
  check_tree(given, nn.meta.unbox(want), "the image tokenizer's variables")
  tmp = _start(out, overwrite)
  try:
    saved_config.save_config(tmp, config, final_dir=out)
    rules = config.mesh.rules
    params = _placed(given["params"], want["params"], place, mesh_shape, rules, release)
    state = {"step": np.int32(STEP), "params": params}
    if "batch_stats" in want:
      stats = _placed(given["batch_stats"], want["batch_stats"], place, mesh_shape, rules, release)
      state["extra"] = {"batch_stats": stats}
    meta = {"stage": tokenizer_run.STAGE, "source": _json_value(dict(source or {}))}
    _save_state(tmp, state, meta)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _finish(tmp, out)
