import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.sample import constraints as cons
from vqlm.vocab import Vocab

VOCAB = Vocab(text_size=20, image_size=12, grid=(2, 3), num_reserved=2, pad_to=16)
HW = VOCAB.tokens_per_image
BOS, EOS, BOI, EOI, FRAME, PAD = (
  VOCAB.bos_id,
  VOCAB.eos_id,
  VOCAB.boi_id,
  VOCAB.eoi_id,
  VOCAB.frame_id,
  VOCAB.pad_id,
)
CODES = [VOCAB.image_offset + c for c in (0, 5, 11, 3, 7, 2)]  # one full grid of ids


@functools.partial(jax.jit, static_argnames=("spec", "max_new"))
def _random_rollouts(spec, state, seeds, *, max_new):
  """Rolls the machine forward with random logits (a random per-id bias makes specials and image
  codes likely in some seeds): `[num_seeds, B, max_new]` tokens."""
  b, v = state.last.shape[0], spec.padded_size

  def one(seed):
    key = jax.random.key(seed)
    bias = 3.0 * jax.random.normal(jax.random.fold_in(key, 10_000), (v,))

    def body(t, carry):
      st, toks = carry
      k = jax.random.fold_in(key, t)
      logits = jax.random.normal(k, (b, v)) * 2.0 + bias
      forced, klass = cons.forced_and_class(spec, st, max_new - t)
      allowed = cons.allowed_ids(spec, forced, klass)
      tok = jax.random.categorical(jax.random.fold_in(k, 1), jnp.where(allowed, logits, -jnp.inf))
      tok = jnp.where(forced >= 0, forced, tok).astype(jnp.int32)
      return cons.update(spec, st, tok), toks.at[:, t].set(tok)

    toks = jnp.full((b, max_new), -1, jnp.int32)
    return jax.lax.fori_loop(0, max_new, body, (state, toks))[1]

  return jax.vmap(one)(seeds)


def _is_code(i):
  return VOCAB.image_offset <= i < VOCAB.size


def _check(mode, prompt, gen, *, num_images, max_new):
  """Independent grammar check of one generated row; returns the number of finished runs."""
  gen = [int(i) for i in gen]
  # Find the stop: after it only pad.
  stop = next((t for t, i in enumerate(gen) if i == PAD), None)
  if stop is not None:
    assert all(i == PAD for i in gen[stop:]), gen
    assert stop > 0 and (gen[stop - 1] == EOS or (mode == "image" and gen[stop - 1] == EOI)), gen
  body = gen[:stop]
  # Replay the prompt to know whether a run is open.
  in_run, open_run = 0, False
  for i in prompt:
    if i == BOI:
      open_run, in_run = True, 0
    elif open_run and _is_code(i):
      in_run += 1
    else:
      open_run = False
  started = int(open_run) if prompt[-1] != FRAME else 0
  left = num_images - started
  prev = prompt[-1]
  finished = 0
  for t, i in enumerate(body):
    steps_left = max_new - t
    assert 0 <= i < VOCAB.size and i not in (PAD, BOS), (t, i, body)
    assert not VOCAB.is_special(i) or i in (EOS, BOI, EOI, FRAME), (t, i)
    if open_run and in_run < HW:
      assert _is_code(i), (t, i, body)
      in_run += 1
    elif open_run:
      assert i == EOI, (t, i, body)
      open_run = False
      finished += 1
    else:
      assert not _is_code(i) and i != EOI, (t, i, body)
      if prev == FRAME:
        assert i == BOI, (t, i, body)
      elif mode == "text":
        assert i not in (BOI, FRAME), (t, i, body)
      elif mode == "interleaved":
        assert i != FRAME, (t, i, body)
        if i == BOI:
          assert steps_left >= HW + 2, (t, body)
      elif mode == "image":
        assert i == (BOI if left > 0 else EOS), (t, i, body)
      elif mode == "video":
        if left > 0:
          assert i == (FRAME if prev == EOI else BOI), (t, i, body)
        else:
          assert i == EOS, (t, i, body)
      if i == BOI:
        open_run, in_run, left = True, 0, left - 1
    prev = i
  if mode in ("image", "video"):
    assert left == 0 and not open_run and body[-1] == (EOI if mode == "image" else EOS), body
  if mode in ("text", "interleaved"):
    assert not open_run, body  # every run is complete within max_new
  return finished


PROMPTS = {
  "text": [[BOS, BOI, *CODES, EOI], [BOS, 3, 4], [BOS, BOI, *CODES[:2]], [BOS, 5, FRAME]],
  "interleaved": [[BOS, 1, 2], [BOS, BOI, *CODES[:4]], [BOS, BOI, *CODES], [BOS, 7, BOI]],
  "image": [[BOS, 3, 4, BOI], [BOS, BOI], [BOS, 9], [BOS, 2, BOI, *CODES[:3]]],
  "video": [
    [BOS, 2, BOI, *CODES, EOI],
    [BOS, 4, BOI],
    [BOS, BOI, *CODES, EOI, FRAME],
    [BOS, 6, BOI, *CODES, EOI, FRAME, BOI, *CODES[:5]],
  ],
}


@pytest.mark.parametrize("mode", cons.MODES)
def test_random_logits_never_break_the_grammar(mode):
  spec = cons.Spec.from_vocab(VOCAB, mode)
  prompts = PROMPTS[mode]
  num_images = {"image": 1, "video": 3}.get(mode, 1)
  if mode == "image":
    num_images = [1, 1, 2, 1]
  state = cons.initial_state(spec, prompts, num_images=num_images)
  max_new = 40 if mode in ("text", "interleaved") else cons.min_new_tokens(spec, state)
  seeds = jnp.arange(64)
  out = np.asarray(_random_rollouts(spec, state, seeds, max_new=max_new))
  counts = np.broadcast_to(num_images, (len(prompts),))
  finished = 0
  for s in range(len(seeds)):
    for r, prompt in enumerate(prompts):
      finished += _check(mode, prompt, out[s, r], num_images=int(counts[r]), max_new=max_new)
  assert finished > 0  # image runs actually happened
  if mode == "text":
    assert not np.any(out == FRAME)
    free = out[:, 1, :]  # a text-only prompt: never any image id
    assert not np.any((free >= VOCAB.image_offset) & (free < VOCAB.size))
    assert np.any(out == EOS)  # rows stop at <eos> ...
    assert np.any(out == PAD)  # ... and then emit pad


def test_image_mode_emits_exactly_one_grid_then_stops():
  spec = cons.Spec.from_vocab(VOCAB, "image")
  state = cons.initial_state(spec, [[BOS, 3, BOI]] * 2)
  assert cons.min_new_tokens(spec, state) == HW + 1
  out = np.asarray(_random_rollouts(spec, state, jnp.arange(8), max_new=HW + 3))
  for row in out.reshape(-1, HW + 3):
    assert all(_is_code(i) for i in row[:HW]) and row[HW] == EOI
    assert row[HW + 1 :].tolist() == [PAD, PAD]


def test_video_mode_frame_structure():
  spec = cons.Spec.from_vocab(VOCAB, "video")
  state = cons.initial_state(spec, [[BOS, 2, BOI, *CODES, EOI]], num_images=2)
  n = cons.min_new_tokens(spec, state)
  assert n == 2 * (1 + 1 + HW + 1) + 1
  row = np.asarray(_random_rollouts(spec, state, jnp.arange(1), max_new=n))[0, 0].tolist()
  assert row[:2] == [FRAME, BOI] and row[2 + HW] == EOI
  assert row[3 + HW : 5 + HW] == [FRAME, BOI] and row[5 + 2 * HW] == EOI and row[-1] == EOS


def test_interleaved_never_opens_a_run_that_cannot_finish():
  spec = cons.Spec.from_vocab(VOCAB, "interleaved")
  state = cons.initial_state(spec, [[BOS, 1]])
  # With fewer than h*w + 2 steps left, <boi> is not allowed; with enough it is.
  forced, klass = cons.forced_and_class(spec, state, jnp.array(HW + 1))
  assert not bool(cons.allowed_ids(spec, forced, klass)[0, BOI])
  forced, klass = cons.forced_and_class(spec, state, jnp.array(HW + 2))
  allowed = np.asarray(cons.allowed_ids(spec, forced, klass)[0])
  assert allowed[BOI] and allowed[EOS] and allowed[: VOCAB.text_size].all()
  assert not allowed[VOCAB.size :].any() and not allowed[[PAD, BOS, EOI, FRAME]].any()
  assert not allowed[VOCAB.image_offset : VOCAB.size].any()


def test_initial_state_reads_open_runs_off_the_prompt():
  spec = cons.Spec.from_vocab(VOCAB, "video")
  state = cons.initial_state(
    spec,
    [
      [BOS, BOI],
      [BOS, BOI, *CODES[:4]],
      [BOS, BOI, *CODES],
      [BOS, BOI, *CODES, EOI],
      [BOS, BOI, *CODES, EOI, FRAME],
    ],
    num_images=3,
    active=[True, True, True, True, False],
  )
  np.testing.assert_array_equal(state.codes_left, [HW, HW - 4, 0, 0, 0])
  np.testing.assert_array_equal(state.images_left, [2, 2, 2, 3, 3])
  np.testing.assert_array_equal(state.done, [False, False, False, False, True])
  forced, _ = cons.forced_and_class(spec, state, jnp.array(100))
  np.testing.assert_array_equal(forced, [-1, -1, EOI, FRAME, PAD])


@pytest.mark.parametrize(
  "prompt, match",
  [
    ([], "empty"),
    ([BOS, PAD], "pad"),
    ([BOS, VOCAB.size], "outside"),
    ([BOS, CODES[0]], "outside <boi>"),
    ([BOS, BOI, *CODES, CODES[0]], "longer"),
    ([BOS, BOI, CODES[0], EOI], "closes"),
    ([BOS, BOI, CODES[0], 3], "interrupts"),
  ],
)
def test_bad_prompts_raise(prompt, match):
  with pytest.raises(ValueError, match=match):
    cons.initial_state(cons.Spec.from_vocab(VOCAB, "interleaved"), [prompt])


def test_image_counts_that_cannot_be_met_raise():
  spec = cons.Spec.from_vocab(VOCAB, "image")
  with pytest.raises(ValueError, match="already holds"):
    cons.initial_state(spec, [[BOS, BOI, *CODES]], num_images=0)
  with pytest.raises(ValueError, match="nothing to generate"):
    cons.initial_state(spec, [[BOS, 3]], num_images=0)
  with pytest.raises(ValueError, match="mode"):
    cons.Spec.from_vocab(VOCAB, "audio")
