"""Starting an LM run from another run's parameters (`config.init_from`).

Only the parameters are read (an Orbax partial restore: no optimizer state, no step), onto the
new run's shardings, so the source may have been trained on another device count. The source must
be an LM run with the same vocabulary (or one this run's extends with specials in reserved slots,
such as the chat turns), the same SentencePiece model and the same parameter
shapes; each mismatch is one line naming what differs. The new run then trains from step 0 with a
fresh optimizer (and `optim.freeze` may keep parameter groups fixed).
"""

import os

import jax

from vqlm import runs
from vqlm.errors import UserError
from vqlm.runs.lm_run import TEXT_MODEL, VOCAB_FILE
from vqlm.runs.restore import CheckpointMismatchError, restore_subtree
from vqlm.vocab import Vocab

VOCAB_FIELDS = ("text_size", "image_size", "grid", "specials", "num_reserved", "pad_to")


def check_source(source: str) -> str:
  """The absolute path of `source` after checking that it is an LM run."""
  source = os.path.abspath(os.path.expanduser(source))
  try:
    saved = runs.load_config(source)
  except FileNotFoundError as e:
    raise UserError(f"config.init_from: {e}") from None
  if saved.get("stage") != "lm":
    raise UserError(
      f"config.init_from {source} is a {saved.get('stage')} run; it must be an LM run (an "
      "image tokenizer's parameters do not fit a transformer)"
    )
  return source


def warm_start(source: str | None, vocab: Vocab, text_model: str, *, log_fn=print):
  """`loop.run`'s `warm_start`: replaces the fresh state's parameters by those of `source`.

  Args:
    source: the LM run to start from (None or "": no warm start, returns None).
    vocab: the new run's vocabulary.
    text_model: the new run's SentencePiece model file.
  """
  if not source:
    return None

  def apply(state):
    theirs = Vocab.load(os.path.join(source, VOCAB_FILE))
    # Specials added in reserved slots (e.g. the chat turns) keep every id of the source.
    differ = [f for f in VOCAB_FIELDS if getattr(theirs, f) != getattr(vocab, f)]
    if differ and not vocab.extends(theirs):
      raise UserError(
        f"config.init_from {source} has another vocabulary ({', '.join(differ)} differs): "
        "train on codes of the same image tokenizer, with that run's text model"
      )
    with open(os.path.join(source, TEXT_MODEL), "rb") as a, open(text_model, "rb") as b:
      if a.read() != b.read():
        raise UserError(
          f"config.init_from {source} reads text with another SentencePiece model than "
          "config.data.text_model; leave data.text_model empty to reuse that run's"
        )
    target = {
      "params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params
      )
    }
    try:
      step, restored = restore_subtree(os.path.join(source, "checkpoints"), target)
    except CheckpointMismatchError as e:
      raise UserError(
        f"config.init_from {source} does not fit this model ({e.detail}); set the model config "
        f"to that run's (see {os.path.join(source, runs.CONFIG_FILE)})"
      ) from None
    log_fn(f"initialised the parameters from step {step} of {source}")
    return state.replace(params=restored["params"])

  return apply
