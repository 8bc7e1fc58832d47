import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn.autoencoder import (
  AttnBlock,
  Decoder,
  Encoder,
  PatchEncoder,
  ResBlock,
  SplitPatchEncoder,
  factor_of,
  num_groups,
  output_conv,
)


def rng_key(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU: eager param init dominates here.
  return jax.random.key(seed, impl="rbg")


def _images(b=2, h=16, w=16, seed=0):
  return jax.random.uniform(rng_key(seed), (b, h, w, 3), minval=-1.0, maxval=1.0)


def test_num_groups_divides_channels_and_caps_at_32():
  assert [num_groups(c) for c in (8, 12, 16, 40, 48, 64, 96, 3)] == [8, 12, 16, 20, 24, 32, 32, 3]
  for c in range(1, 200):
    g = num_groups(c)
    assert c % g == 0 and g <= 32


@pytest.mark.parametrize(
  "mults,factor", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 4), 16)]
)
def test_encoder_decoder_shapes_for_each_factor(mults, factor):
  enc = Encoder(channels=8, channel_multipliers=mults, latent_dim=5, attention_at_lowest=True)
  dec = Decoder(channels=8, channel_multipliers=mults, attention_at_lowest=True)
  assert factor_of(mults) == enc.factor == dec.factor == factor
  x = jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32)
  enc_vars = jax.eval_shape(enc.init, rng_key(0), x)
  z = jax.eval_shape(enc.apply, enc_vars, x)
  assert z.shape == (2, 32 // factor, 48 // factor, 5)
  dec_vars = jax.eval_shape(dec.init, rng_key(0), z)
  out = jax.eval_shape(dec.apply, dec_vars, z)
  assert out.shape == (2, 32, 48, 3) and out.dtype == jnp.float32


def test_empty_multipliers_rejected():
  with pytest.raises(ValueError, match="channel_multipliers"):
    factor_of(())


def test_attention_only_at_lowest_when_asked():
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  with_attn = jax.eval_shape(Encoder(channels=8, attention_at_lowest=True).init, rng_key(0), x)[
    "params"
  ]
  without = jax.eval_shape(Encoder(channels=8).init, rng_key(0), x)["params"]
  assert "attn" in with_attn["mid"] and "res2" in with_attn["mid"]
  assert "attn" not in without["mid"]


def test_bf16_compute_keeps_float32_params_and_output():
  dec = Decoder(channels=8, channel_multipliers=(1, 2), dtype=jnp.bfloat16)
  z = jnp.ones((1, 4, 4, 6), jnp.bfloat16)
  variables = dec.init(rng_key(0), z)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = dec.apply(variables, z)
  assert out.dtype == jnp.float32 and out.shape == (1, 8, 8, 3)
  assert np.isfinite(np.asarray(out)).all()


def test_resblock_projects_skip_only_when_channels_change():
  x = jnp.ones((1, 4, 4, 8))
  same = ResBlock(8).init(rng_key(0), x)["params"]
  wider = ResBlock(16).init(rng_key(0), x)["params"]
  assert "skip" not in same and wider["skip"]["kernel"].shape == (1, 1, 8, 16)
  assert ResBlock(16).apply({"params": wider}, x).shape == (1, 4, 4, 16)


def test_attention_is_permutation_equivariant_over_positions():
  x = jax.random.normal(rng_key(1), (2, 4, 4, 8))
  block = AttnBlock()
  variables = block.init(rng_key(0), x)
  perm = np.random.default_rng(0).permutation(16)
  shuffled = x.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8)
  out = block.apply(variables, x).reshape(2, 16, 8)
  out_shuffled = block.apply(variables, shuffled).reshape(2, 16, 8)
  np.testing.assert_allclose(out_shuffled, out[:, perm], atol=1e-5)


def test_output_conv_matches_decoder_last_layer():
  dec = Decoder(channels=8, channel_multipliers=(1, 2))
  z = jax.random.normal(rng_key(2), (2, 4, 4, 6))
  variables = dec.init(rng_key(0), z)
  out, state = dec.apply(variables, z, mutable=["intermediates"])
  features = state["intermediates"]["last_features"][0]
  conv = variables["params"]["conv_out"]
  np.testing.assert_allclose(output_conv(features, conv["kernel"]) + conv["bias"], out, atol=1e-5)


def test_encoder_real_forward_is_finite_and_input_dependent():
  enc = Encoder(channels=8, channel_multipliers=(1, 2), latent_dim=4)
  x = _images()
  variables = enc.init(rng_key(0), x)
  z1, z2 = enc.apply(variables, x), enc.apply(variables, _images(seed=1))
  assert z1.shape == (2, 8, 8, 4) and np.isfinite(np.asarray(z1)).all()
  assert float(jnp.abs(z1 - z2).max()) > 1e-3


def test_patch_encoder_codes_depend_on_their_own_patch_only():
  enc = PatchEncoder(channels=8, channel_multipliers=(1, 2, 2), latent_dim=5, mlp_blocks=2)
  assert enc.factor == 4
  x = _images(b=1, h=16, w=24)
  variables = enc.init(rng_key(0), x)
  z = enc.apply(variables, x)
  assert z.shape == (1, 4, 6, 5)
  # Change the pixels of patch (1, 2) only: only latent (1, 2) moves.
  y = x.at[:, 4:8, 8:12].set(-x[:, 4:8, 8:12])
  moved = np.abs(np.asarray(enc.apply(variables, y) - z)).max(-1)[0]
  assert moved[1, 2] > 1e-3
  moved[1, 2] = 0.0
  np.testing.assert_array_equal(moved, 0.0)
  # The same patch drawn at another place, in another image, gets the same latent.
  other = _images(b=1, h=16, w=24, seed=3).at[:, 12:16, 0:4].set(x[:, 4:8, 8:12])
  np.testing.assert_allclose(enc.apply(variables, other)[0, 3, 0], z[0, 1, 2], atol=1e-5)


def test_split_patch_encoder_keeps_form_and_colour_in_their_own_channels():
  from vqlm.data import shapes
  from vqlm.errors import UserError

  enc = SplitPatchEncoder(
    channels=8, channel_multipliers=(1, 2, 2), latent_dim=6, mlp_blocks=1, colour_channels=2
  )
  scene = lambda color, shape: [
    {"shape": shape, "color": color, "size": "large", "position": "center"}
  ]
  image = lambda color, shape: jnp.asarray(shapes.render(scene(color, shape), 32)) / 127.5 - 1.0
  red_tri, blue_tri = image("red", "triangle"), image("blue", "triangle")
  red_sq = image("red", "square")
  x = jnp.stack([red_tri, blue_tri, red_sq])
  variables = enc.init(rng_key(0), x)
  z = np.asarray(enc.apply(variables, x))
  assert z.shape == (3, 8, 8, 6)
  # Another colour moves only the colour channels; another form (same colour) only the form ones.
  recolor, reshape = np.abs(z[1] - z[0]), np.abs(z[2] - z[0])
  assert recolor[..., 4:].max() > 1e-3 and recolor[..., :4].max() < 1e-5
  assert reshape[..., :4].max() > 1e-3
  # Patches with red pixels in both images have the same colour input, so the same colour latents.
  drawn = lambda im: (np.asarray(im).max(-1) > -1).reshape(8, 4, 8, 4).any((1, 3))
  both = drawn(red_tri) & drawn(red_sq)
  assert both.sum() >= 4 and reshape[both][:, 4:].max() < 1e-5
  with pytest.raises(UserError, match="colour_channels=6 must be in 1..latent_dim - 1"):
    SplitPatchEncoder(channels=8, latent_dim=6, colour_channels=6).init(rng_key(0), x)


def test_group_norm_groups_and_eps_options():
  from vqlm.errors import UserError
  from vqlm.nn.autoencoder import group_norm

  x = np.asarray(_images(b=1, h=4, w=4)[..., :1].repeat(8, axis=-1)) * np.arange(1, 9)
  norm = group_norm(8, 2, 1e-2, "norm")
  y = norm.apply(norm.init(rng_key(0), x), x)
  g = x.reshape(1, 4, 4, 2, 4)
  mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
  np.testing.assert_allclose(y, ((g - mean) / np.sqrt(var + 1e-2)).reshape(x.shape), atol=1e-5)
  with pytest.raises(UserError, match="does not divide"):
    group_norm(8, 3, 1e-6, "norm")
  block = ResBlock(16, groups=4)
  params = block.init(rng_key(0), jnp.zeros((1, 4, 4, 8)))["params"]
  assert params["norm1"]["scale"].shape == (8,) and "skip" in params


def test_taming_encoder_decoder_layout():
  from vqlm.errors import UserError
  from vqlm.nn.taming import TamingDecoder, TamingEncoder

  kw = dict(channels=8, channel_multipliers=(1, 2), attention_levels=(1,), norm_groups=4)
  enc = TamingEncoder(num_res_blocks=1, z_channels=5, latent_dim=3, **kw)
  dec = TamingDecoder(num_res_blocks=2, z_channels=5, **kw)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  ev = jax.eval_shape(enc.init, rng_key(0), x)
  z = jax.eval_shape(enc.apply, ev, x)
  assert z.shape == (2, 8, 8, 3)
  p = ev["params"]
  # The strided conv keeps the width; the next level's first block widens (1x1 skip).
  assert p["down0_conv"]["kernel"].shape == (3, 3, 8, 8) and "down1_attn0" in p
  assert p["down1_res0"]["skip"]["kernel"].shape == (1, 1, 8, 16) and "down0_attn0" not in p
  assert p["conv_out"]["kernel"].shape[-1] == 5 and p["quant_conv"]["kernel"].shape == (5, 3)
  dv = jax.eval_shape(dec.init, rng_key(0), z)
  out = jax.eval_shape(dec.apply, dv, z)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  q = dv["params"]
  assert q["post_quant_conv"]["kernel"].shape == (3, 5) and "up1_attn1" in q and "up0_res1" in q
  assert q["up1_conv"]["kernel"].shape == (3, 3, 16, 16) and "attn" in q["mid"]
  with pytest.raises(UserError, match="attention_levels"):
    jax.eval_shape(TamingEncoder(**{**kw, "attention_levels": (5,)}).init, rng_key(0), x)
