"""Every bottleneck (identity, gaussian, vq, fsq; with and without the GAN) trains, evaluates and
writes its artefacts through the `vqlm` command, on tiny configs (4 steps, 16 test images)."""

import json
import math
import os

import jax
import numpy as np
import pytest

from vqlm import cli, imaging

# Each case costs 12-20 s of CPU, nearly all of it compiling the train step and init. The default
# run covers every bottleneck once and the GAN on a continuous and a discrete one; the plain
# gaussian and vq runs (the same evaluation paths as their GAN runs) only run with `-m slow`.
SLOW = pytest.mark.slow
CASES = [
  pytest.param("identity", False, id="identity"),
  pytest.param("gaussian", False, id="gaussian"),
  # Discrete bottlenecks are trained and evaluated by the default suite's session fixture (VQ)
  # too; these and the GAN cases compile larger train steps, so they run with -m slow.
  pytest.param("vq", False, id="vq", marks=SLOW),
  pytest.param("fsq", False, id="fsq", marks=SLOW),
  pytest.param("gaussian", True, id="gaussian+gan", marks=SLOW),
  pytest.param("vq", True, id="vq+gan", marks=SLOW),
]
GRIDS = {"gaussian": "prior_samples.png", "identity": "random_latents.png"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny shapes data set, built once for every run of this module."""
  from vqlm.data.sources import source_from_config
  from vqlm.stages.tokenizer_config import get_config

  data = get_config("size=tiny").data
  data.data_dir = str(tmp_path_factory.mktemp("shapes"))
  source_from_config(data, "train")
  return data.data_dir


@pytest.mark.parametrize("kind,gan", CASES)
def test_bottleneck_trains_evaluates_and_writes_artefacts(kind, gan, data_dir, tmp_path, capfd):
  workdir = str(tmp_path / "run")
  argv = [
    "vqlm",
    "train",
    "--config",
    f"configs/tokenizer.py:size=tiny,bottleneck={kind}" + (",gan=True" if gan else ""),
    f"--config.data.data_dir={data_dir}",
    "--workdir",
    workdir,
    "--progress=false",
    "--config.train.steps=4",
    "--config.evals.tokenizer.num_examples=16",
    "--config.evals.tokenizer.batch_size=16",
  ]
  if gan:
    argv.append("--config.loss.disc_start=2")  # The discriminator trains from step 2 of 4.
  assert cli.main(argv) == 0
  trained = json.load(open(os.path.join(workdir, "eval.json")))["tokenizer"]
  capfd.readouterr()

  assert cli.main(["vqlm", "eval", "--workdir", workdir]) == 0
  printed = json.loads(capfd.readouterr().out)["tokenizer"]  # stdout is the JSON alone.
  result = json.load(open(os.path.join(workdir, "eval.json")))["tokenizer"]
  assert result == printed
  assert result["bottleneck"] == kind and result["num_examples"] == 16
  assert result["psnr"] == pytest.approx(trained["psnr"])  # Same run, same images.
  for key in ("psnr", "ssim"):
    assert math.isfinite(result[key])
  discrete = kind in ("vq", "fsq")
  assert ("codebook_usage" in result) == discrete
  assert ("kl" in result) == (kind == "gaussian")

  samples = os.path.join(workdir, "samples")
  written = {name for name in GRIDS.values() if os.path.exists(os.path.join(samples, name))}
  assert written == ({GRIDS[kind]} if kind in GRIDS else set())
  for name in written:  # 16 decoded 32x32 images, 8 per row, shown at twice their size.
    assert imaging.load_png(os.path.join(samples, name)).shape == (2 * 66 + 2, 8 * 66 + 2, 3)

  if gan:
    lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    last = [m for m in map(json.loads, lines) if "train/d_loss" in m][-1]
    assert last["train/disc_active"] == 1.0
    assert math.isfinite(last["train/g_loss"]) and math.isfinite(last["train/d_loss"])
    assert 0.0 < last["train/d_weight"] < 1e4  # The adaptive weight at the decoder's last conv.

  if kind == "gaussian":
    _check_kl_is_the_bottlenecks(workdir, result["kl"])


def _check_kl_is_the_bottlenecks(workdir: str, kl: float) -> None:
  """The evaluator's KL (from `TokenizerRun.posterior`) is the bottleneck's own "kl" term."""
  from vqlm.data.sources import source_from_config
  from vqlm.runs import TokenizerRun

  run = TokenizerRun(workdir)
  source = source_from_config(run.config.data, "test")
  images = np.stack([source[i]["image"] for i in range(16)])
  mean, _ = run.posterior(images)
  np.testing.assert_array_equal(mean, run.encode_latent(images))
  forward = jax.jit(lambda v, x: run.model.apply(v, x, train=False)[1]["kl"])
  assert kl > 0 and kl == pytest.approx(float(forward(run.variables, images / 127.5 - 1.0)), 1e-4)
