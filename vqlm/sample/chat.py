"""Sampling from an instruction-tuned (chat) LM: draw an image for a request, reply to a turn.

A chat LM has `<user>` / `<assistant>` in its vocabulary (`vqlm.vocab.CHAT_SPECIALS`) and was
trained on `vqlm.data.chat` layouts, `<bos> <user> parts <assistant> parts <eos>`. The prompt of
a reply is the conversation so far, then `<assistant>` (`chat.prompt`):

    gen = run.generator()
    images = draw(gen, ["draw a big red circle in the middle"], num_per_prompt=4, cfg_scale=2.0)
    turns = [{"role": "user", "parts": [image, "what color is the shape on the left"]}]
    answers = reply(gen, [turns])

`draw` continues the prompt with `<boi>` and samples one image (mode "image"; guidance against
the LM's unconditional `<bos> <boi>`, learnt with caption dropout, or with `chat_uncond` against
an empty request, `<bos> <user> <assistant> <boi>`, learnt by a model tuned with
`config.data.chat.drop_request`). `reply` samples text (mode
"text": text ids until `<eos>`; the sampler never emits a role marker, so a reply is the text of
one assistant turn). Both batch and seed rows as `Generator.generate_images` does: row `i` of a
call draws with seed `(seed, first_row + i)`, whatever the batch size.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vqlm.data import chat
from vqlm.errors import UserError
from vqlm.sample.processors import GREEDY, SamplingConfig
from vqlm.vocab import CHAT_SPECIALS

# Most text ids of a restated caption (the shapes captions of up to 3 objects need about 40).
RESTATE_MAX_LEN = 48
NO_CHAT = (
  "this LM has no chat turns; instruction-tune it with --config.data.chat.weight=0.5 "
  "(docs/tuning.md)"
)


def chat_uncond_ids(vocab: Any) -> list[int]:
  """The unconditional prompt of chat drawing: an empty request, `<bos> <user> <assistant>
  <boi>` (learnt from the draw instructions whose request was dropped)."""
  return [vocab.bos_id, vocab.special("user"), vocab.special("assistant"), vocab.boi_id]


def require_chat_vocab(vocab: Any) -> None:
  """Raises a one-line UserError unless `vocab` has the chat turn markers."""
  if not all(name in vocab.specials for name in CHAT_SPECIALS):
    raise UserError(NO_CHAT)


def _turns(conversation: Any, what: str) -> list[Mapping[str, Any]]:
  """A request (one user text) or a turn list -> a checked turn list."""
  if isinstance(conversation, str):
    return [{"role": "user", "parts": [conversation]}]
  if isinstance(conversation, Mapping) or not isinstance(conversation, Sequence):
    raise UserError(
      f"{what} has type {type(conversation).__name__}; pass a str or a list of turns "
      '[{"role": "user", "parts": [...]}].'
    )
  turns = list(conversation)
  if not turns:
    raise UserError(f"{what} has no turns; give it at least one user turn.")
  return turns


def chat_prompt_ids(generator: Any, turns: Sequence[Mapping[str, Any]]) -> list[int]:
  """The prompt ids of the assistant's next turn: `chat.prompt` of `turns` (ends in `<assistant>`).

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM.
    turns: `[{"role": "user" | "assistant", "parts": [...]}]`; a part is a `str`, int codes
      `[h, w]` or a uint8 image `[H, W, 3]` (encoded with `generator.encode_images`).
      `chat.SceneImage` placeholders are refused (`chat.with_codes` first).
  """
  require_chat_vocab(generator.vocab)
  turns = _turns(turns, "turns")
  encoded, images = [], False
  for turn in turns:
    if not isinstance(turn, Mapping) or "parts" not in turn:
      raise UserError(f"a turn must be a dict with 'role' and 'parts', got {turn!r:.80}.")
    parts = []
    for part in turn["parts"]:
      if not isinstance(part, (str, chat.SceneImage)):
        arr = np.asarray(part)
        if arr.ndim == 3 and arr.dtype == np.uint8:
          part = generator.encode_images(arr[None])[0]
        images = images or arr.ndim in (2, 3)
      parts.append(part)
    encoded.append({"role": turn.get("role"), "parts": parts})
  if images:
    generator._check_reads_images("a chat turn with an image")
  ids = chat.prompt(encoded, generator.vocab, generator.text_tokenizer)
  return [int(i) for i in ids]


def _prompts(generator: Any, requests: Any, what: str) -> list[list[int]]:
  if isinstance(requests, (str, Mapping)) or not isinstance(requests, Sequence):
    raise UserError(f"{what} must be a list (of str or of turn lists); wrap one in a list.")
  if not requests:
    raise UserError(f"no {what} given; pass at least one.")
  return [chat_prompt_ids(generator, _turns(r, f"{what}[{i}]")) for i, r in enumerate(requests)]


def draw(
  generator: Any,
  requests: Sequence[str | Sequence[Mapping[str, Any]]],
  *,
  num_per_prompt: int = 1,
  cfg_scale: float | None = None,
  sampling: SamplingConfig | None = None,
  seed: int = 0,
  batch_size: int | None = None,
  first_row: int = 0,
  return_codes: bool = False,
  restate: bool = False,
  captions: Sequence[str] | None = None,
  chat_uncond: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """The assistant's image for each request: prompt `chat_prompt_ids + <boi>`, mode "image"
  (with a caption: `chat_prompt_ids + caption ids + <boi>`).

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM.
    requests: user texts ("draw a small blue square at the top") or turn lists (ending with a
      user turn).
    num_per_prompt: images per request.
    cfg_scale: classifier-free guidance scale (None or 1.0: none); the unconditional prompt is
      `generator.uncond_ids` (`<bos> <boi>`), with `chat_uncond` an empty request
      (`chat_uncond_ids`: for a model tuned with `config.data.chat.drop_request`).
    sampling: image settings (default temperature 1).
    seed, first_row: image `i` of the call uses seed `(seed, first_row + i)`.
    batch_size: rows per sampler call (default: the Generator's).
    return_codes: also return the code grids.
    restate: the assistant first restates each request as a caption (`restate`, greedy), then
      draws it: the reply layout of a model tuned with `config.data.chat.restate`.
    captions: the assistant's caption of each request, given (`restate` is then not asked).
  Returns:
    uint8 `[N, H, W, 3]`, `N = len(requests) * num_per_prompt`, prompt-major (and int32 codes
    `[N, h, w]`).
  """
  if num_per_prompt <= 0:
    raise UserError(f"num_per_prompt={num_per_prompt} must be >= 1.")
  prompts = _prompts(generator, requests, "requests")
  if restate and captions is None:
    captions = text_before_image(generator, prompts, batch_size=batch_size)
  if captions is not None:
    if isinstance(captions, str) or len(captions) != len(prompts):
      raise UserError(f"captions must be a list of {len(prompts)} strings, one per request.")
    prompts = [p + generator.text_ids(c) for p, c in zip(prompts, captions)]
  boi = generator.vocab.boi_id
  rows = [p + [boi] for p in prompts for _ in range(num_per_prompt)]
  uncond = [chat_uncond_ids(generator.vocab)] * len(rows) if chat_uncond else None
  return generator.draw_ids(
    rows,
    uncond_prompts=uncond,
    cfg_scale=cfg_scale,
    sampling=sampling,
    seed=seed,
    batch_size=batch_size,
    return_codes=return_codes,
    first_row=first_row,
  )


def restate(
  generator: Any,
  requests: Sequence[str | Sequence[Mapping[str, Any]]],
  *,
  batch_size: int | None = None,
  max_len: int = RESTATE_MAX_LEN,
) -> list[str]:
  """The caption a restating chat LM writes before its image, per request (greedy): the text
  of its reply up to its `<boi>`.

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM tuned with `config.data.chat.restate`.
    requests: user texts or turn lists, as for `draw`.
    max_len: most text ids of a caption.
  """
  return text_before_image(
    generator, _prompts(generator, requests, "requests"), batch_size=batch_size, max_len=max_len
  )


def text_before_image(
  generator: Any, prompts: list[list[int]], *, batch_size: int | None, max_len: int = 0
) -> list[str]:
  """The text the model writes (greedy) after each prompt of unified ids before it opens an
  image (or ends), at most `max_len` ids (default RESTATE_MAX_LEN), stripped: a restated
  request's caption, or an edit's reason (`vqlm.data.edits.reason`)."""
  # Mode "interleaved" lets the model open its image (a step budget that fits one whole run);
  # the caption is what comes before that `<boi>` (or before `<eos>`).
  v = generator.vocab
  max_len = max_len or RESTATE_MAX_LEN
  tokens, lengths = generator._run_batches(
    prompts,
    desc="captions",
    batch_size=batch_size,
    mode="interleaved",
    max_new_tokens=max_len + v.tokens_per_image + 2,
    sampling=SamplingConfig(text=GREEDY, image=GREEDY),
    seed=0,
  )
  captions = []
  for row, n in zip(tokens, lengths):
    text = []
    for t in row[:n]:
      if not v.is_text(int(t)):
        break
      text.append(int(t))
    captions.append(v.decode_text(generator.text_tokenizer, text[:max_len]).strip())
  return captions


def reply(
  generator: Any,
  conversations: Sequence[Sequence[Mapping[str, Any]]],
  *,
  greedy: bool = True,
  sampling: SamplingConfig | None = None,
  seed: int = 0,
  max_len: int = 48,
  batch_size: int | None = None,
) -> list[str]:
  """The assistant's text reply to each conversation (greedy by default; `greedy=False` samples
  with `sampling`, row `i` with seed `(seed, i)`).

  Args:
    generator: a `vqlm.sample.api.Generator` of a chat LM.
    conversations: turn lists ending with a user turn (or user texts).
    max_len: most ids per reply (the reply ends earlier at `<eos>`).
  Returns:
    one stripped string per conversation.
  """
  return write_replies(
    generator,
    reply_prompts(generator, conversations),
    greedy=greedy,
    sampling=sampling,
    seed=seed,
    max_len=max_len,
    batch_size=batch_size,
  )


def reply_prompts(
  generator: Any, conversations: Sequence[Sequence[Mapping[str, Any]]]
) -> list[list[int]]:
  """The prompt ids of the assistant's reply to each conversation (`chat_prompt_ids`; images
  encoded once), after checking that each ends with a user turn."""
  if isinstance(conversations, Sequence) and not isinstance(conversations, str):
    for i, c in enumerate(conversations):
      last = _turns(c, f"conversations[{i}]")[-1]
      if not isinstance(c, str) and (not isinstance(last, Mapping) or last.get("role") != "user"):
        raise UserError(f"conversations[{i}] must end with a user turn for the assistant to reply.")
  return _prompts(generator, conversations, "conversations")


def write_replies(
  generator: Any,
  rows: Sequence[Sequence[int]],
  *,
  greedy: bool = True,
  sampling: SamplingConfig | None = None,
  seed: int = 0,
  max_len: int = 48,
  batch_size: int | None = None,
) -> list[str]:
  """`reply` from prompt ids (`reply_prompts`): one stripped string per row."""
  if max_len <= 0:
    raise UserError(f"max_len={max_len} must be >= 1.")
  return generator.write_ids(
    rows,
    greedy=greedy,
    sampling=sampling,
    seed=seed,
    max_len=max_len,
    batch_size=batch_size,
    desc="replies",
  )


__all__ = [
  "NO_CHAT",
  "chat_prompt_ids",
  "chat_uncond_ids",
  "draw",
  "reply",
  "reply_prompts",
  "require_chat_vocab",
  "restate",
  "write_replies",
]
