"""Latent-space tools (`vqlm.eval.latent_space`, `vqlm latent`) on the tiny VQ run, and on an
autoencoder and a VAE of random parameters (no training: the tools only need
a run directory with a config and a checkpoint)."""

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from vqlm import cli
from vqlm.errors import UserError
from vqlm.eval.latent_space import ImageSet, LatentSpace, image_set, nearest
from vqlm.runs import TokenizerRun, save_config
from vqlm.runs.tokenizer_run import abstract_variables, tokenizer_model
from vqlm.runtime.checkpoint import Checkpointer
from vqlm.stages.tokenizer_config import get_config


def random_run(workdir: str, arg: str, data_dir: str, *, steps=(0,), **bottleneck) -> str:
  """A tokenizer run directory of random parameters (nothing compiled: shapes from
  `eval_shape`), one checkpoint per step; `bottleneck` overrides the config's bottleneck."""
  config = get_config(f"size=tiny,{arg}")
  config.data.data_dir = data_dir
  config.model.bottleneck.update(bottleneck)
  shapes = nn.meta.unbox(abstract_variables(tokenizer_model(config), 32))
  rng = np.random.default_rng(0)
  state = {
    "params": jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), shapes["params"])
  }
  if "batch_stats" in shapes:
    state["extra"] = {
      "batch_stats": jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes["batch_stats"])
    }
  ckpt = Checkpointer(f"{workdir}/checkpoints", async_save=False)
  for step in steps:
    ckpt.save(step, state)
  ckpt.wait()
  ckpt.close()
  save_config(workdir, config)
  return workdir


@pytest.fixture(scope="module")
def vq(tiny):
  run = TokenizerRun(tiny["tok"])
  return LatentSpace(run, batch_size=16), image_set(run, num=48)


@pytest.fixture(scope="module", params=["identity", "gaussian"])
def continuous(request, tiny, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp(request.param))
  run = TokenizerRun(random_run(workdir, f"bottleneck={request.param}", tiny["data"]))
  return LatentSpace(run, batch_size=16), image_set(run, num=16)


def test_neighbors_of_a_set_image_start_with_itself_and_match_brute_force(vq):
  space, images = vq
  picked = [3, 10, 47]
  found = space.neighbors(images.images[picked], images.images, k=4)
  assert found.indices.shape == found.distances.shape == (3, 4)
  assert found.indices.dtype == np.int32 and found.distances.dtype == np.float32
  np.testing.assert_array_equal(found.indices[:, 0], picked)
  np.testing.assert_array_equal(found.distances[:, 0], 0.0)
  pooled = space.latents(images.images).astype(np.float64).mean(axis=(1, 2))
  brute = np.linalg.norm(pooled[picked][:, None] - pooled[None], axis=-1)
  order = np.argsort(brute, axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(found.indices, order)
  np.testing.assert_allclose(found.distances, np.take_along_axis(brute, order, 1), atol=1e-6)


def test_nearest_breaks_ties_to_the_lower_index_and_refuses_a_large_k():
  pool = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], np.float32)
  found = nearest(np.zeros((1, 2), np.float32), pool, 4)
  np.testing.assert_array_equal(found.indices, [[1, 3, 0, 2]])
  np.testing.assert_array_equal(found.distances, [[0, 0, 1, 1]])
  with pytest.raises(UserError, match="k=5 is larger than the set of 4 images"):
    nearest(pool, pool, 5)
  with pytest.raises(UserError, match="k=0"):
    nearest(pool, pool, 0)


def test_interpolation_ends_are_the_reconstructions(vq):
  space, images = vq
  a, b = images.images[0], images.images[1]
  frames = space.interpolate(a, b, num=5)
  assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
  recon = space.run.reconstruct(images.images[:2]).astype(np.int32)
  assert np.abs(frames[0] - recon[0]).max() <= 1
  assert np.abs(frames[-1] - recon[1]).max() <= 1
  with pytest.raises(UserError, match="num=1"):
    space.interpolate(a, b, num=1)


def test_continuous_runs_interpolate_and_sample(continuous):
  space, images = continuous
  frames = space.interpolate(images.images[0], images.images[1], num=3)
  recon = space.run.reconstruct(images.images[:2]).astype(np.int32)
  assert frames.shape == (3, 32, 32, 3)
  assert np.abs(frames[0] - recon[0]).max() <= 1 and np.abs(frames[-1] - recon[1]).max() <= 1
  reference = images.images
  first = space.sample(4, seed=1, reference=reference)
  assert first.shape == (4, 32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, space.sample(4, seed=1, reference=reference))
  z = space.random_latents(4, seed=1, reference=reference)
  if space.kind == "gaussian":
    np.testing.assert_array_equal(z, space.run.sample_prior(4, seed=1))
  else:
    with pytest.raises(UserError, match="no prior"):
      space.sample(4)
    mean, std = space.latent_statistics(reference)
    flat = space.latents(reference).reshape(-1, z.shape[-1])
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(first, space.decode(z))


def test_attribute_vector_is_the_mean_difference(vq):
  space, images = vq
  red, blue = images.select("caption:red"), images.select("caption:blue")
  assert all("red" in images.texts[i] for i in images.indices("caption:red"))
  vector = space.attribute_vector(red, blue)
  assert vector.shape == (8, 8, 8) and vector.dtype == np.float32
  direct = space.latents(red).mean(0) - space.latents(blue).mean(0)
  np.testing.assert_allclose(vector, direct, rtol=1e-5, atol=1e-6)
  queries = images.images[:2]
  edited = space.attribute(queries, vector, strength=2.0)
  assert edited.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(edited, space.decode(space.latents(queries) + 2.0 * vector))
  with pytest.raises(UserError, match="shape"):
    space.attribute(queries, vector[:4])


def test_region_attribute_vector_is_the_mean_over_masked_positions(vq):
  space, images = vq
  red, blue = images.select("caption:red"), images.select("caption:blue")
  pixels = np.zeros((len(red), 32, 32), bool)
  pixels[:, 5, 9] = True  # one pixel -> the latent position (1, 2) of the 4x4 patches
  pixels[0, 30, 31] = True  # and (7, 7) in the first image only
  masks = space.region_masks(pixels)
  assert masks.shape == (len(red), 8, 8) and masks.sum() == len(red) + 1
  assert masks[:, 1, 2].all() and masks[0, 7, 7]
  blue_masks = np.ones((len(blue), 8, 8), bool)
  vector = space.attribute_vector(red, blue, with_masks=masks, without_masks=blue_masks)
  z_red, z_blue = space.latents(red), space.latents(blue)
  direct = z_red[masks].mean(0) - z_blue.reshape(-1, z_blue.shape[-1]).mean(0)
  assert vector.shape == (8,) and vector.dtype == np.float32
  np.testing.assert_allclose(vector, direct, rtol=1e-5, atol=1e-6)
  queries = images.images[:2]
  where = np.zeros((2, 8, 8), bool)
  where[:, :4] = True
  edited = space.attribute(queries, vector, strength=1.5, masks=where)
  z = space.latents(queries)
  np.testing.assert_array_equal(edited, space.decode(z + 1.5 * vector * where[..., None]))
  with pytest.raises(UserError, match="both groups"):
    space.attribute_vector(red, blue, with_masks=masks)
  with pytest.raises(UserError, match="no latent position"):
    space.attribute_vector(red, blue, with_masks=masks, without_masks=~blue_masks)
  with pytest.raises(UserError, match="do not tile"):
    space.region_masks(np.zeros((1, 30, 30), bool))


def test_discrete_samples_are_random_codes_fixed_by_the_seed(vq):
  space, _ = vq
  images = space.sample(3, seed=7)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, space.sample(3, seed=7))
  codes = space.random_codes(3, seed=7)
  assert codes.shape == (3, 8, 8) and codes.max() < space.run.codebook_size
  np.testing.assert_array_equal(images, space.run.decode(codes))
  assert not np.array_equal(codes, space.random_codes(3, seed=8))


def test_groups_by_caption_and_indices():
  images = ImageSet(np.zeros((6, 4, 4, 3), np.uint8), ["a Red x", "blue", "red", "", "b", "c"], "s")
  np.testing.assert_array_equal(images.indices("caption:red"), [0, 2])
  np.testing.assert_array_equal(images.indices("0, 2-4"), [0, 2, 3, 4])
  for bad, message in (("caption:green", "no caption"), ("7", "outside"), ("x", "not a group")):
    with pytest.raises(UserError, match=message):
      images.indices(bad)


def _png(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def test_the_command_writes_each_mode(tiny, tmp_path, capsys):
  tok = tiny["tok"]
  base = ["vqlm", "latent", "--workdir", tok, "--num_images", "24", "--batch_size", "8"]
  side = 2 * 32 + 2  # Images at twice their size, 2 pixels of padding.
  cases = {
    "neighbors": (["--k", "3", "--query", "5"], (side + 2, 4 * side + 2)),
    "interpolate": (["--frames", "4"], (side + 2, 4 * side + 2)),
    "attribute": (["--add", "caption:red", "--subtract", "0-5"], (side + 2, 2 * side + 2)),
    "sample": (["--num", "3"], (side + 2, 3 * side + 2)),
  }
  for mode, (flags, shape) in cases.items():
    out = tmp_path / f"{mode}.png"
    argv = base[:2] + [mode] + base[2:] + flags + ["--out", str(out)]
    assert cli.main(argv) == 0, mode
    assert _png(out).shape == (*shape, 3), mode
  printed = capsys.readouterr().out
  assert "query 5: 5 (0)," in printed and f"wrote {tmp_path / 'sample.png'}" in printed


def test_the_command_help_and_one_line_errors(tiny, tmp_path, capsys):
  for argv in (["--help"], ["neighbors", "-h"]):
    assert cli.main(["vqlm", "latent", *argv]) == 0
    assert capsys.readouterr().out.startswith("usage: vqlm latent")
  tok = tiny["tok"]
  cases = {
    ("bogus", "--workdir", tok): "unknown mode 'bogus'",
    ("neighbors",): "--workdir is required",
    ("neighbors", "--workdir", str(tmp_path / "none")): "does not exist",
    ("neighbors", "--workdir", tok, "--num_images", "4", "--k", "9"): "k=9 is larger than",
    ("--workdir", tok): "give a mode",
    ("attribute", "--workdir", tok): "needs --add",
    ("voronoi", "--workdir", tok, "--num_images", "4"): "2-D code words",
  }
  for argv, message in cases.items():
    assert cli.main(["vqlm", "latent", *argv]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vqlm: error:"), err
    assert message in err, (argv, err)
