import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn import attention
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.sample.processors import SamplingConfig, Settings
from vqlm.sample.sampler import (
  MAX_CACHE_SEGMENTS,
  Sampler,
  bucket,
  cache_schedule,
  continuation_logps,
  pad_uncond_prompts,
)
from vqlm.vocab import Vocab

VOCAB = Vocab(text_size=40, image_size=24, grid=(2, 3), num_reserved=2, pad_to=16)
HW = VOCAB.tokens_per_image
BOS, EOS, BOI, EOI, FRAME, PAD = (
  VOCAB.bos_id,
  VOCAB.eos_id,
  VOCAB.boi_id,
  VOCAB.eoi_id,
  VOCAB.frame_id,
  VOCAB.pad_id,
)
MODEL = dict(
  vocab_size=VOCAB.padded_size,
  dim=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  mlp_dim=128,
  image_offset=VOCAB.image_offset,
  image_size=VOCAB.image_size,
  grid=VOCAB.grid,
)
GREEDY = SamplingConfig.greedy()
CODES = [VOCAB.image_offset + c for c in (1, 7, 3, 20, 11, 0)]


def random_variables(model, seed=0):
  """Random params of the model's shapes drawn with NumPy (a compiled init costs seconds)."""
  rng = np.random.default_rng(seed)
  abstract = nn.meta.unbox(
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  )

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray(0.15 * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def plain():
  model = Transformer(TransformerConfig(**MODEL))
  return model, random_variables(model)


@pytest.fixture(scope="module")
def sampler(plain):
  return Sampler(plain[0], plain[1], VOCAB)


def _full_logits(model, variables, seqs):
  """Full forward passes (no cache) over right-padded sequences: `[N, L, V]`."""
  length = max(len(s) for s in seqs)
  tokens = np.full((len(seqs), length), PAD, np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)] = s
  logits, _ = jax.jit(model.apply)(variables, jnp.asarray(tokens))
  return np.asarray(logits)


def _is_code(ids):
  ids = np.asarray(ids)
  return (ids >= VOCAB.image_offset) & (ids < VOCAB.size)


@pytest.mark.parametrize("variant", ["plain", "rope2d_scan"])
def test_cached_decoding_matches_a_full_forward_pass(variant, plain):
  if variant == "plain":
    model, variables = plain
  else:
    model = Transformer(TransformerConfig(**MODEL, rope_2d=True, scan_layers=True))
    variables = random_variables(model, seed=1)
  sampler = Sampler(model, variables, VOCAB)
  # An open image run (row 0) guarantees image codes among the checked positions.
  prompts = [
    [BOS, 3, BOI, CODES[0]],
    [BOS, 5, BOI, *CODES, EOI, 9, 8, 7],
    [BOS] + list(range(1, 20)),
  ]
  sampling = SamplingConfig(text=Settings(temperature=1.0), image=Settings(temperature=1.0))
  out = sampler(
    prompts, max_new_tokens=24, mode="interleaved", sampling=sampling, seed=3, return_logits=True
  )
  assert out.tokens.shape == (3, 24) and out.logits.shape == (3, 24, VOCAB.padded_size)
  assert _is_code(out.tokens).any()
  seqs = [p + out.tokens[r, : out.lengths[r]].tolist() for r, p in enumerate(prompts)]
  full = _full_logits(model, variables, seqs)
  for r, p in enumerate(prompts):
    n = out.lengths[r]
    np.testing.assert_allclose(
      out.logits[r, :n], full[r, len(p) - 1 : len(p) - 1 + n], rtol=1e-5, atol=1e-5
    )


def test_bfloat16_sampling_casts_weights_once_and_keeps_float32_logits(plain):
  model, variables = plain
  sampler = Sampler(model, variables, VOCAB, dtype="bfloat16")
  kernels = [x for x in jax.tree.leaves(sampler.variables["params"])]
  assert kernels and all(x.dtype == jnp.bfloat16 for x in kernels)
  assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32  # the caller's are kept
  prompts = [[BOS, 3, 4, BOI], [BOS, 9, BOI]]
  out = sampler(prompts, max_new_tokens=HW + 1, mode="image", sampling=GREEDY, return_logits=True)
  assert out.logits.dtype == np.float32
  for row in out.tokens:  # the constraints still hold: one full grid, then <eoi>
    assert _is_code(row[:HW]).all() and row[HW] == EOI
  # The same continuation's float32 logits agree to bfloat16 precision.
  full = _full_logits(model, variables, [p + out.tokens[r].tolist() for r, p in enumerate(prompts)])
  for r, p in enumerate(prompts):
    want = full[r, len(p) - 1 : len(p) + HW]
    got = out.logits[r]
    codes = slice(VOCAB.image_offset, VOCAB.image_offset + VOCAB.image_size)
    np.testing.assert_allclose(got[:HW, codes], want[:HW, codes], atol=0.1 * np.abs(want).max())


def test_cfg_in_one_doubled_batch_equals_two_separate_passes(plain, sampler):
  model, variables = plain
  prompts = [[BOS, 3, 4, 5, BOI], [BOS, 9, BOI]]
  scale = 3.0
  out = sampler(
    prompts, max_new_tokens=HW + 1, mode="image", cfg_scale=scale, seed=0, return_logits=True
  )
  for row in out.tokens:  # exactly one grid, then <eoi>
    assert _is_code(row[:HW]).all() and row[HW] == EOI
  n = HW + 1
  full = _full_logits(
    model,
    variables,
    [p + out.tokens[r].tolist() for r, p in enumerate(prompts)]
    + [[BOS, BOI] + out.tokens[r].tolist() for r in range(2)],
  )
  cond, uncond = full[:2], full[2:]
  for r, p in enumerate(prompts):
    c = cond[r, len(p) - 1 : len(p) - 1 + n]
    u = uncond[r, 1 : 1 + n]
    want = np.concatenate([u[:HW] + scale * (c[:HW] - u[:HW]), c[HW:]])  # guidance on codes only
    np.testing.assert_allclose(out.logits[r], want, rtol=1e-5, atol=1e-4)
  # The guided draw differs from the unguided one, and a new scale does not recompile.
  sampler(prompts, max_new_tokens=HW + 1, mode="image", cfg_scale=0.5, seed=0, return_logits=True)
  fn = sampler._jitted[("image", HW + 1, True, True, 1)]
  assert fn._cache_size() == 1


def test_cfg_with_pad_masked_unconditional_prompts_as_janus_builds_them(plain, sampler):
  """Janus's unconditional branch: the prompt, same length, every id but <bos>/<boi> -> <pad>
  (attended); guidance mixes `uncond + scale * (cond - uncond)` on codes."""
  model, variables = plain
  prompts = [[BOS, 3, 4, 5, BOI], [BOS, 9, BOI]]
  uncond = pad_uncond_prompts(prompts, VOCAB)
  assert uncond == [[BOS, PAD, PAD, PAD, BOI], [BOS, PAD, BOI]]
  scale = 3.0
  out = sampler(
    prompts,
    max_new_tokens=HW + 1,
    mode="image",
    cfg_scale=scale,
    uncond_prompts=uncond,
    return_logits=True,
  )
  full = _full_logits(
    model, variables, [p + out.tokens[r % 2].tolist() for r, p in enumerate(prompts + uncond)]
  )
  codes = slice(VOCAB.image_offset, VOCAB.image_offset + VOCAB.image_size)
  for r, p in enumerate(prompts):
    c = full[r, len(p) - 1 : len(p) - 1 + HW, codes]
    u = full[2 + r, len(p) - 1 : len(p) - 1 + HW, codes]
    np.testing.assert_allclose(out.logits[r, :HW, codes], u + scale * (c - u), atol=1e-4)
  with pytest.raises(ValueError, match="<pad>"):  # conditional prompts still refuse <pad>
    sampler([[BOS, PAD, BOI]], max_new_tokens=HW + 1, mode="image")


def test_prompts_of_different_lengths_in_one_batch_match_each_alone(sampler):
  # Lengths 2, 11 and 15 (one prompt bucket, so "alone" reuses the batch's compiled loop).
  prompts = [[BOS, 2], [BOS, 4, 5, BOI, *CODES, EOI, 6], [BOS] + [7, 8, 9] * 4 + [3, 3]]
  assert bucket(len(prompts[0]), 16) == bucket(len(prompts[2]), 16)
  batch = sampler(prompts, max_new_tokens=20, mode="interleaved", sampling=GREEDY)
  for r, p in enumerate(prompts):
    alone = sampler([p], max_new_tokens=20, mode="interleaved", sampling=GREEDY, batch_size=3)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[r])
    assert alone.lengths[0] == batch.lengths[r]


@pytest.mark.parametrize("cfg", [None, 2.0])
def test_image_mode_draws_from_the_code_logits_alone(sampler, cfg):
  # Without return_logits the loop computes only the codes' logits (a slice of the output
  # table); with it, the full logits. Both must draw the same tokens from the same seeds.
  prompts = [[BOS, 2, BOI], [BOS, 4, 5, 6, BOI]]
  sampling = SamplingConfig(image=Settings(temperature=1.0, top_k=5))
  kw = dict(max_new_tokens=HW + 1, mode="image", sampling=sampling, seed=3, cfg_scale=cfg)
  fast = sampler(prompts, **kw)
  full = sampler(prompts, return_logits=True, **kw)
  np.testing.assert_array_equal(fast.tokens, full.tokens)
  assert _is_code(fast.tokens[:, :HW]).all() and (fast.tokens[:, HW] == EOI).all()
  # Each drawn code is among the 5 most likely codes of the step (top-k over the codes only).
  code_logits = full.logits[:, :HW, VOCAB.image_offset : VOCAB.size]
  top5 = np.argsort(-code_logits, axis=-1)[..., :5] + VOCAB.image_offset
  assert all(fast.tokens[r, t] in top5[r, t] for r in range(2) for t in range(HW))


def test_same_seed_same_output_and_rows_do_not_depend_on_neighbours(sampler):
  prompts = [[BOS, 2], [BOS, 4, 5], [BOS, 6]]
  kw = dict(max_new_tokens=20, mode="interleaved")
  a = sampler(prompts, seed=7, **kw)
  b = sampler(prompts, seed=7, **kw)
  c = sampler(prompts, seed=8, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # Row 1 alone, with its row seed, draws exactly what it drew inside the batch.
  alone = sampler([prompts[1]], seed=7, row_seeds=[1], batch_size=3, **kw)
  np.testing.assert_array_equal(alone.tokens[0], a.tokens[1])


def test_text_mode_never_emits_image_ids(sampler):
  prompts = [[BOS, BOI, *CODES, EOI], [BOS, BOI, *CODES[::-1], EOI]]
  out = sampler(prompts, max_new_tokens=30, mode="text", seed=1)
  generated = out.tokens[out.tokens != PAD]
  assert not _is_code(generated).any()
  assert not np.isin(generated, [BOI, EOI, FRAME, BOS]).any()
  assert (generated < VOCAB.size).all()


def test_video_mode_frame_structure(sampler):
  prompt = [BOS, 3, BOI, *CODES, EOI]
  need = 2 * (HW + 3) + 1  # (<frame> <boi> codes <eoi>) x 2, <eos>
  with pytest.raises(ValueError, match=f"at least {need}"):
    sampler([prompt], max_new_tokens=need - 1, mode="video", num_images=2)
  out = sampler([prompt], max_new_tokens=need, mode="video", num_images=2, seed=2)
  row = out.tokens[0].tolist()
  frame = [FRAME, BOI] + ["code"] * HW + [EOI]
  got = ["code" if _is_code(i) else i for i in row]
  assert got == frame + frame + [EOS] and out.lengths[0] == need


@pytest.mark.parametrize(
  "prompt_len, steps, block",
  [(16, 257, 64), (16, 65, 64), (4, 24, 64), (16, 1025, 64), (32, 300, 100), (16, 257, 0)],
)
def test_cache_schedule_gives_every_step_the_slots_it_needs(prompt_len, steps, block):
  schedule = cache_schedule(prompt_len, steps, block)
  ends, lengths = zip(*schedule)
  assert ends[-1] == steps and list(ends) == sorted(set(ends))
  assert list(lengths) == sorted(set(lengths)) and len(schedule) <= MAX_CACHE_SEGMENTS
  assert all(n % attention.KEY_PANEL == 0 for n in lengths)
  # Step t writes slot n_r - 1 + t <= prompt_len - 1 + t: a segment's last step, end - 1, needs
  # prompt_len + end - 1 slots.
  assert all(n >= prompt_len + end - 1 for end, n in schedule)
  assert (len(schedule) == 1) == (block == 0 or steps < 64)


@pytest.mark.parametrize("return_logits", [False, True])
def test_a_growing_cache_samples_what_one_full_length_cache_samples(plain, return_logits):
  model, variables = plain
  prompts = [[BOS, 3, BOI, *CODES, EOI], [BOS, 5, 6, 7]]
  frames = 16  # (<frame> <boi> 6 codes <eoi>) x 16 <eos>: 145 steps, three cache sizes.
  kw = dict(
    max_new_tokens=frames * (HW + 3) + 1,
    mode="video",
    num_images=frames,
    seed=5,
    return_logits=return_logits,
  )
  assert len(cache_schedule(16, kw["max_new_tokens"], 64)) == 3
  grown = Sampler(model, variables, VOCAB)(prompts, **kw)
  full = Sampler(model, variables, VOCAB, cache_block=0)(prompts, **kw)
  assert (grown.lengths > 128).all()  # Every row decodes into the third segment.
  np.testing.assert_array_equal(grown.tokens, full.tokens)
  if return_logits:
    np.testing.assert_allclose(grown.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise(plain, sampler):
  model, variables = plain
  with pytest.raises(ValueError, match="padded_size"):
    bigger = TransformerConfig(**{**MODEL, "vocab_size": VOCAB.padded_size + 16})
    Sampler(Transformer(bigger), variables, VOCAB)
  with pytest.raises(ValueError, match="batch_size"):
    sampler([[BOS, 1]] * 3, max_new_tokens=4, batch_size=2)
  with pytest.raises(ValueError, match="at least"):
    sampler([[BOS, 1, BOI]], max_new_tokens=HW, mode="image")
  with pytest.raises(ValueError, match="top_p"):
    sampler([[BOS, 1]], max_new_tokens=4, sampling=SamplingConfig(text=Settings(top_p=0.0)))
  with pytest.raises(ValueError, match="cache_block"):
    Sampler(model, variables, VOCAB, cache_block=-1)


def test_continuation_logps_sum_the_log_probabilities_of_a_full_forward_pass(plain, sampler):
  model, variables = plain
  prompts = [[BOS, 3], [BOS, 5, 6, 7, BOI, *CODES, EOI], [BOS]]
  continuations = [[4, 9, 2], [11], [BOI, *CODES[:2]]]
  got = continuation_logps(sampler, prompts, continuations, batch_size=2)
  seqs = [p + c for p, c in zip(prompts, continuations)]
  logits = _full_logits(model, variables, seqs).astype(np.float64)
  logps = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = [
    sum(logps[i, k - 1, seq[k]] for k in range(len(p), len(seq)))
    for i, (p, seq) in enumerate(zip(prompts, seqs))
  ]
  assert got.dtype == np.float32 and got.shape == (3,)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # One row alone scores as it does in a batch with others.
  alone = continuation_logps(sampler, prompts[1:2], continuations[1:2], batch_size=2)
  np.testing.assert_allclose(alone, got[1:2], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="2 prompts for 3 continuations"):
    continuation_logps(sampler, prompts[:2], continuations)
  with pytest.raises(ValueError, match="at least one id"):
    continuation_logps(sampler, [[BOS]], [[]])


_MESH_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np, flax.linen as nn
    from vqlm.runtime.config import DEFAULT_RULES
    from vqlm.runtime import mesh as mesh_lib
    from vqlm.nn.transformer import Transformer, TransformerConfig
    from vqlm.sample.sampler import Sampler
    import test_sampler as t

    model = Transformer(TransformerConfig(**t.MODEL))
    variables = t.random_variables(model)
    mesh = mesh_lib.make_mesh({{"data": 2, "tensor": 2}})
    rules = mesh_lib.rules_from_config(DEFAULT_RULES)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 4), "int32"))
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    sharded = jax.device_put(variables, shardings)
    assert sharded["params"]["embed"]["embedding"].sharding.spec[0] == "tensor"
    prompts = [[t.BOS, 2 + i] + [5] * i for i in range(4)]
    # Sampled text, then an image run with guidance (a doubled batch), in one call.
    kw = dict(max_new_tokens=16, mode="interleaved", seed=4, cfg_scale=2.0,
              uncond_prompts=[[t.BOS, t.BOI]] * 4)
    prompts = [p + [t.BOI] if i % 2 else p for i, p in enumerate(prompts)]
    ref = Sampler(model, variables, t.VOCAB)(prompts, **kw)
    got = Sampler(model, sharded, t.VOCAB, mesh=mesh, rules=rules)(prompts, **kw)
    assert t._is_code(ref.tokens).any()
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    # Scoring continuations (teacher-forced) on the sharded weights.
    from vqlm.sample.sampler import continuation_logps
    ends = [[3, 4], [5], [6, 7, 8], [9]]
    ref_logps = continuation_logps(Sampler(model, variables, t.VOCAB), prompts, ends, batch_size=4)
    got_logps = continuation_logps(
        Sampler(model, sharded, t.VOCAB, mesh=mesh, rules=rules), prompts, ends, batch_size=4)
    np.testing.assert_allclose(got_logps, ref_logps, rtol=1e-4, atol=1e-4)

    # A mesh that splits only the batch: one decode loop per device when the rows divide
    # (guidance's doubled rows stay with their device), one partitioned loop when they do not.
    data_only = Sampler(model, variables, t.VOCAB, mesh=mesh_lib.make_mesh({{"data": 4}}))
    prompts8 = prompts + [p[:-1] + [7, t.BOI] for p in prompts]
    kw8 = dict(kw, uncond_prompts=[[t.BOS, t.BOI]] * 8, return_logits=True)
    assert data_only.loop_shards(8) == 4 and data_only.loop_shards(6) == 1
    ref = Sampler(model, variables, t.VOCAB)(prompts8, **kw8)
    got = data_only(prompts8, **kw8)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    np.testing.assert_allclose(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    kw6 = dict(kw, uncond_prompts=[[t.BOS, t.BOI]] * 6)
    ref = Sampler(model, variables, t.VOCAB)(prompts8[:6], **kw6)
    np.testing.assert_array_equal(data_only(prompts8[:6], **kw6).tokens, ref.tokens)
    print("MESH-OK")
""")


def test_sampling_on_a_mesh_matches_one_device():
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
    [sys.executable, "-c", _MESH_SCRIPT.format(tests=tests)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert "MESH-OK" in proc.stdout, proc.stderr[-3000:]
