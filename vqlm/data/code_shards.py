"""Pre-encoded data: code grids + texts in ArrayRecord shards, with a manifest.

`vqlm encode` runs a trained image tokenizer over a source once; the LM then reads these shards
(random access through grain's ArrayRecordDataSource) instead of re-encoding every step.

Layout of an encoded directory:
  manifest.json                 tokenizer run, grid, codebook size, counts, shard list
  <split>-00000-of-00008.array_record ...

Each record is msgpack: {"index": int, "codes": int32 [h, w] (or [T, h, w] for video),
"text": str}. A shard is written to a temporary name and renamed when complete, so a killed run
leaves only whole shards and a re-run skips them.
"""

from collections.abc import Iterator, Sequence
import json
import os
import time
from typing import Any

import flax.serialization
import jax
import numpy as np
from tqdm.auto import tqdm

from vqlm.errors import UserError

MANIFEST = "manifest.json"


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def serialize(record: dict[str, Any]) -> bytes:
  return flax.serialization.msgpack_serialize(
    {
      "index": int(record["index"]),
      "codes": np.asarray(record["codes"], np.int32),
      "text": str(record.get("text", "")),
    }
  )


def deserialize(data: bytes) -> dict[str, Any]:
  return flax.serialization.msgpack_restore(data)


def read_manifest(directory: str) -> dict:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{directory} holds no encoded data ({MANIFEST} missing); run "
      "`vqlm encode --tokenizer TOKENIZER_RUN --out DIR` first"
    )
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_manifest(directory: str, manifest: dict) -> None:
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, MANIFEST))


class CodeShards:
  """Random access over one split's shards: `len`, `[i] -> {"index", "codes", "text"}`."""

  def __init__(self, directory: str, split: str):
    import grain

    self.manifest = read_manifest(directory)
    info = self.manifest["splits"].get(split)
    if info is None:
      raise UserError(
        f"split '{split}' was not encoded in {directory} (encoded: "
        f"{', '.join(self.manifest['splits'])}); if the data set has it, run `vqlm encode "
        f"--tokenizer {self.manifest.get('tokenizer_run', 'TOKENIZER_RUN')} --out {directory} "
        f"--splits {split}`"
      )
    missing = [s for s in info["shards"] if not s["complete"]]
    if missing:
      raise UserError(
        f"{len(missing)} shard(s) of split '{split}' in {directory} are "
        "incomplete; re-run the same `vqlm encode` command to finish them"
      )
    self._directory = directory
    self._split = split
    self._files = [s["file"] for s in info["shards"]]
    self._ends = np.cumsum([s["stop"] - s["start"] for s in info["shards"]])
    for shard in info["shards"]:
      self._check_shard(grain, shard)
    paths = [os.path.join(directory, f) for f in self._files]
    self._source = grain.sources.ArrayRecordDataSource(paths)
    self.grid = tuple(self.manifest["grid"])
    self.codebook_size = int(self.manifest["codebook_size"])

  def _damaged(self, file: str, what: str) -> UserError:
    fix = "" if what == "missing" else "delete it and "
    return UserError(
      f"encoded data file {os.path.join(self._directory, file)} is damaged ({what}); {fix}"
      f"re-run the `vqlm encode` command that made {self._directory} (it re-encodes only "
      "missing shards)"
    )

  def _check_shard(self, grain, shard: dict) -> None:
    """Opens one shard up front: a missing, truncated or short file is named before training."""
    path = os.path.join(self._directory, shard["file"])
    if not os.path.exists(path):
      raise self._damaged(shard["file"], "missing")
    try:
      count = len(grain.sources.ArrayRecordDataSource([path]))
    except (RuntimeError, ValueError, OSError) as e:
      raise self._damaged(shard["file"], str(e).strip() or "unreadable") from None
    if count != shard["stop"] - shard["start"]:
      raise self._damaged(
        shard["file"], f"{count} records where the manifest lists {shard['stop'] - shard['start']}"
      )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    try:
      return deserialize(self._source[i])
    except (RuntimeError, ValueError, TypeError) as e:  # Riegeli checksum, msgpack decoding.
      file = self._files[int(np.searchsorted(self._ends, i, side="right"))]
      raise self._damaged(file, f"record {i}: {str(e).strip()[:160]}") from None


def _batches(indices: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
  for start in range(0, len(indices), batch_size):
    yield indices[start : start + batch_size]


def encode_split(
  run,
  source,
  directory: str,
  *,
  split: str,
  shard_size: int = 10_000,
  batch_size: int = 256,
  progress: bool = True,
  log_fn=print,
) -> dict[str, Any]:
  """Encodes every item of `source` with the tokenizer `run` into shards of `directory`.

  Items with an "image" [H, W, 3] give codes [h, w]; items with "frames" [T, H, W, 3] give
  [T, h, w]. Returns this split's manifest entry (with images/s of the encoding).
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  os.makedirs(directory, exist_ok=True)
  n = len(source)
  if n == 0:
    raise UserError(f"the '{split}' split is empty; nothing to encode")
  num_shards = max(1, -(-n // shard_size))
  manifest = _load_or_new_manifest(directory, run)
  entry = manifest["splits"].get(split)
  if entry is None or entry["num_shards"] != num_shards or entry["num_records"] != n:
    entry = {
      "num_records": n,
      "num_shards": num_shards,
      "shards": [
        {
          "file": shard_name(split, s, num_shards),
          "start": s * shard_size,
          "stop": min(n, (s + 1) * shard_size),
          "complete": False,
        }
        for s in range(num_shards)
      ],
    }
  manifest["splits"][split] = entry
  todo = [
    s
    for s in entry["shards"]
    if not (s["complete"] and os.path.exists(os.path.join(directory, s["file"])))
  ]
  mine = [s for i, s in enumerate(todo) if i % jax.process_count() == jax.process_index()]
  skipped = num_shards - len(todo)
  if skipped:
    log_fn(f"encode {split}: {skipped} of {num_shards} shard(s) already done, skipping them")
  total = sum(s["stop"] - s["start"] for s in mine)
  bar = tqdm(total=total, desc=f"encode {split}", unit="img", disable=not progress)
  images_done, seconds, compiled = 0, 0.0, False
  for shard in mine:
    path = os.path.join(directory, shard["file"])
    writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
    for batch_indices in _batches(range(shard["start"], shard["stop"]), batch_size):
      items = [source[i] for i in batch_indices]
      start = time.perf_counter()
      codes, count = _encode_items(run, items)
      if compiled:  # The first batch pays for compilation: leave it out of the throughput.
        seconds += time.perf_counter() - start
        images_done += count
      compiled = True
      for i, item, c in zip(batch_indices, items, codes):
        writer.write(serialize({"index": i, "codes": c, "text": item.get("text", "")}))
      bar.update(len(items))
    writer.close()
    os.replace(path + ".tmp", path)
    shard["complete"] = True
    if jax.process_index() == 0:
      _write_manifest(directory, manifest)
  bar.close()
  entry["images_per_sec"] = images_done / seconds if seconds else None
  if jax.process_index() == 0:
    _write_manifest(directory, manifest)
  return entry


def _encode_items(run, items: list[dict]) -> tuple[list[np.ndarray], int]:
  if "frames" in items[0]:
    frames = np.stack([item["frames"] for item in items])  # [B, T, H, W, 3]
    b, t = frames.shape[:2]
    codes = run.encode(frames.reshape((b * t,) + frames.shape[2:]))
    return list(codes.reshape((b, t) + codes.shape[1:])), b * t
  images = np.stack([item["image"] for item in items])
  return list(run.encode(images)), len(items)


def _load_or_new_manifest(directory: str, run) -> dict:
  identity = {
    "tokenizer_run": os.path.abspath(run.workdir),
    "tokenizer_step": run.step,
    "grid": list(run.grid),
    "codebook_size": run.codebook_size,
    "image_size": run.image_size,
  }
  path = os.path.join(directory, MANIFEST)
  if os.path.exists(path):
    manifest = read_manifest(directory)
    same = all(manifest.get(k) == v for k, v in identity.items())
    if same:
      return manifest
    raise UserError(
      f"{directory} already holds codes of another tokenizer "
      f"({manifest.get('tokenizer_run')} step {manifest.get('tokenizer_step')}); "
      "choose a new --out directory"
    )
  return {**identity, "splits": {}}
