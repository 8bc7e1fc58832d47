import numpy as np
import pytest
from test_sample_api import GRID, SIZE, FakeRun
from test_sampler import random_variables

from vqlm.data import chat
from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.sample import api
from vqlm.sample import chat as sample_chat
from vqlm.sample.processors import SamplingConfig, Settings
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import CHAT_SPECIALS, Vocab

K = 16


def make_run(tmp_path_factory, *, chat_vocab: bool = True) -> FakeRun:
  texts = chat.texts(chat.conversations(60, max_objects=3)) + ["draw a red circle"]
  path = train_sentencepiece(
    texts, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=120
  )
  tokenizer = TextTokenizer.load(path)
  vocab = Vocab(text_size=tokenizer.vocab_size, image_size=K, grid=GRID, num_reserved=2, pad_to=16)
  if chat_vocab:
    vocab = vocab.with_specials(CHAT_SPECIALS)
  model = Transformer(
    TransformerConfig(
      vocab_size=vocab.padded_size,
      dim=32,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      mlp_dim=64,
      image_offset=vocab.image_offset,
      image_size=K,
      grid=GRID,
    )
  )
  params = random_variables(model)["params"]
  return FakeRun(model=model, params=params, vocab=vocab, text_tokenizer=tokenizer)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
  return api.Generator(make_run(tmp_path_factory), batch_size=4, progress=False)


def test_chat_prompt_ids_is_chat_prompt_with_images_encoded(gen):
  v = gen.vocab
  codes = np.array([[1, 2], [3, 4]], np.int32)
  turns = [
    {"role": "user", "parts": ["what shape is in the middle", codes]},
    {"role": "assistant", "parts": ["circle"]},
    {"role": "user", "parts": ["describe the image"]},
  ]
  ids = sample_chat.chat_prompt_ids(gen, turns)
  np.testing.assert_array_equal(ids, chat.prompt(turns, v, gen.text_tokenizer))
  assert ids[:2] == [v.bos_id, v.special("user")] and ids[-1] == v.special("assistant")
  assert ids.count(v.special("user")) == 2 and v.eos_id not in ids
  image = gen.image_tokenizer.decode(codes[None])[0]  # decodes to what encodes back to `codes`
  with_image = [{"role": "user", "parts": ["what shape is in the middle", image]}]
  np.testing.assert_array_equal(
    sample_chat.chat_prompt_ids(gen, with_image), chat.prompt(turns[:1], v, gen.text_tokenizer)
  )
  placeholder = [{"role": "user", "parts": [chat.SceneImage.of([])]}]
  with pytest.raises(UserError, match="with_codes"):
    sample_chat.chat_prompt_ids(gen, placeholder)


def test_no_chat_vocab_is_one_line_error(tmp_path_factory):
  plain = api.Generator(make_run(tmp_path_factory, chat_vocab=False), progress=False)
  for call in (
    lambda: sample_chat.require_chat_vocab(plain.vocab),
    lambda: sample_chat.draw(plain, ["draw a red circle"]),
    lambda: sample_chat.reply(plain, ["what do you see"]),
  ):
    with pytest.raises(UserError) as err:
      call()
    assert str(err.value) == sample_chat.NO_CHAT and "\n" not in str(err.value)
    assert "--config.data.chat.weight" in str(err.value)


def test_draw_shapes_and_seeding(gen):
  turns = [{"role": "user", "parts": ["draw a small red square at the top"]}]
  requests = ["draw a red circle", turns]
  images, codes = sample_chat.draw(gen, requests, num_per_prompt=2, seed=1, return_codes=True)
  assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert codes.shape == (4, *GRID) and codes.dtype == np.int32
  np.testing.assert_array_equal(images, gen.image_tokenizer.decode(codes))
  # Prompt-major, seeded per row: a slice of the rows drawn with first_row gives the same images.
  tail = sample_chat.draw(gen, requests[1:], num_per_prompt=2, seed=1, first_row=2)
  np.testing.assert_array_equal(tail, images[2:])
  # The prompt is the chat prompt + <boi>.
  row = sample_chat.chat_prompt_ids(gen, turns) + [gen.vocab.boi_id]
  direct = gen.draw_ids([row, row], seed=1, first_row=2)
  np.testing.assert_array_equal(direct, images[2:])
  many = sample_chat.draw(gen, requests * 3, seed=0, return_codes=True)[1]
  assert len({c.tobytes() for c in many}) > 1  # rows differ by seed
  with pytest.raises(UserError, match="list"):
    sample_chat.draw(gen, "draw a red circle")
  with pytest.raises(UserError, match="num_per_prompt"):
    sample_chat.draw(gen, requests, num_per_prompt=0)


def test_reply_text_greedy_and_sampled(gen):
  codes = np.array([[5, 6], [7, 8]], np.int32)
  conversations = [
    "describe the image",
    [{"role": "user", "parts": [codes, "what color is the shape at the top"]}],
  ]
  replies = sample_chat.reply(gen, conversations, max_len=6)
  assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
  # Greedy: the sampler's text-mode argmax continuation of the chat prompt, decoded.
  user = [{"role": "user", "parts": [conversations[0]]}]
  rows = [sample_chat.chat_prompt_ids(gen, t) for t in (user, conversations[1])]
  out = gen.sampler(
    rows,
    max_new_tokens=6,
    mode="text",
    sampling=SamplingConfig(text=Settings(temperature=0.0)),
    batch_size=4,
  )
  ids = out.tokens[0, : out.lengths[0]]
  assert all(gen.vocab.is_text(int(i)) or int(i) == gen.vocab.eos_id for i in ids)
  assert replies[0] == gen.vocab.decode_text(gen.text_tokenizer, ids).strip()
  assert sample_chat.reply(gen, conversations[::-1], max_len=6) == replies[::-1]
  hot = SamplingConfig(text=Settings(temperature=2.0))
  a = sample_chat.reply(gen, conversations * 4, greedy=False, sampling=hot, seed=3, max_len=6)
  b = sample_chat.reply(gen, conversations * 4, greedy=False, sampling=hot, seed=3, max_len=6)
  c = sample_chat.reply(gen, conversations * 4, greedy=False, sampling=hot, seed=4, max_len=6)
  assert a == b and a != c
  ended = [{"role": "user", "parts": ["hi"]}, {"role": "assistant", "parts": ["circle"]}]
  with pytest.raises(UserError, match="end with a user turn"):
    sample_chat.reply(gen, [ended])


@pytest.mark.slow
def test_draw_with_guidance(gen):
  requests = ["draw a red circle", "draw a small red square at the top"]
  guided = sample_chat.draw(gen, requests, num_per_prompt=2, seed=1, cfg_scale=3.0)
  assert guided.shape == (4, SIZE, SIZE, 3)
  np.testing.assert_array_equal(
    guided, sample_chat.draw(gen, requests, num_per_prompt=2, seed=1, cfg_scale=3.0)
  )
  plain = sample_chat.draw(gen, requests, num_per_prompt=2, seed=1)
  assert not np.array_equal(guided, plain)
  # Guidance runs against the generator's unconditional prompt, <bos> <boi>.
  turns = [{"role": "user", "parts": [requests[0]]}]
  row = sample_chat.chat_prompt_ids(gen, turns) + [gen.vocab.boi_id]

  def guided_by(uncond):
    out = gen.sampler(
      [row],
      max_new_tokens=GRID[0] * GRID[1] + 1,
      mode="image",
      seed=1,
      cfg_scale=3.0,
      uncond_prompts=[uncond],
      batch_size=4,
    )
    codes = out.tokens[0, : GRID[0] * GRID[1]] - gen.vocab.image_offset
    return gen.image_tokenizer.decode(codes.reshape(1, *GRID))[0]

  np.testing.assert_array_equal(guided_by([gen.vocab.bos_id, gen.vocab.boi_id]), guided[0])
  # With chat_uncond, against an empty request: <bos> <user> <assistant> <boi>.
  empty = sample_chat.chat_uncond_ids(gen.vocab)
  assert empty == sample_chat.chat_prompt_ids(gen, [{"role": "user", "parts": []}]) + [
    gen.vocab.boi_id
  ]
  chat_guided = sample_chat.draw(
    gen, requests[:1], num_per_prompt=1, seed=1, cfg_scale=3.0, chat_uncond=True
  )
  np.testing.assert_array_equal(guided_by(empty), chat_guided[0])
  assert not np.array_equal(chat_guided[0], guided[0])


def test_restate_is_the_text_before_the_models_image_and_draw_continues_it(gen):
  v = gen.vocab
  requests = ["draw a red circle", "draw a small red square at the top"]
  captions = sample_chat.restate(gen, requests)
  n_max = sample_chat.RESTATE_MAX_LEN
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  # The greedy interleaved continuation, read up to its first non-text id.
  rows = [sample_chat.chat_prompt_ids(gen, r) for r in requests]
  out = gen.sampler(
    rows,
    max_new_tokens=n_max + v.tokens_per_image + 2,
    mode="interleaved",
    sampling=SamplingConfig(text=Settings(temperature=0.0), image=Settings(temperature=0.0)),
    batch_size=4,
  )
  for caption, row, n in zip(captions, out.tokens, out.lengths):
    text = []
    for t in row[:n]:
      if not v.is_text(int(t)):
        break
      text.append(int(t))
    assert caption == v.decode_text(gen.text_tokenizer, text[:n_max]).strip()
  # draw(captions=...) draws from chat prompt + caption ids + <boi>; restate=True asks for them.
  given = ["a large red circle in the center", "a small red square at the top"]
  images = sample_chat.draw(gen, requests, seed=2, captions=given)
  direct = gen.draw_ids([r + gen.text_ids(c) + [v.boi_id] for r, c in zip(rows, given)], seed=2)
  np.testing.assert_array_equal(images, direct)
  restated = sample_chat.draw(gen, requests, seed=2, restate=True)
  rows_r = [r + gen.text_ids(c) + [v.boi_id] for r, c in zip(rows, captions)]
  np.testing.assert_array_equal(restated, gen.draw_ids(rows_r, seed=2))
  with pytest.raises(UserError, match="one per request"):
    sample_chat.draw(gen, requests, captions=["only one"])
