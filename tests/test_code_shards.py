"""Encoded data: a missing, truncated or corrupted shard is one error naming the file."""

import os
import shutil

import pytest

from vqlm.data import pipeline
from vqlm.data.code_shards import CodeShards, read_manifest
from vqlm.errors import UserError


@pytest.fixture
def codes(tiny, tmp_path):
  """A private copy of the tiny run's encoded data, and its validation shard's path."""
  directory = str(tmp_path / "codes")
  shutil.copytree(tiny["codes"], directory)
  shard = read_manifest(directory)["splits"]["validation"]["shards"][0]["file"]
  return directory, os.path.join(directory, shard)


def test_intact_shards_read_back(codes):
  directory, _ = codes
  source = CodeShards(directory, "validation")
  record = source[len(source) - 1]
  assert record["codes"].shape == source.grid and isinstance(record["text"], str)


def test_missing_or_truncated_shard_is_named_up_front(codes):
  directory, shard = codes
  with open(shard, "rb") as f:
    data = f.read()
  with open(shard, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(UserError, match=f"{shard} is damaged .*delete it and re-run"):
    CodeShards(directory, "validation")
  os.remove(shard)
  with pytest.raises(UserError, match=f"{shard} is damaged \\(missing\\); re-run"):
    CodeShards(directory, "validation")


def test_corrupted_record_is_named_when_read_also_through_the_pipeline(codes):
  directory, shard = codes
  with open(shard, "rb") as f:
    data = bytearray(f.read())
  data[100:300] = bytes(200)  # Inside the first record's chunk: its checksum no longer matches.
  with open(shard, "wb") as f:
    f.write(bytes(data))
  source = CodeShards(directory, "validation")
  with pytest.raises(UserError, match=f"{shard} is damaged \\(record 0: .*Riegeli"):
    source[0]
  iterator = pipeline.make_iterator(
    source, global_batch_size=4, transform=lambda i, e: {"codes": e["codes"]}, seed=0, num_threads=2
  )
  with pytest.raises(UserError, match=f"{shard} is damaged"):
    for _ in range(len(source)):
      next(iterator)
