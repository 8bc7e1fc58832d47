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
  d, h, kvh, dh, f = (kw[k] for k in ("dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"))
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
  assert old["num_kv_heads"] == 2 and new["num_kv_heads"] == 4 and old["head_dim"] == 8


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
