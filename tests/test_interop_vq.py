"""Taming-family VQ tokenizers imported from safetensors (vqlm.interop.vqmodel, janus_vq,
chameleon_vq) against the torch references on tiny random models in float32: the same codes,
decoded images within 1e-4."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from vqlm import imaging
from vqlm.errors import UserError
from vqlm.interop import chameleon_vq, janus_vq, run_files, vqmodel
from vqlm.interop.checkpoint_files import HFCheckpoint, materialize, write_safetensors
from vqlm.nn.image_tokenizer import ImageTokenizer
from vqlm.runs.tokenizer_run import TokenizerRun

pytestmark = pytest.mark.interop
TOL = 1e-4


@pytest.fixture(scope="module")
def torch():
  torch = pytest.importorskip("torch")
  if importlib.util.find_spec("torchvision") is not None:
    from vqlm.testing import torch_refs

    torch_refs.import_torchvision()  # transformers / diffusers import it
  torch.manual_seed(0)
  return torch


def _images(torch, size=32):
  return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _spread_codebook(torch, embedding, latents):
  """Codebook rows near the model's own latents [B, D, h, w], so the codes vary (random init
  codebooks are far from the latents and a single code wins everywhere)."""
  flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
  pick = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(2))
  rows = flat[pick[: embedding.shape[0]]]
  with torch.no_grad():
    embedding.copy_(rows + 0.01 * torch.randn(rows.shape, generator=torch.Generator()))


def _nhwc(x):
  return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def _vqlm(ckpt_dir, convert):
  model_kwargs, variables = convert(HFCheckpoint(ckpt_dir))
  model = ImageTokenizer(**model_kwargs)
  variables = materialize(variables)
  encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))
  decode = jax.jit(lambda v, c: model.apply(v, c, method=model.decode))
  return (
    model,
    lambda x: np.asarray(encode(variables, x)),
    lambda c: np.asarray(decode(variables, c)),
  )


def _check_codes(codes, ref):
  assert len(np.unique(ref)) > 8, "the reference codes barely vary: a weak test"
  np.testing.assert_array_equal(codes, ref)


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_diffusers_vqmodel_codes_and_decode(torch, tmp_path):
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.VQModel(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    latent_channels=4,
    vq_embed_dim=6,
    num_vq_embeddings=64,
    norm_num_groups=8,
    sample_size=32,
  ).eval()
  x = _images(torch)
  with torch.no_grad():
    _spread_codebook(torch, ref.quantize.embedding.weight, ref.encode(x).latents)
    _, _, (_, _, indices) = ref.quantize(ref.encode(x).latents)
    codes_ref = indices.reshape(2, 16, 16)
    rows = ref.quantize.embedding(codes_ref).permute(0, 3, 1, 2)
    images_ref = _nhwc(ref.decode(rows, force_not_quantize=True).sample)
  ref.save_pretrained(tmp_path / "vq", safe_serialization=True)

  model, encode, decode = _vqlm(str(tmp_path / "vq"), vqmodel.convert)
  assert model.encoder["attention_levels"] == (1,) and model.decoder["attention_levels"] == (1,)
  _check_codes(encode(_nhwc(x)), codes_ref.numpy())
  assert _max_abs(decode(codes_ref.numpy()), images_ref) < TOL
  assert vqmodel.default_image_size(HFCheckpoint(str(tmp_path / "vq"))) == 32

  # End to end: a tokenizer run directory, loaded as trained runs are.
  out = vqmodel.import_run(str(tmp_path / "vq"), str(tmp_path / "run"))
  run = TokenizerRun(out)
  assert run.config.source.format == vqmodel.FORMAT and run.image_size == 32 and run.has_decoder
  np.testing.assert_array_equal(run.encode(_nhwc(x)), codes_ref.numpy())
  decoded = run.decode(codes_ref.numpy()).astype(np.int32)
  assert np.abs(decoded - imaging.to_uint8(images_ref).astype(np.int32)).max() <= 1
  with pytest.raises(UserError, match="not empty"):
    vqmodel.import_run(str(tmp_path / "vq"), out)
  assert vqmodel.import_run(str(tmp_path / "vq"), out, overwrite=True, image_size=64) == out
  assert TokenizerRun(out).image_size == 64


def _janus_reference(torch):
  from transformers import JanusVQVAE, JanusVQVAEConfig

  config = JanusVQVAEConfig(
    embed_dim=8,
    num_embeddings=64,
    latent_channels=16,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    num_patches=16,
    projection_dim=32,
    image_token_embed_dim=32,
  )
  return JanusVQVAE(config).eval()


def test_janus_vq_codes_and_decode_with_unit_codebook_rows(torch, tmp_path):
  pytest.importorskip("transformers")
  ref = _janus_reference(torch)
  x = _images(torch)
  with torch.no_grad():
    _spread_codebook(torch, ref.quantize.embedding.weight, ref.quant_conv(ref.encoder(x)))
    tokens = ref.encode(x).image_tokens
    images_ref = _nhwc(ref.decode(tokens.reshape(2, -1)))
  codes_ref = tokens.reshape(2, 16, 16).numpy()
  ref.save_pretrained(tmp_path / "janus", safe_serialization=True)

  model, encode, decode = _vqlm(str(tmp_path / "janus"), janus_vq.convert)
  assert model.bottleneck["lookup_normalize"] and model.decoder["num_res_blocks"] == 2
  _check_codes(encode(_nhwc(x)), codes_ref)
  assert _max_abs(decode(codes_ref), images_ref) < TOL
  assert janus_vq.image_size(HFCheckpoint(str(tmp_path / "janus"))) == 32

  # The same weights inside a whole Janus checkpoint: model.vqmodel.* and vq_config.
  ckpt = HFCheckpoint(str(tmp_path / "janus"))
  whole = tmp_path / "whole"
  write_safetensors(str(whole), {f"model.vqmodel.{n}": ckpt.read(n) for n in ckpt.names()})
  with open(whole / "config.json", "w") as f:
    json.dump({"model_type": "janus", "vq_config": ckpt.config}, f)
  kwargs, variables = janus_vq.convert(HFCheckpoint(str(whole)))
  assert kwargs == janus_vq.convert(ckpt)[0]
  a, b = materialize(variables), materialize(janus_vq.convert(ckpt)[1])
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _chameleon_reference(torch):
  from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

  config = ChameleonVQVAEConfig(
    embed_dim=8,
    num_embeddings=64,
    latent_channels=16,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    resolution=32,
    attn_resolutions=[16],
  )
  return ChameleonVQVAE(config).eval()


def test_chameleon_vq_codes_and_no_decoder(torch, tmp_path):
  pytest.importorskip("transformers")
  ref = _chameleon_reference(torch)
  x = _images(torch)
  with torch.no_grad():
    _spread_codebook(torch, ref.quantize.embedding.weight, ref.quant_conv(ref.encoder(x)))
    codes_ref = ref.encode(x).image_tokens.reshape(2, 16, 16).numpy()
  ref.save_pretrained(tmp_path / "cham", safe_serialization=True)

  ckpt = HFCheckpoint(str(tmp_path / "cham"))
  assert not chameleon_vq.has_decoder(ckpt) and chameleon_vq.image_size(ckpt) == 32
  model, encode, decode = _vqlm(str(tmp_path / "cham"), chameleon_vq.convert)
  assert model.decoder == {"kind": "none"} and model.encoder["attention_levels"] == (1,)
  _check_codes(encode(_nhwc(x)), codes_ref)
  with pytest.raises(UserError, match="no decoder") as info:
    decode(codes_ref)
  assert "\n" not in str(info.value)

  # An encode-only run directory: TokenizerRun encodes, and decode refuses in one line.
  model_kwargs, variables = chameleon_vq.convert(ckpt)
  out = run_files.write_tokenizer_run(
    str(tmp_path / "run"), model_kwargs=model_kwargs, image_size=32, variables=variables
  )
  run = TokenizerRun(out)
  assert not run.has_decoder
  np.testing.assert_array_equal(run.encode(_nhwc(x)), codes_ref)
  with pytest.raises(UserError, match="no decoder") as info:
    run.decode(codes_ref)
  assert "\n" not in str(info.value)


def test_chameleon_vq_with_decoder_weights_decodes(torch, tmp_path):
  """Anole-style: decoder.* beside the encoder, in taming's order (up.0 = full resolution). The
  reference decoder is transformers' Janus VQ decoder (the same taming decoder), fed raw rows."""
  pytest.importorskip("transformers")
  from safetensors.torch import save_file

  cham, janus = _chameleon_reference(torch), _janus_reference(torch)
  x = _images(torch)
  with torch.no_grad():
    _spread_codebook(torch, cham.quantize.embedding.weight, cham.quant_conv(cham.encoder(x)))
    codes = cham.encode(x).image_tokens.reshape(2, 16, 16)
    rows = cham.quantize.embedding(codes).permute(0, 3, 1, 2)
    images_ref = _nhwc(janus.decoder(cham.post_quant_conv(rows)))
  tensors = {k: v.contiguous() for k, v in cham.state_dict().items()}
  for name, value in janus.decoder.state_dict().items():
    if name.startswith("up."):  # transformers' up.k is taming's up.(levels - 1 - k)
      k, rest = name[3:].split(".", 1)
      name = f"up.{1 - int(k)}.{rest}"
    tensors[f"decoder.{name}"] = value.contiguous()
  os.makedirs(tmp_path / "anole")
  save_file(tensors, str(tmp_path / "anole" / "model.safetensors"))
  with open(tmp_path / "anole" / "config.json", "w") as f:
    json.dump(cham.config.to_dict(), f)

  assert chameleon_vq.has_decoder(HFCheckpoint(str(tmp_path / "anole")))
  model, encode, decode = _vqlm(str(tmp_path / "anole"), chameleon_vq.convert)
  assert model.decoder["attention_levels"] == (1,) and not model.bottleneck["lookup_normalize"]
  _check_codes(encode(_nhwc(x)), codes.numpy())
  assert _max_abs(decode(codes.numpy()), images_ref) < TOL


def test_wrong_architecture_names_the_missing_tensor(tmp_path):
  write_safetensors(str(tmp_path / "x"), {"foo.weight": np.zeros((2, 2), np.float32)})
  for convert in (vqmodel.convert, janus_vq.convert, chameleon_vq.convert):
    with pytest.raises(UserError, match="encoder.conv_in.weight") as info:
      convert(HFCheckpoint(str(tmp_path / "x")))
    assert "\n" not in str(info.value)
