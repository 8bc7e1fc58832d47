"""`vqlm text train --config configs/tokenizer.py:data=shapes --out DIR [--vocab_size 1000]`.

Trains a SentencePiece model on the captions of a data set's training split and saves it as
`DIR/text.model`. (An LM run also trains one by itself from its code shards when none is given.)
"""

import os

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def main(argv: list[str]) -> int:
  wants_help = any(arg in flag_lib.HELP_FLAGS for arg in argv[1:2])
  if not wants_help and (len(argv) < 2 or argv[1] != "train"):
    raise UserError("usage: vqlm text train --config CONFIG --out DIR [--vocab_size N]")
  fv = flag_lib.parse(
    [argv[0]] + argv[1 if wants_help else 2 :],
    lambda f: (
      f.DEFINE_string("out", None, "directory for text.model"),
      f.DEFINE_integer("vocab_size", 1000, "SentencePiece vocabulary size"),
      f.DEFINE_integer("max_examples", 100_000, "captions to train on at most"),
    ),
    config=True,
  )
  config = flag_lib.require_config(fv)
  out = flag_lib.check_workdir(fv.out, "--out")
  from vqlm.data.sources import source_from_config
  from vqlm.text import train_sentencepiece

  source = source_from_config(config.data, "train")
  texts = [source[i]["text"] for i in range(min(len(source), fv.max_examples))]
  path = train_sentencepiece(
    [t for t in texts if t.strip()],
    model_prefix=os.path.join(out, "text"),
    vocab_size=fv.vocab_size,
  )
  print(f"wrote {path}")
  return 0
