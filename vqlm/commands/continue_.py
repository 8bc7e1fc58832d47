"""`vqlm continue --workdir LM_RUN --text "a red square" --image x.png --text "then" --out DIR`.

Continues one interleaved prompt with a trained LM run. The prompt is the `--text "..."` and
`--image PATH` flags in the order they are given on the command line; images are resized to the
image tokenizer's size (as `vqlm caption` does). Writes to the directory `--out`:

  DIR/continuation.txt        the generated text, each generated image as `<image k>`
  DIR/image_000.png ...       the generated images (k = 0, 1, ...)

`--mode` constrains what is generated: `interleaved` (text and images, the default), `text` (no
images) or `image` (`--num_images` images, then stop).

Edit: `vqlm continue --workdir LM_RUN --edit --text "make the red circle blue" --image scene.png`
with an LM trained on reasoned edits (the video demo's): the model writes its reason, the object
the edit acts on chosen among its caption's objects by its likelihood (`vqlm.sample.edit`;
`--nochoose_object`: the greedy reason), then draws the result: `DIR/continuation.txt` holds the
reason and `<image 0>`, `DIR/image_000.png` the edited image.

Video: `vqlm continue --workdir LM_RUN --frames f1.png,f2.png --num_frames 4 [--caption "..."]`
continues the clip given by its frames and writes `DIR/frame_000.png ...` (the new frames only).
"""

import os

from vqlm.commands import flags as flag_lib
from vqlm.errors import UserError

PART_FLAGS = ("text", "image")
TEXT_FILE = "continuation.txt"


def load_run(workdir: str, tokenizer: str | None = None):
  """The LM run in `workdir`, parameters only (a seam for tests)."""
  from vqlm.runs import LMRun

  return LMRun(workdir, tokenizer=tokenizer or None)


def reason_style(run) -> str:
  """The reason style of the run's edit documents, "" without reasons (a seam for tests)."""
  from vqlm.eval.edit_eval import run_reasons_edits

  return run_reasons_edits(run.config)


def ordered_parts(argv: list[str]) -> list[tuple[str, str]]:
  """`(flag, value)` of each `--text` / `--image` in command-line order (absl keeps the order of
  one multi flag's values, not the order between two flags)."""
  parts, i = [], 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      break
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name in PART_FLAGS:
      if "=" in arg:
        parts.append((name, value))
      elif i + 1 < len(argv):
        parts.append((name, argv[i + 1]))
        i += 1
    i += 1
  return parts


def write_continuation(out_dir: str, segments: list) -> tuple[str, int]:
  """`continuation.txt` (text runs, `<image k>` for image k) and `image_{k:03d}.png`."""
  from vqlm import imaging

  pieces, k = [], 0
  for segment in segments:
    if isinstance(segment, str):
      if segment.strip():
        pieces.append(segment.strip())
      continue
    imaging.save_png(segment, os.path.join(out_dir, f"image_{k:03d}.png"))
    pieces.append(f"<image {k}>")
    k += 1
  text = " ".join(pieces)
  with open(os.path.join(out_dir, TEXT_FILE), "w") as f:
    f.write(text + "\n")
  return text, k


def main(argv: list[str]) -> int:
  fv = flag_lib.parse(
    argv,
    lambda f: (
      flag_lib.define_lm_run(f),
      f.DEFINE_multi_string("text", [], "a text part of the prompt (order on the line counts)"),
      f.DEFINE_multi_string("image", [], "an image part of the prompt (order on the line counts)"),
      f.DEFINE_string("frames", None, "video: comma-separated frame images f1.png,f2.png,..."),
      f.DEFINE_integer("num_frames", None, "video: new frames to generate after --frames"),
      f.DEFINE_string("caption", "", "video: the clip's caption (before its frames)"),
      f.DEFINE_enum(
        "mode", "interleaved", ["interleaved", "text", "image"], "what may be generated"
      ),
      f.DEFINE_integer("num_images", 1, "--mode image: images to generate"),
      f.DEFINE_bool(
        "edit",
        False,
        "an image edit (--text INSTRUCTION --image SOURCE) by an LM trained on reasoned edits: "
        "the reason, then the edited image",
      ),
      f.DEFINE_bool(
        "choose_object",
        True,
        "--edit: the object the reason acts on is chosen among its caption's objects by the "
        "model's likelihood (--nochoose_object: the greedy reason)",
      ),
      f.DEFINE_integer("max_new_tokens", 128, "most new tokens (not for --frames)"),
      f.DEFINE_float("temperature", 1.0, "text and image-code temperature (0 = greedy)"),
      f.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = all)"),
      f.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)"),
      f.DEFINE_integer("seed", 0, "random seed (same seed, same continuation)"),
      f.DEFINE_string("out", "continuation", "output directory"),
      f.DEFINE_bool("progress", False, "show a progress bar"),
      f.DEFINE_enum(
        "dtype",
        "model",
        ["model", "float32", "bfloat16"],
        "sampling weights and compute: the model's own, or cast",
      ),
    ),
  )
  if not fv.workdir:
    raise UserError("--workdir is required: the LM run directory")
  video = fv.frames is not None
  parts = ordered_parts(argv)
  if [v for k, v in parts if k == "text"] != fv.text or [
    v for k, v in parts if k == "image"
  ] != fv.image:
    raise UserError("cannot read the order of --text/--image; write them as --text=... --image=...")
  if fv.edit and (video or [k for k, _ in parts] != ["text", "image"]):
    raise UserError('--edit takes one --text "instruction" then one --image SOURCE, no --frames')
  if video:
    frames = [p.strip() for p in fv.frames.split(",") if p.strip()]
    if not frames:
      raise UserError("--frames is empty: pass f1.png,f2.png,... (comma-separated)")
    if parts:
      raise UserError("--frames cannot be mixed with --text/--image; use --caption for the text")
    if fv.num_frames is None or fv.num_frames <= 0:
      raise UserError("--num_frames N (>= 1) is required with --frames: the new frames to draw")
    if fv["mode"].present or fv["num_images"].present:
      raise UserError("--mode and --num_images do not apply to --frames (video continuation)")
  else:
    if not parts:
      raise UserError('no prompt given: pass --text "..." and/or --image PATH (or --frames)')
    if fv.num_frames is not None or fv.caption:
      raise UserError("--num_frames and --caption go with --frames (video continuation)")
    if fv.max_new_tokens <= 0 or fv.num_images <= 0:
      raise UserError("--max_new_tokens and --num_images must be >= 1")
  from vqlm.commands.caption import fit_images, read_images

  frame_images = read_images(frames, "--frames") if video else []  # before the (slow) run loads
  part_images = read_images(fv.image, "--image")
  out_dir = flag_lib.check_workdir(fv.out, "--out")
  from vqlm import imaging
  from vqlm.sample.api import generator_for
  from vqlm.sample.processors import SamplingConfig, Settings

  settings = Settings(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)
  sampling = SamplingConfig(text=settings, image=settings).check()
  run = load_run(fv.workdir, fv.tokenizer)
  if fv.edit and not reason_style(run):
    raise UserError(
      "--edit needs an LM trained on reasoned edits (config.data.edit.reason, as the video "
      "demo's); for another LM use --mode image --num_images 1"
    )
  gen = generator_for(run, dtype=None if fv.dtype == "model" else fv.dtype)
  gen.progress = fv.progress
  size = getattr(gen.image_tokenizer, "image_size", None)
  if video:
    new = gen.continue_video(
      fit_images(frame_images, size, "--frames"),
      num_new_frames=fv.num_frames,
      caption=fv.caption,
      sampling=sampling,
      seed=fv.seed,
    )
    for k, frame in enumerate(new):
      imaging.save_png(frame, os.path.join(out_dir, f"frame_{k:03d}.png"))
    print(f"wrote {out_dir}: {len(new)} frames frame_000.png ... frame_{len(new) - 1:03d}.png")
    return 0
  if fv.edit:
    return _edit(gen, fv, fit_images(part_images, size), sampling, out_dir)
  images = iter(fit_images(part_images, size) if part_images else [])
  prompt = [value if kind == "text" else next(images) for kind, value in parts]
  out = gen.continue_sequence(
    [prompt],
    max_new_tokens=fv.max_new_tokens,
    mode=fv.mode,
    sampling=sampling,
    seed=fv.seed,
    num_images=fv.num_images,
  )[0]
  text, num_images = write_continuation(out_dir, out.segments)
  print(text)
  print(f"wrote {out_dir}: {TEXT_FILE} and {num_images} image(s)")
  return 0


def _edit(gen, fv, images, sampling, out_dir: str) -> int:
  from vqlm.sample import edit as sample_edit

  style = reason_style(gen.run)
  edited, reasons = sample_edit.edit_images(
    gen,
    fv.text,
    images,
    style=style,
    choose_object=fv.choose_object and style in sample_edit.CHOOSABLE,
    sampling=sampling,
    seed=fv.seed,
  )
  text, _ = write_continuation(out_dir, [reasons[0], edited[0]])
  print(text)
  print(f"wrote {out_dir}: {TEXT_FILE} and image_000.png")
  return 0
