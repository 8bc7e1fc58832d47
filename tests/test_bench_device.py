"""`python -m vqlm.bench device`: the accelerator bench's dry run, flags, limits and presets."""

import json
import os
import subprocess
import sys

import pytest

from vqlm.bench import __main__ as bench_main
from vqlm.bench import device
from vqlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not on the accelerator image: the bench must run without them.
MISSING_ON_DEVICE = ("ml_collections", "grain", "tensorflow_datasets", "diffusers", "tensorflow")


@pytest.mark.ci  # A fresh process importing the whole bench: about 17 s.
def test_dry_run_needs_none_of_the_libraries_the_device_image_lacks(tmp_path):
  """Every part, tiny, in a process where importing those libraries fails. PyTorch lines have
  figures where torch and transformers are installed, else say why not; the diffusers line is
  always skipped here."""
  out = tmp_path / "device.json"
  code = (
    "import sys\n"
    f"for name in {MISSING_ON_DEVICE!r}:\n"
    "  sys.modules[name] = None\n"
    "from vqlm.bench import __main__ as m\n"
    f"sys.exit(m.main(['device', '--dry_run', '--out', {str(out)!r}]))\n"
  )
  # Unoptimised XLA code compiles faster; only the script's plumbing is tested here.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_PRNG_IMPL="rbg", XLA_FLAGS=flags)
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["dry_run"] is True and report["device"]["platform"] == "cpu"
  assert list(report["parts"]) == list(device.PARTS)
  assert "| what | vqlm | PyTorch | vqlm / PyTorch | unit | notes |" in proc.stdout
  for name, part in report["parts"].items():
    assert part["status"] == "ok", (name, part["status"])
    assert f"### {part['title']}" in proc.stdout
    assert part["rows"] and part["rows"][0]["vqlm"] > 0, part
    for row in part["rows"]:
      assert (row["pytorch"] is None) == bool(row["pytorch_note"]), row
      assert "not run" not in row["pytorch_note"], row
      if row["pytorch"]:
        assert row["ratio"] == pytest.approx(row["vqlm"] / row["pytorch"])
  tokenizer = report["parts"]["tokenizer"]["rows"][0]
  assert tokenizer["pytorch_note"] in (
    "skipped: diffusers not installed",
    "skipped: torch not installed (pip install -e '.[bench]')",
  )
  assert report["parts"]["sample"]["rows"][0]["what"].startswith("sample tiny, 4 image tokens")


def test_help_names_the_parts_and_the_command(capsys):
  assert bench_main.main(["device", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--parts" in out and "--dry_run" in out and "--out $OUT/device.json" in out


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--parts", "lm,flash"], "choose from lm, tokenizer, sample"),
    (["--parts", ","], "choose from"),
    (["--time_limit", "-1"], "--time_limit must be positive"),
    (["--sample_batches", "1,x"], "comma-separated ints"),
    (["--sample_batches", "0"], "must be positive"),
    (["--lm_batch", "-1"], "--lm_batch=-1 must be positive"),
  ],
)
def test_bad_flags_are_one_line_errors(flags, message):
  with pytest.raises(ValueError, match=message):
    device.main(["device", "--dry_run", *flags])


def test_each_part_stops_at_its_time_limit_and_the_report_says_so(tmp_path, capsys):
  out = tmp_path / "sub" / "device.json"
  code = device.main(["device", "--dry_run", "--time_limit", "1e-9", "--out", str(out)])
  assert code == 0
  report = json.loads(out.read_text())
  for part in report["parts"].values():
    assert part["status"].startswith("stopped at the 0 s limit, before"), part
    assert part["rows"] == []
  assert "sample: stopped at the 0 s limit, before building the vqlm sampler" in (
    capsys.readouterr().out
  )


def test_settings_take_the_flag_overrides():
  args = device._parse(["x", "--lm_batch", "4", "--sample_batches", "2,16"])
  s = device.settings_from(args)
  assert s["lm_batch"] == 4 and s["sample_batches"] == (2, 16)
  assert s["lm_seq_len"] == 2048 and s["lm_size"] == "large" and s["tokenizer_size"] == "base"


def test_presets_match_the_configs_the_users_train():
  """The bench mirrors configs/lm.py and configs/tokenizer.py (which need ml-collections)."""
  from vqlm.runtime.config import as_kwargs
  from vqlm.stages import lm_config, tokenizer_config

  lm = as_kwargs(lm_config.get_config("size=large").model)
  for key, value in device.lm_model_kwargs("large").items():
    if key != "attention_impl":  # The bench measures the new default, "auto".
      assert lm[key] == value, key
  assert device.lm_model_kwargs("large")["attention_impl"] == "auto"
  config = tokenizer_config.get_config("size=base")
  kw, image_size = device.tokenizer_model_kwargs("base")
  assert kw == as_kwargs(config.model) and image_size == config.data.image_size


def test_lm_model_flag_overrides_the_step_and_names_unknown_keys():
  args = device._parse(["x", "--lm_model", "remat_policy=none,query_chunks=1,scan_layers=false"])
  s = device.settings_from(args)
  assert s["lm_overrides"] == dict(remat_policy="none", query_chunks=1, scan_layers=False)
  with pytest.raises(UserError, match=r"--lm_model item 'remat=none'.*remat_policy"):
    device.settings_from(device._parse(["x", "--lm_model", "remat=none"]))


def test_dry_run_lm_line_names_the_overrides(capsys):
  assert device.main(["device", "--dry_run", "--parts", "lm", "--lm_model", "query_chunks=2"]) == 0
  assert "attention auto -> xla, num_layers=1" in capsys.readouterr().out
