"""Modality constraints: a per-row state machine that says which ids the next token may be.

Structural rules (every mode):
  * inside an image run (`codes_left > 0`) only image codes, for exactly `h*w` steps;
  * right after the last code of a run, `<eoi>` is forced;
  * right after `<frame>`, `<boi>` is forced;
  * pad, `<bos>`, `<frame>` (unless forced), the reserved specials and the padded tail of the
    table `[vocab.size, padded_size)` are never sampled; image codes never outside a run;
  * a row stops after `<eos>` and then emits `<pad>` (masked by the caller).

Outside image runs, per mode:
  * "text"        text ids or `<eos>` (captioning: no images).
  * "interleaved" text ids, `<eos>`, or `<boi>` (only while the steps left fit a whole run).
  * "image"       `<boi>` while images are still to start, else the row stops after its `<eoi>`
                  (t2i: the prompt ends in `<boi>`; the output is `h*w` codes then `<eoi>`).
  * "video"       after `<eoi>`: `<frame>` (then `<boi>`) while frames are still to start, else
                  `<eos>`.
  * "free"        any id but image codes, `<frame>` and the reserved slots (so `<pad>` too),
                  and nothing structural: `<boi>` opens no run and nothing is forced (a row
                  still stops after `<eos>`). Text generation as Chameleon's forward masks it
                  (its logits hide only the image tokens) for imported models, whose source
                  ids fill the other slots (`vqlm.interop.chameleon`).

The state lives on device (`ConstraintState`, a pytree of `[B]` arrays) and is advanced inside the
sampler's `lax.while_loop`; `initial_state` reads it off the prompts on the host, so a prompt may
also end inside an image run (the run is completed: image completion).
"""

from collections.abc import Sequence
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vqlm.errors import UserError
from vqlm.vocab import Vocab

MODES = ("text", "image", "interleaved", "video")
# Not one of the grammar's MODES (no structure): `Sampler(..., mode=FREE)` only.
FREE = "free"
# Which class of ids a row may take when nothing is forced (rows of `Spec.class_table`).
_FORCED, _IMAGE, _TEXT, _TEXT_OR_IMAGE, _FREE = range(5)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static description of the vocabulary and the mode (hashable: a jit static argument)."""

  mode: str
  text_size: int
  image_offset: int
  image_size: int
  tokens_per_image: int
  padded_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  boi_id: int
  eoi_id: int
  frame_id: int

  @classmethod
  def from_vocab(cls, vocab: Vocab, mode: str) -> "Spec":
    if mode not in MODES + (FREE,):
      raise UserError(f"mode={mode!r} is not one of {MODES + (FREE,)}.")
    return cls(
      mode=mode,
      text_size=vocab.text_size,
      image_offset=vocab.image_offset,
      image_size=vocab.image_size,
      tokens_per_image=vocab.tokens_per_image,
      padded_size=vocab.padded_size,
      pad_id=vocab.pad_id,
      bos_id=vocab.bos_id,
      eos_id=vocab.eos_id,
      boi_id=vocab.boi_id,
      eoi_id=vocab.eoi_id,
      frame_id=vocab.frame_id,
    )

  def is_image(self, ids):
    return (ids >= self.image_offset) & (ids < self.image_offset + self.image_size)

  def class_table(self) -> np.ndarray:
    """bool `[5, padded_size]`: the ids of each class (forced, image, text, text-or-image,
    free)."""
    ids = np.arange(self.padded_size)
    text = (ids < self.text_size) | (ids == self.eos_id)
    image = np.asarray(self.is_image(ids))
    table = np.zeros((5, self.padded_size), bool)
    table[_IMAGE] = image
    table[_TEXT] = text
    table[_TEXT_OR_IMAGE] = text | (ids == self.boi_id)
    table[_FREE] = text | np.isin(ids, [self.pad_id, self.bos_id, self.boi_id, self.eoi_id])
    return table


@flax.struct.dataclass
class ConstraintState:
  """Per-row state of the modality machine (all `[B]`).

  Attributes:
    codes_left: int32 codes still to emit in the open image run (0: no run open).
    images_left: int32 `<boi>` still to emit ("image" and "video" modes).
    last: int32 the row's last token (prompt or generated).
    done: bool, the row has stopped (it emits `<pad>` from now on).
  """

  codes_left: jax.Array
  images_left: jax.Array
  last: jax.Array
  done: jax.Array


def initial_state(
  spec: Spec,
  prompts: Sequence[Sequence[int]],
  *,
  num_images: int | Sequence[int] = 1,
  active: Sequence[bool] | None = None,
  allow_pad: bool = False,
) -> ConstraintState:
  """The state after each prompt (NumPy, host side).

  Args:
    spec: vocabulary and mode.
    prompts: unified ids per row, each starting with `<bos>`.
    num_images: "image"/"video" modes: image runs to finish per row, counting a run the prompt
      leaves open (t2i with a prompt ending in `<boi>`: 1; video: the number of new frames).
    active: rows marked False start done (batch padding).
    allow_pad: accept `<pad>` inside prompts (unconditional guidance prompts that mask the
      caption with `<pad>`, as Janus's do; `vqlm.sample.sampler.pad_uncond_prompts`).
  Raises:
    ValueError: on ids outside the vocabulary, pad ids, codes outside a run, or a count that
      cannot be met.
  """
  b = len(prompts)
  counts = np.broadcast_to(np.asarray(num_images, np.int64), (b,))
  active = np.ones(b, bool) if active is None else np.asarray(active, bool)
  hw = spec.tokens_per_image
  codes_left, images_left, last = (np.zeros(b, np.int32) for _ in range(3))
  for r, prompt in enumerate(prompts):
    ids = np.asarray(prompt, np.int64).reshape(-1)
    if ids.size == 0:
      raise UserError(f"prompt {r} is empty; start every prompt with <bos> (id {spec.bos_id}).")
    size = spec.image_offset + spec.image_size
    if ids.min() < 0 or ids.max() >= size or (not allow_pad and np.any(ids == spec.pad_id)):
      raise UserError(
        f"prompt {r} holds ids outside [0, {size}) or <pad>; build prompts from "
        "Vocab ids without padding (the sampler pads)."
      )
    open_run, in_run = False, 0
    for i in ids:
      if i == spec.boi_id:
        open_run, in_run = True, 0
      elif open_run and spec.is_image(i):
        in_run += 1
        if in_run > hw:
          raise UserError(
            f"prompt {r} has an image run longer than {hw} codes; end each run "
            "with <eoi> after exactly h*w codes."
          )
      elif spec.is_image(i):
        raise UserError(f"prompt {r} has image codes outside <boi> ... <eoi>.")
      else:
        if open_run and i != spec.eoi_id:
          raise UserError(
            f"prompt {r} interrupts an image run with id {i}; image runs hold "
            f"exactly {hw} codes followed by <eoi>."
          )
        if i == spec.eoi_id and open_run and in_run != hw:
          raise UserError(
            f"prompt {r} closes an image run after {in_run} codes; a run holds exactly {hw}."
          )
        open_run = False
    still_open = open_run and in_run < hw and spec.mode != FREE
    codes_left[r] = hw - in_run if still_open else 0
    started = int(open_run)  # A run the prompt opened (complete or not) counts as one image.
    if ids[-1] == spec.frame_id:
      started = 0
    need = int(counts[r]) - started
    if spec.mode in ("image", "video") and active[r]:
      if need < 0 or (need == 0 and ids[-1] == spec.frame_id):
        raise UserError(
          f"prompt {r} already holds the requested {int(counts[r])} image(s); "
          "ask for more images or shorten the prompt."
        )
      if need == 0 and not open_run:
        raise UserError(
          f"prompt {r}: num_images={int(counts[r])} leaves nothing to generate "
          "in mode " + repr(spec.mode) + "; ask for at least one image."
        )
    images_left[r] = max(need, 0)
    last[r] = ids[-1]
  return ConstraintState(codes_left=codes_left, images_left=images_left, last=last, done=~active)


def min_new_tokens(spec: Spec, state: ConstraintState) -> int:
  """Fewest steps after which every active row has finished its open image run and, in the
  "image" / "video" modes, all its requested images (and, in "video", its `<eos>`)."""
  if spec.mode == FREE:
    return 0
  hw = spec.tokens_per_image
  codes, images = np.asarray(state.codes_left), np.asarray(state.images_left)
  last = np.asarray(state.last)
  finish_run = np.where((codes > 0) | spec.is_image(last), codes + 1, 0)  # codes + <eoi>
  total = finish_run
  if spec.mode in ("image", "video"):
    total = total + images * (hw + 2)  # <boi> codes <eoi>
  if spec.mode == "video":
    # A <frame> before each new image, except a first one that follows <frame> or no image.
    first_frame = (last == spec.eoi_id) | (finish_run > 0)
    total = total + np.where(images > 0, images - 1 + first_frame, 0) + 1  # ... <eos>
  return int(np.max(np.where(np.asarray(state.done), 0, total), initial=0))


def forced_and_class(
  spec: Spec, state: ConstraintState, steps_left: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """`(forced [B] int32 id or -1, class [B] int32)` for the next token of each row.

  `steps_left` counts the current step: interleaved rows may open an image run only while
  `steps_left >= h*w + 2` (`<boi>`, the codes, `<eoi>`).
  """
  hw = spec.tokens_per_image
  last, codes_left, images_left = state.last, state.codes_left, state.images_left
  none = jnp.full_like(last, -1)
  if spec.mode == FREE:
    forced = jnp.where(state.done, spec.pad_id, none).astype(jnp.int32)
    return forced, jnp.where(state.done, _FORCED, _FREE).astype(jnp.int32)
  if spec.mode in ("image", "video"):
    after_eoi = last == spec.eoi_id
    if spec.mode == "video":
      free = jnp.where(
        images_left > 0, jnp.where(after_eoi, spec.frame_id, spec.boi_id), spec.eos_id
      )
    else:
      free = jnp.where(images_left > 0, spec.boi_id, spec.eos_id)
    free_class = jnp.full_like(last, _FORCED)
  else:
    free = none
    if spec.mode == "interleaved":
      free_class = jnp.where(steps_left >= hw + 2, _TEXT_OR_IMAGE, _TEXT)
    else:
      free_class = jnp.full_like(last, _TEXT)
  forced = jnp.where(
    spec.is_image(last), spec.eoi_id, jnp.where(last == spec.frame_id, spec.boi_id, free)
  )
  klass = jnp.where((forced >= 0), _FORCED, free_class)
  in_run = codes_left > 0
  forced = jnp.where(in_run, -1, forced)
  klass = jnp.where(in_run, _IMAGE, klass)
  forced = jnp.where(state.done, spec.pad_id, forced)
  klass = jnp.where(state.done, _FORCED, klass)
  return forced.astype(jnp.int32), klass.astype(jnp.int32)


def allowed_ids(spec: Spec, forced: jax.Array, klass: jax.Array) -> jax.Array:
  """bool `[B, padded_size]`: the ids each row may take."""
  table = jnp.asarray(spec.class_table())
  ids = jnp.arange(spec.padded_size, dtype=jnp.int32)
  return table[klass] | (ids[None, :] == forced[:, None])


def update(spec: Spec, state: ConstraintState, token: jax.Array) -> ConstraintState:
  """The state after each row emitted `token[B]`."""
  hw = spec.tokens_per_image
  token = jnp.asarray(token, jnp.int32)
  is_code = spec.is_image(token)
  codes_left = jnp.where(is_code, jnp.maximum(state.codes_left - 1, 0), state.codes_left)
  opens = (token == spec.boi_id) & (spec.mode != FREE)
  codes_left = jnp.where(opens, hw, codes_left)
  images_left = jnp.where(opens, jnp.maximum(state.images_left - 1, 0), state.images_left)
  done = state.done | (token == spec.eos_id)
  if spec.mode == "image":
    done = done | ((token == spec.eoi_id) & (images_left == 0))
  last = jnp.where(state.done, state.last, token)
  return ConstraintState(
    codes_left=codes_left.astype(jnp.int32),
    images_left=images_left.astype(jnp.int32),
    last=last,
    done=done,
  )
