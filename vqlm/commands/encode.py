"""`vqlm encode --tokenizer TOKENIZER_RUN --out DIR [--data shapes] [--splits train,validation]`.

Encodes a data set once with a trained image tokenizer into ArrayRecord code shards (resumable:
finished shards are skipped) and prints the encoding throughput in images/s.

Without `--splits`, encodes those of train, validation and test that the data set has and says
which it skipped (a folder of images has no test split unless its captions name one); a split
named in `--splits` that the data set lacks is an error.
"""

import json
import os

import numpy as np

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def _filtered(source, run, spec: str, report_path: str):
  """`source` minus what the configured filters reject; counts written to `report_path`."""
  from vqlm.data.filters import apply_filters, make_filters

  try:
    config = json.loads(spec)
  except json.JSONDecodeError as e:
    raise UserError(
      f"--filters is not valid JSON ({e.msg}); e.g. '{{\"min_caption_words\": 3}}'"
    ) from None

  def reconstruction_error(images: np.ndarray) -> np.ndarray:
    recon = run.decode(run.encode(images)).astype(np.float32)
    return np.abs(recon - images.astype(np.float32)).mean(axis=(1, 2, 3)) / 127.5

  kept, counts = apply_filters(
    source,
    make_filters(config, score_fns={"reconstruction_error": reconstruction_error}),
    report_path=report_path,
  )
  print(f"filters kept {counts['kept']} of {counts['total']}: {counts['removed']}")
  return kept


DEFAULT_SPLITS = ("train", "validation", "test")


def _missing_split(error: UserError, split: str) -> bool:
  """Whether `error` is a source's "unknown split" error for `split` (`_check_split`, TFDS)."""
  return str(error).startswith(f"unknown split {split!r}")


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("tokenizer", None, "image tokenizer run directory"),
      f.DEFINE_string("out", None, "output directory for shards + manifest.json"),
      f.DEFINE_string("data", "", "data set name (default: the tokenizer's training data)"),
      f.DEFINE_string("data_dir", "", "data directory (default: the tokenizer's)"),
      f.DEFINE_list(
        "splits",
        list(DEFAULT_SPLITS),
        "splits to encode (default: those of train,validation,test the data set has)",
      ),
      f.DEFINE_integer("shard_size", 10_000, "records per shard"),
      f.DEFINE_integer("batch_size", 256, "images per encode call"),
      f.DEFINE_string(
        "filters",
        "",
        "JSON quality filters applied before encoding, e.g. "
        '\'{"min_caption_words": 3, "reconstruction_error": 0.1}\' (the model-based '
        "score is the tokenizer's mean absolute reconstruction error in [0, 2])",
      ),
    ),
  )
  if not fv.tokenizer or not fv.out:
    raise UserError("--tokenizer and --out are required")
  from vqlm.data.code_shards import encode_split
  from vqlm.data.sources import source_from_config
  from vqlm.runs import TokenizerRun

  run = TokenizerRun(fv.tokenizer)
  data = run.config.data
  if fv.data:
    data = data.copy_and_resolve_references()
    data.unlock()
    data.name = fv.data
    data.source_kwargs = {}  # The tokenizer's source options belong to its own data set.
  if fv.data_dir:
    data.data_dir = fv.data_dir
  out = flag_lib.check_workdir(fv.out, "--out")
  sources = {}  # Every split's source first, so a missing split fails before any encoding.
  for split in fv.splits:
    try:
      sources[split] = source_from_config(data, split)
    except UserError as e:
      if not _missing_split(e, split):
        raise
      if fv["splits"].present:
        raise UserError(f"{e}; pass --splits with splits the data set has") from None
      has = str(e).partition("; valid: ")[2]
      print(
        f"skipped {split}: the {data.name} data set has no {split} split"
        + (f" (it has {has})" if has else "")
      )
  if not sources:
    raise UserError(
      f"the {data.name} data set has none of the splits {', '.join(fv.splits)}; "
      "pass --splits with splits it has"
    )
  for split, source in sources.items():
    if fv.filters:
      source = _filtered(source, run, fv.filters, os.path.join(out, f"filters_{split}.json"))
    entry = encode_split(
      run, source, out, split=split, shard_size=fv.shard_size, batch_size=fv.batch_size
    )
    rate = entry.get("images_per_sec")
    print(
      f"encoded {split}: {entry['num_records']} records in {entry['num_shards']} shard(s)"
      + (f", {rate:.0f} images/s" if rate else "")
    )
  return 0
