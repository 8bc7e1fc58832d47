"""`python -m vqlm.bench <lm|matmul|sample|sweep|tokenizer|soak|device|load> [flags]`
(also `vqlm bench ...`)."""

import importlib
import sys

from vqlm.errors import UserError
from vqlm.runtime import host_memory

BENCHMARKS = {
  "lm": "vqlm.bench.lm",
  "matmul": "vqlm.bench.matmul",
  "sample": "vqlm.bench.sample",
  "sweep": "vqlm.bench.sweep",
  "tokenizer": "vqlm.bench.tokenizer",
  "soak": "vqlm.bench.soak",
  "device": "vqlm.bench.device",
  "load": "vqlm.bench.load",
}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in BENCHMARKS:
    print(f"usage: python -m vqlm.bench <{'|'.join(BENCHMARKS)}> [--flags]", file=sys.stderr)
    return 2
  host_memory.reuse_host_memory()  # as the `vqlm` command does, before JAX starts
  module = importlib.import_module(BENCHMARKS[argv[0]])
  try:
    return int(module.main([f"vqlm.bench {argv[0]}"] + argv[1:]) or 0)
  except UserError as e:
    print(f"vqlm.bench {argv[0]}: error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # argparse's --help and usage errors
    return e.code if isinstance(e.code, int) else 2 if e.code else 0
  except Exception as e:
    # `--help` of a benchmark parsed with the commands' flags (imported only by those, so that
    # `device` runs without ml-collections).
    flags = sys.modules.get("vqlm.commands.flags")
    if flags is not None and isinstance(e, flags.HelpShown):
      return 0
    raise


if __name__ == "__main__":
  sys.exit(main())
