"""`python -m vqlm.bench <lm|matmul|sample|sweep|tokenizer|soak|device> [flags]`
(also `vqlm bench ...`)."""

import importlib
import sys

from vqlm.runtime import host_memory

BENCHMARKS = {
  "lm": "vqlm.bench.lm",
  "matmul": "vqlm.bench.matmul",
  "sample": "vqlm.bench.sample",
  "sweep": "vqlm.bench.sweep",
  "tokenizer": "vqlm.bench.tokenizer",
  "soak": "vqlm.bench.soak",
  "device": "vqlm.bench.device",
}


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in BENCHMARKS:
    print(f"usage: python -m vqlm.bench <{'|'.join(BENCHMARKS)}> [--flags]", file=sys.stderr)
    return 2
  host_memory.reuse_host_memory()  # as the `vqlm` command does, before JAX starts
  module = importlib.import_module(BENCHMARKS[argv[0]])
  return int(module.main([f"vqlm.bench {argv[0]}"] + argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
