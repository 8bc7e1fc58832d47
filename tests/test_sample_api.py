import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import random_variables

from vqlm import imaging
from vqlm.commands import caption as caption_cmd
from vqlm.commands import generate as generate_cmd
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.sample import api
from vqlm.sample.processors import SamplingConfig, Settings
from vqlm.text import TextTokenizer, train_sentencepiece
from vqlm.vocab import Vocab

SIZE, GRID, K = 8, (2, 2), 16
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["square", "circle", "triangle"]


class FakeImageTokenizer:
  """A 4x4-patch palette quantiser: codes index 16 colours; decode paints the patches."""

  image_size = SIZE

  def __init__(self):
    rng = np.random.default_rng(0)
    self.palette = rng.integers(0, 256, size=(K, 3)).astype(np.uint8)
    self.grid = GRID
    self.codebook_size = K

  def codebook(self):
    return self.palette.astype(np.float32) / 127.5 - 1.0

  def decode(self, codes):
    codes = np.asarray(codes)
    patches = self.palette[codes]  # [B, h, w, 3]
    return patches.repeat(SIZE // GRID[0], axis=1).repeat(SIZE // GRID[1], axis=2)

  def encode(self, images):
    images = np.asarray(images, np.float32)
    b = images.shape[0]
    means = images.reshape(b, GRID[0], SIZE // GRID[0], GRID[1], SIZE // GRID[1], 3).mean((2, 4))
    d = ((means[..., None, :] - self.palette.astype(np.float32)) ** 2).sum(-1)
    return d.argmin(-1).astype(np.int32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  captions = [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 3
  path = train_sentencepiece(
    captions, model_prefix=str(tmp_path_factory.mktemp("sp") / "text"), vocab_size=40
  )
  tokenizer = TextTokenizer.load(path)
  vocab = Vocab(text_size=tokenizer.vocab_size, image_size=K, grid=GRID, num_reserved=2, pad_to=16)
  model = Transformer(
    TransformerConfig(
      vocab_size=vocab.padded_size,
      dim=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      image_offset=vocab.image_offset,
      image_size=K,
      grid=GRID,
    )
  )
  return FakeRun(
    model=model, params=random_variables(model)["params"], vocab=vocab, text_tokenizer=tokenizer
  )


class FakeRun:
  """What `LMRun` offers the generation API."""

  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)
    self._image_tokenizer = FakeImageTokenizer()

  def tokenizer_run(self):
    return self._image_tokenizer


@pytest.fixture(scope="module")
def gen(run):
  # The cached Generator of the run: the CLI commands below reuse its compiled loops.
  return api.generator_for(run, batch_size=4, progress=False)


def test_generate_images_shapes_codes_and_batch_independence(gen):
  prompts = ["a red square", "a blue circle"]
  images, codes = gen.generate_images(prompts, num_per_prompt=3, seed=1, return_codes=True)
  assert images.shape == (6, SIZE, SIZE, 3) and images.dtype == np.uint8
  assert codes.shape == (6, *GRID) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < K
  np.testing.assert_array_equal(images, gen.image_tokenizer.decode(codes))
  again = gen.generate_images(prompts, num_per_prompt=3, seed=1)
  np.testing.assert_array_equal(again, images)  # same seed, same images
  other = gen.generate_images(prompts, num_per_prompt=3, seed=2)
  assert not np.array_equal(other, images)
  smaller = gen.generate_images(prompts, num_per_prompt=3, seed=1, batch_size=5)
  np.testing.assert_array_equal(smaller, images)  # rows are seeded by index, not by batch


def test_generate_images_with_guidance(gen):
  prompts = ["a green triangle"]
  a = gen.generate_images(prompts, num_per_prompt=2, cfg_scale=3.0, seed=0)
  b = gen.generate_images(prompts, num_per_prompt=2, cfg_scale=3.0, seed=0)
  c = gen.generate_images(prompts, num_per_prompt=2, cfg_scale=1.5, seed=0)
  assert a.shape == (2, SIZE, SIZE, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  fn = gen.sampler._jitted[("image", GRID[0] * GRID[1] + 1, True, False, 1)]
  assert fn._cache_size() == 1  # the scale is traced


def test_caption_images_is_greedy_and_deterministic(gen):
  codes = np.arange(3 * 4).reshape(3, *GRID) % K
  images = gen.image_tokenizer.decode(codes)
  captions = gen.caption_images(images, max_len=12)
  assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
  assert captions == gen.caption_codes(codes, max_len=12)
  assert captions == api.caption_images(gen.run, images, max_len=12, batch_size=4)
  sampled = gen.caption_images(
    images,
    greedy=False,
    max_len=12,
    seed=3,
    sampling=SamplingConfig(text=Settings(temperature=1.0)),
  )
  assert len(sampled) == 3
  with pytest.raises(ValueError, match="uint8"):
    gen.caption_images(images.astype(np.float32))


def test_continue_sequence_segments_and_image_completion(gen):
  v = gen.vocab
  image = gen.image_tokenizer.decode(np.array([[[1, 2], [3, 4]]]))[0]
  prompts = [
    ["a red square", image, "a blue"],
    ["a green circle", [v.boi_id, v.image_token(5)]],
  ]  # an open run: complete it
  outs = gen.continue_sequence(prompts, max_new_tokens=12, seed=0)
  assert len(outs) == 2
  for out in outs:
    assert out.ids.ndim == 1 and 0 < len(out.ids) <= 12
    assert all(isinstance(s, (str, np.ndarray)) for s in out.segments)
  completed = outs[1].segments[0]
  assert isinstance(completed, np.ndarray) and completed.shape == (SIZE, SIZE, 3)
  # The completed image starts with the prompt's code 5 in its top-left patch.
  np.testing.assert_array_equal(completed[0, 0], gen.image_tokenizer.palette[5])
  assert outs[1].ids[3] == v.eoi_id and all(v.is_image(int(i)) for i in outs[1].ids[:3])


def test_continue_video_returns_new_frames(gen):
  frames = gen.image_tokenizer.decode(np.array([[[1, 2], [3, 4]], [[2, 3], [4, 5]]]))
  new = gen.continue_video(frames, num_new_frames=2, caption="a red square", seed=0)
  assert new.shape == (2, SIZE, SIZE, 3) and new.dtype == np.uint8
  same = gen.continue_video(frames, num_new_frames=2, caption="a red square", seed=0)
  np.testing.assert_array_equal(new, same)
  with pytest.raises(ValueError, match="num_new_frames"):
    gen.continue_video(frames, num_new_frames=0)


def test_bad_inputs_raise(gen):
  with pytest.raises(ValueError, match="list of strings"):
    gen.generate_images("a red square")
  with pytest.raises(ValueError, match="num_per_prompt"):
    gen.generate_images(["a"], num_per_prompt=0)
  with pytest.raises(ValueError, match="prompt part"):
    gen.prompt_ids([3.5])


def generate_argv(workdir, out, *extra):
  return ["vqlm generate", "--workdir", str(workdir), "--out", str(out), "--noprogress", *extra]


def test_generate_command_writes_each_image_prompts_codes_and_a_grid(
  run, gen, tmp_path, monkeypatch, capsys
):
  monkeypatch.setattr(generate_cmd, "load_run", lambda workdir, tokenizer=None: run)
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("a blue circle\n\n")
  out, grid = tmp_path / "samples", tmp_path / "grid.png"
  argv = ["--prompt", "a red square", "--prompt-file", str(prompt_file), "--num", "2"]
  argv += ["--prompt", "a green triangle", "--cfg", "2.0", "--grid", str(grid), "--npz"]
  assert generate_cmd.main(generate_argv(tmp_path, out, *argv, "--batch_size", "4")) == 0
  names = [f"{i:05d}" for i in range(6)]
  assert sorted(os.listdir(out)) == sorted(
    ["prompts.jsonl"] + [f"{n}.png" for n in names] + [f"{n}.npz" for n in names]
  )
  rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
  prompts = ["a red square", "a green triangle", "a blue circle"]  # --prompt, then the file
  assert rows == [
    {
      "file": f"{n}.png",
      "prompt": prompts[i // 2],
      "prompt_index": i // 2,
      "sample_index": i % 2,
      "codes": f"{n}.npz",
    }
    for i, n in enumerate(names)
  ]
  # Streamed in batches of 4 (the second padded), the files equal one call over all captions.
  images, codes = gen.generate_images(
    prompts, num_per_prompt=2, cfg_scale=2.0, seed=0, return_codes=True
  )
  for i, n in enumerate(names):
    np.testing.assert_array_equal(imaging.load_png(str(out / f"{n}.png")), images[i])
    np.testing.assert_array_equal(np.load(out / f"{n}.npz")["codes"], codes[i])
  assert imaging.load_png(str(grid)).shape == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2, 3)
  assert "wrote" in capsys.readouterr().out
  with pytest.raises(ValueError, match="no captions"):
    generate_cmd.main(generate_argv(tmp_path, tmp_path / "none"))
  with pytest.raises(ValueError, match="--grid"):
    generate_cmd.main(generate_argv(tmp_path, tmp_path / "x", "--prompt", "a", "--out", "x.png"))


def test_generate_command_files_do_not_depend_on_batch_size(run, tmp_path, monkeypatch):
  monkeypatch.setattr(generate_cmd, "load_run", lambda workdir, tokenizer=None: run)
  argv = ["--prompt", "a red square", "--prompt", "a green circle", "--num", "2", "--seed", "5"]
  files = {}
  for bs in (1, 4):
    out = tmp_path / f"bs{bs}"
    assert generate_cmd.main(generate_argv(tmp_path, out, *argv, "--batch_size", str(bs))) == 0
    files[bs] = {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}
  assert len(files[1]) == 5 and files[1] == files[4]  # 4 PNGs + prompts.jsonl, byte for byte


def test_generate_command_samples_in_bfloat16_on_request(run, tmp_path, monkeypatch):
  monkeypatch.setattr(generate_cmd, "load_run", lambda workdir, tokenizer=None: run)
  out = tmp_path / "bf16"
  argv = ["--prompt", "a red square", "--num", "2", "--dtype", "bfloat16"]
  assert generate_cmd.main(generate_argv(tmp_path, out, *argv)) == 0
  assert imaging.load_png(str(out / "00001.png")).shape == (SIZE, SIZE, 3)
  gen = api.generator_for(run, dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(gen.sampler.variables["params"]))
  assert api.generator_for(run) is not gen


def test_caption_command_prints_one_line_per_image(run, gen, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(caption_cmd, "load_run", lambda workdir, tokenizer=None: run)
  tok = run.tokenizer_run()
  paths = []
  for i in range(2):
    path = str(tmp_path / f"x{i}.png")
    big = tok.decode(np.full((1, *GRID), i + 1))[0].repeat(2, 0).repeat(2, 1)  # resized back
    imaging.save_png(big, path)
    paths.append(path)
  rc = caption_cmd.main(
    [
      "vqlm caption",
      "--workdir",
      str(tmp_path),
      "--image",
      paths[0],
      "--image",
      paths[1],
      "--max_len",
      "12",
      "--batch_size",
      "4",
    ]
  )
  assert rc == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split(": ")[0] for line in lines] == paths
  assert api.generator_for(run) is gen
  want = gen.caption_codes(np.stack([np.full(GRID, 1), np.full(GRID, 2)]), max_len=12)
  assert [line.split(": ", 1)[1] for line in lines] == want
