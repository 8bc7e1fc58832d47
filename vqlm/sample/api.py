"""Generation from a trained LM run: text-to-image, captioning, interleaved and video continuation.

`Generator(run)` wraps a run (anything with `model`, `params`, `vocab`, `text_tokenizer` and
`tokenizer_run()`, e.g. `vqlm.runs.LMRun`) in one `Sampler` whose compiled loops are
reused across calls. Batches have a fixed size (the last one is padded with inactive rows) and
prompt lengths are bucketed, so a call never recompiles for a new prompt. Row `i` of a call draws
with seed `(seed, i)`: results do not depend on `batch_size`. A tqdm bar runs over batches.

The module functions (`generate_images(run, ...)`, ...) reuse one Generator per run object.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any
import weakref

import numpy as np
from tqdm.auto import tqdm

from vqlm.errors import UserError
from vqlm.sample import constraints as cons
from vqlm.sample import video
from vqlm.sample.processors import GREEDY, SamplingConfig
from vqlm.sample.sampler import Sampler, pad_uncond_prompts
from vqlm.vocab import Vocab

Part = str | np.ndarray | Sequence[int]
# Unconditional prompts of classifier-free guidance: "drop" = `<bos> <boi>` (the caption dropped,
# as vqlm trains with caption dropout); "pad" = the prompt with every id but `<bos>` / `<boi>`
# replaced by `<pad>` (Janus's; an imported run records it as `source.cfg_uncond`).
CFG_UNCOND = ("drop", "pad")


def run_cfg_uncond(run: Any) -> str:
  """The unconditional-prompt style a run was trained with: its config's `source.cfg_uncond`
  (set by importers, e.g. Janus: "pad"), else "drop"."""
  config = getattr(run, "config", None)
  source = config.get("source", None) if hasattr(config, "get") else None
  value = source.get("cfg_uncond", None) if hasattr(source, "get") else None
  return value if value in CFG_UNCOND else "drop"


@dataclasses.dataclass(frozen=True)
class Continuation:
  """One generated continuation.

  Attributes:
    ids: int32 generated unified ids (up to and including the stop token).
    segments: the generated content in order: `str` text runs and uint8 `[H, W, 3]` images (an
      image the prompt left open is completed with the prompt's codes).
    text: the generated ids rendered with specials (`"a red<boi><img:3>...<eoi><eos>"`).
  """

  ids: np.ndarray
  segments: list[str | np.ndarray]
  text: str


class Generator:
  """Generation with one LM run.

  Args:
    run: an LM run (`LMRun`) or any object with `model`, `params`, `vocab`, `text_tokenizer` and
      `tokenizer_run()` (the image tokenizer: `encode(uint8 [B,H,W,3]) -> codes [B,h,w]`,
      `decode(codes) -> uint8 images`, `codebook()`). `mesh` and `rules` attributes make
      sampling run on its mesh.
    batch_size: rows per sampler call.
    progress: show a progress bar over batches.
    image_tokenizer: use this image tokenizer instead of `run.tokenizer_run()`.
    dtype: sampling compute dtype (`Sampler`'s; None: the model's own).
    cfg_uncond: "drop" | "pad" (`CFG_UNCOND`), the unconditional prompts of guidance; None: the
      run's own (`run_cfg_uncond`).
  """

  def __init__(
    self,
    run: Any,
    *,
    batch_size: int = 8,
    progress: bool = True,
    image_tokenizer: Any = None,
    dtype: Any = None,
    cfg_uncond: str | None = None,
  ):
    if batch_size <= 0:
      raise UserError(f"batch_size={batch_size} must be >= 1.")
    if cfg_uncond is not None and cfg_uncond not in CFG_UNCOND:
      raise UserError(f"cfg_uncond={cfg_uncond!r}; use one of {CFG_UNCOND}.")
    self.cfg_uncond = cfg_uncond or run_cfg_uncond(run)
    self.run = run
    self.vocab: Vocab = run.vocab
    self.text_tokenizer = run.text_tokenizer
    self.batch_size = batch_size
    self.progress = progress
    self._image_tokenizer = image_tokenizer
    variables = {"params": run.params}
    if run.model.config.image_embed_init == "codebook":
      codebook = np.asarray(self.image_tokenizer.codebook(), np.float32)
      variables["codebook"] = {"embed": {"vectors": codebook}}
    self.sampler = Sampler(
      run.model,
      variables,
      self.vocab,
      mesh=getattr(run, "mesh", None),
      rules=getattr(run, "rules", None),
      dtype=dtype,
    )

  @property
  def image_tokenizer(self) -> Any:
    if self._image_tokenizer is None:
      self._image_tokenizer = self.run.tokenizer_run()
    return self._image_tokenizer

  # ---- prompts ------------------------------------------------------------------------------

  def text_ids(self, text: str) -> list[int]:
    return self.vocab.encode_text(self.text_tokenizer, text)

  def image_ids(self, codes: np.ndarray) -> list[int]:
    """`[h, w]` codes -> `<boi> ids <eoi>`."""
    codes = self.vocab.check_codes(codes)
    return [
      self.vocab.boi_id,
      *self.vocab.image_token(codes.reshape(-1)).tolist(),
      self.vocab.eoi_id,
    ]

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[N, H, W, 3]` -> codes `[N, h, w]` with the image tokenizer (checked)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise UserError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}.")
    return self.vocab.check_codes(self.image_tokenizer.encode(images))

  def prompt_ids(self, parts: Sequence[Part]) -> list[int]:
    """`<bos>` + parts: `str` text, uint8 `[H, W, 3]` image, integer `[h, w]` codes (each image
    wrapped in `<boi> ... <eoi>`), or a 1-D integer sequence of raw unified ids (e.g.
    `[boi, code ids...]` to leave a run open for image completion)."""
    ids = [self.vocab.bos_id]
    for part in parts:
      if isinstance(part, str):
        ids += self.text_ids(part)
        continue
      arr = np.asarray(part)
      if arr.ndim == 3 and arr.dtype == np.uint8:
        ids += self.image_ids(self.encode_images(arr[None])[0])
      elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        ids += self.image_ids(arr)
      elif arr.ndim == 1 and (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        ids += [int(i) for i in arr]
      else:
        raise UserError(
          f"prompt part of type {type(part).__name__} and shape {arr.shape}: use "
          "str, uint8 [H, W, 3] images, int [h, w] codes or 1-D int ids."
        )
    return ids

  def uncond_ids(self, prompts: list[list[int]]) -> list[list[int]]:
    """The unconditional guidance prompts of `prompts` (`cfg_uncond`'s style)."""
    if self.cfg_uncond == "pad":
      return pad_uncond_prompts(prompts, self.vocab)
    return [[self.vocab.bos_id, self.vocab.boi_id]] * len(prompts)

  def _check_reads_images(self, what: str) -> None:
    """A one-line refusal where the model would have to read an image it cannot see."""
    if getattr(self.run.model.config, "gen_embed_dim", 0):
      raise UserError(
        f"{what}: this LM (Janus) reads images only through its SigLIP encoder, which vqlm does "
        "not import; it draws images and writes text, use a vqlm-trained or Chameleon run to "
        "describe images"
      )

  # ---- batching -----------------------------------------------------------------------------

  def _run_batches(
    self,
    prompts: list[list[int]],
    *,
    desc: str,
    batch_size: int | None,
    first_row: int = 0,
    **kwargs,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Samples all prompts in fixed-size batches; returns `(tokens [N, T], lengths [N])`. Row `i`
    draws with seed `(seed, first_row + i)`."""
    bs = batch_size or self.batch_size
    if bs <= 0:
      raise UserError(f"batch_size={bs} must be >= 1.")
    uncond = kwargs.pop("uncond_prompts", None)
    num_images = np.broadcast_to(np.asarray(kwargs.pop("num_images", 1)), (len(prompts),))
    tokens, lengths = [], []
    starts = range(0, len(prompts), bs)
    for start in tqdm(starts, desc=desc, disable=not self.progress, unit="batch"):
      stop = min(start + bs, len(prompts))
      out = self.sampler(
        prompts[start:stop],
        batch_size=bs,
        row_seeds=range(first_row + start, first_row + stop),
        uncond_prompts=None if uncond is None else uncond[start:stop],
        num_images=num_images[start:stop],
        **kwargs,
      )
      tokens.append(out.tokens)
      lengths.append(out.lengths)
    return np.concatenate(tokens), np.concatenate(lengths)

  def _image_runs(self, ids: Sequence[int]) -> list[np.ndarray]:
    """Complete image runs of an id sequence -> code grids `[h, w]`."""
    grids, run = [], None
    h, w = self.vocab.grid
    for i in ids:
      if i == self.vocab.boi_id:
        run = []
      elif run is not None and self.vocab.is_image(int(i)):
        run.append(int(i) - self.vocab.image_offset)
      else:
        if run is not None and len(run) == h * w:
          grids.append(np.asarray(run, np.int32).reshape(h, w))
        run = None
    if run is not None and len(run) == h * w:
      grids.append(np.asarray(run, np.int32).reshape(h, w))
    return grids

  def _decode(self, codes: np.ndarray) -> np.ndarray:
    if len(codes) == 0:
      return np.zeros((0,), np.uint8)
    return np.asarray(self.image_tokenizer.decode(np.asarray(codes, np.int32)), np.uint8)

  # ---- tasks --------------------------------------------------------------------------------

  def generate_images(
    self,
    prompts: Sequence[str],
    *,
    num_per_prompt: int = 1,
    cfg_scale: float | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    return_codes: bool = False,
    first_row: int = 0,
  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Text-to-image: `num_per_prompt` images per caption, prompt-major order.

    Args:
      prompts: captions (`<bos> caption <boi>` is the model's prompt).
      num_per_prompt: images per caption.
      cfg_scale: classifier-free guidance scale (None or 1.0: none). The unconditional prompt is
        `<bos> <boi>` (the caption dropped, as in training with caption dropout), or with
        `cfg_uncond="pad"` the prompt with the caption's ids replaced by `<pad>` (Janus's).
      sampling: text/image settings (default temperature 1, no top-k/top-p).
      seed: base seed; image `i` uses `(seed, i)`.
      batch_size: rows per sampler call (default: the Generator's).
      return_codes: also return the code grids.
      first_row: this call's images are rows `first_row ...` of a longer list (seeds
        `(seed, first_row + i)`), so drawing a long list slice by slice gives the images of one
        call.
    Returns:
      uint8 `[N, H, W, 3]` with `N = len(prompts) * num_per_prompt` (and int32 codes `[N, h, w]`).
    """
    if isinstance(prompts, str):
      raise UserError("prompts must be a list of strings, not one string; wrap it in a list.")
    prompts = list(prompts)
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
      raise UserError(
        f"prompts[{bad}] has type {type(prompts[bad]).__name__}; captions are strings."
      )
    if num_per_prompt <= 0:
      raise UserError(f"num_per_prompt={num_per_prompt} must be >= 1.")
    v = self.vocab
    rows = [[v.bos_id, *self.text_ids(p), v.boi_id] for p in prompts for _ in range(num_per_prompt)]
    if not rows:
      raise UserError("no prompts given; pass at least one caption.")
    return self.draw_ids(
      rows,
      cfg_scale=cfg_scale,
      sampling=sampling,
      seed=seed,
      batch_size=batch_size,
      return_codes=return_codes,
      first_row=first_row,
    )

  def draw_ids(
    self,
    rows: list[list[int]],
    *,
    cfg_scale: float | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    return_codes: bool = False,
    first_row: int = 0,
    uncond_prompts: list[list[int]] | None = None,
  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One image per prompt of unified ids (each `<bos> ... <boi>`; `generate_images`' core,
    the same seeding and guidance): uint8 `[N, H, W, 3]` (and int32 codes `[N, h, w]`).
    `uncond_prompts`: guidance's unconditional prompt per row (default `uncond_ids(rows)`)."""
    v = self.vocab
    bad = next((i for i, r in enumerate(rows) if not len(r) or r[-1] != v.boi_id), None)
    if bad is not None:
      raise UserError(f"image prompt {bad} does not end with <boi>; end each prompt with it.")
    use_cfg = cfg_scale is not None and float(cfg_scale) != 1.0
    tokens, _ = self._run_batches(
      rows,
      desc="images",
      batch_size=batch_size,
      first_row=first_row,
      mode="image",
      max_new_tokens=v.tokens_per_image + 1,
      sampling=sampling,
      seed=seed,
      cfg_scale=float(cfg_scale) if use_cfg else None,
      uncond_prompts=(uncond_prompts or self.uncond_ids(rows)) if use_cfg else None,
    )
    hw = v.tokens_per_image
    codes = (tokens[:, :hw] - v.image_offset).reshape(len(rows), *v.grid).astype(np.int32)
    images = self._decode(codes)
    return (images, codes) if return_codes else images

  def caption_images(
    self,
    images: np.ndarray,
    *,
    greedy: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    max_len: int = 48,
    batch_size: int | None = None,
  ) -> list[str]:
    """Image-to-text: uint8 `[N, H, W, 3]` -> N captions (greedy by default)."""
    self._check_reads_images("captioning")
    codes = self.encode_images(images)
    return self.caption_codes(
      codes, greedy=greedy, sampling=sampling, seed=seed, max_len=max_len, batch_size=batch_size
    )

  def caption_codes(
    self,
    codes: np.ndarray,
    *,
    greedy: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    max_len: int = 48,
    batch_size: int | None = None,
  ) -> list[str]:
    """Image-to-text from code grids `[N, h, w]` (prompt `<bos> <boi> codes <eoi>`)."""
    self._check_reads_images("captioning")
    codes = self.vocab.check_codes(codes)
    if codes.ndim != 3:
      raise UserError(f"codes must be [N, h, w], got shape {codes.shape}.")
    rows = [[self.vocab.bos_id, *self.image_ids(c)] for c in codes]
    return self.write_ids(
      rows,
      greedy=greedy,
      sampling=sampling,
      seed=seed,
      max_len=max_len,
      batch_size=batch_size,
      desc="captions",
    )

  def write_ids(
    self,
    rows: list[list[int]],
    *,
    greedy: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    max_len: int = 48,
    batch_size: int | None = None,
    desc: str = "texts",
  ) -> list[str]:
    """The text after each prompt of unified ids (mode "text": up to `max_len` ids, ending at
    `<eos>`; `caption_codes`' core), stripped; greedy by default. Row `i` uses seed
    `(seed, i)`."""
    if greedy:
      if sampling is not None:
        raise UserError("greedy=True ignores `sampling`; pass greedy=False to sample.")
      sampling = SamplingConfig(text=GREEDY, image=GREEDY)
    tokens, lengths = self._run_batches(
      rows,
      desc=desc,
      batch_size=batch_size,
      mode="text",
      max_new_tokens=max_len,
      sampling=sampling,
      seed=seed,
    )
    return [
      self.vocab.decode_text(self.text_tokenizer, t[:n]).strip() for t, n in zip(tokens, lengths)
    ]

  def continue_sequence(
    self,
    prompts: Sequence[Sequence[Part]],
    *,
    max_new_tokens: int = 128,
    mode: str = "interleaved",
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    cfg_scale: float | None = None,
    uncond_prompts: Sequence[Sequence[Part]] | None = None,
    num_images: int = 1,
    batch_size: int | None = None,
  ) -> list[Continuation]:
    """Continues mixed prompts (see `prompt_ids` for the parts) in any sampler mode.

    Every image run opened (or left open by the prompt) is completed with exactly `h*w` codes.
    """
    if mode not in cons.MODES:
      raise UserError(f"mode={mode!r} is not one of {cons.MODES}.")
    rows = [self.prompt_ids(p) for p in prompts]
    if not rows:
      raise UserError("no prompts given; pass at least one prompt.")
    if any(self.vocab.eoi_id in r for r in rows):
      self._check_reads_images("continuing a prompt that holds an image")
    uncond = None
    if cfg_scale is not None:
      uncond = (
        self.uncond_ids(rows)
        if uncond_prompts is None
        else [self.prompt_ids(p) for p in uncond_prompts]
      )
    tokens, lengths = self._run_batches(
      rows,
      desc="sequences",
      batch_size=batch_size,
      mode=mode,
      max_new_tokens=max_new_tokens,
      sampling=sampling,
      seed=seed,
      cfg_scale=cfg_scale,
      uncond_prompts=uncond,
      num_images=num_images,
    )
    return [self._continuation(prompt, t[:n]) for prompt, t, n in zip(rows, tokens, lengths)]

  def _continuation(self, prompt: list[int], ids: np.ndarray) -> Continuation:
    v = self.vocab
    full = list(prompt) + [int(i) for i in ids]
    start = len(prompt)
    # Cut at the start of the prompt's open image run, if any, so the run is decoded whole.
    open_at = max((i for i, t in enumerate(prompt) if t == v.boi_id), default=-1)
    if open_at >= 0 and v.eoi_id not in prompt[open_at:]:
      start = open_at
    segments, text_run, i = [], [], start
    while i < len(full):
      t = full[i]
      if t == v.boi_id:
        if text_run:
          segments.append(v.decode_text(self.text_tokenizer, text_run))
          text_run = []
        end = i + 1 + v.tokens_per_image
        grids = self._image_runs(full[i : end + 1])
        if grids:
          segments.append(self._decode(grids[0][None])[0])
        i = end + 1
        continue
      if t < v.text_size:
        text_run.append(t)
      i += 1
    if text_run:
      segments.append(v.decode_text(self.text_tokenizer, text_run))
    return Continuation(
      ids=np.asarray(ids, np.int32),
      segments=segments,
      text=v.decode_text(self.text_tokenizer, ids, keep_specials=True),
    )

  def continue_video(
    self,
    frames: np.ndarray,
    *,
    num_new_frames: int,
    caption: str = "",
    cfg_scale: float | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
  ) -> np.ndarray:
    """Video continuation of one clip: uint8 frames `[T, H, W, 3]` -> `[num_new_frames, H, W, 3]`
    (`continue_videos` with this clip alone)."""
    return self.continue_videos(
      [frames],
      num_new_frames=num_new_frames,
      captions=[caption],
      cfg_scale=cfg_scale,
      sampling=sampling,
      seed=seed,
      batch_size=1,
    )[0]

  def continue_videos(
    self,
    frames: Sequence[np.ndarray] | np.ndarray,
    *,
    num_new_frames: int,
    captions: Sequence[str] | None = None,
    cfg_scale: float | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
  ) -> np.ndarray:
    """Video continuation of N clips: each uint8 `[T_i, H, W, 3]` (T_i may be 0: text-to-video)
    -> uint8 `[N, num_new_frames, H, W, 3]` (`vqlm.sample.video.continue_videos`)."""
    return video.continue_videos(
      self,
      frames,
      num_new_frames=num_new_frames,
      captions=captions,
      cfg_scale=cfg_scale,
      sampling=sampling,
      seed=seed,
      batch_size=batch_size,
    )


_GENERATORS: "weakref.WeakKeyDictionary[Any, dict[str, Generator]]" = weakref.WeakKeyDictionary()


def generator_for(run: Any, **kwargs) -> Generator:
  """The cached Generator of `run` (one per run object and `dtype`, so compiled loops are
  reused)."""
  try:
    per_run = _GENERATORS.setdefault(run, {})
  except TypeError:  # Not weak-referenceable: no caching.
    return Generator(run, **kwargs)
  key = str(kwargs.get("dtype"))
  if key not in per_run:
    per_run[key] = Generator(run, **kwargs)
  return per_run[key]


def generate_images(
  run: Any, prompts: Sequence[str], **kwargs: Any
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """`Generator.generate_images` with the run's cached Generator (same keyword arguments)."""
  return generator_for(run).generate_images(prompts, **kwargs)


def caption_images(run: Any, images: np.ndarray, **kwargs: Any) -> list[str]:
  """`Generator.caption_images` with the run's cached Generator."""
  return generator_for(run).caption_images(images, **kwargs)


def continue_sequence(
  run: Any, prompts: Sequence[Sequence[Part]], **kwargs: Any
) -> list[Continuation]:
  """`Generator.continue_sequence` with the run's cached Generator."""
  return generator_for(run).continue_sequence(prompts, **kwargs)


def continue_video(run: Any, frames: np.ndarray, **kwargs: Any) -> np.ndarray:
  """`Generator.continue_video` with the run's cached Generator."""
  return generator_for(run).continue_video(frames, **kwargs)


__all__ = [
  "Continuation",
  "Generator",
  "caption_images",
  "continue_sequence",
  "continue_video",
  "generate_images",
  "generator_for",
]
