"""`vqlm import FORMAT SRC --out RUN [...]` and `vqlm export --format llama RUN OUT`.

Public checkpoints in and out (`vqlm.interop`). `import` writes a vqlm run directory from a
Hugging Face style checkpoint directory (safetensors + config.json, read without torch), which
`vqlm generate|caption|eval|report` and `vqlm.load` then use as a trained run; `export` writes a
vqlm LM run as a Hugging Face Llama directory.

The formats are a registry of module paths (`IMPORTERS`, `EXPORTERS`), imported only when asked
for: an importer is `import_run(src, out, **flags) -> str` and an exporter
`export_run(run, out, **flags) -> str`, each returning the directory written.
"""

import contextlib
import importlib
import io
import os

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

# format -> ("module:function", what SRC is). Imported lazily, by `resolve`.
IMPORTERS = {
  "chameleon": (
    "vqlm.interop.chameleon:import_run",
    "Chameleon / Anole (transformers' ChameleonForConditionalGeneration): an LM run",
  ),
  "janus": (
    "vqlm.interop.janus:import_run",
    "Janus / Janus-Pro (transformers' JanusForConditionalGeneration): an LM run that draws, with "
    "its VQ tokenizer run in RUN/tokenizer (no captioning: its SigLIP encoder is not imported)",
  ),
  "llama": (
    "vqlm.interop.llama:import_run",
    "a Llama decoder (LlamaForCausalLM + tokenizer.json), new image ids for --image_tokenizer's "
    "codes; or a directory `vqlm export` wrote",
  ),
  "vqmodel": (
    "vqlm.interop.vqmodel:import_run",
    "a diffusers VQModel (taming VQGAN): an image tokenizer run",
  ),
}
EXPORTERS = {
  "llama": (
    "vqlm.interop.llama_export:export_run",
    "a Hugging Face LlamaForCausalLM directory (safetensors, config.json, the run's vocabulary)",
  ),
}
DTYPES = ("float32", "bfloat16")
_IMPORT_VALUE_FLAGS = ("out", "image_tokenizer", "dtype", "image_size")
_EXPORT_VALUE_FLAGS = ("format",)


def resolve(registry: dict[str, tuple[str, str]], name: str, what: str):
  """The function registered for `name` (`what` is "import" or "export"), imported now; a
  one-line UserError for an unknown name or a vqlm without that module."""
  if name not in registry:
    raise UserError(f"unknown {what} format {name!r}; valid: {', '.join(sorted(registry))}")
  module_name, function = registry[name][0].split(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
      raise UserError(
        f"vqlm {what} {name} is not available in this vqlm ({module_name} is missing); "
        "update vqlm (git pull, then pip install -e .)"
      ) from None
    raise UserError(
      f"vqlm {what} {name} needs the package {e.name!r}; install it: pip install 'vqlm[interop]'"
    ) from None
  fn = getattr(module, function, None)
  if not callable(fn):
    raise UserError(
      f"vqlm {what} {name} is not available in this vqlm ({module_name}.{function} is "
      "missing); update vqlm (git pull, then pip install -e .)"
    )
  return fn


def _split(argv: list[str], value_flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
  """(positional arguments, flag arguments) of `argv[1:]`; `--flag VALUE` keeps its value."""
  positional, flag_args = [], []
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("-") and arg != "-":
      flag_args.append(arg)
      name = arg.lstrip("-")
      if "=" not in name and name in value_flags and i + 1 < len(argv):
        flag_args.append(argv[i + 1])
        i += 1
    else:
      positional.append(arg)
    i += 1
  return positional, flag_args


def _parse(argv: list[str], define, value_flags, usage: list[str]):
  """Positional arguments and parsed flags; `--help` prints `usage` above the flags."""
  positional, flag_args = _split(argv, value_flags)
  if any(arg in flag_lib.HELP_FLAGS for arg in flag_args):
    buffer = io.StringIO()
    try:
      with contextlib.redirect_stdout(buffer):
        flag_lib.parse([argv[0], "--help"], define)
    finally:
      # command_help's text with the positional usage first and the formats before the flags.
      text = buffer.getvalue()
      description, _, flag_help = text[text.find("\n") + 1 :].partition("\nflags:\n")
      print("\n".join([usage[0], description.rstrip(), *usage[1:], "", "flags:"]))
      print(flag_help.rstrip())
  return positional, flag_lib.parse([argv[0]] + flag_args, define)


def _formats(registry: dict[str, tuple[str, str]]) -> list[str]:
  return [f"  {name:<10}{description}" for name, (_, description) in sorted(registry.items())]


def _define_import(f) -> None:
  f.DEFINE_string("out", None, "the vqlm run directory to write (required)")
  f.DEFINE_string(
    "image_tokenizer",
    None,
    "a vqlm image tokenizer run (e.g. from `vqlm import vqmodel`) whose codes are the imported "
    "LM's image ids; the run records it (llama; janus and chameleon bring their own VQ)",
  )
  f.DEFINE_boolean("overwrite", False, "replace an existing run in --out")
  f.DEFINE_enum(
    "dtype", None, list(DTYPES), "parameter dtype of the run (default: the checkpoint's)"
  )
  f.DEFINE_integer(
    "image_size",
    0,
    "side of the images an image tokenizer encodes (vqmodel; default: the source's)",
  )


def _define_export(f) -> None:
  f.DEFINE_enum("format", "llama", sorted(EXPORTERS), "the checkpoint format to write")
  f.DEFINE_boolean("overwrite", False, "replace a non-empty OUT")


def _existing(path: str, what: str) -> str:
  if "://" in path:
    raise UserError(f"{what} {path}: copy it to a local directory first (a URL is not read)")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise UserError(f"{what} {path} does not exist; fix the path")
  return path


def import_main(argv: list[str]) -> int:
  usage = [
    "usage: vqlm import FORMAT SRC --out RUN [--image_tokenizer TOK] [--overwrite] "
    f"[--dtype {'|'.join(DTYPES)}] [--image_size N]",
    "",
    "formats (SRC: a Hugging Face style directory, safetensors + config.json):",
    *_formats(IMPORTERS),
  ]
  positional, fv = _parse(argv, _define_import, _IMPORT_VALUE_FLAGS, usage)
  if len(positional) != 2:
    got = f"got {len(positional)}: {' '.join(positional)}" if positional else "got none"
    raise UserError(
      f"vqlm import takes FORMAT and SRC ({got}); e.g. vqlm import vqmodel DIR --out RUN "
      f"(formats: {', '.join(sorted(IMPORTERS))})"
    )
  name, src = positional
  import_run = resolve(IMPORTERS, name, "import")  # before the paths: the format is named first
  src = _existing(src, "SRC")
  if not fv.out:
    raise UserError("--out is required: the vqlm run directory to write")
  kwargs = {"overwrite": fv.overwrite}
  if fv.image_tokenizer:
    kwargs["image_tokenizer"] = _existing(fv.image_tokenizer, "--image_tokenizer")
  if fv.dtype:
    kwargs["dtype"] = fv.dtype
  if fv.image_size:
    kwargs["image_size"] = fv.image_size
  out = import_run(src, os.path.abspath(os.path.expanduser(fv.out)), **kwargs)
  print(f"wrote {out}")
  return 0


def export_main(argv: list[str]) -> int:
  usage = [
    "usage: vqlm export --format FORMAT RUN OUT [--overwrite]",
    "",
    "formats (RUN: a vqlm LM run; OUT: the directory to write):",
    *_formats(EXPORTERS),
  ]
  positional, fv = _parse(argv, _define_export, _EXPORT_VALUE_FLAGS, usage)
  if len(positional) != 2:
    got = f"got {len(positional)}: {' '.join(positional)}" if positional else "got none"
    raise UserError(
      f"vqlm export takes RUN and OUT ({got}); e.g. vqlm export --format llama RUN OUT"
    )
  run, out = positional
  export_run = resolve(EXPORTERS, fv.format, "export")
  run = _existing(run, "RUN")
  written = export_run(run, os.path.abspath(os.path.expanduser(out)), overwrite=fv.overwrite)
  print(f"wrote {written}")
  return 0


def main(argv: list[str]) -> int:
  """`argv[0]` is "vqlm import" or "vqlm export" (as `vqlm.cli` passes it)."""
  if argv[0].split()[-1] == "export":
    return export_main(argv)
  return import_main(argv)
