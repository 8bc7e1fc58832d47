"""`vqlm demo --workdir runs/demo [--preset smoke|default|long] [--stages tokenizer,lm,...]`.

Trains every stage on the built-in shapes data, evaluates, and writes WORKDIR/report.html.
Re-running resumes: finished stages are skipped.

`vqlm demo ladder --workdir runs/ladder [--preset smoke|default] [--main runs/demo]`: the same
test images through an autoencoder, a VAE, a VQ-VAE, FSQ, a VQ-GAN and a VQ + LM
(`vqlm.demo.ladder`), written to WORKDIR/ladder.html and WORKDIR/ladder.json.

`vqlm demo tuning --workdir runs/tuning [--main runs/demo] [--preset smoke|default]`: the main
demo's LM instruction-tuned (SFT), then preference-tuned (DPO, GRPO), each model measured
(`vqlm.demo.tuning`), written to WORKDIR/tuning.html and WORKDIR/tuning.json.

`vqlm demo video --workdir runs/video [--main runs/demo] [--preset smoke|default]`: the main demo's
LM trained on a mix of captions/images, video clips and image edits, measured on video
continuation, text-to-video and editing (`vqlm.demo.video`), written to WORKDIR/video.html and
WORKDIR/video.json.
"""

from vqlm.commands import flags as flag_lib

SUB_DEMOS = """
more demos (each with its own --help):
  vqlm demo ladder  the same images through an autoencoder, a VAE, a VQ-VAE, FSQ, a VQ-GAN, VQ + LM
  vqlm demo tuning  instruction (SFT) and preference tuning (DPO, GRPO) of the main demo's LM
  vqlm demo video   the main demo's LM on captions, video clips and image edits: continuation,
                    text-to-video, editing"""


def main(argv: list[str]) -> int:
  if argv[1:2] == ["ladder"]:
    return ladder_main([f"{argv[0]} ladder", *argv[2:]])
  if argv[1:2] == ["tuning"]:
    return tuning_main([f"{argv[0]} tuning", *argv[2:]])
  if argv[1:2] == ["video"]:
    return video_main([f"{argv[0]} video", *argv[2:]])
  from vqlm.demo import main as demo

  try:
    fv = flag_lib.parse(
      argv,
      lambda f: (
        f.DEFINE_string("workdir", "runs/demo", "demo directory (created; resumed if present)"),
        f.DEFINE_string("preset", "default", f"one of {', '.join(demo.PRESETS)}"),
        f.DEFINE_string("stages", "all", f"comma-separated subset of {', '.join(demo.STAGES)}"),
        f.DEFINE_string(
          "data_dir", "", "where the shapes data set is built (default WORKDIR/data)"
        ),
        f.DEFINE_bool("progress", True, "show progress bars"),
      ),
    )
  except flag_lib.HelpShown:
    print(SUB_DEMOS)
    raise
  workdir = flag_lib.check_workdir(fv.workdir)
  d = demo.Demo(workdir, preset=fv.preset, progress=fv.progress, data_dir=fv.data_dir)
  results = d.run(demo.main_stages(fv.stages))
  summary = []
  for section, key in (
    ("tokenizer", "psnr"),
    ("tokenizer", "scene_agreement"),
    ("text_to_image", "scene"),
    ("text_to_image_heldout", "scene"),
    ("text_to_image_reversed", "scene"),
    ("image_to_text", "scene"),
  ):
    if section in results and key in results[section]:
      summary.append(f"{section}.{key}={results[section][key]:.3f}")
  print("demo results: " + ", ".join(summary))
  print(f"report: {workdir}/report.html")
  return 0


def ladder_main(argv: list[str]) -> int:
  from vqlm.demo import ladder
  from vqlm.demo.ladder_recipe import PRESETS

  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("workdir", "runs/ladder", "ladder directory (created; resumed if present)"),
      f.DEFINE_string("preset", "default", f"one of {', '.join(PRESETS)}"),
      f.DEFINE_string(
        "main",
        "",
        "a main demo's directory (`vqlm demo`): its tokenizer and LM are the VQ + LM "
        "rung (default: train a small LM on the FSQ rung's codes)",
      ),
      f.DEFINE_string("stages", "all", f"comma-separated subset of {', '.join(ladder.STAGES)}"),
      f.DEFINE_string("data_dir", "", "where the shapes data set is built (default WORKDIR/data)"),
      f.DEFINE_bool("progress", True, "show progress bars"),
    ),
  )
  workdir = flag_lib.check_workdir(fv.workdir)
  run = ladder.Ladder(
    workdir, preset=fv.preset, main=fv.main, progress=fv.progress, data_dir=fv.data_dir
  )
  results = run.run(ladder.ladder_stages(fv.stages))
  summary = []
  for section in ("random_points", "interpolation"):
    for rung, entry in (results.get(section) or {}).items():
      if isinstance(entry, dict) and "valid_scene" in entry:
        summary.append(f"{section}.{rung}={entry['valid_scene']:.2f}")
  best = (results.get("attributes") or {}).get("best")
  if best:
    summary.append(f"attributes.best={best}")
  print("ladder results: " + ", ".join(summary))
  print(f"report: {workdir}/ladder.html")
  return 0


def tuning_main(argv: list[str]) -> int:
  from vqlm.demo import tuning
  from vqlm.demo.tuning_recipe import PRESETS

  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("workdir", "runs/tuning", "tuning directory (created; resumed if present)"),
      f.DEFINE_string("preset", "default", f"one of {', '.join(PRESETS)}"),
      f.DEFINE_string(
        "main",
        "runs/demo",
        "a main demo's directory (`vqlm demo`, the same preset): its LM is the starting point",
      ),
      f.DEFINE_string("stages", "all", f"comma-separated subset of {', '.join(tuning.STAGES)}"),
      f.DEFINE_bool("progress", True, "show progress bars"),
    ),
  )
  workdir = flag_lib.check_workdir(fv.workdir)
  run = tuning.Tuning(workdir, main=fv.main, preset=fv.preset, progress=fv.progress)
  results = run.run(tuning.tuning_stages(fv.stages))
  summary = []
  for model, entry in (results.get("models") or {}).items():
    for section, key in (("requests", "scene"), ("heldout_requests", "scene")):
      value = (entry.get(section) or {}).get(key)
      if isinstance(value, float):
        summary.append(f"{model}.{section}={value:.3f}")
  print("tuning results: " + ", ".join(summary))
  print(f"report: {workdir}/tuning.html")
  return 0


def video_main(argv: list[str]) -> int:
  from vqlm.demo import video
  from vqlm.demo.video_recipe import PRESETS

  fv = flag_lib.parse(
    argv,
    lambda f: (
      f.DEFINE_string("workdir", "runs/video", "video directory (created; resumed if present)"),
      f.DEFINE_string("preset", "default", f"one of {', '.join(PRESETS)}"),
      f.DEFINE_string(
        "main",
        "runs/demo",
        "a main demo's directory (`vqlm demo`, the same preset): its LM is the starting point, "
        "its tokenizer encodes the clips",
      ),
      f.DEFINE_string("stages", "all", f"comma-separated subset of {', '.join(video.STAGES)}"),
      f.DEFINE_bool("progress", True, "show progress bars"),
    ),
  )
  workdir = flag_lib.check_workdir(fv.workdir)
  run = video.Video(workdir, main=fv.main, preset=fv.preset, progress=fv.progress)
  results = run.run(video.video_stages(fv.stages))
  summary = []
  mixed = (results.get("models") or {}).get("mixed") or {}
  for section, key in (
    ("video_continuation", "next_frame"),
    ("video_continuation", "third_frame"),
    ("text_to_video", "clip_accuracy"),
    ("edit_test", "accuracy"),
    ("edit_heldout", "accuracy"),
    ("text_to_image", "scene"),
    ("image_to_text", "scene"),
  ):
    value = (mixed.get(section) or {}).get(key)
    if isinstance(value, float):
      summary.append(f"{section}.{key}={value:.3f}")
  print("video results: " + ", ".join(summary))
  print(f"report: {workdir}/video.html")
  return 0
