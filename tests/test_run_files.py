"""Run directories written from parameters (vqlm.interop.run_files) load as trained runs."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqlm
from vqlm import runs
from vqlm.errors import UserError
from vqlm.interop import run_files
from vqlm.interop.checkpoint_files import Lazy
from vqlm.interop.placement import place_params
from vqlm.nn.image_tokenizer import ImageTokenizer
from vqlm.nn.transformer import Transformer
from vqlm.runs import lm_run
from vqlm.runtime.checkpoint import to_numpy
from vqlm.runtime.config import as_kwargs
from vqlm.stages import tokenizer_config
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import Vocab

LM_MODEL = dict(
  dim=32,
  num_layers=2,
  num_heads=2,
  num_kv_heads=1,
  mlp_dim=64,
  qk_norm=True,
  tie_embeddings=False,
  norm_eps=1e-5,
  dtype="float32",
  param_dtype="float32",
)
SOURCE = {"format": "test", "path": "/nowhere"}


def _random_like(tree, seed=0):
  """Random float32 arrays with `tree`'s structure (so nothing equals an init by chance)."""
  rng = np.random.default_rng(seed)

  def leaf(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return rng.standard_normal(x.shape).astype(np.float32)
    return np.ones(x.shape, x.dtype)

  return jax.tree.map(leaf, tree)


def _lazy_leaves(tree):
  """Every other leaf wrapped as `Lazy` (reads must go through `Lazy.__call__`)."""
  flat, treedef = jax.tree_util.tree_flatten(tree)
  out = [Lazy(a.shape, a.dtype, lambda a=a: a) if i % 2 else a for i, a in enumerate(flat)]
  return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("runfiles")
  config = tokenizer_config.get_config("size=tiny")
  tok_kwargs = config.model.to_dict()
  image_size = int(config.data.image_size)
  model = ImageTokenizer(**as_kwargs(config.model))
  shapes = jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0), "sample": jax.random.key(1), "restart": jax.random.key(2)},
      jnp.zeros((1, image_size, image_size, 3)),
      train=False,
    )
  )
  variables = _random_like(dict(nn.meta.unbox(shapes)), seed=1)
  tok = run_files.write_tokenizer_run(
    str(root / "tok"),
    model_kwargs=tok_kwargs,
    image_size=image_size,
    variables=_lazy_leaves(variables),
    source=SOURCE,
  )

  sp = train_sentencepiece(
    ["a large red circle", "a small blue square at the top", "two green triangles left"] * 4,
    model_prefix=str(root / "sp"),
    vocab_size=40,
  )
  text_size = TextTokenizer.load(sp).vocab_size
  vocab = Vocab(text_size=text_size, image_size=32, grid=(8, 8))
  config = lm_run.transformer_config(
    run_files.lm_run_config(LM_MODEL, tokenizer_dir=tok, seq_len=96), vocab
  )
  shapes = jax.eval_shape(
    lambda: Transformer(config).init(
      {"params": jax.random.key(0)}, jnp.zeros((1, 8), jnp.int32), positions=None
    )
  )["params"]
  params = _random_like(dict(nn.meta.unbox(shapes)), seed=2)
  params = jax.tree.map(lambda x: x * np.float32(0.05), params)
  lm = run_files.write_lm_run(
    str(root / "lm"),
    model_config=LM_MODEL,
    vocab=vocab,
    text_files={"text.model": sp},
    params=_lazy_leaves(params),
    tokenizer_dir=tok,
    source=SOURCE,
    seq_len=96,
    place=place_params,  # the tokenizer above is read to host memory (the default)
  )
  return {"root": root, "tok": tok, "lm": lm, "tok_vars": variables, "params": params, "sp": sp}


def _assert_same(a, b):
  fa, fb = run_files._flat(a), run_files._flat(b)
  assert sorted(fa) == sorted(fb)
  for name in fa:
    np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


def test_tokenizer_run_round_trips_and_codes(written):
  run = vqlm.load(written["tok"])
  assert isinstance(run, runs.TokenizerRun) and run.step == 0
  _assert_same(to_numpy(run.variables), written["tok_vars"])
  assert run.grid == (8, 8) and run.codebook_size == 32
  config = runs.load_config(written["tok"])
  assert config.source.format == "test" and config.size == run_files.SIZE


def test_lm_run_round_trips(written):
  run = runs.load(written["lm"])
  assert isinstance(run, runs.LMRun) and run.step == 0
  _assert_same(to_numpy(run.params), written["params"])
  assert run.tokenizer_dir() == written["tok"]
  assert run.vocab == Vocab.load(os.path.join(written["lm"], "vocab.json"))
  tokens = jnp.asarray([[run.vocab.bos_id, 3, 4, run.vocab.boi_id]], jnp.int32)
  forward = jax.jit(lambda p: run.model.apply({"params": p}, tokens)[0])
  np.testing.assert_array_equal(
    np.asarray(forward(run.params)), np.asarray(forward(written["params"]))
  )
  with open(os.path.join(written["lm"], "config.json")) as f:
    saved = json.load(f)
  assert saved["model"] == LM_MODEL
  assert saved["stage"] == "lm" and saved["train"]["seq_len"] == 96
  assert saved["source"] == SOURCE
  assert sorted(os.listdir(os.path.join(written["lm"], "checkpoints"))) == ["0"]


@pytest.mark.slow
def test_written_lm_run_generates_and_captions(written):
  """About 25 s on 2 cores (the sampling loops compile)."""
  tok = runs.load(written["tok"])
  codes = tok.encode(np.zeros((1, 32, 32, 3), np.uint8))
  assert codes.shape == (1, 8, 8) and tok.decode(codes).shape == (1, 32, 32, 3)
  run = runs.load(written["lm"])
  images = run.generate(["a red circle"], num_per_prompt=1, seed=1, batch_size=1)
  assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
  captions = run.caption(images, max_len=4, batch_size=1)
  assert len(captions) == 1 and isinstance(captions[0], str)


def test_existing_out_is_refused_unless_overwrite(written, tmp_path):
  kwargs = dict(
    model_kwargs=tokenizer_config.get_config("size=tiny").model.to_dict(),
    image_size=32,
    variables=written["tok_vars"],
  )
  with pytest.raises(UserError, match="--overwrite"):
    run_files.write_tokenizer_run(written["tok"], **kwargs)
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("x")
  with pytest.raises(UserError, match="not a vqlm run"):
    run_files.write_tokenizer_run(str(other), overwrite=True, **kwargs)
  assert (other / "keep.txt").exists()
  again = tmp_path / "again"
  run_files.write_tokenizer_run(str(again), **kwargs)
  (again / "stale.txt").write_text("x")
  run_files.write_tokenizer_run(str(again), overwrite=True, **kwargs)
  assert not (again / "stale.txt").exists()
  assert not [p for p in os.listdir(tmp_path) if ".importing-" in p]


def test_wrong_parameters_are_refused_before_writing(written, tmp_path):
  vocab = Vocab.load(os.path.join(written["lm"], "vocab.json"))
  params = dict(written["params"])
  kwargs = dict(
    model_config=LM_MODEL, vocab=vocab, text_files={"text.model": written["sp"]}, seq_len=96
  )
  with pytest.raises(UserError, match="missing"):
    run_files.write_lm_run(
      str(tmp_path / "a"), params={k: v for k, v in params.items() if k != "head"}, **kwargs
    )
  bad = dict(params, final_norm={"scale": np.zeros((3,), np.float32)})
  with pytest.raises(UserError, match=r"final_norm/scale has shape \(3,\)"):
    run_files.write_lm_run(str(tmp_path / "b"), params=bad, **kwargs)
  with pytest.raises(UserError, match="text.model"):
    run_files.write_lm_run(
      str(tmp_path / "c"), params=params, **dict(kwargs, text_files={"x.model": written["sp"]})
    )
  assert not os.listdir(tmp_path)
