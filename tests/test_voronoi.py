"""Voronoi cells of 2-D codebooks (`vqlm.eval.voronoi`): exact labels, statistics, frames, GIFs,
and the snapshots of a run (a VQ with 2-D code words, random parameters, two checkpoints)."""

import flax.linen as nn
import jax
import numpy as np
from PIL import Image
import pytest

from vqlm.errors import UserError
from vqlm.eval import voronoi
from vqlm.runs import save_config
from vqlm.runs.tokenizer_run import abstract_variables, tokenizer_model
from vqlm.runtime.checkpoint import Checkpointer
from vqlm.stages.tokenizer_config import get_config


def brute_force_labels(codebook: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """The nearest code of each centre [R, R, 2], one code at a time (strict <: lower index wins)."""
  codebook = codebook.astype(np.float32)
  best = np.full(centres.shape[:2], np.inf, np.float32)
  labels = np.zeros(centres.shape[:2], np.int32)
  for k, (cx, cy) in enumerate(codebook):
    dx, dy = centres[..., 0] - cx, centres[..., 1] - cy
    d = dx * dx + dy * dy
    labels = np.where(d < best, k, labels)
    best = np.minimum(best, d)
  return labels


def test_pixel_centres_run_left_to_right_and_top_to_bottom():
  centres = voronoi.pixel_centres((0.0, 4.0, -2.0, 2.0), 4)
  assert centres.shape == (4, 4, 2) and centres.dtype == np.float32
  np.testing.assert_array_equal(centres[0, :, 0], [0.5, 1.5, 2.5, 3.5])
  np.testing.assert_array_equal(centres[:, 0, 1], [1.5, 0.5, -0.5, -1.5])
  with pytest.raises(UserError, match="x1 > x0"):
    voronoi.pixel_centres((1.0, 0.0, 0.0, 1.0), 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_labels_equal_the_brute_force_nearest_code(seed):
  rng = np.random.default_rng(seed)
  codebook = rng.normal(size=(13, 2)).astype(np.float32)
  extent = (-2.5, 2.0, -1.5, 3.0)
  labels = voronoi.voronoi_labels(codebook, extent=extent, resolution=57)
  assert labels.shape == (57, 57) and labels.dtype == np.int32
  np.testing.assert_array_equal(
    labels, brute_force_labels(codebook, voronoi.pixel_centres(extent, 57))
  )
  points = rng.normal(size=(500, 2)).astype(np.float32)
  np.testing.assert_array_equal(
    voronoi.assign(points, codebook), brute_force_labels(codebook, points[:, None])[:, 0]
  )


def test_ties_go_to_the_lower_index():
  extent = (-2.5, 2.5, -2.5, 2.5)  # Pixel centres -2, -1, 0, 1, 2: the middle column is a tie.
  for codebook in ([[-1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [-1.0, 0.0]]):
    labels = voronoi.voronoi_labels(np.array(codebook), extent=extent, resolution=5)
    np.testing.assert_array_equal(labels[:, 2], 0)
    assert set(labels[:, 0]) == {int(codebook[0][0] > 0)}
  duplicated = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
  labels = voronoi.voronoi_labels(duplicated, extent=extent, resolution=5)
  assert set(np.unique(labels)) == {0, 2}
  np.testing.assert_array_equal(
    labels, brute_force_labels(duplicated, voronoi.pixel_centres(extent, 5))
  )


def test_perplexity_of_a_uniform_assignment_is_the_number_of_codes_used():
  stats = voronoi.assignment_stats(np.repeat(np.arange(7), 5), 10)
  assert stats["perplexity"] == pytest.approx(7.0, rel=1e-12)
  assert stats["used"] == 7 and stats["usage"] == pytest.approx(0.7)
  assert voronoi.assignment_stats(np.zeros(9, int), 4)["perplexity"] == pytest.approx(1.0)


def test_a_codebook_that_is_not_2d_is_one_line():
  with pytest.raises(UserError, match=r"2-D code words \[K, 2\], got shape \(4, 3\)"):
    voronoi.voronoi_labels(np.zeros((4, 3)), extent=(0, 1, 0, 1))


def test_the_gif_has_one_frame_per_snapshot(tmp_path):
  rng = np.random.default_rng(0)
  snapshots = [
    voronoi.Snapshot(step, rng.normal(size=(6, 2)), rng.normal(size=(40, 2)) if step else None)
    for step in (0, 10, 20)
  ]
  path = str(tmp_path / "cells.gif")
  frames = voronoi.animate(snapshots, path, resolution=32, size_px=160)
  assert len(frames) == 3 and all(f.shape == (160, 160, 3) and f.dtype == np.uint8 for f in frames)
  with Image.open(path) as gif:
    assert gif.n_frames == 3 and gif.size == (160, 160)
  assert not np.array_equal(frames[1], frames[2])


def random_vq_run(workdir: str, data_dir: str, steps: tuple[int, ...]) -> str:
  """A VQ run (code_dim=2) of random parameters with one checkpoint per step; nothing trained."""
  config = get_config("size=tiny")
  config.data.data_dir = data_dir
  config.model.bottleneck.update(code_dim=2, l2_normalize=False)
  shapes = nn.meta.unbox(abstract_variables(tokenizer_model(config), 32))
  rng = np.random.default_rng(0)
  ckpt = Checkpointer(f"{workdir}/checkpoints", async_save=False)
  for step in steps:
    params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), shapes["params"])
    stats = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes["batch_stats"])
    ckpt.save(step, {"params": params, "extra": {"batch_stats": stats}})
  ckpt.wait()
  ckpt.close()
  save_config(workdir, config)
  return workdir


def test_snapshots_of_a_run_pair_saved_codebooks_with_kept_checkpoints(tiny, tmp_path):
  from vqlm.eval.latent_space import LatentSpace, image_set
  from vqlm.runs import TokenizerRun

  workdir = random_vq_run(str(tmp_path / "vq"), tiny["data"], steps=(5, 10))
  rng = np.random.default_rng(1)
  (tmp_path / "vq" / "samples").mkdir()
  for step in (0, 10):  # Step 0's checkpoint is gone; step 5 saved no codebook.
    np.save(tmp_path / "vq" / "samples" / f"codebook_{step:07d}.npy", rng.normal(size=(32, 2)))
  run = TokenizerRun(workdir, step=10)
  images = image_set(run, split="validation", num=4).images
  snapshots = voronoi.snapshots_from_run(workdir, images)
  assert [s.step for s in snapshots] == [0, 5, 10]
  assert snapshots[0].latents is None
  assert snapshots[1].latents.shape == snapshots[2].latents.shape == (4 * 8 * 8, 2)
  np.testing.assert_allclose(snapshots[1].codebook, TokenizerRun(workdir, step=5).codebook())
  np.testing.assert_array_equal(
    snapshots[2].latents, LatentSpace(run).code_space(images).reshape(-1, 2)
  )
  # The latents' nearest codes under the run's own codebook are the run's codes.
  codes = voronoi.assign(snapshots[1].latents, snapshots[1].codebook)
  np.testing.assert_array_equal(codes, TokenizerRun(workdir, step=5).encode(images).reshape(-1))
  assert len(voronoi.frames(snapshots, resolution=16, size_px=120)) == 3
