import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.token_embed import TokenEmbed
from vqlm.nn.transformer import (
  Transformer,
  TransformerConfig,
  count_params,
  param_counts,
)
from vqlm.stages import lm_config

V, OFF, K, GRID = 96, 60, 30, (2, 3)
BASE = dict(vocab_size=V, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)


def _model(**kwargs) -> Transformer:
  return Transformer(TransformerConfig(**kwargs))


def _tokens(key, b, s):
  return jax.random.randint(jax.random.key(key), (b, s), 0, V)


def _init(model, tokens, seed=0):
  """Random variables of the model's shapes, drawn with NumPy (compiling the model's RNG-based
  init costs seconds per model on CPU; `test_train_lm.py` covers the real init)."""
  rng = np.random.default_rng(seed)
  abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
    return jnp.asarray(0.15 * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _apply(model):
  return jax.jit(model.apply, static_argnames="decode")


def _num_params(params):
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))


def test_forward_shapes_and_dtypes():
  model = _model(**BASE)
  tokens = _tokens(0, 2, 7)
  variables = _init(model, tokens)
  logits, cache = _apply(model)(variables, tokens)
  assert logits.shape == (2, 7, V) and logits.dtype == jnp.float32 and cache is None
  bf16 = _model(**BASE, dtype="bfloat16")
  logits16, _ = _apply(bf16)(variables, tokens)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits, atol=0.15)


def test_params_carry_logical_axis_names():
  for scan in (False, True):
    model = _model(**BASE, scan_layers=scan, tie_embeddings=False, qk_norm=True)
    abstract = jax.eval_shape(model.init, jax.random.key(0), _tokens(0, 1, 4))["params"]
    specs = nn.get_partition_spec(abstract)
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["head"]["kernel"]) == ("embed", "vocab")
    block = specs["layers"] if scan else specs["layer_0"]
    lead = ("layers",) if scan else ()
    assert tuple(block["attn"]["query"]["kernel"]) == lead + ("embed", "heads", "head_dim")
    assert tuple(block["attn"]["key"]["kernel"]) == lead + ("embed", "kv_heads", "head_dim")
    assert tuple(block["attn"]["out"]["kernel"]) == lead + ("heads", "head_dim", "embed")
    assert tuple(block["mlp"]["wo"]["kernel"]) == lead + ("mlp", "embed")
    assert tuple(block["attn_norm"]["scale"]) == lead + ("norm",)


def test_causal_future_tokens_do_not_change_past_logits():
  model = _model(**BASE)
  tokens = _tokens(1, 2, 8)
  variables = _init(model, tokens)
  logits, _ = _apply(model)(variables, tokens)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)
  logits2, _ = _apply(model)(variables, changed)
  np.testing.assert_allclose(logits2[:, :5], logits[:, :5], atol=1e-6)
  assert float(jnp.abs(logits2[:, 5:] - logits[:, 5:]).max()) > 1e-4


def test_packed_segments_do_not_see_each_other():
  model = _model(**BASE)
  tokens = _tokens(2, 1, 10)
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0]])
  variables = _init(model, tokens)
  logits, _ = _apply(model)(variables, tokens, positions=pos, segment_ids=seg)
  other = tokens.at[:, :4].set((tokens[:, :4] + 7) % V)
  logits2, _ = _apply(model)(variables, other, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(logits2[:, 4:9], logits[:, 4:9], atol=1e-5)
  alone, _ = _apply(model)(variables, tokens[:, 4:9])
  np.testing.assert_allclose(logits[:, 4:9], alone, atol=1e-5)


VARIANTS = {
  "plain": {},
  "untied_qknorm_headdim": dict(tie_embeddings=False, qk_norm=True, head_dim=12),
  "codebook": dict(image_offset=OFF, image_size=K, image_embed_init="codebook", codebook_dim=6),
  "rope2d_codebook": dict(
    image_offset=OFF,
    image_size=K,
    grid=GRID,
    rope_2d=True,
    image_embed_init="codebook",
    codebook_dim=6,
  ),
  "image_pos": dict(image_offset=OFF, image_size=K, grid=GRID, image_pos_embed=True),
  "levels": dict(image_offset=OFF, image_size=K, image_embed_init="levels", code_levels=(5, 3, 2)),
}


@pytest.mark.parametrize(
  "variant,scan",
  [(v, False) for v in VARIANTS] + [("plain", True), ("image_pos", True), ("levels", True)],
)
def test_count_params_equals_the_leaves_of_a_real_init(variant, scan):
  config = TransformerConfig(
    **BASE, **VARIANTS[variant], scan_layers=scan, remat_policy="full" if scan else "none"
  )
  variables = Transformer(config).init(jax.random.key(0), _tokens(0, 1, 3))
  assert count_params(config) == _num_params(variables["params"])
  counts = param_counts(config)
  assert sum(counts.values()) == count_params(config)
  assert set(counts) == (
    {"embed", "layers", "final_norm"}
    | ({"head"} if not config.tie_embeddings else set())
    | ({"image_position"} if config.image_pos_embed else set())
  )
  params = nn.meta.unbox(variables["params"])
  assert counts["embed"] == _num_params(params["embed"])
  if "image_position" in counts:
    assert counts["image_position"] == math.prod(GRID) * BASE["dim"]


def test_count_params_ignores_settings_that_do_not_change_params():
  config = TransformerConfig(**BASE)
  n = count_params(config)
  assert n == count_params(
    config.replace(remat_policy="dots", attention_impl="cudnn", query_chunks=4, dtype="bfloat16")
  )
  assert count_params(config.replace(scan_layers=True)) == n
  assert count_params(config.replace(tie_embeddings=False)) == n + V * BASE["dim"]


_EXPECTED = {
  "tiny": (0.05e6, 0.2e6),
  "small": (3e6, 4.5e6),
  "base": (90e6, 130e6),
  "large": (300e6, 400e6),
  "xl": (1.1e9, 1.5e9),
  "7b": (6.5e9, 7.5e9),
}


@pytest.mark.parametrize("size", list(lm_config.SIZES))
def test_config_sizes_param_counts(size):
  config = lm_config.get_config(f"size={size}")
  model_config = TransformerConfig(
    **config.model.to_dict(), vocab_size=lm_config.NOMINAL_VOCAB[size]
  )
  model = Transformer(model_config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  n = _num_params(abstract["params"])
  assert n == count_params(model_config)
  low, high = _EXPECTED[size]
  assert low <= n <= high, f"{size}: {n:,} params"


def test_config_rejects_unknown_keys_and_is_locked():
  with pytest.raises(ValueError, match="valid:"):
    lm_config.get_config("sizee=tiny")
  with pytest.raises(ValueError, match="size"):
    lm_config.get_config("size=huge")
  with pytest.raises(ValueError, match="dtype"):
    lm_config.get_config("size=tiny,dtype=float16")
  with pytest.raises(ValueError, match="remat"):
    lm_config.get_config("size=tiny,remat=some")
  config = lm_config.get_config("size=tiny,dtype=bfloat16,remat=full")
  assert config.model.dtype == "bfloat16" and config.model.remat_policy == "full"
  with pytest.raises(AttributeError):
    config.model.not_a_field = 1
  assert config.model.dim == 64 and config.model.num_layers == 2


def test_invalid_settings_raise_value_error_when_the_config_is_built():
  cases = [
    (dict(BASE, dim=0), "dim=0 must be > 0"),
    (dict(BASE, num_layers=-1), "num_layers=-1 must be > 0"),
    (dict(BASE, num_kv_heads=-2), "num_kv_heads=-2 must be > 0"),
    (dict(BASE, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(BASE, dim=30), "not divisible by num_heads"),
    (dict(BASE, head_dim=7), "must be even for RoPE"),
    (
      dict(BASE, head_dim=6, image_offset=OFF, image_size=K, grid=GRID, rope_2d=True),
      "divisible by 4",
    ),
    (dict(BASE, image_pos_embed=True), "image_pos_embed needs"),
    (dict(BASE, image_offset=OFF, image_size=K, grid=(2,), rope_2d=True), "rope_2d needs"),
    (dict(BASE, rope_2d=True), "rope_2d needs"),
    (dict(BASE, image_embed_init="codebook"), "codebook_dim"),
    (dict(BASE, image_embed_init="random"), "image_embed_init"),
    (
      dict(BASE, image_offset=OFF, image_size=K, image_embed_init="levels", code_levels=(4, 8)),
      "product is image_size=30",
    ),
    (dict(BASE, image_offset=OFF, image_size=K, image_embed_init="levels"), "code_levels"),
    (dict(BASE, remat_policy="some"), "remat_policy"),
    (dict(BASE, attention_impl="flash"), "attention_impl"),
    (dict(BASE, image_offset=90, image_size=30), "inside the vocabulary"),
    (dict(BASE, query_chunks=0), "query_chunks=0 must be >= 1"),
    (dict(BASE, dtype="float17"), "dtype='float17' is not a dtype"),
    (dict(BASE, param_dtype="int32"), "floating-point"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      TransformerConfig(**kwargs)
  config = TransformerConfig(**BASE)
  with pytest.raises(ValueError, match="remat_policy"):
    config.replace(remat_policy="some")  # replace() validates too
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.dim = 64
  with pytest.raises(TypeError, match="TransformerConfig"):
    Transformer(BASE)


def test_config_normalises_json_values():
  config = TransformerConfig(
    **dict(BASE, head_dim=0, num_kv_heads=0),
    dtype="bfloat16",
    param_dtype="float32",
    grid=[2, 3],
    image_offset=OFF,
    image_size=K,
    image_embed_init="levels",
    code_levels=[5, 3, 2],
  )
  assert config.head_dim is None and config.num_kv_heads is None
  assert config.head_size() == 8 and config.kv_heads() == 4
  assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.float32
  assert config.grid == GRID and config.code_levels == (5, 3, 2)
  assert TransformerConfig(**json.loads(json.dumps(config.to_dict()))) == config
  assert hash(config) == hash(config.replace())
  assert TransformerConfig(**BASE, head_dim=12).head_size() == 12
  assert TransformerConfig(**BASE).kv_heads() == 2


def test_call_argument_errors():
  tokens = _tokens(0, 1, 4)
  model = _model(**BASE)
  variables = _init(model, tokens)
  with pytest.raises(ValueError, match="decode=True needs"):
    model.apply(variables, tokens, decode=True)
  with pytest.raises(ValueError, match="without decode=True"):
    model.apply(variables, tokens, cache=model.init_cache(1, 8))


def _stack_layers(params, num_layers):
  """Unscanned params -> the scanned layout (layer_i blocks stacked under "layers")."""
  params = dict(nn.meta.unbox(params))
  blocks = [params.pop(f"layer_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def test_scan_and_remat_match_plain():
  tokens = _tokens(3, 2, 6)

  def logits_and_grad(model, params):
    def loss(p):
      logits = model.apply({"params": p}, tokens)[0]
      return jnp.mean(logits**2), logits

    return jax.jit(jax.grad(loss, has_aux=True))(nn.meta.unbox(params))

  plain = _model(**BASE)
  params = _init(plain, tokens)["params"]
  ref_grad, ref = logits_and_grad(plain, params)
  stacked = _stack_layers(params, BASE["num_layers"])
  for scan, remat in ((True, "none"), (False, "dots"), (True, "full")):
    model = _model(**BASE, scan_layers=scan, remat_policy=remat)
    grad, logits = logits_and_grad(model, stacked if scan else params)
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    if scan:
      grad = dict(grad)
      layers = grad.pop("layers")
      for i in range(BASE["num_layers"]):
        grad[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grad, ref_grad)


def _codebook_vars(variables, key=5):
  variables = dict(variables)
  if "codebook" in variables:
    cb = jax.random.normal(jax.random.key(key), variables["codebook"]["embed"]["vectors"].shape)
    variables["codebook"] = {"embed": {"vectors": cb}}
  return variables


def _decode_matches_full(model, seqs, prompt_lens, max_len=16):
  """Prefill right-padded prompts, then teacher-force the rest one token per call."""
  b, total = len(seqs), max(len(s) for s in seqs)
  variables = _codebook_vars(_init(model, jnp.zeros((1, 4), jnp.int32)))
  apply = jax.jit(model.apply, static_argnames="decode")
  padded = np.zeros((b, total), np.int32)
  for i, s in enumerate(seqs):
    padded[i, : len(s)] = s
  width = max(prompt_lens)
  prompt = np.where(np.arange(width)[None] < np.array(prompt_lens)[:, None], padded[:, :width], 0)
  pos = np.broadcast_to(np.arange(width), (b, width))
  cache = model.init_cache(b, max_len, jnp.float32)
  logits, cache = apply(
    variables, jnp.asarray(prompt), positions=jnp.asarray(pos), cache=cache, decode=True
  )
  got = [[logits[i, t] for t in range(n)] for i, n in enumerate(prompt_lens)]
  nxt = np.array(prompt_lens)
  for _ in range(total - min(prompt_lens)):
    tok = padded[np.arange(b), np.minimum(nxt, total - 1)][:, None]
    logits, cache = apply(
      variables, jnp.asarray(tok), positions=jnp.asarray(nxt[:, None]), cache=cache, decode=True
    )
    for i, s in enumerate(seqs):
      if nxt[i] < len(s):
        got[i].append(logits[i, 0])
    nxt = np.minimum(nxt + 1, max_len - 1)
  # Right padding never changes the logits of earlier tokens (causal), so one batch suffices.
  full, _ = apply(variables, jnp.asarray(padded))
  for i, s in enumerate(seqs):
    np.testing.assert_allclose(jnp.stack(got[i]), full[i, : len(s)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_forward(scan):
  model = _model(**BASE, scan_layers=scan, qk_norm=True, remat_policy="full" if scan else "none")
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, V, size=n) for n in (9, 11, 7)]
  _decode_matches_full(model, seqs, prompt_lens=[3, 6, 1])
  cache = model.init_cache(3, 16)
  layer_caches = [cache["layers"]] if scan else cache["layers"]
  assert len(layer_caches) == (1 if scan else 2)
  lead = (2,) if scan else ()
  for c in layer_caches:
    assert c["k"].shape == lead + (3, 2, 1, 8, 64)  # [B, KVH, L / P, Dh, P]: 64-slot key panels
    assert c["v"].shape == lead + (3, 2, 64, 8)  # [B, KVH, L, Dh]
  grown = model.grow_cache(cache, 100)
  for c in [grown["layers"]] if scan else grown["layers"]:
    assert c["k"].shape == lead + (3, 2, 2, 8, 64) and c["v"].shape == lead + (3, 2, 128, 8)


@pytest.mark.parametrize("variant", ["rope2d_codebook", "image_pos"])
@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_with_image_positions(scan, variant):
  model = _model(**BASE, **VARIANTS[variant], scan_layers=scan)
  text = lambda n: list(np.random.default_rng(n).integers(0, OFF, size=n))
  image = lambda n: list(np.random.default_rng(n + 100).integers(OFF, OFF + K, size=6))
  # Prompts end inside an image, right before one, and inside text; two images back to back.
  seqs = [
    np.array(text(2) + image(1) + text(3)),
    np.array(text(1) + image(2) + image(3)),
    np.array(text(4) + image(4) + text(2)),
  ]
  _decode_matches_full(model, seqs, prompt_lens=[4, 1, 4], max_len=16)
  assert model.init_cache(3, 16)["image_run"].shape == (3, 64)  # Slots: whole key panels.
  assert model.grow_cache(model.init_cache(3, 16), 100)["image_run"].shape == (3, 128)


def test_2d_rope_changes_image_token_logits_only_through_positions():
  tokens = jnp.array([[1, 2, OFF, OFF + 1, OFF + 2, OFF + 3, OFF + 4, OFF + 5, 3]])
  one_d = _model(**BASE, image_offset=OFF, image_size=K, grid=GRID)
  two_d = _model(**BASE, image_offset=OFF, image_size=K, grid=GRID, rope_2d=True)
  variables = _init(one_d, tokens)
  l1, _ = _apply(one_d)(variables, tokens)
  l2, _ = _apply(two_d)(variables, tokens)
  assert l2.shape == l1.shape
  assert float(jnp.abs(l1[:, 3:] - l2[:, 3:]).max()) > 1e-4


def test_image_position_embedding_is_added_per_grid_cell():
  h, w = GRID
  model = _model(**BASE, **VARIANTS["image_pos"])
  plain = _model(**BASE, image_offset=OFF, image_size=K, grid=GRID)
  tokens = jnp.array([[1, 2] + [OFF + 3] * (2 * h * w) + [4, 5]])  # two images, same code
  variables = _init(model, tokens)
  table = variables["params"]["image_position"]
  assert table.shape == (h * w, 32)
  rest = {"params": {k: v for k, v in variables["params"].items() if k != "image_position"}}
  base, _ = _apply(plain)(rest, tokens)
  zeroed = {"params": dict(variables["params"], image_position=jnp.zeros_like(table))}
  np.testing.assert_allclose(_apply(model)(zeroed, tokens)[0], base, atol=1e-6)
  logits, _ = _apply(model)(variables, tokens)
  np.testing.assert_allclose(logits[:, :2], base[:, :2], atol=1e-6)  # text before: untouched
  assert float(jnp.abs(logits[:, 2:] - base[:, 2:]).max()) > 1e-4
  # Changing cell 4's row changes nothing before the 5th code of the first image, and the 5th
  # code of both images.
  bumped = {"params": dict(variables["params"], image_position=table.at[4].add(1.0))}
  diff = jnp.abs(_apply(model)(bumped, tokens)[0] - logits).max(axis=-1)[0]
  first, second = 2 + 4, 2 + h * w + 4
  assert float(diff[:first].max()) < 1e-6
  assert float(diff[first]) > 1e-4 and float(diff[second]) > 1e-4


def test_codebook_embeddings_are_projected_codebook_rows():
  model = _model(**BASE, **VARIANTS["codebook"])
  tokens = jnp.array([[1, OFF, OFF + K - 1, V - 1]])
  variables = _codebook_vars(_init(model, tokens))
  params = nn.meta.unbox(variables["params"])
  learned = params["embed"]["embedding"]
  assert learned.shape == (V - K, 32)
  codebook = variables["codebook"]["embed"]["vectors"]
  embed = TokenEmbed(V, 32, image_offset=OFF, image_size=K, codebook_dim=6)
  rows = embed.apply(
    {"params": params["embed"], "codebook": variables["codebook"]["embed"]}, tokens
  )[0]
  proj = params["embed"]["codebook_proj"]["kernel"]
  np.testing.assert_allclose(rows[0], learned[1], atol=1e-6)
  np.testing.assert_allclose(rows[1], codebook[0] @ proj, atol=1e-5)
  np.testing.assert_allclose(rows[2], codebook[K - 1] @ proj, atol=1e-5)
  np.testing.assert_allclose(rows[3], learned[V - 1 - K], atol=1e-6)
  # Another codebook changes what an image token means, not what a text token means.
  logits_a, _ = _apply(model)(variables, tokens)
  logits_b, _ = _apply(model)(_codebook_vars(variables, key=9), tokens)
  np.testing.assert_allclose(logits_a[0, 0, :OFF], logits_b[0, 0, :OFF], atol=1e-6)
  assert float(jnp.abs(logits_a[0, 1, :OFF] - logits_b[0, 1, :OFF]).max()) > 1e-4
  with pytest.raises(ValueError, match="codebook"):
    model.apply({"params": variables["params"]}, tokens)


def test_level_embeddings_sum_one_vector_per_channel_digit():
  levels = (5, 3, 2)
  model = _model(**BASE, **VARIANTS["levels"])
  codes = np.array([0, 1, 7, 29])  # digits (0,0,0) (1,0,0) (2,1,0) (4,2,1)
  tokens = jnp.array([[1, *(OFF + codes), V - 1]])
  params = nn.meta.unbox(_init(model, tokens)["params"])
  learned, table = params["embed"]["embedding"], params["embed"]["level_embedding"]
  assert learned.shape == (V - K, 32) and table.shape == (sum(levels), 32)
  rows = TokenEmbed(V, 32, image_offset=OFF, image_size=K, code_levels=levels).apply(
    {"params": params["embed"]}, tokens
  )[0]
  np.testing.assert_allclose(rows[0], learned[1], atol=1e-6)
  np.testing.assert_allclose(rows[-1], learned[V - 1 - K], atol=1e-6)
  for row, code in zip(rows[1:-1], codes):
    digits = (code % 5, code // 5 % 3, code // 15 % 2)
    want = table[digits[0]] + table[5 + digits[1]] + table[8 + digits[2]]
    np.testing.assert_allclose(row, want, atol=1e-5)
  # Tied head: image logits add up over channels, so swapping one channel's digit between two
  # codes moves the logits by the same amount: l(a0,b1) + l(b0,a1) == l(a0,a1) + l(b0,b1).
  logits, _ = _apply(model)({"params": params}, tokens)
  image = np.asarray(logits[0, :, OFF : OFF + K])
  code = lambda d0, d1, d2: d0 + 5 * d1 + 15 * d2
  np.testing.assert_allclose(
    image[:, code(1, 2, 0)] + image[:, code(3, 0, 1)],
    image[:, code(1, 0, 1)] + image[:, code(3, 2, 0)],
    atol=1e-4,
  )
  assert np.abs(image[:, code(1, 2, 0)] - image[:, code(3, 0, 1)]).max() > 1e-3


@pytest.mark.parametrize("tied", [True, False])
def test_logits_slice_equals_the_slice_of_the_full_logits(tied):
  model = _model(**{**BASE, "tie_embeddings": tied})
  tokens = _tokens(3, 2, 7)
  variables = _init(model, tokens)
  apply = jax.jit(model.apply, static_argnames="logits_slice")
  full, _ = apply(variables, tokens)
  part, _ = apply(variables, tokens, logits_slice=(OFF, K))
  assert part.shape == (2, 7, K) and part.dtype == jnp.float32
  np.testing.assert_allclose(part, full[..., OFF : OFF + K], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="inside the vocabulary"):
    model.apply(variables, tokens, logits_slice=(OFF, V))


def _gelu(x):
  return np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))


def test_image_generation_path_embeds_and_scores_image_ids_through_its_own_networks(tied=False):
  """Janus's path: image ids embed as aligner(gen_embedding[k]) and score through the gen head;
  the same model without the path, given those rows in its table, has the same hidden states."""
  gen = dict(gen_embed_dim=6, gen_aligner_depth=2, gen_head_dim=20)
  model = _model(**BASE, image_offset=OFF, image_size=K, tie_embeddings=tied, **gen)
  plain = _model(**BASE, image_offset=OFF, image_size=K, tie_embeddings=tied)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, size=(2, 9)))
  assert np.asarray((tokens >= OFF) & (tokens < OFF + K)).any()
  variables = _init(model, tokens)
  p = nn.meta.unbox(variables["params"])
  g = jax.tree.map(np.asarray, p["gen_path"])
  assert set(g) == {"embedding", "aligner_0", "aligner_1", "head_proj", "head_out"}
  assert g["embedding"].shape == (K, 6) and g["head_out"]["kernel"].shape == (20, K)
  assert param_counts(model.config)["gen_path"] == sum(x.size for x in jax.tree.leaves(g))
  aligned = g["embedding"] @ g["aligner_0"]["kernel"] + g["aligner_0"]["bias"]
  aligned = _gelu(aligned) @ g["aligner_1"]["kernel"] + g["aligner_1"]["bias"]
  ref = {k: v for k, v in p.items() if k != "gen_path"}
  ref["embed"] = {"embedding": p["embed"]["embedding"].at[OFF : OFF + K].set(aligned)}
  (ref_logits, _), state = plain.apply(
    {"params": ref}, tokens, capture_intermediates=lambda m, _: m.name == "final_norm"
  )
  (h,) = state["intermediates"]["final_norm"]["__call__"]
  want = np.array(ref_logits)
  want[..., OFF : OFF + K] = (
    _gelu(h @ g["head_proj"]["kernel"] + g["head_proj"]["bias"]) @ g["head_out"]["kernel"]
    + g["head_out"]["bias"]
  )
  apply = jax.jit(model.apply, static_argnames="logits_slice")
  got, _ = apply(variables, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The table's image rows are unused by the path; slices compute only their pieces.
  unused = {**p, "embed": {"embedding": p["embed"]["embedding"].at[OFF : OFF + K].set(9.0)}}
  np.testing.assert_allclose(apply({"params": unused}, tokens)[0], got, rtol=1e-6, atol=1e-6)
  for rows in [(OFF + 3, 5), (OFF - 4, K + 10)]:
    part, _ = apply(variables, tokens, logits_slice=rows)
    np.testing.assert_allclose(part, got[..., rows[0] : rows[0] + rows[1]], atol=1e-6)
  rng = np.random.default_rng(2)
  _decode_matches_full(model, [rng.integers(0, V, size=n) for n in (9, 6)], prompt_lens=[4, 2])
  with pytest.raises(ValueError, match="image-generation path"):
    TransformerConfig(**BASE, gen_embed_dim=4)
