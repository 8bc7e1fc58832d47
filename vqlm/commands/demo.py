"""`vqlm demo --workdir runs/demo [--preset smoke|default|long] [--stages tokenizer,lm,...]`.

Trains every stage on the built-in shapes data, evaluates, and writes WORKDIR/report.html.
Re-running resumes: finished stages are skipped.
"""

from vqlm.commands import flags as flag_lib


def main(argv: list[str]) -> int:
  from vqlm.demo import main as demo

  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("workdir", "runs/demo", "demo directory (created; resumed if present)"),
      f.DEFINE_string("preset", "default", f"one of {', '.join(demo.PRESETS)}"),
      f.DEFINE_string("stages", "all", f"comma-separated subset of {', '.join(demo.STAGES)}"),
      f.DEFINE_string("data_dir", "", "where the shapes data set is built (default WORKDIR/data)"),
      f.DEFINE_bool("progress", True, "show progress bars"),
    ),
  )
  workdir = flag_lib.check_workdir(fv.workdir)
  d = demo.Demo(workdir, preset=fv.preset, progress=fv.progress, data_dir=fv.data_dir)
  results = d.run(demo.main_stages(fv.stages))
  summary = []
  for section, key in (
    ("tokenizer", "psnr"),
    ("tokenizer", "scene_agreement"),
    ("text_to_image", "scene"),
    ("text_to_image_heldout", "scene"),
    ("image_to_text", "scene"),
  ):
    if section in results and key in results[section]:
      summary.append(f"{section}.{key}={results[section][key]:.3f}")
  print("demo results: " + ", ".join(summary))
  print(f"report: {workdir}/report.html")
  return 0
