"""A trained LM loaded for use: `LMRun(workdir)`.

An LM run directory holds `config.json` (with the image tokenizer run's path, stored also relative
to the run), `vocab.json`, `text.model` (SentencePiece) and `checkpoints/`. Loading reads the
parameters alone (no optimizer state) onto a mesh of the devices present, so a run trained on a
pod samples on a laptop. `generate`, `caption` and `continue_sequence` are the Python API.
"""

from collections.abc import Sequence
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlm.errors import UserError
from vqlm.nn.transformer import Transformer, TransformerConfig
from vqlm.runs import restore
from vqlm.runs.saved_config import load_config
from vqlm.runs.tokenizer_run import TokenizerRun
from vqlm.runtime import mesh as mesh_lib
from vqlm.runtime.config import as_kwargs
from vqlm.text import TextTokenizer
from vqlm.vocab import Vocab

STAGE = "lm"
TEXT_MODEL = "text.model"
VOCAB_FILE = "vocab.json"


def transformer_config(config: ml_collections.ConfigDict, vocab: Vocab) -> TransformerConfig:
  """The model an LM config describes: its `model` section + sizes from the vocabulary."""
  kw = as_kwargs(config.model)
  if kw.get("image_embed_init") == "codebook":
    kw["codebook_dim"] = int(config.data.get("codebook_dim", 0))
  kw.update(
    vocab_size=vocab.padded_size,
    image_offset=vocab.image_offset,
    image_size=vocab.image_size,
    grid=tuple(vocab.grid),
  )
  return TransformerConfig(**kw)


def abstract_params(model: Transformer, seq_len: int) -> Any:
  """Boxed ShapeDtypeStructs of the model's params (nothing allocated)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  return jax.eval_shape(
    lambda: model.init(
      {"params": jax.random.key(0)}, tokens, positions=positions, segment_ids=jnp.ones_like(tokens)
    )
  )["params"]


def load_vocab(workdir: str) -> tuple[Vocab, TextTokenizer]:
  """The run's vocabulary and SentencePiece model, checked against each other."""
  vocab_path = os.path.join(workdir, VOCAB_FILE)
  if not os.path.exists(vocab_path):
    raise FileNotFoundError(f"{vocab_path} is missing; the LM run is incomplete, train it again")
  vocab = Vocab.load(vocab_path)
  text_tokenizer = TextTokenizer.load(os.path.join(workdir, TEXT_MODEL))
  if text_tokenizer.vocab_size != vocab.text_size:
    raise UserError(
      f"{TEXT_MODEL} in {workdir} has {text_tokenizer.vocab_size} pieces but "
      f"vocab.json expects {vocab.text_size}; restore the run's own text model"
    )
  return vocab, text_tokenizer


class LMRun:
  """A trained LM read back from its run directory: model, params, vocabulary, text tokenizer.

  Args:
    workdir: the run directory of `vqlm train --config configs/lm.py ...`.
    tokenizer: the image tokenizer run to decode with (default: the one the LM was trained with,
      found from the run's config even when the runs were moved together).
    step: the checkpoint step to load (default: the newest).
    mesh_shape: the mesh to place parameters on (default: data-parallel over all devices).
  """

  def __init__(
    self,
    workdir: str,
    *,
    tokenizer: str | None = None,
    step: int | None = None,
    mesh_shape: dict[str, int] | None = None,
  ):
    self.workdir = os.path.abspath(workdir)
    self.config = load_config(workdir)
    if self.config.get("stage") != STAGE:
      raise UserError(
        f"{workdir} is not an LM run (stage={self.config.get('stage')}); pass the "
        "run directory of `vqlm train --config configs/lm.py...`"
      )
    self.vocab, self.text_tokenizer = load_vocab(workdir)
    self.model = Transformer(transformer_config(self.config, self.vocab))
    self.mesh = restore.inference_mesh(mesh_shape)
    self.rules = mesh_lib.rules_from_config(self.config.mesh.rules)
    boxed = abstract_params(self.model, int(self.config.train.seq_len))
    target = {"params": restore.placed_abstract(boxed, self.mesh, self.rules)}
    self.step, restored = restore.restore_subtree(
      os.path.join(workdir, "checkpoints"), target, step=step
    )
    self.params = restored["params"]
    self._tokenizer_dir = tokenizer
    self._tokenizer_run = None
    self._generators = {}
    self.progress = False

  # ---- the image tokenizer ------------------------------------------------------------------

  def tokenizer_dir(self) -> str:
    """Where the image tokenizer run is: `tokenizer=` if given, else the run's recorded path."""
    path = self._tokenizer_dir or self.config.data.tokenizer
    if not path or not os.path.isdir(path):
      raise FileNotFoundError(
        f"the image tokenizer run {path!r} recorded by {self.workdir} is "
        "missing; restore it or pass --tokenizer (Python: "
        "LMRun(..., tokenizer=DIR))"
      )
    return path

  def tokenizer_run(self) -> TokenizerRun:
    """The image tokenizer this LM was trained with (to encode prompts and decode codes)."""
    if self._tokenizer_run is None:
      path = self.tokenizer_dir()
      run = TokenizerRun(path)
      if tuple(run.grid) != tuple(self.vocab.grid) or run.codebook_size != self.vocab.image_size:
        raise UserError(
          f"the image tokenizer in {path} ({run.grid} grid, {run.codebook_size} "
          f"codes) does not match this LM ({tuple(self.vocab.grid)} grid, "
          f"{self.vocab.image_size} codes); pass the tokenizer it was trained with"
        )
      self._tokenizer_run = run
    return self._tokenizer_run

  # ---- the Python API -----------------------------------------------------------------------

  def generator(self, *, batch_size: int = 8, dtype: Any = None):
    """A `vqlm.sample.Generator` over this run; one per setting is kept, so its compiled
    sampling loops are reused by later calls (and by every evaluator). Progress bars follow
    `self.progress`."""
    from vqlm.sample.api import Generator

    key = (batch_size, str(dtype))
    if key not in self._generators:
      self._generators[key] = Generator(
        self, batch_size=batch_size, progress=self.progress, dtype=dtype
      )
    self._generators[key].progress = self.progress
    return self._generators[key]

  def generate(
    self,
    prompts: Sequence[str],
    *,
    num_per_prompt: int = 1,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
  ) -> np.ndarray:
    """Text-to-image: uint8 `[len(prompts) * num_per_prompt, H, W, 3]`, prompt-major."""
    from vqlm.sample.processors import SamplingConfig, Settings

    settings = Settings(temperature=temperature, top_k=top_k, top_p=top_p)
    return self.generator().generate_images(
      prompts if isinstance(prompts, str) else list(prompts),  # the Generator refuses one str
      num_per_prompt=num_per_prompt,
      cfg_scale=cfg_scale,
      sampling=SamplingConfig(text=settings, image=settings).check(),
      seed=seed,
      batch_size=batch_size,
    )

  def caption(
    self, images: np.ndarray, *, max_len: int = 48, batch_size: int | None = None
  ) -> list[str]:
    """Image-to-text, greedy: uint8 `[N, H, W, 3]` -> N captions."""
    return self.generator().caption_images(
      np.asarray(images), max_len=max_len, batch_size=batch_size
    )

  def continue_sequence(self, prompt: Sequence[Any], *, max_new_tokens: int = 128, **kwargs: Any):
    """Continues one interleaved prompt (`str` text and uint8 `[H, W, 3]` images, in order);
    returns a `vqlm.sample.Continuation` (its `segments` are text and images)."""
    return self.generator().continue_sequence(
      [list(prompt)], max_new_tokens=max_new_tokens, **kwargs
    )[0]

  def continue_video(self, frames: np.ndarray, *, num_new_frames: int, **kwargs: Any):
    """Video continuation: uint8 frames `[T, H, W, 3]` -> `[num_new_frames, H, W, 3]`."""
    return self.generator().continue_video(
      np.asarray(frames), num_new_frames=num_new_frames, **kwargs
    )
