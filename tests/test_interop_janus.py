"""`vqlm import janus`: a tiny random Janus (transformers' JanusForConditionalGeneration, built
offline) imported as a vqlm LM run + its VQ tokenizer run, against the reference: logits of text
(LM head) and image codes (generation head) on a mixed sequence, greedy text generation, and
image generation under Janus's classifier-free guidance."""

import json
import os

import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.interop import janus
from vqlm.vocab import Vocab

SPECIALS = (
  "<｜begin▁of▁sentence｜>",
  "<｜end▁of▁sentence｜>",
  "<｜▁pad▁｜>",
  "<image_placeholder>",
  "<begin_of_image>",
  "<end_of_image>",
)
CAPTION = "a small red circle at the top left"


def _tokenizer_json(path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [CAPTION, "a large blue square", "the quick brown fox jumps over the lazy dog"] * 20
  trainer = trainers.BpeTrainer(
    vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(corpus, trainer)
  tok.add_special_tokens(list(SPECIALS))
  tok.save(path)
  return tok


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
  pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from vqlm.testing.torch_refs import import_torchvision

  import_torchvision()  # transformers' Janus imports torchvision
  from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
  from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

  src = str(tmp_path_factory.mktemp("janus_src"))
  tok = _tokenizer_json(os.path.join(src, "tokenizer.json"))
  ids = {s: tok.token_to_id(s) for s in SPECIALS}
  bos, eos, pad = (ids[s] for s in SPECIALS[:3])
  text = LlamaConfig(
    vocab_size=tok.get_vocab_size(with_added_tokens=True),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=bos,
    eos_token_id=eos,
    pad_token_id=pad,
  )
  vision = JanusVisionConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=4,  # an 8x8 grid
    projection_dim=32,
    num_image_tokens=64,
    mlp_ratio=2,
  )
  vq = JanusVQVAEConfig(
    embed_dim=8,
    num_embeddings=48,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    latent_channels=32,
    projection_dim=32,
    image_token_embed_dim=32,
    num_hidden_layers=2,
  )
  config = JanusConfig(
    text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids[SPECIALS[3]]
  )
  torch.manual_seed(0)
  model = JanusForConditionalGeneration(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # weights of real scale (the init's are ~0.02: nearly flat logits)
    for name, p in model.named_parameters():
      if "vqmodel" in name or "vision_model" in name or name.startswith("model.aligner"):
        continue
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / (1.0 if "embed" in name else p.shape[1] ** 0.5))
  g = model.generation_config
  g.bos_token_id, g.eos_token_id, g.pad_token_id = bos, eos, pad
  g.generation_kwargs = {"boi_token_id": ids["<begin_of_image>"]}
  model.save_pretrained(src, safe_serialization=True)
  return src, model, ids


@pytest.fixture(scope="module")
def imported(janus_dir, tmp_path_factory):
  import vqlm

  src, model, ids = janus_dir
  out = str(tmp_path_factory.mktemp("janus_run") / "run")
  assert janus.import_run(src, out) == out
  run = vqlm.load(out)
  with open(os.path.join(out, "text.model")) as f:
    text_model = json.load(f)
  id_map = np.full(model.config.text_config.vocab_size, -1, np.int64)
  id_map[np.asarray(text_model["source_ids"])] = np.arange(run.vocab.text_size)
  for s, v in text_model["special_ids"].items():
    id_map[int(s)] = v
  return run, id_map


@pytest.mark.interop
def test_layout_and_logits_of_text_and_image_ids_match_janus(janus_dir, imported):
  import jax.numpy as jnp
  import torch

  _, model, ids = janus_dir
  run, id_map = imported
  v = run.vocab
  assert (v.text_size, v.image_size, v.grid) == (len(id_map) - 5, 48, (8, 8))
  roles = dict(zip(("bos", "eos", "pad"), SPECIALS[:3])) | {
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
  }
  for role, token in roles.items():
    assert id_map[ids[token]] == v.special(role)
  assert run.model.config.gen_embed_dim == 8 and run.model.config.gen_aligner_depth == 2
  assert os.path.isdir(os.path.join(run.workdir, "tokenizer"))
  rng = np.random.default_rng(0)
  text, codes = rng.integers(0, 300, 6).tolist(), rng.integers(0, 48, 10).tolist()
  boi, eoi = ids["<begin_of_image>"], ids["<end_of_image>"]
  seq = [("t", t) for t in [ids[SPECIALS[0]], *text, boi]]
  seq += [("i", c) for c in codes] + [("t", t) for t in [eoi, *text[:3]]]
  with torch.no_grad():
    pieces = [
      model.get_input_embeddings()(torch.tensor([[i]]))
      if kind == "t"
      else model.prepare_embeddings_for_image_generation(torch.tensor([[i]]))
      for kind, i in seq
    ]
    h = model.model.language_model(inputs_embeds=torch.cat(pieces, 1)).last_hidden_state
    text_ref = model.lm_head(h)[0].numpy()
    image_ref = model.model.generation_head(h)[0].numpy()
  tokens = [id_map[i] if kind == "t" else v.image_offset + i for kind, i in seq]
  logits, _ = run.model.apply({"params": run.params}, jnp.asarray([tokens]))
  logits = np.asarray(logits[0])
  kept = np.nonzero(id_map >= 0)[0]
  text_diff = np.abs(logits[:, id_map[kept]] - text_ref[:, kept]).max()
  image_diff = np.abs(logits[:, v.image_offset : v.image_offset + 48] - image_ref).max()
  assert np.abs(text_ref).max() > 1 and np.abs(image_ref).max() > 1  # not flat
  print(f"janus max abs: text {text_diff:.2e}, image {image_diff:.2e}")
  assert text_diff < 1e-4 and image_diff < 1e-4, (text_diff, image_diff)


@pytest.mark.interop
def test_greedy_text_generation_matches_janus_token_for_token(janus_dir, imported):
  import torch

  from vqlm.sample import SamplingConfig

  _, model, ids = janus_dir
  run, id_map = imported
  prompt = [ids[SPECIALS[0]], *np.random.default_rng(1).integers(0, 300, 5).tolist()]
  with torch.no_grad():
    ref = model.generate(
      torch.tensor([prompt]),
      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      max_new_tokens=64,
      do_sample=False,
      suppress_tokens=[ids[SPECIALS[2]]],  # vqlm never samples <pad>
      generation_mode="text",
    )[0, len(prompt) :].numpy()
  out = run.generator(batch_size=1).sampler(
    [id_map[prompt].tolist()], max_new_tokens=64, mode="free", sampling=SamplingConfig.greedy()
  )
  assert len(ref) == 64 and out.lengths[0] == 64
  np.testing.assert_array_equal(out.tokens[0], id_map[ref])


@pytest.mark.interop
def test_image_generation_under_guidance_matches_janus_and_captioning_is_refused(
  janus_dir, imported
):
  import torch

  from vqlm.sample import SamplingConfig

  _, model, ids = janus_dir
  run, _ = imported
  tok = __import__("tokenizers").Tokenizer.from_file(os.path.join(janus_dir[0], "tokenizer.json"))
  prompt = [ids[SPECIALS[0]], *tok.encode(CAPTION).ids, ids["<begin_of_image>"]]
  with torch.no_grad():
    ref = model.generate(
      torch.tensor([prompt]),
      attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      do_sample=False,
      generation_mode="image",
      guidance_scale=4.0,
    )[0].numpy()
  assert len(ref) == 64 and len(set(ref.tolist())) > 4
  images, codes = run.generator(batch_size=1).generate_images(
    [CAPTION], cfg_scale=4.0, sampling=SamplingConfig.greedy(), return_codes=True
  )
  np.testing.assert_array_equal(codes.reshape(-1), ref)
  assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
  with pytest.raises(UserError, match="SigLIP"):
    run.caption(images)


def test_special_roles_and_id_map_from_tokenizer_files(tmp_path):
  tok = {
    "model": {"vocab": {"a": 0, "b": 1, "c": 2}},
    "added_tokens": [{"id": 3 + i, "content": s} for i, s in enumerate(SPECIALS)],
  }
  (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
  (tmp_path / "generation_config.json").write_text(json.dumps({"pad_token_id": 5}))
  size, tokens = janus.tokenizer_tokens(str(tmp_path / "tokenizer.json"))
  assert size == 9
  roles = janus.special_roles(str(tmp_path), {}, tokens)
  assert roles == {"bos": 3, "eos": 4, "pad": 5, "boi": 7, "eoi": 8}
  vocab = Vocab(text_size=4, image_size=4, grid=(2, 2))
  id_map = janus.text_id_map(11, size, roles, vocab)  # rows past the tokenizer are dropped
  assert id_map.tolist() == [0, 1, 2, 5, 6, 4, 3, 7, 8, -1, -1]
  with pytest.raises(UserError, match="repeat"):
    janus.special_roles(str(tmp_path), {"text_config": {"eos_token_id": 3}}, tokens)


def test_non_janus_sources_are_refused(tmp_path):
  from vqlm.interop.checkpoint_files import write_safetensors

  write_safetensors(str(tmp_path), {"x": np.zeros(2, np.float32)})
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(UserError, match="not Janus"):
    janus.import_run(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(UserError, match="--image_tokenizer"):
    janus.import_run(str(tmp_path), str(tmp_path / "out"), image_tokenizer="tok")
