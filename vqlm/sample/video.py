"""Video continuation: clips of given frames (and captions) -> their next frames.

A clip of frames `f_1 .. f_T` (uint8 `[T, H, W, 3]`, encoded by the run's image tokenizer) is the
prompt `<bos> caption <boi> f_1 <eoi> <frame> ... <boi> f_T <eoi>` (the video layout of
`vqlm.data.sequences`; with no frames, `<bos> caption <boi>`: text-to-video). The sampler's
"video" mode then forces `<frame> <boi>` before each new frame and `<eos>` after the last.
`Generator.continue_video` / `continue_videos` call `continue_videos` here.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from vqlm.errors import UserError
from vqlm.sample import constraints as cons
from vqlm.sample.processors import SamplingConfig


def continue_videos(
  generator: Any,
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
  -> uint8 `[N, num_new_frames, H, W, 3]`.

  Clip `i`'s prompt is `<bos> caption_i <boi> f_1 <eoi> <frame> ... <boi> f_T <eoi>` (with no
  frames, `<bos> caption_i <boi>`); the sampler then forces `<frame> <boi>` before each new frame
  and `<eos>` after the last. Clip `i` draws with seed `(seed, i)`, so results do not depend on
  `batch_size`. With `cfg_scale`, the unconditional prompts drop the captions.

  Args:
    frames: the given frames of each clip (a list, or an array `[N, T, H, W, 3]`).
    num_new_frames: frames to generate per clip.
    captions: one per clip (None: no captions).
    batch_size: rows per sampler call (default: the Generator's).
  """
  if num_new_frames <= 0:
    raise UserError(f"num_new_frames={num_new_frames} must be >= 1.")
  clips = [np.asarray(f) for f in frames]
  if not clips:
    raise UserError("no clips given; pass at least one clip of frames [T, H, W, 3].")
  bad = next((i for i, c in enumerate(clips) if len(c) and c.ndim != 4), None)
  if bad is not None:
    raise UserError(f"clip {bad} has shape {clips[bad].shape}; pass frames [T, H, W, 3].")
  captions = [""] * len(clips) if captions is None else list(captions)
  if len(captions) != len(clips):
    raise UserError(f"{len(captions)} captions for {len(clips)} clips; pass one per clip.")
  v = generator.vocab
  given = [c for c in clips if len(c)]
  all_codes = generator.encode_images(np.concatenate(given)) if given else None
  codes, at = [], 0
  for c in clips:
    codes.append(all_codes[at : at + len(c)] if len(c) else np.zeros((0, *v.grid), np.int32))
    at += len(c)

  def build(text: str, clip_codes: np.ndarray) -> list[int]:
    ids = [v.bos_id, *(generator.text_ids(text) if text else [])]
    for t, c in enumerate(clip_codes):
      ids += ([v.frame_id] if t else []) + generator.image_ids(c)
    if not len(clip_codes):
      ids.append(v.boi_id)
    return ids

  prompts = [build(text, c) for text, c in zip(captions, codes)]
  spec = cons.Spec.from_vocab(v, "video")
  state = cons.initial_state(spec, prompts, num_images=num_new_frames)
  use_cfg = cfg_scale is not None and float(cfg_scale) != 1.0
  tokens, lengths = generator._run_batches(
    prompts,
    desc="video",
    batch_size=batch_size,
    mode="video",
    max_new_tokens=cons.min_new_tokens(spec, state),
    sampling=sampling,
    seed=seed,
    cfg_scale=float(cfg_scale) if use_cfg else None,
    uncond_prompts=[build("", c) for c in codes] if use_cfg else None,
    num_images=num_new_frames,
  )
  grids = []
  for c, row, n in zip(codes, tokens, lengths):
    ids = ([] if len(c) else [v.boi_id]) + row[:n].tolist()
    grids += generator._image_runs(ids)[:num_new_frames]
  images = generator._decode(np.stack(grids))
  return images.reshape(len(clips), num_new_frames, *images.shape[1:])
