"""`vqlm report --workdir RUN`: write RUN/report.html, a self-contained page of a run.

RUN is an image-tokenizer run, an LM run (both of `vqlm train`) or the demo's directory: the page
shows what the run is, its eval.json tables, its training curves and the grids it saved
(`vqlm.report`). What the run did not produce reads "not run".
"""

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv, lambda f: f.DEFINE_string("workdir", None, "run directory (tokenizer, LM or demo)")
  )
  if not fv.workdir:
    raise UserError("--workdir is required: the run directory to report on")
  from vqlm import report

  kind = report.run_kind(fv.workdir, strict=True)
  path = report.write_report(fv.workdir, kind=kind)
  print(f"wrote {path} ({kind} report)")
  return 0
