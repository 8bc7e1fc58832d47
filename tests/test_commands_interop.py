"""`vqlm import` / `vqlm export`: help, the registry of formats, arguments and one-line errors.

The importers and the exporter are stand-ins here (modules put in `sys.modules`); the real ones
are tested with their modules (tests/test_interop_*.py)."""

import os
import sys
import types

import pytest

from vqlm import cli
from vqlm.commands import COMMANDS, interop
from vqlm.errors import UserError


def _main(capsys, *args):
  code = cli.main(["vqlm", *args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _error(err: str) -> str:
  lines = [l for l in err.strip().splitlines() if l.startswith("vqlm: error:")]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


@pytest.fixture
def stand_ins(monkeypatch):
  """A module `vqlm_test_interop` with an importer and an exporter that record their calls,
  registered as the formats "fake" (import) and "fake" (export)."""
  calls = []
  module = types.ModuleType("vqlm_test_interop")

  def import_run(src, out, **flags):
    calls.append(("import", src, out, flags))
    return out

  def export_run(run, out, **flags):
    calls.append(("export", run, out, flags))
    return out

  module.import_run, module.export_run = import_run, export_run
  monkeypatch.setitem(sys.modules, "vqlm_test_interop", module)
  monkeypatch.setitem(interop.IMPORTERS, "fake", ("vqlm_test_interop:import_run", "a test"))
  monkeypatch.setitem(interop.EXPORTERS, "fake", ("vqlm_test_interop:export_run", "a test"))
  return calls


def test_commands_are_registered():
  assert COMMANDS["import"][0] == COMMANDS["export"][0] == "vqlm.commands.interop"


@pytest.mark.parametrize("command", ["import", "export"])
def test_help_documents_every_flag_and_format(capsys, command):
  code, out, err = _main(capsys, command, "--help")
  assert code == 0, err
  assert out.startswith(f"usage: vqlm {command} ")
  registry = interop.IMPORTERS if command == "import" else interop.EXPORTERS
  for name in registry:
    assert f"\n  {name} " in out
  flags = out.split("flags:\n")[1]
  names = ["out", "image_tokenizer", "overwrite", "dtype", "image_size"]
  for name in names if command == "import" else ["format", "overwrite"]:
    assert f"--{name}: " in flags and f"--{name}" in out.splitlines()[0]
  assert _main(capsys, command, "llama", "-h")[0] == 0


def test_registry_points_into_vqlm_interop():
  for registry, function in ((interop.IMPORTERS, "import_run"), (interop.EXPORTERS, "export_run")):
    for path, description in registry.values():
      module, name = path.split(":")
      assert module.startswith("vqlm.interop.") and name == function and description


def test_resolve_explains_what_is_missing(monkeypatch):
  with pytest.raises(UserError, match="unknown import format 'nope'; valid: chameleon, janus"):
    interop.resolve(interop.IMPORTERS, "nope", "import")
  registry = {"gone": ("vqlm.interop.not_written_yet:import_run", "")}
  with pytest.raises(UserError, match="not available in this vqlm .vqlm.interop.not_written_yet"):
    interop.resolve(registry, "gone", "import")
  monkeypatch.setitem(sys.modules, "vqlm_test_empty", types.ModuleType("vqlm_test_empty"))
  with pytest.raises(UserError, match="vqlm_test_empty.import_run is missing"):
    interop.resolve({"empty": ("vqlm_test_empty:import_run", "")}, "empty", "import")
  broken = types.ModuleType("vqlm_test_broken")
  monkeypatch.setitem(sys.modules, "vqlm_test_broken", broken)
  monkeypatch.setattr(
    interop.importlib,
    "import_module",
    lambda name: (_ for _ in ()).throw(ModuleNotFoundError("no torch", name="torch")),
  )
  with pytest.raises(UserError, match=r"needs the package 'torch'.*vqlm\[interop\]"):
    interop.resolve({"b": ("vqlm_test_broken:import_run", "")}, "b", "import")


def test_import_passes_paths_and_set_flags(capsys, stand_ins, tmp_path):
  src, tok = tmp_path / "src", tmp_path / "tok"
  src.mkdir()
  tok.mkdir()
  out = str(tmp_path / "run")
  code, printed, err = _main(
    capsys,
    "import",
    "--out",
    out,
    "fake",
    str(src),
    "--dtype=bfloat16",
    "--image_tokenizer",
    str(tok),
  )
  assert code == 0, err
  assert stand_ins == [
    (
      "import",
      str(src),
      out,
      {"overwrite": False, "dtype": "bfloat16", "image_tokenizer": str(tok)},
    )
  ]
  assert printed.strip() == f"wrote {out}"
  _main(capsys, "import", "fake", str(src), "--out", out, "--overwrite", "--image_size", "256")
  assert stand_ins[-1][3] == {"overwrite": True, "image_size": 256}


def test_export_passes_run_and_out(capsys, stand_ins, tmp_path):
  out = str(tmp_path / "hf")
  code, printed, err = _main(capsys, "export", "--format", "fake", str(tmp_path), out)
  assert code == 0, err
  assert stand_ins == [("export", str(tmp_path), out, {"overwrite": False})]


@pytest.mark.parametrize(
  "args, message",
  [
    (["import", "nope", "."], "unknown import format 'nope'; valid: chameleon"),
    (["import", "--out", "x"], "vqlm import takes FORMAT and SRC (got none)"),
    (["import", "fake", "--out", "x"], "vqlm import takes FORMAT and SRC (got 1: fake)"),
    (["import", "fake", "a", "b", "--out", "x"], "(got 3: fake a b)"),
    (["import", "fake", "/no/such/dir", "--out", "x"], "SRC /no/such/dir does not exist"),
    (["import", "fake", "."], "--out is required"),
    (["import", "fake", ".", "--out", "x", "--dtype", "int8"], "--dtype"),
    (["import", "fake", ".", "--out", "x", "--image_tokenizer", "/no/tok"], "/no/tok does not"),
    (["export", "--format", "fake", "/no/run", "x"], "RUN /no/run does not exist"),
    (["export", "--format", "onnx", ".", "x"], "--format"),
    (["export", "."], "vqlm export takes RUN and OUT (got 1: .)"),
  ],
)
def test_mistakes_are_one_line(capsys, stand_ins, args, message):
  code, _, err = _main(capsys, *args)
  assert code == 2
  assert message in _error(err)
  assert not stand_ins
  assert not os.path.exists("x")
