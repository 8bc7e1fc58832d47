"""Caption matching: whether a generated caption describes the same scene as the true one."""

from vqlm.data import shapes


def captions_match(truth: str, caption: str) -> bool:
  """Same scene: both parse and agree (object order free), else the same text."""
  a, b = shapes.parse_caption(truth), shapes.parse_caption(caption)
  if a is not None and b is not None:
    return shapes.canonical(a) == shapes.canonical(b)
  return " ".join(truth.lower().split()) == " ".join(caption.lower().split())
