import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlm.nn import image_tokenizer as tok
from vqlm.nn.image_tokenizer import ImageTokenizer


def rng_key(seed):
  # The "rbg" PRNG compiles much faster than threefry on CPU: eager param init dominates here.
  return jax.random.key(seed, impl="rbg")


ENCODER = {"channels": 8, "channel_multipliers": (1, 2), "num_res_blocks": 1, "latent_dim": 6}
BOTTLENECKS = {
  "identity": {"kind": "identity"},
  "gaussian": {"kind": "gaussian", "latent_dim": 4},
  "vq": {"kind": "vq", "codebook_size": 32, "code_dim": 3, "l2_normalize": True},
  "fsq": {"kind": "fsq", "levels": (5, 4, 3)},
}


def _images(seed=0, b=2, size=16):
  return jax.random.uniform(rng_key(seed), (b, size, size, 3), minval=-1.0, maxval=1.0)


def _model(kind):
  return ImageTokenizer(encoder=ENCODER, bottleneck=BOTTLENECKS[kind])


@pytest.fixture(scope="module")
def vq():
  model = _model("vq")
  return model, model.init(rng_key(0), _images())


@pytest.mark.parametrize("kind", list(BOTTLENECKS))
def test_shapes_of_every_kind(kind):
  model = _model(kind)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(model.init, rng_key(0), x)
  recon, aux = jax.eval_shape(model.apply, variables, x)
  assert recon.shape == (2, 16, 16, 3) and recon.dtype == jnp.float32
  assert set(variables["params"]) - {"quantizer"} == {"enc", "dec"}
  latent = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode_latent), variables, x)
  assert latent.shape == (2, 8, 8, 4 if kind == "gaussian" else 6)
  if model.is_discrete:
    codes = jax.eval_shape(lambda v, x: tok.encode(model, v, x), variables, x)
    assert codes.shape == (2, 8, 8) and codes.dtype == jnp.int32
    assert aux["indices"].shape == (2, 8, 8)
    images = jax.eval_shape(lambda v, c: tok.decode(model, v, c), variables, codes)
    assert images.shape == (2, 16, 16, 3) and images.dtype == jnp.float32
    k = jax.eval_shape(lambda v: tok.codebook(model, v), variables)
    assert k.shape == (model.codebook_size, 3)


def test_properties():
  model = _model("fsq")
  assert model.factor == 2 and model.grid_shape(32, 16) == (16, 8)
  assert model.codebook_size == 60 and model.is_discrete
  assert _model("vq").codebook_size == 32
  assert _model("identity").codebook_size == 0 and not _model("identity").is_discrete


def test_decode_of_encode_equals_the_eval_forward(vq):
  model, variables = vq
  x = _images(1)
  codes = jax.jit(lambda v, x: tok.encode(model, v, x))(variables, x)
  recon = jax.jit(lambda v, c: tok.decode(model, v, c))(variables, codes)
  forward, aux = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(codes, aux["indices"])
  np.testing.assert_allclose(recon, forward, atol=1e-5)
  # decode only sees codebook vectors: the latents are out-projected codebook rows.
  latents = model.apply(variables, x, method=model.encode_latent)
  rows = tok.codebook(model, variables)[codes]
  out = variables["params"]["quantizer"]["proj_out"]
  np.testing.assert_allclose(latents, rows @ out["kernel"] + out["bias"], atol=1e-5)
  np.testing.assert_allclose(
    model.apply(variables, latents, method=model.decode_latent), forward, atol=1e-5
  )


def test_straight_through_gradient_reaches_the_encoder(vq):
  model, variables = vq
  x = _images(2)

  def recon_loss(params):
    recon, _ = model.apply({**variables, "params": params}, x, train=False)
    return jnp.mean(jnp.abs(recon - x))

  grads = jax.grad(recon_loss)(variables["params"])
  for part in ("enc", "dec"):
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[part]))))
    assert norm > 0, part
  assert float(jnp.abs(grads["quantizer"]["proj_in"]["kernel"]).max()) > 0


@pytest.mark.parametrize("shape", [(2, 15, 16, 3), (2, 16, 16, 1), (16, 16, 3), (2, 16, 16, 4)])
def test_bad_image_shapes_raise_one_line(vq, shape):
  model, variables = vq
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\] with H and W divisible by 2") as err:
    tok.encode(model, variables, jnp.zeros(shape))
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="divisible"):
    model.apply(variables, jnp.zeros(shape))


def test_continuous_tokenizer_has_no_codes():
  model = _model("identity")
  variables = model.init(rng_key(0), _images())
  with pytest.raises(ValueError, match="encode_latent"):
    tok.encode(model, variables, _images())
  with pytest.raises(ValueError, match="discrete"):
    tok.codebook(model, variables)


def test_config_errors():
  with pytest.raises(ValueError, match="latent_dim"):
    ImageTokenizer(encoder=ENCODER, bottleneck={"kind": "vq", "latent_dim": 5}).init(
      rng_key(0), _images()
    )
  with pytest.raises(ValueError, match="kind"):
    ImageTokenizer(encoder=ENCODER, bottleneck={"codebook_size": 4}).init(rng_key(0), _images())
  with pytest.raises(ValueError, match="unknown encoder kind 'vit'; valid: conv, patch"):
    ImageTokenizer(encoder=dict(ENCODER, kind="vit"), bottleneck=BOTTLENECKS["fsq"]).init(
      rng_key(0), _images()
    )


def test_patch_encoder_tokenizer_from_config_round_trips_codes():
  from vqlm.runtime.config import as_kwargs
  from vqlm.stages.tokenizer_config import get_config

  config = get_config("size=tiny,encoder=patch,bottleneck=fsq")
  assert config.model.encoder.kind == "patch" and "kind" not in config.model.decoder
  model = ImageTokenizer(**as_kwargs(config.model))
  images = _images(size=32)
  variables = model.init(rng_key(0), images)
  assert "patch_in" in variables["params"]["enc"]
  codes = tok.encode(model, variables, images)
  assert codes.shape == (2, 8, 8)
  # A code is a function of its own patch: a patch copied elsewhere gets the same code.
  moved = images.at[:, 28:32, 28:32].set(images[:, 0:4, 0:4])
  np.testing.assert_array_equal(tok.encode(model, variables, moved)[:, 7, 7], codes[:, 0, 0])


def test_split_encoder_tokenizer_from_config_and_its_errors():
  from vqlm.errors import UserError
  from vqlm.runtime.config import as_kwargs
  from vqlm.stages.tokenizer_config import get_config

  config = get_config("size=tiny,encoder=split,bottleneck=fsq")
  assert config.model.bottleneck.levels == (4,) * 6 and config.model.encoder.latent_dim == 6
  assert "colour_channels" not in config.model.decoder
  model = ImageTokenizer(**as_kwargs(config.model))
  images = _images(size=32)
  variables = model.init(rng_key(0), images)
  codes = tok.encode(model, variables, images)
  assert codes.shape == (2, 8, 8) and tok.decode(model, variables, codes).shape == (2, 32, 32, 3)
  with pytest.raises(UserError, match="encoder=split needs bottleneck=fsq"):
    get_config("size=tiny,encoder=split,bottleneck=vq")
  # An FSQ with a projection (latent_dim != len(levels)) would mix form and colour again.
  config.model.bottleneck.levels = (4, 4, 4, 4)
  with pytest.raises(UserError, match="one level per latent channel"):
    ImageTokenizer(**as_kwargs(config.model)).init(rng_key(0), images)


def test_decoder_mirrors_encoder_unless_given():
  model = ImageTokenizer(
    encoder=ENCODER,
    bottleneck={"kind": "identity"},
    decoder={"channels": 4, "channel_multipliers": (1, 1)},
  )
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  params = jax.eval_shape(model.init, rng_key(0), x)["params"]
  assert params["dec"]["conv_out"]["kernel"].shape == (3, 3, 4, 3)
  mirrored = jax.eval_shape(_model("identity").init, rng_key(0), x)["params"]
  assert mirrored["dec"]["conv_out"]["kernel"].shape == (3, 3, 8, 3)
  assert mirrored["dec"]["conv_in"]["kernel"].shape == (3, 3, 6, 16)


TAMING = dict(
  kind="taming", channels=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4
)


def test_taming_tokenizer_mirrors_its_decoder_and_round_trips_codes():
  model = ImageTokenizer(
    encoder=dict(TAMING, latent_dim=4, z_channels=6, num_res_blocks=0, mid_attention=False),
    bottleneck={"kind": "vq", "codebook_size": 16},
  )
  x = _images(size=8)
  variables = jax.jit(model.init)(rng_key(0), x)
  dec = variables["params"]["dec"]  # mirrored: z_channels too, without latent_dim
  assert dec["post_quant_conv"]["kernel"].shape == (4, 6) and "up1_conv" in dec

  @jax.jit
  def run(variables, x):
    recon, aux = model.apply(variables, x)
    codes = tok.encode(model, variables, x)
    return recon, aux["indices"], codes, tok.decode(model, variables, codes)

  recon, indices, codes, decoded = run(variables, x)
  np.testing.assert_array_equal(codes, indices)
  np.testing.assert_allclose(decoded, recon, atol=1e-5)


def test_decoderless_tokenizer_encodes_and_refuses_to_decode_in_one_line():
  from vqlm.errors import UserError

  model = ImageTokenizer(
    encoder=dict(TAMING, latent_dim=4),
    decoder={"kind": "none"},
    bottleneck={"kind": "vq", "codebook_size": 16},
  )
  assert not model.has_decoder and _model("vq").has_decoder
  x = _images()
  variables = model.init(rng_key(0), x, method=ImageTokenizer.initialize)
  assert set(variables["params"]) == {"enc", "quantizer"}
  assert tok.encode(model, variables, x).shape == (2, 8, 8)
  for call in (
    lambda: tok.decode(model, variables, jnp.zeros((1, 8, 8), jnp.int32)),
    lambda: model.apply(variables, x),
  ):
    with pytest.raises(UserError, match="no decoder") as info:
      call()
    assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="unknown decoder kind"):
    ImageTokenizer(encoder=ENCODER, decoder={"kind": "x"}, bottleneck=BOTTLENECKS["vq"]).init(
      rng_key(0), x
    )


def test_initialize_makes_the_same_variables_as_the_forward(vq):
  model, variables = vq
  shapes = jax.eval_shape(
    lambda: model.init(rng_key(0), _images(), method=ImageTokenizer.initialize)
  )
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)
