"""Hugging Face tokenizer.json text models (vqlm.text_hf) behind the TextTokenizer interface."""

import json
import os
import sys

import numpy as np
import pytest

from vqlm import text_hf
from vqlm.errors import UserError
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import Vocab

tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
  "a large red circle at the top left",
  "a small blue square next to two green triangles",
  "the quick brown fox jumps over the lazy dog",
] * 8
# Source specials in the order Llama-like tokenizers put them: <unk>=0, <s>=1, </s>=2, then the
# begin / end of image markers (as Chameleon and Janus have them) and one vqlm has no role for.
SPECIALS = ["<unk>", "<s>", "</s>", "<begin_image>", "<end_image>", "<sys>"]
ROLES = {"bos": 1, "eos": 2, "boi": 3, "eoi": 4}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """A tiny Llama-style BPE (Metaspace, byte fallback off) trained offline on SENTENCES."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(
    SENTENCES, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS, show_progress=False)
  )
  path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
  tok.save(path)
  return path


def _vocab(source_size: int) -> Vocab:
  return Vocab(text_size=source_size - len(ROLES), image_size=16, grid=(4, 4))


def _id_map(source_size: int, vocab: Vocab, *, specials: bool = True) -> np.ndarray:
  """Role ids -> their vqlm special (or -1), every other source id -> the next text id."""
  role_of = {i: vocab.special(r) for r, i in ROLES.items()}
  out, text = [], 0
  for i in range(source_size):
    if i in role_of:
      out.append(role_of[i] if specials else -1)
    else:
      out.append(text)
      text += 1
  return np.asarray(out)


@pytest.fixture(scope="module")
def model(tokenizer_json, tmp_path_factory):
  """(run-style text.model path, its Vocab, the raw tokenizers.Tokenizer)."""
  raw = tokenizers.Tokenizer.from_file(tokenizer_json)
  size = raw.get_vocab_size(with_added_tokens=True)
  vocab = _vocab(size)
  path = str(tmp_path_factory.mktemp("run") / "text.model")
  with open(path, "wb") as f:
    f.write(text_hf.hf_text_model(tokenizer_json, _id_map(size, vocab), text_size=vocab.text_size))
  return path, vocab, raw


def test_text_model_loads_through_text_tokenizer_and_round_trips(model):
  path, vocab, raw = model
  tok = TextTokenizer.load(path)
  assert isinstance(tok, text_hf.HFTextTokenizer)
  assert tok.vocab_size == vocab.text_size == raw.get_vocab_size() - len(ROLES)
  for sentence in SENTENCES[:3]:
    ids = vocab.encode_text(tok, sentence)
    assert ids and all(0 <= i < vocab.text_size for i in ids)
    assert tok.decode(ids) == sentence
    # The same tokens as the source tokenizer, renumbered: ids past the roles shift down.
    source = raw.encode(sentence, add_special_tokens=False).ids
    assert [tok.source_id(i) for i in ids] == source
    assert [tok.id_to_piece(i) for i in ids] == [raw.id_to_token(s) for s in source]
  assert tok.unk_id == 0 and tok.id_to_piece(0) == "<unk>"
  assert tok.id_to_piece(1) == "<sys>"  # after <unk>, the roles step aside: order is kept


def test_source_specials_in_text_become_vqlm_specials_or_are_dropped(model, tokenizer_json):
  path, vocab, raw = model
  tok = TextTokenizer.load(path)
  ids = tok.encode("a red circle</s><sys>")
  assert ids == tok.encode("a red circle") + [vocab.eos_id, 1]  # <sys> is text id 1
  assert vocab.decode_text(tok, ids, keep_specials=True) == "a red circle<eos><sys>"
  size = raw.get_vocab_size()
  without = text_hf.hf_text_model(tokenizer_json, _id_map(size, vocab, specials=False))
  dropped = text_hf.HFTextTokenizer.load(_write(path + ".2", without))
  assert dropped.vocab_size == vocab.text_size and dropped.special_ids == {}
  assert dropped.encode("a red circle</s>") == tok.encode("a red circle")


def _write(path, content: bytes) -> str:
  with open(path, "wb") as f:
    f.write(content)
  return path


def test_vocab_decodes_interleaved_ids(model):
  path, vocab, _ = model
  tok = vocab.text_tokenizer(os.path.dirname(path))
  text = vocab.encode_text(tok, "a small blue square")
  ids = [vocab.bos_id, *text, vocab.boi_id, vocab.image_token(3), vocab.eoi_id]
  assert vocab.decode_text(tok, ids) == "a small blue square"
  assert vocab.decode_text(tok, ids, keep_specials=True) == (
    "<bos>a small blue square<boi><img:3><eoi>"
  )


def test_plain_tokenizer_json_keeps_every_id(tokenizer_json):
  tok = TextTokenizer.load(tokenizer_json)
  raw = tokenizers.Tokenizer.from_file(tokenizer_json)
  assert tok.vocab_size == raw.get_vocab_size()
  assert tok.encode("a red dog") == raw.encode("a red dog", add_special_tokens=False).ids


def test_descriptor_may_name_a_tokenizer_file_beside_it(tokenizer_json, tmp_path):
  raw = tokenizers.Tokenizer.from_file(tokenizer_json)
  size = raw.get_vocab_size()
  data = json.loads(text_hf.hf_text_model(tokenizer_json, np.arange(size)))
  del data["tokenizer"]
  data["tokenizer_file"] = "tokenizer.json"
  raw.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "ids.json").write_text(json.dumps(data))
  tok = TextTokenizer.load(str(tmp_path / "ids.json"))
  assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
  os.remove(tmp_path / "tokenizer.json")
  with pytest.raises(UserError, match="copy it back"):
    TextTokenizer.load(str(tmp_path / "ids.json"))


def test_sentencepiece_models_still_load_as_before(tmp_path):
  path = train_sentencepiece(SENTENCES, model_prefix=str(tmp_path / "sp"), vocab_size=40)
  tok = TextTokenizer.load(path)
  assert type(tok) is TextTokenizer and tok.decode(tok.encode("a red fox")) == "a red fox"


def test_errors_are_one_line_user_errors(model, tokenizer_json, tmp_path, monkeypatch):
  path, vocab, raw = model
  tok = TextTokenizer.load(path)
  with pytest.raises(UserError, match="outside"):
    tok.decode([vocab.text_size])
  size = raw.get_vocab_size()
  with pytest.raises(UserError, match="exactly one source id"):
    text_hf.hf_text_model(tokenizer_json, np.zeros(size, np.int64), text_size=size)
  with pytest.raises(UserError, match="not valid JSON"):
    text_hf.HFTextTokenizer.load(_write(str(tmp_path / "bad.json"), b"{nope"))
  with pytest.raises(UserError, match="not a tokenizer.json"):
    TextTokenizer.load(_write(str(tmp_path / "odd.json"), b'{"model": 3}'))
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(UserError, match=r"pip install 'vqlm\[interop\]'"):
    TextTokenizer.load(path)


def test_lm_run_reads_an_hf_text_model(model, tmp_path):
  """A run written with this text model loads its vocabulary and text tokenizer as LMRun does."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from vqlm.interop import run_files
  from vqlm.nn.transformer import Transformer
  from vqlm.runs import lm_run

  path, vocab, _ = model
  kwargs = dict(dim=16, num_layers=1, num_heads=2, mlp_dim=32)
  config = lm_run.transformer_config(run_files.lm_run_config(kwargs), vocab)
  shapes = jax.eval_shape(
    lambda: Transformer(config).init({"params": jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32))
  )
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["params"]))
  out = run_files.write_lm_run(
    str(tmp_path / "lm"),
    model_config=kwargs,
    vocab=vocab,
    text_files={"text.model": path},
    params=params,
    seq_len=16,
  )
  loaded_vocab, tok = lm_run.load_vocab(out)
  assert loaded_vocab == vocab and isinstance(tok, text_hf.HFTextTokenizer)
  assert tok.encode("a red circle") == TextTokenizer.load(path).encode("a red circle")
