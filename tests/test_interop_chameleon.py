"""vqlm.interop.chameleon: Chameleon / Anole -> a vqlm LM run + its image tokenizer run, with
the source ids permuted (image tokens -> image codes, roles -> specials, the rest -> text ids);
parity with transformers' ChameleonForConditionalGeneration on tiny random models (logits, and
greedy text generation through vqlm's jitted sampler in mode "free")."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.errors import UserError
from vqlm.interop import chameleon
from vqlm.sample import constraints as cons
from vqlm.vocab import Vocab

CODES, WORDS = 32, 76  # image tokens (the VQ's codebook) and plain words of the tiny vocabulary
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, as Chameleon's
OTHERS = ["<eoss>", "<racm3:break>", "<image>", "<reserved08706>"]


def image_name(code: int) -> str:
  """Chameleon's BPE name of image code `code`: its digits as letters A-J, then "Z"."""
  return chameleon.IMAGE_PREFIX + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def tiny_vocabulary(seed: int = 0) -> dict[str, int]:
  """Chameleon's specials at 0-3, then image tokens, <eoss>, <racm3:break>, ... and words in a
  shuffled order (image codes scattered, not in id order)."""
  rest = [image_name(k) for k in range(CODES)] + OTHERS + [f"w{i}" for i in range(WORDS)]
  rest = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
  return {name: i for i, name in enumerate(SPECIALS + rest)}


def tokenizer_json(vocabulary: dict[str, int]) -> str:
  """A word-level tokenizer.json over `vocabulary`, built offline with `tokenizers`."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIALS + OTHERS])
  return tok.to_str()


def _transformers():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from vqlm.testing import torch_refs

  try:
    torch_refs.import_torchvision()
  except ImportError:
    pass
  import transformers

  return torch, transformers


def hf_chameleon(path, *, swin_norm=False, seed=0):
  """A tiny random ChameleonForConditionalGeneration saved to `path` with its tokenizer.json;
  returns the model (eval, float32)."""
  torch, transformers = _transformers()
  torch.manual_seed(seed)
  vocabulary = tiny_vocabulary(seed)
  vq = dict(
    embed_dim=4,
    num_embeddings=CODES,
    latent_channels=8,
    resolution=16,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
  )
  config = transformers.ChameleonConfig(
    vocab_size=len(vocabulary),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
    swin_norm=swin_norm,
    vq_config=vq,
    vocabulary_map=vocabulary,
  )
  model = transformers.ChameleonForConditionalGeneration(config).eval()
  with torch.no_grad():  # spread logits (no near-ties for greedy), norms away from 1 and 0
    for name, p in model.named_parameters():
      if "vqmodel" in name:
        continue
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  model.save_pretrained(str(path), safe_serialization=True)
  (path / "tokenizer.json").write_text(tokenizer_json(vocabulary))
  return model


# ---- ids (no torch) ---------------------------------------------------------------------------


def test_image_codes_read_the_names_as_transformers_does():
  vocabulary = {"<s>": 0, image_name(10): 7, image_name(0): 9, "IMGIMGJJZ": 4, "w": 3}
  assert chameleon.image_codes(vocabulary) == {7: 10, 9: 0, 4: 99}
  with pytest.raises(UserError, match="IMGIMGxZ"):
    chameleon.image_codes({"IMGIMGxZ": 1})


def test_id_map_permutes_images_roles_and_keeps_the_text_order():
  vocabulary = tiny_vocabulary()
  images = chameleon.image_codes(vocabulary)
  roles = {"bos": 0, "pad": 1, "eos": 2, "boi": vocabulary["<racm3:break>"]}
  roles["eoi"] = vocabulary["<eoss>"]
  size = len(vocabulary)
  vocab = Vocab(text_size=size - len(roles) - CODES, image_size=CODES, grid=(2, 2))
  ids = chameleon.id_map(size, roles, images, vocab)
  assert np.unique(ids).size == size and ids.min() == 0 and ids.max() < vocab.size
  for role, source in roles.items():
    assert ids[source] == vocab.special(role)
  for source, code in images.items():
    assert ids[source] == vocab.image_offset + code
  text = [s for s in range(size) if s not in images and s not in roles.values()]
  np.testing.assert_array_equal(ids[text], np.arange(vocab.text_size))  # order kept


def test_free_mode_never_draws_image_codes_and_opens_no_runs():
  vocab = Vocab(text_size=20, image_size=12, grid=(2, 3), num_reserved=2, pad_to=16)
  spec = cons.Spec.from_vocab(vocab, cons.FREE)
  image = [vocab.boi_id, *vocab.image_token(np.arange(6)).tolist(), vocab.eoi_id]
  prompts = [[vocab.bos_id, 3], [vocab.bos_id, vocab.boi_id], [vocab.bos_id, 5, *image]]
  state = cons.initial_state(spec, prompts)
  assert not np.any(state.codes_left) and cons.min_new_tokens(spec, state) == 0
  bias = jnp.zeros(vocab.padded_size).at[vocab.image_offset :].set(9.0)  # codes most likely
  bias = bias.at[jnp.asarray([vocab.boi_id, vocab.eos_id])].set(3.0)

  @jax.jit
  def step(state, t):
    key = jax.random.fold_in(jax.random.key(0), t)
    forced, klass = cons.forced_and_class(spec, state, 40 - t)
    allowed = cons.allowed_ids(spec, forced, klass)
    logits = jax.random.normal(key, (3, vocab.padded_size)) + bias
    tok = jax.random.categorical(jax.random.fold_in(key, 1), jnp.where(allowed, logits, -1e9))
    tok = jnp.where(forced >= 0, forced, tok)
    return cons.update(spec, state, tok), tok

  tokens = []
  for t in range(40):
    state, tok = step(state, t)
    assert not np.any(state.codes_left)
    tokens.append(np.asarray(tok))
  tokens = np.stack(tokens, 1)
  assert not np.any(vocab.is_image(tokens)) and not np.any(tokens == vocab.frame_id)
  assert np.any(tokens == vocab.boi_id) and np.any(tokens == vocab.eos_id)
  reserved = (tokens >= vocab.special("frame")) & (tokens < vocab.image_offset)
  assert not np.any(reserved)
  for row in tokens:  # after <eos>: only <pad>
    stop = list(row).index(vocab.eos_id) if vocab.eos_id in row else len(row)
    assert np.all(row[stop + 1 :] == vocab.pad_id)


def _config_only(path, **config):
  from vqlm.interop.checkpoint_files import write_safetensors

  write_safetensors(str(path), {"model.embed_tokens.weight": np.zeros((8, 4), np.float32)})
  (path / "config.json").write_text(json.dumps(config))
  return str(path)


@pytest.mark.parametrize(
  "config, tokenizer, match",
  [
    ({"model_type": "llama"}, True, "not chameleon"),
    ({"model_type": "chameleon"}, True, "vocabulary_map"),
    ({"model_type": "chameleon", "vocabulary_map": {"<s>": 0}}, False, "tokenizer.json"),
  ],
)
def test_import_refuses_other_sources_in_one_line(tmp_path, config, tokenizer, match):
  src = _config_only(tmp_path, **config)
  if tokenizer:
    (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(UserError, match=match) as e:
    chameleon.import_run(src, str(tmp_path / "out"))
  assert "\n" not in str(e.value)


def test_import_refuses_a_non_empty_out(tmp_path):
  src = _config_only(tmp_path, model_type="chameleon", vocabulary_map={"<s>": 0})
  (tmp_path / "tokenizer.json").write_text("{}")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "x").write_text("")
  with pytest.raises(UserError, match="--overwrite"):
    chameleon.import_run(src, str(tmp_path / "out"))


# ---- parity with transformers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(reference model, source vocabulary, imported LMRun, source id -> vqlm id)."""
  import vqlm

  src = tmp_path_factory.mktemp("chameleon")
  model = hf_chameleon(src)
  out = chameleon.import_run(str(src), str(tmp_path_factory.mktemp("runs") / "lm"))
  run = vqlm.load(out)
  vocabulary = tiny_vocabulary()
  roles = chameleon.special_roles(str(src), json.loads((src / "config.json").read_text()))
  ids = chameleon.id_map(len(vocabulary), roles, chameleon.image_codes(vocabulary), run.vocab)
  return model, vocabulary, run, ids


def _mixed(vocabulary, seed):
  """<s> words <racm3:break> 64 image tokens <eoss> words, in source ids."""
  rng = np.random.default_rng(seed)
  words = [vocabulary[f"w{i}"] for i in rng.integers(0, WORDS, 7)]
  codes = [vocabulary[image_name(int(k))] for k in rng.integers(0, CODES, 64)]
  image = [vocabulary["<racm3:break>"], *codes, vocabulary["<eoss>"]]
  return [vocabulary["<s>"], *words[:4], *image, *words[4:]]


def _logits_parity(model, vocabulary, run, ids):
  """Max abs difference of the logits on two mixed sequences, with transformers' image mask
  applied to vqlm's logits through the permutation (they must be exactly its float minimum)."""
  torch, _ = _transformers()
  src = np.asarray([_mixed(vocabulary, 1), _mixed(vocabulary, 2)[::-1]])
  with torch.no_grad():
    ref = model(torch.tensor(src)).logits.numpy()
  out, _ = run.model.apply({"params": run.params}, jnp.asarray(ids[src]))
  ours = np.asarray(out)[..., ids]  # vqlm logits in source id order
  image = run.vocab.is_image(ids)
  ours[..., image] = np.finfo(np.float32).min  # transformers' mask, through the permutation
  assert np.all(ref[..., image] == np.finfo(np.float32).min)
  return float(np.abs(ours - ref).max())


@pytest.mark.interop
def test_import_matches_transformers_logits_text_and_image_ids(imported):
  model, vocabulary, run, ids = imported
  assert _logits_parity(model, vocabulary, run, ids) < 1e-4
  assert run.model.config.qk_norm == "layernorm" and not run.model.config.tie_embeddings
  # The run's files: the tokenizer run inside it, recorded relative to it.
  config = json.loads(open(f"{run.workdir}/config.json").read())
  assert config["relative_paths"]["data.tokenizer"] == chameleon.TOKENIZER_DIR
  assert run.tokenizer_dir() == f"{run.workdir}/{chameleon.TOKENIZER_DIR}"
  tok = run.tokenizer_run()
  assert tok.codebook_size == CODES and tuple(tok.grid) == (8, 8)
  # Text through the id map: words -> their text ids, "</s>" -> vqlm's <eos>.
  text = run.text_tokenizer.encode("w3 w17 </s>")
  assert text == [ids[vocabulary["w3"]], ids[vocabulary["w17"]], run.vocab.eos_id]
  assert run.text_tokenizer.decode(text[:2]) == "w3 w17"
  # Image -> codes -> vqlm ids equals transformers' image -> BPE tokens, through the permutation.
  torch, _ = _transformers()
  pixels = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model.get_image_tokens(torch.tensor(pixels.transpose(0, 3, 1, 2))).numpy()
  codes = tok.encode(pixels).reshape(2, -1)
  np.testing.assert_array_equal(ids[ref], run.vocab.image_token(codes))


@pytest.mark.interop
def test_greedy_generation_matches_transformers_generate(imported):
  """64 greedy tokens per prompt, vqlm's jitted sampler in mode "free" (image codes masked, as
  transformers' forward masks them) against `generate`, token for token; the third prompt's
  continuation draws <s> and <pad> and stops at </s>."""
  from vqlm.sample.processors import SamplingConfig
  from vqlm.sample.sampler import Sampler

  torch, _ = _transformers()
  model, vocabulary, run, ids = imported
  words = [vocabulary[f"w{i}"] for i in np.random.default_rng(1).integers(0, WORDS, 3)]
  prompts = [[vocabulary["<s>"], *words], _mixed(vocabulary, 1)[:40], _mixed(vocabulary, 23)[:40]]
  sampler = Sampler(run.model, {"params": run.params}, run.vocab, cache_block=0)
  out = sampler(
    [ids[p] for p in prompts], max_new_tokens=64, mode=cons.FREE, sampling=SamplingConfig.greedy()
  )
  back = np.full(run.vocab.padded_size, -1)
  back[ids] = np.arange(ids.size)
  for r, prompt in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    ref = ref.numpy()[0, len(prompt) :]
    n = int(out.lengths[r])
    assert n == len(ref)
    np.testing.assert_array_equal(back[out.tokens[r, :n]], ref)
  assert {vocabulary[t] for t in ("<s>", "<pad>")} <= set(ref[:-1]) and ref[-1] == vocabulary[
    "</s>"
  ]


@pytest.mark.interop
def test_swin_norm_import_matches_transformers_and_captions(tmp_path, capsys):
  """Chameleon-30B's norm order (`swin_norm`) imported by the `vqlm import` command, the
  imported run through `LMRun.caption`, and an import that reuses that image tokenizer run."""
  import vqlm
  from vqlm import cli

  model = hf_chameleon(tmp_path / "src", swin_norm=True, seed=1)
  out = str(tmp_path / "lm")
  assert cli.main(["vqlm", "import", "chameleon", str(tmp_path / "src"), "--out", out]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  run = vqlm.load(out)
  assert run.model.config.swin_norm
  vocabulary = tiny_vocabulary(seed=1)
  roles = chameleon.special_roles(str(tmp_path / "src"), model.config.to_dict())
  ids = chameleon.id_map(len(vocabulary), roles, chameleon.image_codes(vocabulary), run.vocab)
  assert _logits_parity(model, vocabulary, run, ids) < 1e-4
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  captions = run.caption(images, max_len=6)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  tokenizer = run.tokenizer_dir()
  again = chameleon.import_run(
    str(tmp_path / "src"), str(tmp_path / "lm2"), image_tokenizer=tokenizer
  )
  assert not (tmp_path / "lm2" / chameleon.TOKENIZER_DIR).exists()
  assert vqlm.load(again).tokenizer_dir() == tokenizer
