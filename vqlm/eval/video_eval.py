"""Video measures of an LM on moving shapes: continuation and text-to-video, judged per frame.

Clips are `moving_shapes.MovingShapesSource(split=..., image_size=<the LM's image tokenizer's>,
num_frames=..., seed=...)` items: one object moving at constant speed. A generated frame is right
(`judge_frame`) when the scene parser (`scene_parser.object_boxes`) reads exactly one object, with
the clip object's colour, shape and size, whose top-left corner (the smallest row and column of its
pixels) is within `TOLERANCE` px of the same measure on the true frame.

Evaluators (`config.evals`, stage "lm"):

    evals = {"video": {"type": "video_continuation", "given_frames": 3, "num_frames": 6},
             "t2v": {"type": "text_to_video", "num_frames": 6, "cfg_scale": 2.0}}

- "video_continuation": the first `given_frames` frames of each clip (encoded by the LM's image
  tokenizer; with `with_caption`, after the clip's caption) -> the rest; the accuracy per offset
  after the last given frame (`accuracy_by_offset`, `next_frame` = offset 1, `third_frame` =
  offset 3).
- "text_to_video": the caption alone (`<bos> caption <boi>`) -> every frame; `clip_accuracy` (all
  frames right) and `frame_accuracy`.

Artefacts: `video_NAME.json` (each clip's caption, true boxes and per-frame verdicts) and
`video_NAME.png` (the first clips as strips, rows given | generated | true, aligned in time).
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

import numpy as np

from vqlm.data import moving_shapes, shapes
from vqlm.errors import UserError
from vqlm.eval import evaluators, scene_parser

TOLERANCE = 1  # px between the generated and the true object's top-left corner.
SHOWN_CLIPS = 8  # clips drawn in the png.
_BLANK = 48  # grey of the empty cells of a strip (the shapes background is black).


def frame_truth(clip: Mapping[str, Any]) -> list[dict]:
  """Per frame of `clip` (a `moving_shapes` item): the object's `color`, `shape`, `size` (the
  clip's) and the `top` / `left` corner `object_boxes` reads on the true frame."""
  truth = []
  for t, (frame, scene) in enumerate(zip(clip["frames"], clip["scenes"])):
    boxes = scene_parser.object_boxes(frame)
    if len(boxes) != 1:
      raise UserError(
        f"frame {t} of the clip '{clip['text']}' parses as {len(boxes)} objects; video measures "
        "need images of at least 30 px (the tokenizer's image_size)"
      )
    obj = {a: scene[0][a] for a in scene_parser.ATTRIBUTES}
    truth.append({**obj, "top": boxes[0]["top"], "left": boxes[0]["left"]})
  return truth


def judge_frame(
  image: np.ndarray, truth: Mapping[str, Any], *, tolerance: int = TOLERANCE
) -> dict[str, Any]:
  """Verdict on a generated frame uint8 `[H, W, 3]` against its `frame_truth` entry:
  `{"right": bool, "appearance": bool (one object of the right colour, shape and size, wherever
  it is), "objects": the parsed objects with their corners}`."""
  objects = scene_parser.object_boxes(image)
  appearance = len(objects) == 1 and all(objects[0][a] == truth[a] for a in scene_parser.ATTRIBUTES)
  right = (
    appearance
    and abs(objects[0]["top"] - truth["top"]) <= tolerance
    and abs(objects[0]["left"] - truth["left"]) <= tolerance
  )
  return {"right": bool(right), "appearance": bool(appearance), "objects": objects}


def load_clips(
  *, split: str, num_clips: int, num_frames: int, image_size: int, seed: int = 0
) -> list[dict]:
  """The first `num_clips` clips of `MovingShapesSource(split, image_size, num_frames, seed)`."""
  if num_clips <= 0:
    raise UserError(f"num_clips={num_clips} must be >= 1.")
  source = moving_shapes.MovingShapesSource(
    split=split, image_size=image_size, num_frames=num_frames, seed=seed
  )
  return [source[i] for i in range(min(num_clips, len(source)))]


def _judge_all(
  clips: Sequence[Mapping[str, Any]], generated: np.ndarray, first: int
) -> list[list[dict]]:
  """Verdicts `[N][n]` of generated frames `[N, n, H, W, 3]` against true frames `first ...`."""
  verdicts = []
  for clip, frames in zip(clips, generated):
    truth = frame_truth(clip)[first : first + len(frames)]
    verdicts.append([judge_frame(f, t) for f, t in zip(frames, truth)])
  return verdicts


def _rates(verdicts: list[list[dict]]) -> dict[str, Any]:
  right = np.array([[v["right"] for v in row] for row in verdicts], bool)  # [N, n]
  look = np.array([[v["appearance"] for v in row] for row in verdicts], bool)
  return {
    "by_frame": [float(x) for x in right.mean(0)],
    "frame_accuracy": float(right.mean()),
    "clip_accuracy": float(right.all(1).mean()),
    "appearance_accuracy": float(look.mean()),
  }


def continuation_accuracy(
  generator: Any,
  clips: Sequence[Mapping[str, Any]],
  *,
  given_frames: int = 3,
  with_caption: bool = False,
  sampling: Any = None,
  seed: int = 0,
  batch_size: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, list[list[dict]]]:
  """Continues each clip from its first `given_frames` frames (`generator.continue_videos`) and
  judges the generated frames.

  Args:
    generator: a `vqlm.sample.api.Generator` of a video LM.
    clips: `moving_shapes` items (`load_clips`), all with the same number of frames T.
    given_frames: K, frames in the prompt (1 <= K < T); T - K frames are generated.
    with_caption: prompts start with the clip's caption.
  Returns:
    (metrics, generated uint8 `[N, T - K, H, W, 3]`, verdicts `[N][T - K]` of `judge_frame`);
    metrics: `accuracy_by_offset` ({"1": .., ...}: offset d is frame K + d), `next_frame`,
    `third_frame` (when T - K >= 3), `clip_accuracy` (every generated frame right),
    `appearance_accuracy` (position ignored), `num_clips`.
  """
  num_frames = _num_frames(clips)
  if not 1 <= given_frames < num_frames:
    raise UserError(
      f"given_frames={given_frames} must be in [1, {num_frames - 1}] for clips of "
      f"{num_frames} frames."
    )
  generated = generator.continue_videos(
    [clip["frames"][:given_frames] for clip in clips],
    num_new_frames=num_frames - given_frames,
    captions=[clip["text"] for clip in clips] if with_caption else None,
    sampling=sampling,
    seed=seed,
    batch_size=batch_size,
  )
  verdicts = _judge_all(clips, generated, given_frames)
  rates = _rates(verdicts)
  by_offset = {str(d + 1): acc for d, acc in enumerate(rates["by_frame"])}
  metrics = {"accuracy_by_offset": by_offset, "next_frame": by_offset["1"]}
  if "3" in by_offset:
    metrics["third_frame"] = by_offset["3"]
  metrics.update(
    clip_accuracy=rates["clip_accuracy"],
    appearance_accuracy=rates["appearance_accuracy"],
    num_clips=len(clips),
  )
  return metrics, generated, verdicts


def text_to_video_accuracy(
  generator: Any,
  clips: Sequence[Mapping[str, Any]],
  *,
  cfg_scale: float | None = None,
  sampling: Any = None,
  seed: int = 0,
  batch_size: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, list[list[dict]]]:
  """Draws every frame of each clip from its caption alone (prompt `<bos> caption <boi>`) and
  judges them.

  Returns:
    (metrics, generated uint8 `[N, T, H, W, 3]`, verdicts `[N][T]`); metrics: `clip_accuracy`
    (every frame right), `frame_accuracy`, `accuracy_by_frame` ({"1": .., ...}),
    `appearance_accuracy` (position ignored), `num_clips`.
  """
  num_frames = _num_frames(clips)
  generated = generator.continue_videos(
    [clip["frames"][:0] for clip in clips],
    num_new_frames=num_frames,
    captions=[clip["text"] for clip in clips],
    cfg_scale=cfg_scale,
    sampling=sampling,
    seed=seed,
    batch_size=batch_size,
  )
  verdicts = _judge_all(clips, generated, 0)
  rates = _rates(verdicts)
  metrics = {
    "clip_accuracy": rates["clip_accuracy"],
    "frame_accuracy": rates["frame_accuracy"],
    "accuracy_by_frame": {str(t + 1): acc for t, acc in enumerate(rates["by_frame"])},
    "appearance_accuracy": rates["appearance_accuracy"],
    "num_clips": len(clips),
  }
  return metrics, generated, verdicts


def _num_frames(clips: Sequence[Mapping[str, Any]]) -> int:
  if not clips:
    raise UserError("no clips given; pass at least one moving_shapes clip.")
  lengths = {len(clip["frames"]) for clip in clips}
  if len(lengths) != 1:
    raise UserError(f"clips of {sorted(lengths)} frames; pass clips of one length.")
  return lengths.pop()


def strips(
  clips: Sequence[Mapping[str, Any]], generated: np.ndarray, given_frames: int
) -> np.ndarray:
  """One uint8 image of the clips as strips of T columns (time): rows given (frames 1..K), generated
  (frames K+1..T) and true (all T), empty cells grey; no given row when K = 0."""
  from vqlm import imaging

  cells = []
  for clip, gen in zip(clips, generated):
    true = np.asarray(clip["frames"])
    blank = np.full_like(true[:1], _BLANK)
    rest = np.repeat(blank, len(true) - given_frames, axis=0)
    if given_frames:
      cells += [true[:given_frames], rest]
    cells += [np.repeat(blank, given_frames, axis=0), gen, true]
  return imaging.make_grid(np.concatenate(cells), columns=len(clips[0]["frames"]), scale=3)


def _records(
  clips: Sequence[Mapping[str, Any]], verdicts: list[list[dict]], given_frames: int
) -> list[dict]:
  return [
    {
      "text": clip["text"],
      "given_frames": given_frames,
      "truth": frame_truth(clip)[given_frames:],
      "verdicts": [dict(v) for v in row],
    }
    for clip, row in zip(clips, verdicts)
  ]


# ---- evaluators ---------------------------------------------------------------------------------


def _check_data(run: Any) -> int:
  """The LM's image size; a one-line refusal unless its tokenizer was trained on shapes."""
  data = run.tokenizer_run().config.data
  if data.name not in ("shapes", "moving_shapes"):
    raise UserError(
      f"the video measures judge frames with the shapes scene parser; the run's tokenizer used "
      f"'{data.name}'. Leave them out of config.evals for this data set"
    )
  return int(data.image_size)


class _Video(evaluators.Evaluator):
  """Settings shared by the video evaluators; `run` writes the artefacts."""

  stage = "lm"
  kind = ""

  def __init__(
    self,
    *,
    split: str = "test",
    num_clips: int = 100,
    num_frames: int = 6,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    log_fn=print,
  ):
    if split not in shapes.SPLITS:
      raise UserError(f"{self.kind} split={split!r}; use one of {shapes.SPLITS}")
    if not moving_shapes.MIN_FRAMES <= num_frames <= moving_shapes.MAX_FRAMES:
      raise UserError(
        f"{self.kind} num_frames={num_frames}; use {moving_shapes.MIN_FRAMES}.."
        f"{moving_shapes.MAX_FRAMES}"
      )
    if num_clips <= 0:
      raise UserError(f"{self.kind} num_clips={num_clips} must be >= 1")
    super().__init__(
      log_fn,
      split=split,
      num_clips=num_clips,
      num_frames=num_frames,
      temperature=temperature,
      top_k=top_k,
      seed=seed,
      batch_size=batch_size,
    )

  def measure(self, generator, clips, sampling) -> tuple[dict, np.ndarray, list[list[dict]]]:
    raise NotImplementedError

  def run(self, run, artefacts=None):
    from vqlm import imaging

    s = self.settings
    clips = load_clips(
      split=s["split"],
      num_clips=s["num_clips"],
      num_frames=s["num_frames"],
      image_size=_check_data(run),
      seed=s["seed"],
    )
    generator = run.generator(batch_size=s["batch_size"])
    sampling = evaluators._sampling(s["temperature"], s["top_k"])
    metrics, generated, verdicts = self.measure(generator, clips, sampling)
    given = s.get("given_frames", 0)
    metrics["split"] = s["split"]
    metrics["settings"] = {k: v for k, v in s.items() if k not in ("split", "name")}
    if artefacts:
      name = s.get("name", self.kind)
      os.makedirs(artefacts, exist_ok=True)
      with open(os.path.join(artefacts, f"video_{name}.json"), "w", encoding="utf-8") as f:
        json.dump({"metrics": metrics, "clips": _records(clips, verdicts, given)}, f, indent=1)
      shown = min(SHOWN_CLIPS, len(clips))
      grid = strips(clips[:shown], generated[:shown], given)
      imaging.save_png(grid, os.path.join(artefacts, f"video_{name}.png"))
    return metrics


class VideoContinuation(_Video):
  """Continuation of `num_clips` clips of `split` from their first `given_frames` frames
  (`continuation_accuracy`; `with_caption`: the caption first)."""

  kind = "video_continuation"

  def __init__(self, *, given_frames: int = 3, with_caption: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.settings.update(given_frames=given_frames, with_caption=bool(with_caption))
    if not 1 <= given_frames < self.settings["num_frames"]:
      raise UserError(
        f"video_continuation given_frames={given_frames}; use 1..{self.settings['num_frames'] - 1}"
      )

  def measure(self, generator, clips, sampling):
    s = self.settings
    return continuation_accuracy(
      generator,
      clips,
      given_frames=s["given_frames"],
      with_caption=s["with_caption"],
      sampling=sampling,
      seed=s["seed"],
    )


class TextToVideo(_Video):
  """Every frame of `num_clips` clips of `split` from their captions (`text_to_video_accuracy`;
  `cfg_scale` 1: no guidance)."""

  kind = "text_to_video"

  def __init__(self, *, cfg_scale: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    self.settings["cfg_scale"] = float(cfg_scale)

  def measure(self, generator, clips, sampling):
    s = self.settings
    return text_to_video_accuracy(
      generator, clips, cfg_scale=s["cfg_scale"], sampling=sampling, seed=s["seed"]
    )
