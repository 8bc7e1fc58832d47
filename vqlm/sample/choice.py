"""The likeliest of a few candidate texts after each prompt, by the model's own log-probability.

`edit.py` and `answer.py` let a model write a reason greedily, then choose the part of it that
has only a few right values (the edited object, the answer) among candidates read from the
model's own words.
"""

from collections.abc import Sequence
from typing import Any

from vqlm.sample.sampler import continuation_logps


def likeliest(
  generator: Any,
  prompts: Sequence[Sequence[int]],
  candidates: Sequence[Sequence[str]],
  *,
  end_ids: Sequence[int] = (),
  batch_size: int | None = None,
) -> list[str | None]:
  """For each prompt, the candidate text whose ids (then `end_ids`) the model finds likeliest
  after it (`sampler.continuation_logps`, summed log-probabilities, float32).

  Args:
    generator: a `vqlm.sample.api.Generator`.
    prompts: prompt ids, one row per item.
    candidates: the candidate texts of each row (possibly none).
    end_ids: ids scored after each candidate's text (e.g. `<eos>`), so that a candidate that
      should go on is not preferred for stopping early.
  Returns:
    the likeliest candidate of each row; None where a row has none (the first on ties).
  """
  v, tok = generator.vocab, generator.text_tokenizer
  owners = [row for row, texts in enumerate(candidates) for _ in texts]
  texts = [text for row_texts in candidates for text in row_texts]
  if not texts:
    return [None] * len(prompts)
  scores = continuation_logps(
    generator.sampler,
    [prompts[row] for row in owners],
    [list(v.encode_text(tok, text)) + list(end_ids) for text in texts],
    batch_size=batch_size or generator.batch_size,
  )
  best: dict[int, tuple[float, str]] = {}
  for row, text, score in zip(owners, texts, scores):
    if row not in best or score > best[row][0]:
      best[row] = (float(score), text)
  return [best[row][1] if row in best else None for row in range(len(prompts))]


__all__ = ["likeliest"]
