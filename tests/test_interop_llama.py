"""vqlm.interop.llama: Hugging Face Llama decoders -> vqlm Transformer params (and run
directories) and back; parity against transformers' LlamaForCausalLM on tiny random models."""

import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.interop import llama
from vqlm.interop.checkpoint_files import HFCheckpoint, materialize, write_safetensors
from vqlm.nn.transformer import Transformer, TransformerConfig

DIM, LAYERS, HEADS, KV_HEADS, MLP, VOCAB = 64, 2, 4, 2, 96, 300


def _transformers():
  """torch + transformers, or skip (transformers imports torchvision: see torch_refs)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from vqlm.testing import torch_refs

  try:
    torch_refs.import_torchvision()
  except ImportError:
    pass
  import transformers

  return torch, transformers


def hf_llama(path, *, tie=False, vocab=VOCAB, seed=0, **overrides):
  """A tiny random LlamaForCausalLM saved (safetensors) to `path`; returns the model (eval)."""
  torch, transformers = _transformers()
  torch.manual_seed(seed)
  cfg = dict(
    vocab_size=vocab,
    hidden_size=DIM,
    intermediate_size=MLP,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    rms_norm_eps=1e-5,
    rope_theta=500.0,
    tie_word_embeddings=tie,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
  )
  cfg.update(overrides)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
  with torch.no_grad():  # norm scales away from 1, so that a dropped scale would show
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(str(path), safe_serialization=True)
  return model


def hf_logits(model, ids):
  torch, _ = _transformers()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()


def vqlm_logits(kwargs, params, ids):
  model = Transformer(TransformerConfig(**kwargs, attention_impl="xla"))
  out, _ = model.apply({"params": materialize(params)}, jnp.asarray(ids))
  return np.asarray(out)


@pytest.mark.interop
@pytest.mark.parametrize("tie", [False, True])
def test_convert_lm_matches_transformers_with_permuted_ids(tmp_path, tie):
  model = hf_llama(tmp_path, tie=tie)
  perm = np.random.default_rng(0).permutation(384)[:VOCAB]
  kwargs, params = llama.convert_lm(HFCheckpoint(str(tmp_path)), id_map=perm, vocab_rows=384)
  assert kwargs["tie_embeddings"] == tie and kwargs["num_kv_heads"] == KV_HEADS
  assert kwargs["rope_theta"] == 500.0 and kwargs["norm_eps"] == 1e-5
  ids = np.random.default_rng(1).integers(0, VOCAB, (2, 40))
  ref = hf_logits(model, ids)
  out = vqlm_logits(kwargs, params, perm[ids])
  assert np.abs(out[..., perm] - ref).max() < 1e-5


def _fake_checkpoint(path, config):
  """A checkpoint directory with zero Llama tensors of the shapes `config` implies."""
  import json

  kw = llama.lm_kwargs(config)
  d, h, kvh, f = (kw[k] for k in ("dim", "num_heads", "num_kv_heads", "mlp_dim"))
  dh = kw["head_dim"] or d // h
  tensors = {"model.embed_tokens.weight": np.zeros((config["vocab_size"], d), np.float32)}
  for i in range(kw["num_layers"]):
    p = f"model.layers.{i}."
    for name, shape in {
      "input_layernorm.weight": (d,),
      "post_attention_layernorm.weight": (d,),
      "self_attn.q_proj.weight": (h * dh, d),
      "self_attn.k_proj.weight": (kvh * dh, d),
      "self_attn.v_proj.weight": (kvh * dh, d),
      "self_attn.o_proj.weight": (d, h * dh),
      "mlp.gate_proj.weight": (f, d),
      "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
    }.items():
      tensors[p + name] = np.zeros(shape, np.float32)
  tensors["model.norm.weight"] = np.ones((d,), np.float32)
  if not config.get("tie_word_embeddings"):
    tensors["lm_head.weight"] = np.zeros((config["vocab_size"], d), np.float32)
  write_safetensors(str(path), tensors)
  with open(path / "config.json", "w") as fh:
    json.dump(config, fh)
  return HFCheckpoint(str(path))


BASE = dict(
  hidden_size=32,
  num_attention_heads=4,
  num_hidden_layers=1,
  intermediate_size=48,
  vocab_size=20,
  tie_word_embeddings=True,
)


@pytest.mark.parametrize(
  "extra, key",
  [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 128}, "sliding_window"),
  ],
)
def test_lm_kwargs_refuses_what_vqlm_cannot_compute(extra, key):
  with pytest.raises(UserError, match=key):
    llama.lm_kwargs({**BASE, **extra})
  llama.lm_kwargs({**BASE, **extra}, allow=[key])  # an importer that handles it


def test_lm_kwargs_reads_both_rope_spellings_and_gqa():
  old = llama.lm_kwargs({**BASE, "rope_theta": 5e5, "rope_scaling": None, "num_key_value_heads": 2})
  new = llama.lm_kwargs({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
  assert old["rope_theta"] == new["rope_theta"] == 5e5
  assert old["num_kv_heads"] == 2 and new["num_kv_heads"] == 4 and old["head_dim"] is None
  assert llama.lm_kwargs({**BASE, "head_dim": 16})["head_dim"] == 16


def test_convert_lm_new_rows_and_shapes_without_torch(tmp_path):
  ckpt = _fake_checkpoint(tmp_path, {**BASE, "tie_word_embeddings": False})
  with pytest.raises(UserError, match="two source ids"):
    llama.convert_lm(ckpt, id_map=np.zeros(20, int), vocab_rows=32)
  with pytest.raises(UserError, match="only 16"):
    llama.convert_lm(ckpt, vocab_rows=16)
  id_map = np.arange(20) + 4
  id_map[-2:] = -1  # the source's padded tail is dropped
  kwargs, params = llama.convert_lm(ckpt, id_map=id_map, vocab_rows=32)
  assert not kwargs["tie_embeddings"] and kwargs["vocab_size"] == 32
  assert params["embed"]["embedding"].shape == (32, 32)
  assert params["head"]["kernel"].shape == (32, 32)
  assert params["layer_0"]["attn"]["out"]["kernel"].shape == (4, 8, 32)
  source = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
  table = llama.permute_rows(source, id_map, 32)
  np.testing.assert_array_equal(table[4:22], source[:18])
  new = np.r_[0:4, 22:32]
  np.testing.assert_allclose(table[new].mean(0), source[:18].mean(0), atol=0.02)
  assert np.abs(table[new] - source[:18].mean(0)).max() < 0.1 * source[:18].std()


def test_convert_lm_refuses_weights_of_another_shape(tmp_path):
  ckpt = _fake_checkpoint(tmp_path, BASE)
  with pytest.raises(UserError, match="different models"):
    llama.convert_lm(ckpt, hf_config={**BASE, "intermediate_size": 64}, vocab_rows=32)


# ---- runs: export and import -------------------------------------------------------------------


def tokenizer_run_dir(path):
  """A config-only vqlm image tokenizer run (tiny: 32 codes on an 8x8 grid); the importer reads
  its layout from the config, never its checkpoint."""
  from vqlm.runs import saved_config
  from vqlm.stages import tokenizer_config

  path.mkdir()
  saved_config.save_config(str(path), tokenizer_config.get_config("size=tiny"))
  return str(path)


LM_MODEL = dict(
  dim=DIM,
  num_layers=LAYERS,
  num_heads=HEADS,
  num_kv_heads=KV_HEADS,
  mlp_dim=MLP,
  tie_embeddings=False,
  rope_theta=500.0,
  norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def vqlm_run(tmp_path_factory):
  """A vqlm LM run with random parameters (norm scales away from 1) and a SentencePiece model."""
  import jax

  from vqlm import text as text_lib
  from vqlm.interop import run_files
  from vqlm.vocab import Vocab

  root = tmp_path_factory.mktemp("vqlm_run")
  tok = tokenizer_run_dir(root / "tok")
  captions = [f"a {s} {c} shape {i}" for s in ("small", "large") for c in "rgb" for i in range(20)]
  sp = text_lib.train_sentencepiece(captions, model_prefix=str(root / "sp"), vocab_size=48)
  codes, grid = llama.image_layout(tok)
  vocab = Vocab(text_lib.TextTokenizer.load(sp).vocab_size, codes, grid)
  config = TransformerConfig(
    **LM_MODEL,
    vocab_size=vocab.padded_size,
    image_offset=vocab.image_offset,
    image_size=vocab.image_size,
    grid=vocab.grid,
  )
  init = jax.jit(Transformer(config).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda x: np.asarray(x) + (0.1 * rng.standard_normal(x.shape) if x.ndim == 1 else 0),
    nn_unbox(init["params"]),
  )
  run = run_files.write_lm_run(
    str(root / "run"),
    model_config=LM_MODEL,
    vocab=vocab,
    text_files={"text.model": sp},
    params=params,
    tokenizer_dir=tok,
    seq_len=128,
  )
  return {"run": run, "tok": tok, "vocab": vocab, "root": root}


def nn_unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def mixed_ids(vocab, seed=0):
  """`[1, S]`: `<bos>` text `<boi>` one image's codes `<eoi>` text (unified ids)."""
  rng = np.random.default_rng(seed)
  image = rng.integers(vocab.image_offset, vocab.size, vocab.tokens_per_image)
  return np.concatenate(
    [
      [vocab.bos_id],
      rng.integers(0, vocab.text_size, 9),
      [vocab.boi_id],
      image,
      [vocab.eoi_id],
      rng.integers(0, vocab.text_size, 5),
    ]
  )[None]


@pytest.fixture(scope="module")
def exported(vqlm_run):
  from vqlm.interop import llama_export

  return llama_export.export_run(vqlm_run["run"], str(vqlm_run["root"] / "hf"))


def test_export_then_import_gives_identical_parameters(vqlm_run, exported):
  import jax

  from vqlm.runs.lm_run import LMRun

  for name in ("config.json", "generation_config.json", "model.safetensors", "vocab.json"):
    assert (vqlm_run["root"] / "hf" / name).exists()
  back = llama.import_run(exported, str(vqlm_run["root"] / "back"))
  a, b = LMRun(vqlm_run["run"]), LMRun(back)
  assert a.vocab == b.vocab and a.model.config == b.model.config
  assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert b.config.data.tokenizer == vqlm_run["tok"]


@pytest.mark.interop
def test_export_matches_transformers_on_text_and_image_ids(vqlm_run, exported):
  torch, transformers = _transformers()
  from vqlm.runs.lm_run import LMRun

  lm = LMRun(vqlm_run["run"])
  ids = mixed_ids(lm.vocab)
  ours, _ = lm.model.apply({"params": lm.params}, jnp.asarray(ids))
  model = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
  ref = hf_logits(model, ids)
  assert ref.shape == (1, ids.shape[1], lm.vocab.padded_size)
  assert np.abs(np.asarray(ours) - ref).max() < 1e-4


def test_export_refuses_options_llama_lacks():
  from vqlm.interop.llama_export import check_llama_compatible

  base = TransformerConfig(**LM_MODEL, vocab_size=128, image_offset=64, image_size=64, grid=(8, 8))
  check_llama_compatible(base.replace(scan_layers=True, query_chunks=4, remat_policy="full"))
  for change, name in [
    (dict(rope_2d=True), "rope_2d"),
    (dict(image_pos_embed=True), "image_pos_embed"),
    (dict(image_embed_init="levels", code_levels=(8, 8)), "image_embed_init"),
    (dict(qk_norm=True), "qk_norm"),
  ]:
    with pytest.raises(UserError, match=f"model.{name}="):
      check_llama_compatible(base.replace(**change))


WORDS = (
  "the a red green blue small large circle square triangle at top left right center of".split()
)


def tokenizer_json(path, size):
  """A tiny byte-level BPE tokenizer.json (<unk>=0, <s>=1, </s>=2, about `size` ids), offline."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=size,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  rng = np.random.default_rng(0)
  corpus = [" ".join(rng.choice(WORDS, 8)) for _ in range(400)]
  tok.train_from_iterator(corpus, trainer)
  tok.save(str(path))
  assert tok.get_vocab_size() == size
  return tok


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A tiny random Hugging Face Llama (300 rows, a ~280-id tokenizer: the tail is padding)
  imported with a tokenizer run of 32 codes."""
  root = tmp_path_factory.mktemp("imported")
  src = root / "hf"
  model = hf_llama(src, vocab=VOCAB, pad_token_id=2)
  tok = tokenizer_json(src / "tokenizer.json", 280)
  out = llama.import_run(str(src), str(root / "run"), image_tokenizer=tokenizer_run_dir(root / "t"))
  return {"model": model, "tok": tok, "out": out, "src": str(src), "root": root}


def test_import_refuses_a_text_only_run_and_other_models(tmp_path):
  ckpt = _fake_checkpoint(tmp_path, {**BASE, "architectures": ["LlamaForCausalLM"]})
  del ckpt
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(UserError, match="--image_tokenizer"):
    llama.import_run(str(tmp_path), str(tmp_path / "run"))
  other = tmp_path / "other"
  _fake_checkpoint(other, {**BASE, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
  with pytest.raises(UserError, match="not LlamaForCausalLM"):
    llama.import_run(str(other), str(tmp_path / "run"))


@pytest.mark.interop
def test_import_keeps_text_logits_and_greedy_generation(imported):
  from vqlm.runs.lm_run import LMRun
  from vqlm.sample.processors import SamplingConfig
  from vqlm.sample.sampler import Sampler

  lm = LMRun(imported["out"])
  vocab = lm.vocab
  assert vocab.text_size == 280 - 2  # <s> and </s> became vqlm's bos and eos
  id_map = llama.text_id_map(280, {"bos": 1, "eos": 2}, vocab)
  assert id_map[1] == vocab.bos_id and id_map[2] == vocab.eos_id and id_map[3] == 1
  text = "a red circle at the top left of the green square"
  source = [1] + imported["tok"].encode(text).ids
  assert lm.text_tokenizer.encode(text) == [int(id_map[i]) for i in source[1:]]
  # The logits of every source id are the source model's, at the permuted ids.
  ours, _ = lm.model.apply({"params": lm.params}, jnp.asarray(id_map[source])[None])
  ref = hf_logits(imported["model"], [source])
  assert np.abs(np.asarray(ours)[..., id_map] - ref[..., :280]).max() < 1e-5
  # Greedy decoding, 64 tokens, token for token (bos is never sampled by vqlm's text mode).
  torch, _ = _transformers()
  with torch.no_grad():
    hf = (
      imported["model"]
      .generate(
        torch.tensor([source]),
        max_new_tokens=64,
        min_new_tokens=64,
        do_sample=False,
        suppress_tokens=list(range(280, VOCAB)) + [1],
        pad_token_id=2,
      )[0, len(source) :]
      .numpy()
    )
  sampler = Sampler(lm.model, {"params": lm.params}, vocab, cache_block=0)  # one compile
  out = sampler([id_map[source]], max_new_tokens=64, mode="text", sampling=SamplingConfig.greedy())
  n = int(out.lengths[0])
  assert n == 64 or out.tokens[0, n - 1] == vocab.eos_id
  np.testing.assert_array_equal(out.tokens[0, :n], id_map[hf[:n]])


def test_cli_import_and_export_in_bfloat16(vqlm_run, exported, capsys):
  """`vqlm export --format llama` and `vqlm import llama --dtype bfloat16` through the command."""
  import jax

  from vqlm import cli
  from vqlm.runs.lm_run import LMRun

  root = vqlm_run["root"]
  out = str(root / "hf_cli")
  assert cli.main(["vqlm", "export", "--format", "llama", vqlm_run["run"], out]) == 0
  assert cli.main(["vqlm", "export", "--format", "llama", vqlm_run["run"], out]) == 2
  assert "--overwrite" in capsys.readouterr().err
  argv = ["vqlm", "export", "--format", "llama", vqlm_run["run"], out, "--overwrite"]
  assert cli.main(argv) == 0
  argv = ["vqlm", "import", "llama", out, "--out", str(root / "bf16"), "--dtype", "bfloat16"]
  assert cli.main(argv) == 0
  lm = LMRun(str(root / "bf16"))
  assert lm.model.config.param_dtype == jnp.bfloat16 and lm.model.config.dtype == jnp.bfloat16
  a = LMRun(vqlm_run["run"]).params["layer_0"]["attn"]["query"]["kernel"]
  b = lm.params["layer_0"]["attn"]["query"]["kernel"]
  assert b.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(jax.device_get(a)).astype(jnp.bfloat16), b)
